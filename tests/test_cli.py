"""The ``chunkllama`` command line: parser built from typed functions, and the demo end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chunkllama import cli

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_TEXT * 3, trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
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


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_demo_help_comes_from_the_signature(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--length", "--depth", "--pretraining-length", "--trials", "--max-new-tokens"):
        assert flag in out
    assert "16384" in out and "plain RoPE" in out


def test_console_script_help():
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from chunkllama.cli import main; sys.exit(main())", "demo", "--help"],
        capture_output=True, text=True, timeout=120,
    )
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


@pytest.mark.slow
def test_demo_default_model_at_16k(capsys):
    """The headline: at 2x SmolLM2's window plain RoPE misses the key and DCA finds it (minutes)."""
    pytest.importorskip("gguf")
    from chunkllama.models import default_gguf_path

    try:
        default_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "plain RoPE: 0/1, DCA: 1/1" in out
