"""The README's screenshot of the web page: ``chunkllama serve`` (default model unless --model) in
a headless Debian chromium, a PDF uploaded, a question asked, the streamed answer shown.

Without ``--file`` the PDF is made from the opening of *The Leavenworth Case* (PG19, public domain)
under ``--data``: about 10k tokens, past SmolLM2's 8k window.

    python bench/web_screenshot.py --data ../shared/data --out docs/serve_web.png

The committed ``docs/serve_web.png`` (the bundled PDF, 18k tokens = 2.2x SmolLM2's window; the planted
secret word found; the follow-up served from the prefix cache, 18122 of 18148 tokens cached):

    python bench/web_screenshot.py --file examples/leavenworth_case.pdf --question "What is the secret word?" \
        --question "What is the secret word? Say it once more." --answer-prefix "The secret word is" \
        --max-tokens 12 --out docs/serve_web.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "serving"))  # the browser driver of the web test
from serve_client import running_server  # noqa: E402

ASCII = {"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2014": "--", "\u2013": "-"}


def book_pdf(data: Path, out: Path, characters: int) -> Path:
    import fpdf

    text = (data / "pg19" / "4047_the_leavenworth_case.txt").read_text(encoding="utf-8")
    start = text.index("I had been a junior partner")
    body = "".join(ASCII.get(c, c) for c in text[start:start + characters]).encode("latin-1", "replace").decode("latin-1")
    pdf = fpdf.FPDF()
    pdf.set_font("helvetica", size=10)
    pdf.add_page()
    pdf.multi_cell(0, 5, "THE LEAVENWORTH CASE, by Anna Katherine Green (1878)\n\n" + body)
    pdf.output(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--file", type=Path, default=None, help="PDF or text file to upload")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--characters", type=int, default=40000, help="book characters in the generated PDF")
    parser.add_argument("--question", action="append", default=None,
                        help="question to ask (repeat for follow-ups); default: two questions on the book")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--answer-prefix", default="", help="the answer's start (small models need one)")
    parser.add_argument("--out", type=Path, default=Path("docs/serve_web.png"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    from test_web import drive

    work = Path(tempfile.mkdtemp(prefix="web-screenshot-"))
    document = args.file or book_pdf(args.data, work / "the_leavenworth_case.pdf", args.characters)
    server_args = (["--model", args.model] if args.model else []) + (["--threads", str(args.threads)] if args.threads else [])
    with running_server(server_args, work / "server.log") as base:
        questions = args.question or ["What is the name of the law firm where the narrator works?",
                                      "Who has died, according to the young man?"]
        page = drive(base + "/", document, questions, args.out, max_tokens=args.max_tokens, timeout=1500,
                     answer_prefix=args.answer_prefix)
    print(page["stats"], "|", page["answer"], "|", page["footer"], page["errors"] or "")
    return 0 if page["answer"] else 1


if __name__ == "__main__":
    sys.exit(main())
