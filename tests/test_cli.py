"""The ``chunkllama`` command line: parser built from typed functions, and the demo end to end."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import pytest
import torch
from cli_runner import assert_usage_error, run_cli

from chunkllama import cli, options

_TEXT = [
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.",
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "The pass key is 12345. Remember it. 12345 is the pass key. What is the pass key? The pass key is",
    "0 1 2 3 4 5 6 7 8 9 10000 99999 60494 27611",
]


def save_tiny_checkpoint(directory: Path, window: int = 64) -> Path:
    """A tiny random Llama (2 layers, window ``window``) and a tiny BPE tokenizer, saved as a HF dir."""
    import transformers

    from tiny_bpe import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(_TEXT, vocab_size=300, bos="<s>", eos="</s>")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=window,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _all_help_argvs() -> list[list[str]]:
    groups = sorted({name.split()[0] for name in cli.COMMANDS if " " in name})
    return [[], *[[g] for g in groups], *[name.split() for name in cli.COMMANDS]]


@pytest.mark.parametrize("argv", _all_help_argvs(), ids=lambda a: " ".join(a) or "top")
def test_every_help_works_and_states_each_default_once(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: chunkllama")
    assert "(default: None)" not in out and "``" not in out
    for block in re.split(r"\n  (?=--)", out):  # one option's help: its default is stated at most once
        assert block.lower().count("default") <= 1, block


def test_demo_help_comes_from_the_signature(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--length", "--depth", "--pretraining-length", "--trials", "--max-new-tokens",
                 "--dtype", "--device", "--debug"):
        assert flag in out
    assert "(default: 16384)" in out and "plain RoPE" in out


_HELP_TIMER = """
import json, sys, time
from chunkllama import cli
times = {}
for argv in json.loads(sys.argv[1]):
    tick = time.perf_counter()
    try:
        cli.main([*argv, "--help"])
    except SystemExit as exc:
        assert exc.code == 0, argv
    times[" ".join(argv) or "top"] = time.perf_counter() - tick
