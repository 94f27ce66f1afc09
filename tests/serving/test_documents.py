"""Document loading: PDFs with and without a text layer, encrypted and broken PDFs, text files, folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunkllama.serving.documents import DocumentError, join_documents, load_document, load_documents

fpdf = pytest.importorskip("fpdf", reason="fpdf2 makes the test PDFs (pip install fpdf2)")


def make_pdf(path: Path, pages: list[str | None], *, owner: str | None = None, user: str | None = None) -> Path:
    """A PDF with one page per item: text, or None for a page with only a drawing (no text layer)."""
    pdf = fpdf.FPDF()
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        if text is None:
            pdf.rect(20, 20, 100, 60, style="F")  # an "image" with no text
        else:
            pdf.multi_cell(0, 6, text)
    if owner is not None:
        pdf.set_encryption(owner_password=owner, user_password=user)
    pdf.output(str(path))
    return path


def test_pdf_with_text_gets_page_markers(tmp_path):
    path = make_pdf(tmp_path / "a.pdf", ["The sky is blue.", None, "The pass key is 12345."])
    doc = load_document(path)
    assert doc.pages == 3 and doc.empty_pages == (2,)
    assert doc.text == "[page 1]\nThe sky is blue.\n\n[page 2]\n\n\n[page 3]\nThe pass key is 12345."
    assert "3 pages, 1 without text" in doc.describe()


def test_pdf_without_text_layer_is_refused(tmp_path):
    path = make_pdf(tmp_path / "scan.pdf", [None, None])
    with pytest.raises(DocumentError, match=r"scan.pdf: PDF has no text layer \(2 page\(s\).*run OCR first"):
        load_document(path)


def test_password_protected_pdf_is_refused_but_owner_only_opens(tmp_path):
    locked = make_pdf(tmp_path / "locked.pdf", ["secret"], owner="own", user="user")
    with pytest.raises(DocumentError, match="locked.pdf: PDF is protected by a password; remove the protection"):
        load_document(locked)
    restricted = make_pdf(tmp_path / "restricted.pdf", ["readable"], owner="own")  # no user password
    assert load_document(restricted).text == "[page 1]\nreadable"


@pytest.mark.parametrize("content", [b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog", b"this is not a pdf at all", b"\x00" * 100])
def test_broken_pdf_is_refused(tmp_path, content):
    path = tmp_path / "broken.pdf"
    path.write_bytes(content)
    with pytest.raises(DocumentError, match="broken.pdf: cannot read this PDF .*is the file complete and really a PDF"):
        load_document(path)


def test_truncated_pdf_is_refused(tmp_path):
    whole = make_pdf(tmp_path / "whole.pdf", ["The sky is blue."] * 3).read_bytes()
    path = tmp_path / "cut.pdf"
    path.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(DocumentError, match="cut.pdf: (cannot read this PDF|PDF has no)"):
        load_document(path)


def test_empty_files_are_refused(tmp_path):
    (tmp_path / "empty.pdf").write_bytes(b"")
    (tmp_path / "blank.txt").write_text(" \n\n  ", encoding="utf-8")
    with pytest.raises(DocumentError, match=r"empty.pdf: file is empty \(0 bytes\)"):
        load_document(tmp_path / "empty.pdf")
    with pytest.raises(DocumentError, match="blank.txt: file is empty"):
        load_document(tmp_path / "blank.txt")


def test_text_files_missing_files_and_non_utf8(tmp_path):
    (tmp_path / "notes.md").write_text("# Notes\r\nThe grass is green.\n", encoding="utf-8")
    assert load_document(tmp_path / "notes.md").text == "# Notes\nThe grass is green."
    with pytest.raises(DocumentError, match="nope.txt: file not found"):
        load_document(tmp_path / "nope.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DocumentError, match="latin1.txt: not UTF-8 text"):
        load_document(tmp_path / "latin1.txt")


def test_folders_and_several_files(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second", encoding="utf-8")
    (folder / "sub" / "c.md").write_text("third", encoding="utf-8")
    (folder / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG")
    make_pdf(folder / "a.pdf", ["first"])
    docs = load_documents([folder])
    assert [d.name for d in docs] == ["a.pdf", "b.txt", "c.md"]
    assert join_documents(docs) == "[file a.pdf]\n[page 1]\nfirst\n\n[file b.txt]\nsecond\n\n[file c.md]\nthird"
    assert join_documents(load_documents([folder / "b.txt"])) == "second"
    (tmp_path / "none").mkdir()
    with pytest.raises(DocumentError, match="none: folder holds no .pdf/.txt/.md"):
        load_documents([tmp_path / "none"])
    with pytest.raises(DocumentError, match="no documents given"):
        load_documents([])
