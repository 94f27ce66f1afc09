"""``chunkllama chat`` end to end on a tiny saved model: scripted questions through a subprocess, the
interactive loop through a pseudo-terminal, JSON output, and argument errors before any model load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chunkllama import cli

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = " ".join(f"Chapter {i}. The sky is blue and the grass is green; the pass key is {1000 + i}." for i in range(12))
WINDOW = ["--pretraining-length", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved with the chat-template tokenizer; its EOS row of the LM head is zero,
    so greedy decoding never ends an answer by itself (answers run to --max-new-tokens)."""
    import transformers

    directory = tmp_path_factory.mktemp("tiny-chat")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "doc.txt").write_text(DOCUMENT, encoding="utf-8")
    return directory


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def chat_args(tiny_dir, *extra):
    return ["chat", "--model", str(tiny_dir), "--file", str(tiny_dir / "doc.txt"), *WINDOW, *extra]


def test_scripted_questions_in_a_subprocess_match_json_and_the_engine(tiny_dir, capsys):
    args = chat_args(tiny_dir, "--question", "What is the pass key?", "--question", "And the sky?",
                     "--max-new-tokens", "6")
    result = subprocess.run([sys.executable, "-m", "chunkllama.cli", *args], capture_output=True, text=True,
                            timeout=300, env=env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "document tokens (1 file" in result.stderr and "window 32" in result.stderr
    assert "DCA chunk 24 / local 4 (stride 20)" in result.stderr and "device cpu" in result.stderr

    assert cli.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["window"] == 32 and report["dca"]["chunk_len"] == 20 and report["document_tokens"] > 100
    first, second = report["answers"]
    assert first["finish_reason"] == second["finish_reason"] == "length" and first["new_tokens"] == 6
    assert second["reused_tokens"] >= first["prompt_tokens"]  # turn 2 reads only its own tokens (+ re-tokenized answer)
    assert result.stdout == f"Q: What is the pass key?\nA: {first['answer']}\nQ: And the sky?\nA: {second['answer']}\n"

    import chunkllama
    from chunkllama.serving.engine import Engine
    from chunkllama.serving.sampling import SamplingParams

    model, tokenizer = chunkllama.load_model(str(tiny_dir), device="cpu")
    chunkllama.apply_dca(model, 32)
    conv = Engine(model, tokenizer).conversation(document=DOCUMENT)
    assert conv.ask("What is the pass key?", SamplingParams(max_new_tokens=6)).text == first["answer"]
    assert conv.ask("And the sky?", SamplingParams(max_new_tokens=6)).text == second["answer"]


def test_interactive_chat_in_a_pseudo_terminal(tiny_dir):
    pexpect = pytest.importorskip("pexpect")
    args = chat_args(tiny_dir, "--max-new-tokens", "5000", "--max-context", "100000")
    # a terminal's Ctrl-C: SIGINT at its default, even when pytest itself runs as a background job
    # (non-interactive shells start those with SIGINT ignored, and exec passes that on)
    child = pexpect.spawn(sys.executable, ["-m", "chunkllama.cli", *args], env=env(), cwd=str(ROOT),
                          encoding="utf-8", timeout=240,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect("/reset")
        child.expect("you> ")
        child.sendline("/doc")
        child.expect(r"doc.txt \(text, \d+ characters\)")
        child.expect("you> ")
        child.sendline("What is the pass key?")
        child.expect("assistant> ")
        child.expect(r"\S{20}")  # some of the (long) answer has streamed
        child.sendintr()  # Ctrl-C stops this answer only
        child.expect(r"\[interrupted\]")
        child.expect(r"\[\d+ tokens, abort")
        child.expect("you> ")
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--file", "missing.txt"], "missing.txt: file not found"),
        (["--pdf", "README.md"], "--pdf README.md: not a .pdf file"),
        (["--top-p", "2"], r"--top-p must be in \(0, 1\]"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--max-context", "1"], "--max-context must be >= 2"),
        (["--json"], "--json needs at least one --question"),
        (["--device", "tpu"], "--device must be cpu, cuda, cuda:N or auto"),
    ],
)
def test_bad_arguments_are_one_line_before_the_model_loads(capsys, monkeypatch, extra, message):
    import chunkllama.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad argument")

    monkeypatch.setattr(chunkllama.models, "load_model", no_model)
    monkeypatch.chdir(ROOT)
    assert cli.main(["chat", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chunkllama chat: error: ") and err.count("\n") == 1
    assert pytest.importorskip("re").search(message, err), err


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_kv_dtype_is_checked_while_parsing(capsys, monkeypatch, command):
    import chunkllama.models

    monkeypatch.setattr(chunkllama.models, "load_model", lambda *a, **k: pytest.fail("model loaded for a bad argument"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--kv-dtype", "int4"])
    assert exit_info.value.code == 2
    assert "--kv-dtype int4: unknown KV cache dtype; accepted: auto, fp8" in capsys.readouterr().err


def test_image_only_pdf_and_oversized_document_are_usage_errors(tmp_path, tiny_dir, capsys):
    fpdf = pytest.importorskip("fpdf")
    pdf = fpdf.FPDF()
    pdf.add_page()
    pdf.rect(10, 10, 50, 50, style="F")
    pdf.output(str(tmp_path / "scan.pdf"))
    assert cli.main(["chat", "--pdf", str(tmp_path / "scan.pdf")]) == 2
    assert "scan.pdf: PDF has no text layer" in capsys.readouterr().err

    assert cli.main([*chat_args(tiny_dir, "--max-context", "50", "--question", "Q?")]) == 2
    err = capsys.readouterr().err
    assert "but the maximum context is 50 tokens" in err and "chunkllama chat: error:" in err


def test_list_options_repeat():
    parser = cli.build_parser({"chat": cli.COMMANDS["chat"]})
    args = parser.parse_args(["chat", "--pdf", "a.pdf", "--pdf", "b.pdf", "--question", "one?", "--question", "two?"])
    assert args.pdf == ["a.pdf", "b.pdf"] and args.question == ["one?", "two?"] and not args.file
