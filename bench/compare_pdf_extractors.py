"""Compare PDF text extraction of pypdf and pdfplumber on real PDFs (why documents.py uses pypdf).

For each PDF: seconds, characters extracted, and the share of "glued" words (letter runs of 25+
characters, which in prose almost always means the spaces between words were lost), per library.
Runs on the CPU in seconds; needs ``pip install pypdf pdfplumber``.

    python bench/compare_pdf_extractors.py /usr/share/doc/libtasn1-doc/libtasn1.pdf \
        /usr/share/doc/shared-mime-info/shared-mime-info-spec.pdf --out bench/results
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path


def extract_pypdf(path: Path) -> list[str]:
    import pypdf

    return [page.extract_text() or "" for page in pypdf.PdfReader(path).pages]


def extract_pdfplumber(path: Path) -> list[str]:
    import pdfplumber

    with pdfplumber.open(path) as pdf:
        return [page.extract_text() or "" for page in pdf.pages]


def glued_share(text: str) -> float:
    words = re.findall(r"[A-Za-z]+", text)
    return sum(len(w) >= 25 for w in words) / max(1, len(words))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pdfs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write pdf_extractors.json/.md here")
    args = parser.parse_args()
    rows = []
    for path in args.pdfs:
        for name, extract in (("pypdf", extract_pypdf), ("pdfplumber", extract_pdfplumber)):
            start = time.perf_counter()
            pages = extract(path)
            seconds = time.perf_counter() - start
            text = "\n".join(pages)
            rows.append(dict(pdf=path.name, library=name, pages=len(pages), seconds=round(seconds, 3),
                             characters=len(text), words=len(re.findall(r"[A-Za-z]+", text)),
                             glued_word_share=round(glued_share(text), 5)))
            print(rows[-1])
    if args.out is not None:
        import importlib.metadata as md

        args.out.mkdir(parents=True, exist_ok=True)
        versions = {lib: md.version(lib) for lib in ("pypdf", "pdfplumber", "pdfminer.six")}
        (args.out / "pdf_extractors.json").write_text(json.dumps(dict(versions=versions, rows=rows), indent=1) + "\n")
        lines = [f"PDF text extraction ({', '.join(f'{k} {v}' for k, v in versions.items())}); "
                 "glued = share of letter runs of 25+ characters (lost spaces)", "",
                 "| pdf | library | pages | seconds | characters | words | glued |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['pdf']} | {r['library']} | {r['pages']} | {r['seconds']} | {r['characters']} | "
                  f"{r['words']} | {r['glued_word_share']:.2%} |" for r in rows]
        (args.out / "pdf_extractors.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
