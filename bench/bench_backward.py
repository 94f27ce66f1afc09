"""DCA attention forward + backward: fused Triton kernels vs SDPA-flash causal (the same call), and gradient parity.

Usage (CUDA):
    python bench/bench_backward.py [--lengths 8192 16384 32768] [--parity-length 2048] [--tune 16384] [--out bench/results]

Shapes: batch 1, 32 query heads / 8 KV heads, head_dim 128, bf16 (Llama-3-8B attention), pretraining
length 8192 (chunk_size 6144, chunk_len 5120). Random inputs; ``q``, ``k``, ``v`` are leaves that
require grad, ``k`` given as cached (rotated), a fixed random cotangent ``dO``.

- ``dca_fwd_ms``: :func:`chunkllama.attention.dca_attention` (``backend="triton"``) with grad enabled
  (the forward also writes the log-sum-exp); ``dca_fwd_bwd_ms``: forward + ``out.backward(dO)``.
- ``sdpa_*``: ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`` under the
  flash backend, same tensors.
- ``*_peak_gib``: peak CUDA memory of one forward + backward above the inputs.
- Parity (``--parity-length``, GQA 4:1, a left-padded row, pretraining 1024 so 3+ chunks): max abs error
  of out/dq/dk/dv of the Triton path (bf16) and of the reference path in bf16, both against the
  reference path in fp32 on the same bf16-rounded inputs; ``ratio`` = Triton / reference (the rule: <= 2).

Timing: ``triton.testing.do_bench`` (median, grads reset to None between runs). Writes ``backward.json``
and ``backward.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from chunkllama.attention import dca_attention
from chunkllama.attention.reference import reference_dca_attention
from chunkllama.config import DCAConfig
from chunkllama.positions import key_rope_positions
from chunkllama.rope import RotaryParams, apply_rope

HQ, HK, D = 32, 8, 128
PRETRAINING = 8192


def device_info() -> dict:
    import transformers
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


def make_rope(head_dim: int = D) -> RotaryParams:
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cuda") / head_dim))
    return RotaryParams(inv_freq)


def bench_ms(fn, leaves, rep_ms: float = 400.0) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, grad_to_none=leaves, return_mode="median"))


def peak_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def speed_inputs(T: int) -> tuple:
    """Random bf16 leaves ``q (1, HQ, T, D)``, ``k``/``v (1, HK, T, D)`` that require grad, a cotangent
    ``d_out`` like ``q`` (seeded by ``T``), and positions ``0..T-1`` ``(1, T)``."""
    gen = torch.Generator(device="cuda").manual_seed(T)
    q, k, v = (torch.randn(1, h, T, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
               for h in (HQ, HK, HK))
    d_out = torch.randn(1, HQ, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v, d_out, torch.arange(T, device="cuda")[None]


def run_speed(T: int, rows: list, info: dict) -> None:
    rope, config = make_rope(), DCAConfig(PRETRAINING)
    q, k, v, d_out, positions = speed_inputs(T)
    scale = D**-0.5

    def dca():
        return dca_attention(q, k, v, positions, positions, rope, config, scale, backend="triton")

    def sdpa():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    row = {"bench": "fwd_bwd", "T": T, "Hq": HQ, "Hk": HK, "D": D, "dtype": "bf16", **info}
    for name, fn in (("dca", dca), ("sdpa", sdpa)):
        row[f"{name}_fwd_ms"] = bench_ms(fn, [q, k, v])
        row[f"{name}_fwd_bwd_ms"] = bench_ms(lambda: fn().backward(d_out), [q, k, v])
        row[f"{name}_peak_gib"] = peak_gib(lambda: fn().backward(d_out))
        q.grad = k.grad = v.grad = None
    row["dca_bwd_ms"] = row["dca_fwd_bwd_ms"] - row["dca_fwd_ms"]
    row["sdpa_bwd_ms"] = row["sdpa_fwd_bwd_ms"] - row["sdpa_fwd_ms"]
    row["fwd_bwd_dca_over_sdpa"] = row["dca_fwd_bwd_ms"] / row["sdpa_fwd_bwd_ms"]
    row["bwd_dca_over_sdpa"] = row["dca_bwd_ms"] / row["sdpa_bwd_ms"]
    print(json.dumps({k_: row[k_] for k_ in ("T", "dca_fwd_ms", "dca_fwd_bwd_ms", "sdpa_fwd_ms", "sdpa_fwd_bwd_ms",
                                              "fwd_bwd_dca_over_sdpa", "bwd_dca_over_sdpa", "dca_peak_gib",
                                              "sdpa_peak_gib")}), flush=True)
    rows.append(row)


BWD_CONFIGS = ["64,64,8,2", "64,64,4,2", "64,64,4,3", "128,64,8,2", "64,128,8,2", "128,128,8,2", "32,64,4,3",
               "64,32,4,3"]


def tune_backward(T: int, rows: list, info: dict) -> None:
    """Time forward + backward for each tiling candidate (``BLOCK_M,BLOCK_N,warps,stages``) of the dK/dV and
    the dQ kernel through ``CHUNKLLAMA_BWD_DKDV_CONFIG`` / ``CHUNKLLAMA_BWD_DQ_CONFIG``, one kernel at a time
    (the other at its default), and record the best of each."""
    rope, config = make_rope(), DCAConfig(PRETRAINING)
    q, k, v, d_out, positions = speed_inputs(T)

    def step():
        dca_attention(q, k, v, positions, positions, rope, config, D**-0.5, backend="triton").backward(d_out)

    for variable in ("CHUNKLLAMA_BWD_DKDV_CONFIG", "CHUNKLLAMA_BWD_DQ_CONFIG"):
        timings = {}
        for candidate in BWD_CONFIGS:
            os.environ[variable] = candidate
            try:
                timings[candidate] = bench_ms(step, [q, k, v], rep_ms=200)
            except Exception as exc:  # noqa: BLE001 (a tiling the compiler rejects is a row, not a crash)
                print(f"tune {variable}={candidate}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            print(f"tune {variable}={candidate}: fwd+bwd {timings[candidate]:.2f} ms at T={T}", flush=True)
        del os.environ[variable]
        best = min(timings, key=timings.get) if timings else None
        rows.append({"bench": "tune", "variable": variable, "T": T, "timings_ms": timings, "best": best, **info})


def run_parity(T: int, rows: list, info: dict) -> None:
    rope, config = make_rope(), DCAConfig(1024)
    gen = torch.Generator(device="cuda").manual_seed(1)
    batch, hq, hk = 2, 16, 4
    q, k, v, g = (torch.randn(batch, h, T, D, device="cuda", generator=gen).bfloat16().float() for h in (hq, hk, hk, hq))
    kpos = torch.arange(T, device="cuda")[None] - torch.tensor([0, 301], device="cuda")[:, None]
    rotation = key_rope_positions(kpos.clamp(min=0), config.chunk_len)
    scale = D**-0.5

    def grads(dtype, backend):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        k_rot = apply_rope(leaves[1], rope, rotation)
        if backend == "triton":
            out = dca_attention(leaves[0], k_rot, leaves[2], kpos, kpos, rope, config, scale, backend="triton")
        else:
            out = reference_dca_attention(leaves[0], k_rot, leaves[2], kpos, kpos, rope, config, scale)
        (out.float() * g).sum().backward()
        return [out.detach().float()] + [t.grad.float() for t in leaves]

    want, lowp, got = grads(torch.float32, "reference"), grads(torch.bfloat16, "reference"), grads(torch.bfloat16, "triton")
    row = {"bench": "parity", "T": T, "B": batch, "Hq": hq, "Hk": hk, "D": D, "dtype": "bf16", "pads": [0, 301], **info}
    for name, a, r, w in zip(("out", "dq", "dk", "dv"), got, lowp, want):
        err, ref_err = (a - w).abs().max().item(), (r - w).abs().max().item()
        row[name] = {"triton_err": err, "reference_bf16_err": ref_err, "ratio": err / ref_err, "max": w.abs().max().item()}
    print(json.dumps({n: row[n] for n in ("out", "dq", "dk", "dv")}), flush=True)
    rows.append(row)


def write_md(rows: list, path: Path) -> None:
    lines = ["# DCA attention forward + backward (Triton) vs SDPA-flash causal", ""]
    speed = [r for r in rows if r["bench"] == "fwd_bwd"]
    if speed:
        r0 = speed[0]
        lines += [f"{r0['device']}, torch {r0['torch']}, triton {r0['triton']}; batch 1, {HQ} q / {HK} kv heads x {D}, "
                  f"bf16, pretraining {PRETRAINING} (chunk_len 5120).", "",
                  "| T | DCA fwd ms | DCA fwd+bwd ms | SDPA fwd ms | SDPA fwd+bwd ms | fwd+bwd DCA/SDPA | bwd DCA/SDPA "
                  "| DCA peak GiB | SDPA peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in speed:
            lines.append(f"| {r['T']} | {r['dca_fwd_ms']:.2f} | {r['dca_fwd_bwd_ms']:.2f} | {r['sdpa_fwd_ms']:.2f} | "
                         f"{r['sdpa_fwd_bwd_ms']:.2f} | {r['fwd_bwd_dca_over_sdpa']:.2f}x | {r['bwd_dca_over_sdpa']:.2f}x | "
                         f"{r['dca_peak_gib']:.2f} | {r['sdpa_peak_gib']:.2f} |")
    for r in (r for r in rows if r["bench"] == "tune"):
        lines += ["", f"Tiling of `{r['variable']}` at T={r['T']} (forward + backward ms; the other kernel at its default): "
                  f"best `{r['best']}`", "", "| config | ms |", "|---|---|"]
        lines += [f"| {c} | {ms:.2f} |" for c, ms in r["timings_ms"].items()]
    for r in (r for r in rows if r["bench"] == "parity"):
        lines += ["", f"Gradient parity at T={r['T']} (B={r['B']}, {r['Hq']}/{r['Hk']} heads, pads {r['pads']}, "
                  "pretraining 1024): max abs error vs the fp32 reference path", "",
                  "| tensor | Triton bf16 | reference bf16 | ratio | max abs |", "|---|---|---|---|---|"]
        for n in ("out", "dq", "dk", "dv"):
            e = r[n]
            lines.append(f"| {n} | {e['triton_err']:.3g} | {e['reference_bf16_err']:.3g} | {e['ratio']:.2f} | {e['max']:.3g} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384, 32768])
    parser.add_argument("--parity-length", type=int, default=2048)
    parser.add_argument("--tune", type=int, default=0, metavar="T",
                        help="first time the backward kernels' tilings at this length (see tune_backward)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    info = device_info()
    rows: list = []
    if args.tune:
        tune_backward(args.tune, rows, info)
    if args.parity_length:
        run_parity(args.parity_length, rows, info)
    for T in args.lengths:
        run_speed(T, rows, info)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backward.json").write_text(json.dumps(rows, indent=1) + "\n")
    write_md(rows, args.out / "backward.md")
    print(f"wrote {args.out / 'backward.json'} and backward.md")


if __name__ == "__main__":
    main()
