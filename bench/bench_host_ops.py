"""Host work of the patch per decoder layer per decode step: ops launched, host reads, step time.

A small random Llama (CPU by default, fp32, the reference backend that ``auto`` picks there) is
prefilled past several DCA chunks, then decoded one token at a time with the dynamic cache, as
``generate`` does. One decode step is profiled (torch.profiler) for the DCA model and for the
same model unpatched:

- ``ops``: top-level aten ops (each is one kernel launch or more on a GPU, ~5-10 us of host time);
- ``host_reads``: ops that copy tensor data to the host (``aten::_local_scalar_dense`` behind
  ``int()``/``bool()``/``.item()``, ``aten::equal``, copies to the CPU): on a GPU each one stalls
  the host until the device has caught up;
- ``step_ms``: median eager time of one decode step.

The per-layer numbers are (DCA - unpatched) / layers. Run it against any checkout to compare
(``PYTHONPATH=<checkout>/src``); the result records which source it measured.

    PYTHONPATH=src python bench/bench_host_ops.py --label after
    PYTHONPATH=<old checkout>/src python bench/bench_host_ops.py --label before

Writes bench/results/host_ops.json (one entry per label, others kept) and host_ops.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import time

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

import chunkllama
from chunkllama import apply_dca

RESULTS = pathlib.Path(__file__).parent / "results"
HOST_READ_OPS = ("aten::_local_scalar_dense", "aten::equal", "aten::is_nonzero")


def _model(layers: int, device: str) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device).eval()


def _top_level(events) -> list:
    """aten ops not called from inside another aten op."""
    found = []
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            found.append(event)
    return found


def _decode_setup(model: torch.nn.Module, prompt: int, device: str):
    ids = torch.randint(3, 512, (1, prompt + 1), generator=torch.Generator().manual_seed(1)).to(device)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :prompt], position_ids=torch.arange(prompt, device=device)[None], past_key_values=cache, use_cache=True)
    return ids[:, prompt:], cache


def _step(model, token, cache, position):
    with torch.no_grad():
        return model(token, position_ids=torch.full((1, 1), position, device=token.device), past_key_values=cache, use_cache=True)


def _measure(model: torch.nn.Module, prompt: int, steps: int, device: str) -> dict:
    token, cache = _decode_setup(model, prompt, device)
    for i in range(3):  # warm up
        _step(model, token, cache, prompt + i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(model, token, cache, prompt + 3)
    top = _top_level(prof.events())
    reads = [e for e in prof.events() if e.name in HOST_READ_OPS or (e.name == "aten::to" and "cpu" in str(e.input_shapes))]
    times = []
    for i in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _step(model, token, cache, prompt + 4 + i)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return {"ops": len(top), "host_reads": len(reads), "step_ms": statistics.median(times)}


def _source() -> str:
    root = pathlib.Path(chunkllama.__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "src"], capture_output=True, text=True, check=True).stdout.strip()
        commit += "+uncommitted changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"{root} @ {commit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of this run in the results (e.g. before, after)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=700, help="prompt tokens (the model's window is 256: ~4 DCA chunks)")
    parser.add_argument("--steps", type=int, default=40, help="decode steps timed")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)

    plain = _measure(_model(args.layers, args.device), args.prompt, args.steps, args.device)
    dca = _measure(apply_dca(_model(args.layers, args.device), pretraining_length=256), args.prompt, args.steps, args.device)
    per_layer = {key: (dca[key] - plain[key]) / args.layers for key in ("ops", "host_reads", "step_ms")}
    entry = {
        "source": _source(), "device": args.device, "layers": args.layers, "prompt": args.prompt,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "unpatched": plain, "dca": dca, "dca_extra_per_layer": per_layer,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "host_ops.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[args.label] = entry
    path.write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Host work per decode step (bench/bench_host_ops.py)", "",
        "Small random Llama, dynamic cache, one decode step; 'extra per layer' = (DCA - unpatched) / layers.", "",
        "| run | source | device | layers | ops unpatched | ops DCA | extra ops / layer | host reads DCA | step ms unpatched | step ms DCA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, e in results.items():
        lines.append(
            f"| {label} | {e['source']} | {e['device']} | {e['layers']} | {e['unpatched']['ops']} | {e['dca']['ops']} | "
            f"{e['dca_extra_per_layer']['ops']:.1f} | {e['dca']['host_reads']} | {e['unpatched']['step_ms']:.2f} | {e['dca']['step_ms']:.2f} |"
        )
    (RESULTS / "host_ops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
