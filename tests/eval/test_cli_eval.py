"""`chunkllama eval ...` end to end through the real CLI parser, on a tiny model saved to disk."""

import json

import pytest
from cli_runner import assert_usage_error, run_cli

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


# --- bad arguments: one line naming the option, exit code 2, before anything heavy is imported ---

_BAD = [
    ("ppl", ["--lengths", "12q"], "--lengths 12q: '12q' is not a length; accepted: comma-separated lengths"),
    ("ppl", ["--methods", "none,alibi"], "--methods none,alibi: unknown method 'alibi'; accepted: none, pi, ntk"),
    ("ppl", ["--data", "/nonexistent/pg19"], "--data /nonexistent/pg19: no such file or directory; accepted: "),
    ("ppl", ["--windows", "0"], "--windows 0: must be at least 1"),
    ("ppl", ["--dtype", "fp8"], "--dtype fp8: unknown dtype"),
    ("passkey", ["--lengths", "4k,x"], "--lengths 4k,x: 'x' is not a length"),
    ("passkey", ["--methods", "dca:chunk_size=big"], "--methods dca:chunk_size=big: chunk_size='big' is not int"),
    ("passkey", ["--depths", "-1"], "--depths -1: must be at least 1"),
    ("passkey", ["--model", "nowhere.gguf"], "--model nowhere.gguf: GGUF file not found"),
    ("needle", ["--lengths", "0"], "--lengths 0: '0' is not positive"),
    ("needle", ["--methods", "yarn:chunk_size=3"], "bad option 'chunk_size=3' for method 'yarn'; accepted: factor"),
    ("needle", ["--data", "/nonexistent"], "--data /nonexistent: no such file or directory"),
    ("needle", ["--device", "gpu"], "--device gpu: unknown device; accepted: cpu, cuda, cuda:N"),
    ("longqa", ["--data", "/nonexistent/file.jsonl"], "--data /nonexistent/file.jsonl: no such file or directory"),
    ("longqa", ["--max-length", "16q"], "--max-length 16q: not a length"),
    ("longqa", ["--limit", "0"], "--limit 0: must be at least 1"),
    ("longqa", ["--model", "./no-such-dir"], "--model ./no-such-dir: model path not found"),
]


@pytest.mark.parametrize("command, args, fragment", _BAD, ids=[f"{c} {' '.join(a)}" for c, a, _ in _BAD])
def test_bad_arguments(command, args, fragment):
    assert_usage_error(run_cli("eval", command, *args), f"chunkllama eval {command}", fragment)


def test_data_without_the_expected_folder(tmp_path):
    for command, folder in (("ppl", "pg19"), ("needle", "paul_graham_essays")):
        assert_usage_error(run_cli("eval", command, "--data", str(tmp_path)), f"chunkllama eval {command}",
                           f"--data {tmp_path}: {tmp_path} holds no {folder}/ folder")


def test_unknown_task_lists_the_tasks_found(tiny_data):
    assert_usage_error(run_cli("eval", "longqa", "--data", str(tiny_data), "--tasks", "coursera,nosuch"),
                       "chunkllama eval longqa", "--tasks coursera,nosuch: no task nosuch in the data; "
                       "accepted: coursera, scientific_qa")


def test_output_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    assert_usage_error(run_cli("eval", "passkey", "--output", str(tmp_path / "taken")), "chunkllama eval passkey",
                       "exists and is not a directory")


def test_python_api_checks_before_loading(tiny_data):
    from chunkllama.eval.commands import run_ppl
    from chunkllama.options import OptionError

    with pytest.raises(OptionError, match="--lengths 1x"):
        run_ppl(model="/no/such/model", lengths="1x", data=str(tiny_data))
    with pytest.raises(OptionError, match="--data /no/such/data: no such file"):
        run_ppl(model="/no/such/model", data="/no/such/data")
