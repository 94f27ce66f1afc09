"""Host (CPU) time of one DCA decode step, layer by layer of the call stack, vs SDPA.

Usage (CUDA):
    python bench/bench_host_overhead.py [--cache 16384] [--cprofile] [--label NAME] [--out bench/results]
    CHUNKLLAMA_FAST_LAUNCH=0 python bench/bench_host_overhead.py --label triton_run   # Triton's own launch path

A one-token decode step is short on the GPU (tens of microseconds), so the Python path that launches
it can cost as much as the kernels. This times, on the host only (GPU work left running behind),
each level of the call: ``dca_attention`` (validation + backend choice + launch),
``triton_dispatch.launch``, ``dca_decode`` (allocations + two kernel launches), and the pieces it is
made of; and ``F.scaled_dot_product_attention`` on the same tensors for comparison.
Shapes as ``bench_attention.py`` decode: batch 1, 32 q heads / 8 kv heads, head_dim 128, bf16.
Writes ``host_overhead[_LABEL].json`` and ``.md``; the info says whether kernels were launched through
:class:`chunkllama.attention.triton_launch.CachedLaunch` (``fast_launch``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from chunkllama.attention import dca_attention, rotate_keys, triton_dispatch
from chunkllama.attention.triton_decode import dca_decode
from chunkllama.attention.triton_launch import fast_launch_enabled
from chunkllama.config import DCAConfig
from chunkllama.rope import RotaryParams, apply_rope

from bench_attention import host_us  # bench/ is on sys.path when run as a script

HQ, HK, D = 32, 8, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=int, default=16384)
    parser.add_argument("--cprofile", action="store_true", help="also print where dca_attention's host time goes")
    parser.add_argument("--label", default="", help="suffix of the result files (e.g. the launch path measured)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    import triton

    T = args.cache
    config = DCAConfig(8192)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device="cuda") / D))
    rope = RotaryParams(inv_freq, 1.0)
    scale = D**-0.5
    torch.manual_seed(0)
    q = torch.randn(1, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HK, T, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, HK, T, D, device="cuda", dtype=torch.bfloat16)
    kpos = torch.arange(T, device="cuda").unsqueeze(0)
    k = apply_rope(k, rope, kpos % config.chunk_len)
    qpos = kpos[:, -1:]
    decode_args = (q, k, v, qpos, kpos, rope.inv_freq, 1.0, config.chunk_len, config.chunk_size, scale)

    rows = {
        "dca_attention (backend=triton)": lambda: dca_attention(q, k, v, qpos, kpos, rope, config, scale,
                                                                backend="triton"),
        "dca_attention (backend=auto)": lambda: dca_attention(q, k, v, qpos, kpos, rope, config, scale),
        "triton_dispatch.launch": lambda: triton_dispatch.launch(q, k, v, qpos, kpos, rope, config, scale),
        "triton_dispatch.unsupported_reason": lambda: triton_dispatch.unsupported_reason(q, k, v),
        "dca_decode": lambda: dca_decode(*decode_args),
        "rotate_keys (the new token's key)": lambda: rotate_keys(k[:, :, -1:], rope, qpos),
        "3 x torch.empty": lambda: [torch.empty(1024, device="cuda") for _ in range(3)],
        "F.scaled_dot_product_attention (enable_gqa)": lambda: F.scaled_dot_product_attention(
            q, k, v, scale=scale, enable_gqa=True),
    }
    results = {name: round(host_us(fn, calls=500, rounds=5, warmup=20), 1) for name, fn in rows.items()}
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cache": T, "fast_launch": fast_launch_enabled(), "label": args.label}
    for name, us in results.items():
        print(f"{us:8.1f} us  {name}", flush=True)
    if args.cprofile:
        import cProfile
        import pstats

        fn = rows["dca_attention (backend=auto)"]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(2000):
            fn()
        profiler.disable()
        torch.cuda.synchronize()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "host_overhead" + (f"_{args.label}" if args.label else "")
    (args.out / f"{stem}.json").write_text(json.dumps({"host_us": results, **info}, indent=1))
    path = "CachedLaunch (direct launcher call)" if info["fast_launch"] else "Triton's JITFunction.run"
    lines = [f"# Host time of one decode step (cache {T})", "",
             f"{info['device']}, torch {info['torch']}, triton {info['triton']}. Best of 5 rounds of 500 calls. "
             f"Kernels launched through {path}.", "",
             "| call | host us |", "|---|---|"]
    lines += [f"| {name} | {us} |" for name, us in results.items()]
    (args.out / f"{stem}.md").write_text("\n".join(lines + [""]))


if __name__ == "__main__":
    main()
