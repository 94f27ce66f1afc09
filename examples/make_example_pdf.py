"""Render the bundled example document: the opening of *The Leavenworth Case* as a PDF.

*The Leavenworth Case* (Anna Katharine Green, 1878) is in the public domain (Project Gutenberg
ebook #4047, part of the PG19 test split). This script takes the book's text from a PG19 copy
(``--data``, e.g. ``../shared/data`` next to the repository), keeps its opening (the title and
table of contents, Book I up to a paragraph boundary after ``--chars`` characters: about 18.5k
SmolLM2 tokens, ~2.3x that model's 8k window) and renders it with fpdf2 into
``examples/leavenworth_case.pdf``.

One paragraph is planted, clearly labelled, at the paragraph boundary nearest the middle:
``PLANTED`` below (a "secret word", in the style of the passkey test). The default model
(SmolLM2-135M-Instruct) is too small to answer questions about the novel itself even within its
window, so this fact, which exists nowhere else in the document, is what
``chunkllama chat --pdf examples/leavenworth_case.pdf --question "What is the secret word?"
--answer-prefix "The secret word is"`` shows it retrieving from the middle of a document longer
than twice its window. Pass ``--no-plant`` to render the book alone.

Apart from that paragraph nothing is added to or changed in the book's words: typographic
quotes, dashes and non-breaking spaces are written as their ASCII equivalents because the PDF's
built-in Helvetica font is Latin-1 only, and the Gutenberg production credit line is dropped. The
output is byte-for-byte reproducible (fixed creation date).

    python examples/make_example_pdf.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

BOOK = "4047_the_leavenworth_case.txt"
ASCII = {"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2014": "--", "\u2013": "-",
         "\u00a0": " ", "\u2026": "...", "\u00e6": "ae", "\u0153": "oe"}


PLANTED = ("NOTE: the secret word is marmalade. Remember it. marmalade is the secret word. "
           "The secret word is marmalade.")


def plant(text: str, paragraph: str) -> str:
    """``text`` with ``paragraph`` inserted at the first paragraph break after its middle."""
    middle = text.find("\n\n", len(text) // 2)
    return text[:middle] + "\n\n" + paragraph + text[middle:]


def excerpt(text: str, chars: int) -> str:
    """The book's opening, cut at the first paragraph break after ``chars`` characters."""
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[0].startswith("Produced by"):
        lines = lines[1:]
    body = "\n".join(lines).strip()
    cut = body.find("\n\n", chars)
    body = body if cut < 0 else body[:cut]
    for fancy, plain in ASCII.items():
        body = body.replace(fancy, plain)
    return body.encode("latin-1", errors="replace").decode("latin-1")


def render(text: str, out: Path) -> None:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_creation_date(datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc))
    pdf.set_title("The Leavenworth Case (opening chapters)")
    pdf.set_author("Anna Katharine Green")
    pdf.set_margins(20, 20, 20)
    pdf.set_auto_page_break(True, margin=20)
    pdf.add_page()
    pdf.set_font("helvetica", size=11)
    for paragraph in text.split("\n\n"):
        pdf.multi_cell(0, 5.5, " ".join(paragraph.split("\n")).strip() or " ", new_x="LMARGIN", new_y="NEXT")
        pdf.ln(2.5)
    pdf.output(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder holding pg19/")
    parser.add_argument("--chars", type=int, default=70_000, help="characters of the book to keep")
    parser.add_argument("--no-plant", action="store_true", help="do not plant the secret-word paragraph")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "leavenworth_case.pdf")
    args = parser.parse_args()
    source = args.data / "pg19" / BOOK
    if not source.is_file():
        raise SystemExit(f"error: {source} not found; pass --data DIR with DIR/pg19/{BOOK}")
    text = excerpt(source.read_text(encoding="utf-8"), args.chars)
    render(text if args.no_plant else plant(text, PLANTED), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
