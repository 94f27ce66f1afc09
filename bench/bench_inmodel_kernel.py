"""The DCA prefill kernel on the inputs a model gives it vs random inputs of the same layout.

Usage (CUDA):
    python bench/bench_inmodel_kernel.py [--length 32768] [--out bench/results]

Inside ``bench_e2e.py``'s Llama-2-7B-shaped forward the kernel takes longer per layer than in
``bench_attention.py``. This separates the two possible causes: it captures the ``dca_attention``
arguments of one layer of a real forward (random bf16 weights), then times the kernel standalone
(``triton.testing.do_bench``) on (a) those captured tensors, (b) fresh ``randn`` tensors with exactly
the captured shapes and strides, (c) the captured tensors copied to contiguous (B, H, T, D). Equal
times for (a) and (b) mean the inputs are not the cause (then it is the running conditions: clocks,
power, what runs before). Writes ``inmodel_kernel.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import chunkllama
import chunkllama.patching as patching


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    import transformers
    import triton

    from bench_e2e import LLAMA2_7B, build_model

    model = build_model()
    chunkllama.apply_dca(model, LLAMA2_7B["max_position_embeddings"], backend="triton")
    captured: list = []
    original = patching.dca_attention

    def capture(*a, **kw):
        if len(captured) == args.layer:
            captured.append(tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in a) + (kw,))
        else:
            captured.append(None)
        return original(*a, **kw)

    patching.dca_attention = capture
    try:
        ids = torch.randint(0, LLAMA2_7B["vocab_size"], (1, args.length), device="cuda")
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)
    finally:
        patching.dca_attention = original
    query, key, value, qpos, kpos, rope, config, kwargs = captured[args.layer]
    del model
    torch.cuda.empty_cache()

    def like(t: torch.Tensor) -> torch.Tensor:
        fresh = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        return fresh.copy_(torch.randn(t.shape, dtype=t.dtype, device=t.device))

    def time_it(q, k, v) -> float:
        fn = lambda: original(q, k, v, qpos, kpos, rope, config, **kwargs)  # noqa: E731
        return float(triton.testing.do_bench(fn, warmup=100, rep=1000, return_mode="median"))

    results = {
        "captured_ms": time_it(query, key, value),
        "random_same_strides_ms": time_it(like(query), like(key), like(value)),
        "captured_contiguous_ms": time_it(query.contiguous(), key.contiguous(), value.contiguous()),
        "strides": {"query": query.stride(), "key": key.stride(), "value": value.stride()},
        "input_std": {"query": float(query.float().std()), "key": float(key.float().std()),
                      "value": float(value.float().std())},
        "T": args.length, "layer": args.layer, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "transformers": transformers.__version__,
    }
    results["captured_ms_again"] = time_it(query, key, value)
    print(json.dumps(results, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inmodel_kernel.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
