"""The web page in a real headless browser (Debian's ``chromium`` + ``chromium-driver``, driven by
Selenium): load the page, upload a PDF, see its size in tokens, ask, and see the streamed answer,
which must equal the API's greedy answer to the same messages. A screenshot is saved (to
``$CHUNKLLAMA_WEB_SCREENSHOT`` when set, else the test's tmp dir).

Skipped, with the reason, when chromium / chromedriver / selenium are missing
(``apt-get install chromium chromium-driver``; ``pip install selenium``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from test_server import raw, save_tiny_model, start_server, stop_server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
fpdf = pytest.importorskip("fpdf", reason="fpdf2 makes the test PDF (pip install fpdf2)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)

PAGES = ["The grass is green. The sky is blue.", "The pass key is 12345. Remember it."]
QUESTION = "What is the pass key?"


def make_pdf(path: Path) -> Path:
    pdf = fpdf.FPDF()
    pdf.set_font("helvetica", size=12)
    for text in PAGES:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    pdf.output(str(path))
    return path


def open_browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,800"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def drive(url: str, document: Path, question: str | list[str], screenshot: Path, max_tokens: int = 24, timeout: float = 120,
          answer_prefix: str = "") -> dict:
    """Load the page at ``url``, upload ``document``, ask ``question`` (or several, in turn); return
    what the page shows (the last answer)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = open_browser()
    try:
        wait = WebDriverWait(browser, timeout)
        browser.get(url)
        wait.until(lambda b: "max context" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(document.resolve()))
        wait.until(lambda b: "tokens" in b.find_element(By.ID, "doc-stats").text)
        stats = browser.find_element(By.ID, "doc-stats").text
        document_text = browser.find_element(By.ID, "document").get_property("value")
        # the answer length sits in the folded "Settings" box: set it directly
        browser.execute_script("document.getElementById('max-tokens').value = arguments[0];"
                               "document.getElementById('answer-prefix').value = arguments[1]", str(max_tokens), answer_prefix)
        questions = [question] if isinstance(question, str) else list(question)
        for turn, text in enumerate(questions, 1):
            browser.find_element(By.ID, "question").send_keys(text)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) >= turn
                       or b.find_elements(By.CSS_SELECTOR, ".msg.error"))
        errors = browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")[-1] if not errors else None
        shown = browser.execute_script("return arguments[0].firstChild.textContent", answer) if answer else None
        footer = answer.find_element(By.CSS_SELECTOR, ".stats").text if answer else None
        progress_hidden = not browser.find_element(By.ID, "progress").is_displayed()
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(screenshot))
        return {"stats": stats, "document": document_text, "answer": shown, "footer": footer,
                "errors": [e.text for e in errors], "progress_hidden": progress_hidden}
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def web_server(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("web")
    model_dir = save_tiny_model(root / "tiny-llama", tokenizer)
    proc, port = start_server(model_dir, root / "server.log", "--pretraining-length", "32", "--max-context", "1024")
    yield {"port": port, "root": root}
    stop_server(proc)


def test_page_uploads_a_pdf_and_streams_the_answer(web_server):
    port, root = web_server["port"], web_server["root"]
    pdf = make_pdf(root / "facts.pdf")
    shot = Path(os.environ.get("CHUNKLLAMA_WEB_SCREENSHOT", root / "serve_web.png"))
    page = drive(f"http://127.0.0.1:{port}/", pdf, QUESTION, shot)
    assert not page["errors"], page["errors"]
    assert "[page 2]" in page["document"] and "12345" in page["document"]
    assert "tokens" in page["stats"] and "facts.pdf" in page["stats"]
    # the page's answer is the API's greedy answer to the same messages
    content = f"Read the document and answer the question.\n\nDocument:\n{page['document'].strip()}\n\nQuestion: {QUESTION}"
    status, expected = raw(port, "POST", "/v1/chat/completions", {
        "model": "tiny-llama", "messages": [{"role": "user", "content": content}], "max_tokens": 24, "temperature": 0})
    assert status == 200
    text = expected["choices"][0]["message"]["content"]
    assert page["answer"] == text and "first token" in page["footer"] and "24 answer tokens" in page["footer"]
    assert page["progress_hidden"]
    assert shot.stat().st_size > 10_000


def test_progress_events_for_the_page(web_server):
    """``chunkllama_progress`` adds prompt-reading progress chunks before the first token."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", web_server["port"], timeout=30)
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "The sky is blue. " * 30}],
            "max_tokens": 3, "temperature": 0, "stream": True, "chunkllama_progress": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    lines = conn.getresponse().read().decode().split("\n\n")
    chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    progress = [c["progress"] for c in chunks if "progress" in c]
    assert progress and progress[-1]["done"] == progress[-1]["total"] and all(c["choices"] == [] for c in chunks if "progress" in c)


def test_document_endpoint_errors(web_server):
    status, got = raw(web_server["port"], "POST", "/v1/documents?filename=scan.pdf", b"%PDF-1.4 broken")
    assert status == 400 and "scan.pdf" in got["error"]["message"]
    status, got = raw(web_server["port"], "POST", "/v1/documents?filename=notes.txt", "The sky is blue.".encode())
    assert status == 200 and got["tokens"] > 0 and got["max_context"] == 1024 and got["pretraining_length"] == 32
