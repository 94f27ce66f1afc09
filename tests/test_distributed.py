"""Models split across processes or devices give the same logits and greedy tokens as one piece.

- Tensor parallel: ``tp_plan="auto"`` under ``torchrun`` with 2 CPU processes (gloo), tiny Llama and
  Qwen2 (q/k/v biases), DCA on each rank's local heads (``tp_worker.py``), vs the same model in one
  process. Slow (two interpreters importing torch + transformers: ~40 s on 2 busy cores).
- ``device_map`` split: accelerate hooks, one layer on the CPU and one offloaded to disk (weights
  loaded by the hooks at each call; a CPU-only machine has no second device), vs unsplit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from chunkllama.distributed import from_pretrained_kwargs, is_main_process, world_size
from tiny_models import make_model
from tp_worker import run

TOL = 1e-5
TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for family in ("llama", "qwen2"):
        model = make_model(family)
        model.config._attn_implementation = "sdpa"
        model.save_pretrained(root / family)
    return root


def _load(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


@pytest.mark.slow
def test_tensor_parallel_under_torchrun_equals_one_process(saved, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(TESTS / "tp_worker.py"), str(tmp_path), str(saved / "llama"), str(saved / "qwen2")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for family in ("llama", "qwen2"):
        parallel = torch.load(tmp_path / f"{family}.pt")
        alone = run(_load(saved / family))
        assert parallel["world"] == 2 and parallel["q_weight"] == "DTensor"
        assert parallel["q_width"] * 2 == alone["q_width"], "each rank must run DCA on half of the heads"
        err = (parallel["logits"] - alone["logits"]).abs().max().item()
        assert err <= TOL, f"{family}: tensor-parallel logits differ by {err:.3g}"
        assert torch.equal(parallel["tokens"], alone["tokens"]), family
        assert torch.equal(parallel["tokens_chunked_prefill"], alone["tokens"]), family


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_device_map_split_with_offload_equals_unsplit(saved, family, tmp_path):
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "disk", "lm_head": "cpu"}
    split_model = _load(saved / family, device_map=device_map, offload_folder=str(tmp_path))
    assert split_model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # loaded by hooks
    split, whole = run(split_model), run(_load(saved / family))
    assert (split["logits"] - whole["logits"]).abs().max().item() <= TOL
    assert torch.equal(split["tokens"], whole["tokens"])
    assert torch.equal(split["tokens_chunked_prefill"], whole["tokens"])


def test_outside_torchrun_nothing_changes(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert world_size() == 1 and is_main_process() and from_pretrained_kwargs() == {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    kwargs = from_pretrained_kwargs()
    assert not is_main_process()
    config = kwargs.get("distributed_config")
    assert (config.tp_plan if config is not None else kwargs["tp_plan"]) == "auto"


def test_quiet_unless_main_silences_other_ranks_and_restores_streams(monkeypatch, capsys):
    from chunkllama.distributed import quiet_unless_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError), quiet_unless_main():
        print("rank 1 result")
        print("rank 1 progress", file=sys.stderr)
        raise RuntimeError("boom")
    print("after")
    captured = capsys.readouterr()
    assert captured.out == "after\n" and captured.err == ""
    monkeypatch.setenv("RANK", "0")
    with quiet_unless_main():
        print("rank 0 result")
    assert capsys.readouterr().out == "rank 0 result\n"
