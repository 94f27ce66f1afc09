"""`chunkllama eval ...` end to end through the real CLI parser, on a tiny model saved to disk."""

import json

import pytest

from chunkllama import cli


@pytest.fixture()
def model_dir(tiny_model, tiny_chat_tokenizer, tmp_path):
    path = tmp_path / "tiny"
    tiny_model.save_pretrained(path)
    tiny_chat_tokenizer.save_pretrained(path)
    return path


def test_eval_commands_registered():
    for name in ("eval ppl", "eval passkey", "eval needle", "eval longqa"):
        assert name in cli.COMMANDS


def test_cli_eval_ppl_and_passkey(model_dir, tiny_data, tmp_path):
    out = tmp_path / "ppl"
    assert cli.main(["eval", "ppl", "--model", str(model_dir), "--methods", "none,dca:chunk_size=32,local_window=4",
                     "--lengths", "96", "--data", str(tiny_data), "--output", str(out), "--device", "cpu",
                     "--no-progress"]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "dca(chunk_size=32,local_window=4)"]
    assert rows[1]["config"]["dca"]["chunk_size"] == 32
    out = tmp_path / "pk"
    assert cli.main(["eval", "passkey", "--model", str(model_dir), "--methods", "yarn", "--lengths", "256",
                     "--depths", "1", "--output", str(out), "--device", "cpu", "--no-progress"]) == 0
    (row,) = json.loads((out / "summary.json").read_text())["rows"]
    assert row["config"]["rope_parameters"]["rope_type"] == "yarn" and row["n"] == 1


def test_cli_eval_longqa_limit(model_dir, tiny_data, tmp_path):
    out = tmp_path / "qa"
    assert cli.main(["eval", "longqa", "--model", str(model_dir), "--methods", "none", "--tasks", "coursera",
                     "--data", str(tiny_data), "--max-length", "320", "--limit", "1", "--max-new-tokens", "2",
                     "--output", str(out), "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][0]["task"] == "coursera" and summary["rows"][0]["n"] == 1
