"""``chunkllama finetune`` end to end on a tiny model directory, through the CLI's argparse builder."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from chunkllama.cli import build_parser
from chunkllama.training.command import finetune
from chunkllama.training.data import ChatDataError
from tiny_chat import tiny_tokenizer
from tiny_models import make_model

pytest.importorskip("peft")


def _run(argv):
    args = vars(build_parser({"finetune": finetune}).parse_args(argv))
    command = args.pop("_command")
    return command(**{k: v for k, v in args.items() if k in inspect.signature(finetune).parameters})


def test_finetune_command_trains_and_saves_an_adapter(tmp_path, capsys):
    base = tmp_path / "base"
    make_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    chat = {"messages": [{"role": "user", "content": "tell me the code. " * 5}, {"role": "assistant", "content": "code 42"}]}
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps(chat) + "\n" + json.dumps({"conversations": [{"from": "human", "value": "x" * 300}, {"from": "gpt", "value": "y"}]}) + "\n")
    code = _run([
        "finetune", "--data", str(data), "--output", str(tmp_path / "out"), "--model", str(base),
        "--pretraining-length", "32", "--steps", "2", "--max-length", "200", "--device", "cpu", "--no-gradient-checkpointing",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "1 chats (1 skipped as longer than 200 tokens)" in printed and "loss by step: 1:" in printed
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["dual_chunk_attention_config"]["original_max_position_embeddings"] == 32
    assert len(json.loads((tmp_path / "out" / "training_log.json").read_text())["loss"]) == 2


def test_finetune_rejects_bad_data_before_loading_a_model(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ChatDataError, match=r"bad.jsonl:1: the chat has no assistant turn"):
        finetune(data=str(data), output=str(tmp_path / "out"), model=str(tmp_path / "missing"))


def test_help_comes_from_the_docstring():
    text = build_parser({"finetune": finetune})._subparsers._group_actions[0].choices["finetune"].format_help()
    assert "--no-lora" in text and "JSONL training file" in text
