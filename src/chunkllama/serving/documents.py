"""Loading documents to chat about: PDF, plain text / Markdown, several files, folders.

PDF text is extracted with ``pypdf``: on the real PDFs compared by
``bench/compare_pdf_extractors.py`` (a texinfo manual and a DocBook spec) it kept the spaces
between words where ``pdfplumber`` glued them together on whole pages ("SharedMIME-infoDatabase",
"directoryisaddedto..."), and it was 3-4x faster, with a smaller dependency footprint (pure Python).

Each PDF page starts with a marker ``[page N]`` (1-based) so the model can cite pages; several
documents are joined with a ``[file NAME]`` header each. Every failure is a
:class:`DocumentError` whose message names the file, what is wrong and what to do: a missing
file, an unsupported or non-UTF-8 file, an empty file, a broken PDF, a password-protected PDF,
and a PDF without a text layer (scanned / image-only: needs OCR first).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

PDF_SUFFIXES = (".pdf",)
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
#: What a folder contributes: these files, in sorted order (hidden files skipped).
FOLDER_SUFFIXES = PDF_SUFFIXES + TEXT_SUFFIXES


class DocumentError(ValueError):
    """A document cannot be used; the message says which file, what is wrong and how to fix it."""


@dataclass(frozen=True)
class Document:
    """One loaded file.

    Attributes:
        path: where it was read from.
        text: its text; for a PDF, each page begins with ``[page N]``.
        pages: number of pages (PDF), None for text files.
        empty_pages: 1-based numbers of PDF pages without any extractable text.
    """

    path: Path
    text: str
    pages: int | None = None
    empty_pages: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return self.path.name

    def describe(self) -> str:
        """One line: name, pages or size in characters, pages without text."""
        size = f"{self.pages} pages" if self.pages is not None else "text"
        blank = f", {len(self.empty_pages)} without text" if self.empty_pages else ""
        return f"{self.path} ({size}{blank}, {len(self.text):,} characters)"


def load_document(path: str | os.PathLike[str]) -> Document:
    """Load one file: ``.pdf`` through pypdf, anything else as UTF-8 text.

    Raises:
        DocumentError: missing, unreadable, empty, broken, encrypted or image-only file.
    """
    path = Path(path)
    if not path.exists():
        raise DocumentError(f"{path}: file not found")
    if path.is_dir():
        raise DocumentError(f"{path}: is a folder; use load_documents() (or pass the folder itself to --file)")
    if path.suffix.lower() in PDF_SUFFIXES:
        return _load_pdf(path)
    return _load_text(path)


def load_documents(paths: Iterable[str | os.PathLike[str]]) -> list[Document]:
    """Load files and folders (a folder: its ``.pdf/.txt/.md/.markdown/.rst`` files, recursively, sorted).

    Raises:
        DocumentError: for the first path that cannot be used, or when nothing was given / found.
    """
    documents: list[Document] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                raise DocumentError(f"{path}: folder holds no {'/'.join(FOLDER_SUFFIXES)} files")
            documents.extend(load_document(p) for p in files)
        else:
            documents.append(load_document(path))
    if not documents:
        raise DocumentError("no documents given")
    return documents


def join_documents(documents: list[Document]) -> str:
    """The text the model reads: one document as it is, several each under a ``[file NAME]`` header."""
    if len(documents) == 1:
        return documents[0].text
    return "\n\n".join(f"[file {doc.name}]\n{doc.text}" for doc in documents)


# --- formats -------------------------------------------------------------------------------------


def _load_text(path: Path) -> Document:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DocumentError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DocumentError(
            f"{path}: not UTF-8 text (supported: PDF files and UTF-8 text such as .txt/.md); "
            "convert it to UTF-8 or to PDF first"
        ) from None
    text = text.replace("\r\n", "\n").replace("\x00", "")
    if not text.strip():
        raise DocumentError(f"{path}: file is empty (no text to read)")
    return Document(path, text.strip("\n"))


def _load_pdf(path: Path) -> Document:
    import pypdf
    from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError

    # pypdf reports recoverable defects of a PDF on its logger; they are noise to a chat user.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    if path.stat().st_size == 0:
        raise DocumentError(f"{path}: file is empty (0 bytes)")
    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")  # owner-password-only PDFs open with an empty user password
            except DependencyError:
                raise DocumentError(
                    f"{path}: PDF is encrypted with AES; reading it needs the 'cryptography' package "
                    "(pip install cryptography)"
                ) from None
            if not opened:
                raise DocumentError(
                    f"{path}: PDF is protected by a password; remove the protection first "
                    "(e.g. qpdf --decrypt --password=PASSWORD in.pdf out.pdf)"
                )
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentError:
        raise
    except FileNotDecryptedError:
        raise DocumentError(f"{path}: PDF is protected by a password; remove the protection first") from None
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as error:
        raise DocumentError(
            f"{path}: cannot read this PDF ({type(error).__name__}: {error}); is the file complete and really a PDF?"
        ) from None
    if not pages:
        raise DocumentError(f"{path}: PDF has no pages")
    pages = [_clean(text) for text in pages]
    empty = tuple(i + 1 for i, text in enumerate(pages) if not text)
    if len(empty) == len(pages):
        raise DocumentError(
            f"{path}: PDF has no text layer ({len(pages)} page(s) of images, e.g. a scan); "
            "run OCR first (e.g. ocrmypdf in.pdf out.pdf) or pass the text as a .txt file"
        )
    text = "\n\n".join(f"[page {i + 1}]\n{body}" for i, body in enumerate(pages))
    return Document(path, text, pages=len(pages), empty_pages=empty)


def _clean(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\x00", "").splitlines()]
    return "\n".join(lines).strip()


__all__ = ["Document", "DocumentError", "join_documents", "load_document", "load_documents"]
