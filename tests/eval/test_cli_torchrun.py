"""``torchrun --nproc-per-node 2 -m chunkllama eval ...``: the real CLI under torchrun (gloo, 2 CPU processes).

The tiny Llama (4 query / 2 key-value heads, vocabulary 400) is sharded by transformers'
``tp_plan="auto"`` through :func:`chunkllama.load_model`; both ranks run every forward pass, and
rank 0 alone prints and writes. The numbers must equal one process's. Slow: two interpreters
importing torch + transformers (~30 s on 2 busy cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

from chunkllama import cli

SRC = Path(__file__).resolve().parents[2] / "src"
PPL_TOL = 1e-5  # relative: a sharded o_proj/down_proj sums in another order (fp32); measured 4e-7


@pytest.fixture()
def model_dir(tiny_model, tiny_chat_tokenizer, tmp_path):
    """The tiny Llama with its matrices widened 8x, so the methods' perplexities differ (near-uniform otherwise)."""
    path = tmp_path / "tiny"
    with torch.no_grad():
        for param in tiny_model.parameters():
            if param.ndim == 2:
                param.mul_(8.0)
    tiny_model.save_pretrained(path)
    tiny_chat_tokenizer.save_pretrained(path)
    return path


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "chunkllama", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_eval_ppl_under_torchrun_equals_one_process(model_dir, tiny_data, tmp_path, capsys):
    args = ["eval", "ppl", "--model", str(model_dir), "--methods", "none,yarn,dca:chunk_size=32,local_window=4",
            "--lengths", "96,160", "--data", str(tiny_data), "--no-progress"]
    done = _torchrun(*args, "--output", str(tmp_path / "tp"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli.main([*args, "--output", str(tmp_path / "one"), "--device", "cpu"]) == 0
    alone_out = capsys.readouterr().out

    parallel = json.loads((tmp_path / "tp" / "summary.json").read_text())["rows"]
    alone = json.loads((tmp_path / "one" / "summary.json").read_text())["rows"]
    assert [(r["method"], r["L"]) for r in parallel] == [(r["method"], r["L"]) for r in alone]
    for p, a in zip(parallel, alone):
        assert abs(p["ppl"] - a["ppl"]) <= PPL_TOL * a["ppl"], (p["method"], p["L"], p["ppl"], a["ppl"])
    # rank 0 printed once: one table (the same as one process's), one "loaded" line
    table = alone_out[alone_out.index("| method"):]
    assert done.stdout.count("| method") == 1 and done.stdout.count("loaded ") == 1, done.stdout
    assert table.splitlines()[0] in done.stdout
    assert sorted(p.name for p in (tmp_path / "tp").iterdir()) == ["ppl_vs_length.png", "samples.jsonl",
                                                                    "summary.json", "table.md"]


def test_rank_1_prints_only_its_error(model_dir, tiny_data, tmp_path):
    """A rank other than 0 (the environment torchrun sets, no launcher needed to fail before loading) says
    nothing but its error, naming its rank; --device auto conflicts with tensor parallelism."""
    result = run_cli("eval", "ppl", "--model", str(model_dir), "--methods", "none", "--lengths", "96",
                     "--data", str(tiny_data), "--output", str(tmp_path / "out"), "--device", "auto",
                     env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("chunkllama eval ppl: error: [rank 1] ValueError: tensor parallelism under torchrun "
                           "(2 processes)") and "conflicts" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_eval_passkey_greedy_under_torchrun_decodes_the_same_tokens(model_dir, tmp_path, capsys):
    """Greedy decoding with the KV cache on the sharded model: the same tokens as one process."""
    args = ["eval", "passkey", "--model", str(model_dir), "--methods", "none,dca:chunk_size=32,local_window=4",
            "--lengths", "128", "--depths", "2", "--greedy", "--no-progress"]
    done = _torchrun(*args, "--output", str(tmp_path / "tp"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli.main([*args, "--output", str(tmp_path / "one"), "--device", "cpu"]) == 0
    capsys.readouterr()

    def decoded(folder):
        lines = (tmp_path / folder / "samples.jsonl").read_text().splitlines()
        return [(s["method"], s["depth"], s["predicted_ids"]) for s in map(json.loads, lines)]

    parallel, alone = decoded("tp"), decoded("one")
    assert len(parallel) == 4 and parallel == alone
    assert done.stdout.count("| method") == 1, done.stdout
