"""Speed of the DCA Triton kernels reading the FP8 cache vs the bf16 cache (and the cost of quantizing).

Usage (CUDA): ``python bench/bench_fp8_attention.py [--lengths 16k 64k] [--decode-lengths 32k 128k 512k]``

Llama-3-8B attention shapes: batch 1, 32 query / 8 KV heads, head_dim 128, bf16 queries, DCA with
pretraining length 8192. For each length: ``dca_attention(backend="triton")`` on bf16 keys/values and
on the same keys/values packed as FP8 rows (:mod:`chunkllama.attention.fp8`); prefill over the whole
prompt (packed rows dequantized by a kernel, then the bf16 prefill kernel), decode one token against a
cache of that length (the decode kernel reads the packed rows). Also the time of :func:`quantize_kv` for one
prefill piece (5120 tokens, keys and values) and one decode token, as the patched forward runs it.
Timing: ``triton.testing.do_bench`` (median of CUDA-event timings). Writes ``fp8_attention.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import triton
import triton.testing

from chunkllama.attention import dca_attention
from chunkllama.attention.fp8 import quantize_kv
from chunkllama.config import DCAConfig
from chunkllama.planner import parse_size
from chunkllama.rope import RotaryParams

HQ, HK, D = 32, 8, 128


def _inputs(q_len: int, kv_len: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HQ, q_len, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, HK, kv_len, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, HK, kv_len, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    kpos = torch.arange(kv_len, device="cuda")[None]
    return q, k, v, kpos[:, kv_len - q_len:], kpos


def _time(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=5, rep=50))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", nargs="*", default=["16k", "64k"], help="prefill lengths")
    ap.add_argument("--decode-lengths", nargs="*", default=["32k", "128k", "512k"])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    config = DCAConfig(8192)
    rope = RotaryParams(1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D)), 1.0)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "host": platform.node()}
    rows = []
    for kind, lengths in (("prefill", args.lengths), ("decode", args.decode_lengths)):
        for text in lengths:
            length = parse_size(text, what="length")
            q, k, v, qpos, kpos = _inputs(length if kind == "prefill" else 1, length)
            kp, vp = quantize_kv(k), quantize_kv(v)
            bf16 = dca_attention(q, k, v, qpos, kpos, rope, config, backend="triton")
            fp8 = dca_attention(q, kp, vp, qpos, kpos, rope, config, backend="triton")
            row = {
                "bench": kind, "T": length,
                "bf16_ms": _time(lambda: dca_attention(q, k, v, qpos, kpos, rope, config, backend="triton")),
                "fp8_ms": _time(lambda: dca_attention(q, kp, vp, qpos, kpos, rope, config, backend="triton")),
                "rel_rms_fp8_vs_bf16": ((fp8.float() - bf16.float()).norm() / bf16.float().norm()).item(),
                "cache_bytes_ratio": (kp.numel() + vp.numel()) / (2 * (k.numel() + v.numel())), **info,
            }
            row["fp8_over_bf16"] = round(row["fp8_ms"] / row["bf16_ms"], 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
            del q, k, v, kp, vp
            torch.cuda.empty_cache()
    for tokens in (5120, 1):
        x = torch.randn(1, HK, tokens, D, device="cuda", dtype=torch.bfloat16)
        row = {"bench": "quantize", "T": tokens, "ms": _time(lambda: (quantize_kv(x), quantize_kv(x))), **info}
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8_attention.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [f"# DCA Triton kernels, FP8 cache vs bf16 cache — {info['device']}, torch {info['torch']}, "
             f"triton {info['triton']}", "", "Llama-3-8B attention shapes (32 q / 8 KV heads x 128), batch 1, DCA L=8192.", "",
             "| op | T | bf16 cache ms | FP8 cache ms | FP8 / bf16 | output rel. RMS diff |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['bench']} | {r['T']} | {r['bf16_ms']:.3f} | {r['fp8_ms']:.3f} | {r['fp8_over_bf16']} | "
              f"{r['rel_rms_fp8_vs_bf16']:.4f} |" for r in rows if r["bench"] != "quantize"]
    lines += ["", "| quantize_kv (keys + values) | tokens | ms |", "|---|---|---|"]
    lines += [f"| per layer | {r['T']} | {r['ms']:.4f} |" for r in rows if r["bench"] == "quantize"]
    (args.out / "fp8_attention.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