heavy = [m for m in ("torch", "transformers", "tqdm") if m in sys.modules]
print(json.dumps({"times": times, "heavy": heavy}))
"""


def test_help_is_fast_and_imports_nothing_heavy():
    """--help of every command in a fresh interpreter: no torch/transformers import, well under a second."""
    import json

    tick = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _HELP_TIMER, json.dumps(_all_help_argvs())],
                            capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - tick
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert max(report["times"].values()) < 1.0, report["times"]
    assert wall < 10, wall  # the interpreter itself included, on a busy 2-core machine


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "chunkllama", "demo", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--length" in result.stdout


def test_adding_a_command_is_one_function_and_one_entry(capsys):
    calls = []

    def hello(*, name: str = "world", times: int = 1, loud: bool = False, ratio: float | None = None) -> int:
        """Say hello.

        Args:
            name: who to greet.
            times: how often.
            loud: shout.
            ratio: unused.
        """
        calls.append((name, times, loud, ratio))
        return 3

    parser = cli.build_parser({"hello": hello, "eval hello": hello})
    args = vars(parser.parse_args(["hello", "--name", "x", "--times", "2", "--loud"]))
    assert args["_command"] is hello and (args["name"], args["times"], args["loud"], args["ratio"]) == ("x", 2, True, None)
    nested = vars(parser.parse_args(["eval", "hello", "--ratio", "0.5"]))
    assert nested["_command"] is hello and nested["ratio"] == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["hello", "--times", "many"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parser.parse_args(["hello", "--help"])
    assert "who to greet" in capsys.readouterr().out


def test_positional_parameters_are_rejected():
    def bad(x: int) -> None:
        """Bad."""

    with pytest.raises(TypeError, match="keyword-only"):
        cli.build_parser({"bad": bad})


def test_demo_on_a_tiny_model(tmp_path, capsys):
    model_dir = save_tiny_checkpoint(tmp_path / "tiny")
    code = cli.main([
        "demo", "--model", str(model_dir), "--length", "300", "--pretraining-length", "64",
        "--trials", "2", "--max-new-tokens", "3", "--device", "cpu",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("plain RoPE |") == 2 and out.count("DCA |") == 2
    assert "DCAConfig(pretraining_length=64, chunk_size=48, local_window=8)" in out
    assert "total" in out


def _require_default_model() -> None:
    pytest.importorskip("gguf")
    from chunkllama.models import default_gguf_path

    try:
        default_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _run_demo(*args: str, timeout: float) -> str:
    """``chunkllama demo ARGS`` as a user runs it: a fresh interpreter with torch's default threads
    (this suite pins itself to one thread, which would double the demo's time); returns stdout."""
    result = run_cli("demo", *args, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)  # per-phase times, shown with pytest -s
    return result.stdout


@pytest.mark.slow
def test_demo_default_model_short():
    """The real model through the whole demo at 4k tokens with DCA set up for a pretend 2k window
    (DCA over 4 chunks, the first shared with plain RoPE, the rest one forward each).

    Inside SmolLM2's real 8k window plain RoPE reads the key too; the 16k test below shows it fail.
    """
    _require_default_model()
    out = _run_demo("--length", "4k", "--pretraining-length", "2048", timeout=600)
    assert "DCAConfig(pretraining_length=2048, chunk_size=1536, local_window=256) (chunk_len 1280)" in out
    assert "prompt: 4096 tokens (0.50x the model's 8192-token window)" in out
    assert "DCA (first 1280 shared)" in out
    assert "plain RoPE: 1/1, DCA: 1/1" in out


@pytest.mark.slow
@pytest.mark.full_demo
def test_demo_default_model_at_16k():
    """The headline: at 2x SmolLM2's window plain RoPE misses the key and DCA finds it (about a
    minute on 2 idle cores; deselected by default, run with -m full_demo)."""
    _require_default_model()
    out = _run_demo(timeout=1200)
    assert "prompt: 16384 tokens (2.00x the model's 8192-token window)" in out
    assert "DCAConfig(pretraining_length=4096, chunk_size=3072, local_window=512) (chunk_len 2560)" in out
    assert re.search(r"plain RoPE \| answer .* \| wrong \|", out), out
    assert re.search(r"DCA \| answer ' \d{5}.* \| CORRECT \|", out), out
    assert "plain RoPE: 0/1, DCA: 1/1" in out


# --- bad arguments: one line, exit code 2, before anything heavy is imported ---------------------


@pytest.mark.parametrize("args, fragments", [
    (["--length", "12q"], ["--length 12q: not a length; accepted: "]),
    (["--length", "0"], ["--length 0: not positive"]),
    (["--depth", "1.5"], ["--depth 1.5: outside 0..1; accepted: a number from 0 to 1"]),
    (["--trials", "0"], ["--trials 0: must be at least 1"]),
    (["--max-new-tokens", "many"], ["--max-new-tokens many: not a whole number"]),
    (["--device", "tpu"], ["--device tpu: unknown device; accepted: cpu, cuda, cuda:N"]),
    (["--dtype", "int8"], ["--dtype int8: unknown dtype; accepted: bfloat16, float16, float32"]),
    (["--model", "./no/such/model-dir"], ["--model ./no/such/model-dir: model path not found", "accepted: "]),
    (["--model", "missing.gguf"], ["--model missing.gguf: GGUF file not found"]),
    (["--bogus"], ["--bogus: unknown option"]),
    (["--length"], ["--length: expected one argument"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("-") else None)
def test_demo_bad_arguments(args, fragments):
    assert_usage_error(run_cli("demo", *args), "chunkllama demo", *fragments)


def test_model_directory_without_config(tmp_path):
    assert_usage_error(run_cli("demo", "--model", str(tmp_path)), "chunkllama demo",
                       f"--model {tmp_path}: is a directory but has no config.json")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "unreachable"])
def test_uncached_hub_id_fails_at_once(env):
    result = run_cli("demo", "--model", "some-org/not-a-model", env=env)
    assert_usage_error(result, "chunkllama demo", "--model some-org/not-a-model: not available offline",
                       "a local model directory", ".gguf file", max_seconds=10)


def test_unknown_command():
    assert_usage_error(run_cli("dmeo"), "chunkllama", "COMMAND dmeo: unknown command; accepted: demo, chat, serve, plan, finetune, eval")
    assert_usage_error(run_cli("eval"), "chunkllama eval", "COMMAND: missing; accepted: ppl, passkey")


def test_errors_while_running_are_one_line_unless_debug(capsys, monkeypatch):
    def broken(*, size: int = 1) -> int:
        """Fail."""
        raise RuntimeError("something broke\nsecond line")

    assert cli.main(["broken"], commands={"broken": broken}) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chunkllama broken: error: RuntimeError: something broke second line" in err
    assert "--debug" in err
    with pytest.raises(RuntimeError, match="something broke"):
        cli.main(["broken", "--debug"], commands={"broken": broken})
    monkeypatch.setenv("CHUNKLLAMA_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["broken"], commands={"broken": broken})


def test_option_errors_raised_by_a_command_exit_2(capsys):
    from chunkllama.options import OptionError

    def picky(*, name: str = "x") -> int:
        """Picky."""
        raise OptionError(name, "not liked", "y, z", option="--name")

    assert cli.main(["picky"], commands={"picky": picky}) == 2
    assert capsys.readouterr().err == "chunkllama picky: error: --name x: not liked; accepted: y, z\n"


def test_repeatable_and_checked_options():
    def many(*, file: list[str] | None = None, length: Annotated[int, options.length] = 1024) -> int:
        """Many.

        Args:
            file: a file; repeat for more.
            length: tokens.
        """
        return 0

    parser = cli.build_parser({"many": many})
    args = parser.parse_args(["many", "--file", "a", "--file", "b", "--length", "2k"])
    assert args.file == ["a", "b"] and args.length == 2048
    assert parser.parse_args(["many"]).file is None


def test_registry_entries_are_imported_only_when_run(capsys):
    commands = {"missing": "chunkllama_no_such_module:run", "eval ppl": cli.COMMANDS["eval ppl"]}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"], commands=commands)  # lists both without importing either
    assert exit_info.value.code == 0
    assert cli.main(["missing"], commands=commands) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chunkllama missing: error: this command needs chunkllama_no_such_module" in err


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_single_process_commands_refused_under_torchrun(command):
    result = run_cli(command, env={"WORLD_SIZE": "2", "RANK": "0"})
    assert_usage_error(result, f"chunkllama {command}", "error: [rank 0] runs in one process, not under torchrun")
