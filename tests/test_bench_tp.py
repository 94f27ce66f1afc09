"""bench/bench_tp.py (issue 13): the sparse checkpoint, the in-place random fill, and the script end to end
on two gloo processes (tensor parallel on the CPU) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_tp.py"


@pytest.fixture(scope="module")
def tp():
    return load_bench_script("bench_tp")


def test_sparse_checkpoint_loads_as_zeros_and_takes_no_disk(tp, tmp_path):
    import transformers

    config = tp.shape_config("smollm2-135m", 1)
    size = tp.write_sparse_checkpoint(tmp_path / "ckpt", config, torch.float32)
    path = tmp_path / "ckpt" / "model.safetensors"
    assert path.stat().st_size == size > 100 * 2**20  # the embeddings alone: 49152 x 576 fp32
    assert path.stat().st_blocks * 512 < 2**20  # only the header was written
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert model.config.num_hidden_layers == 1
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert all(not p.any() for p in model.parameters())
    tp.fill_random(model)
    for name, param in model.named_parameters():
        if "norm" in name:
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert 0.015 < param.std().item() < 0.025, name
    first = [p.clone() for p in model.parameters()]
    tp.fill_random(model)
    assert all(torch.equal(a, b) for a, b in zip(first, model.parameters()))


def test_tensor_parallel_run_matches_one_process(tmp_path):
    """The smoke run: correctness under torchrun (2 gloo ranks), then reference in one process; and the
    longest / throughput phases on the sparse checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    common = ["--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT)]
    for command in ([*torchrun, "--phase", "correctness", *common], [sys.executable, str(SCRIPT), "--phase", "reference", *common],
                    [*torchrun, "--phase", "longest", *common], [*torchrun, "--phase", "throughput", *common]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "tp.json").read_text())
    check = next(r for r in rows if r["phase"] == "reference")
    assert check["parallel_world"] == 2 and check["world"] == 1
    assert check["max_abs_logit_diff"] <= 1e-4 * max(1.0, check["logit_scale"]), check
    assert check["same_tokens"] and check["same_top1"]
    longest = next(r for r in rows if r["phase"] == "longest")
    assert longest["ok"] and longest["world"] == 2 and len(longest["peak_gib_per_rank"]) == 2
    assert longest["prefill_s"] > 0 and longest["decode_tok_s"] > 0 and longest["planned_gib"] > 0
    speed = {r["model"]: r for r in rows if r["phase"] == "throughput"}
    assert set(speed) == {"unpatched", "dca"} and speed["dca"]["dca_over_unpatched"] > 0
    assert "Correctness" in (tmp_path / "out" / "tp.md").read_text()
