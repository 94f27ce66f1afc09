"""DCA attention forward + backward: fused Triton kernels vs SDPA-flash causal (the same call), and gradient parity.

Usage (CUDA):
    python bench/bench_backward.py [--lengths 8192 16384 32768] [--parity-length 2048] [--tune 16384]
        [--head-dim 128] [--stem backward] [--out bench/results]

Shapes: batch 1, 32 query heads / 8 KV heads, head_dim 128 (``--head-dim 64``: 64), bf16 (Llama-3-8B attention), pretraining
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

``--tune T`` first times the backward's tiling candidates (:func:`tune_backward`) and runs the rows below
with the best; without it the rows use the kernels' defaults.

Timing: ``triton.testing.do_bench`` (median, grads reset to None between runs). Writes ``STEM.json``
and ``STEM.md``.
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
# ``BLOCK_M,BLOCK_N,warps,stages`` candidates; the dK/dV walk takes its phased form when BLOCK_N % BLOCK_M == 0
DKDV_CONFIGS = ["64,64,8,2", "64,64,4,3", "32,64,4,3", "16,64,4,4", "32,128,4,3", "32,128,4,5", "32,128,8,3",
                "64,128,8,3", "64,128,8,2", "16,128,4,4"]
DQ_CONFIGS = ["64,64,8,2", "64,64,4,3", "64,32,4,4", "128,32,4,3", "128,32,8,3", "128,32,4,5", "128,64,8,3",
              "128,128,8,2"]


def device_info() -> dict:
    import transformers
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


def make_rope(head_dim: int | None = None) -> RotaryParams:
    head_dim = head_dim or D
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


def run_speed(T: int, rows: list, info: dict, tiles: dict | None = None) -> None:
    """One row: DCA with the backward's tilings ``tiles`` (environment settings; None values: the defaults)
    vs SDPA flash, forward and forward + backward."""
    run_with_tiles(tiles, lambda: _run_speed(T, rows, info))
    rows[-1].update(tiles={n: t for n, t in (tiles or {}).items() if t})


def run_with_tiles(tiles: dict | None, fn) -> None:
    """``fn()`` with the tilings ``tiles`` (environment settings; None values: the defaults) set."""
    env = {n: t for n, t in (tiles or {}).items() if t}
    saved = {n: os.environ.get(n) for n in env}
    os.environ.update(env)
    try:
        fn()
    finally:
        for n, value in saved.items():
            if value is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = value


def _run_speed(T: int, rows: list, info: dict) -> None:
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
    print(os.environ.get("CHUNKLLAMA_BWD_DKDV_CONFIG"), os.environ.get("CHUNKLLAMA_BWD_DQ_CONFIG"), json.dumps({k_: row[k_] for k_ in ("T", "dca_fwd_ms", "dca_fwd_bwd_ms", "sdpa_fwd_ms", "sdpa_fwd_bwd_ms",
                                              "fwd_bwd_dca_over_sdpa", "bwd_dca_over_sdpa", "dca_peak_gib",
                                              "sdpa_peak_gib")}), flush=True)
    rows.append(row)




def _tune_one(variable: str, candidates: list, step, leaves: list, T: int, rows: list, info: dict) -> str | None:
    """Time ``step`` for each value of ``variable``; leaves the best set in the environment and returns it."""
    timings = {}
    for candidate in candidates:
        os.environ[variable] = candidate
        try:
            timings[candidate] = bench_ms(step, leaves, rep_ms=200)
        except Exception as exc:  # noqa: BLE001 (a tiling the compiler rejects is a row, not a crash)
            print(f"tune {variable}={candidate}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            continue
        print(f"tune {variable}={candidate}: fwd+bwd {timings[candidate]:.2f} ms at T={T}", flush=True)
    best = min(timings, key=timings.get) if timings else None
    if best is None:
        del os.environ[variable]
    else:
        os.environ[variable] = best
    rows.append({"bench": "tune", "variable": variable, "head_dim": D, "T": T, "timings_ms": timings, "best": best,
                 **info})
    return best


def tune_backward(T: int, rows: list, info: dict) -> dict:
    """Time forward + backward for each tiling candidate (``BLOCK_M,BLOCK_N,warps,stages``) through
    ``CHUNKLLAMA_BWD_DKDV_CONFIG`` / ``CHUNKLLAMA_BWD_DQ_CONFIG``: the dK/dV kernel first (dQ at its
    default), then the dQ kernel (dK/dV at its best). Returns the best tilings as environment settings,
    for the speed rows."""
    rope, config = make_rope(), DCAConfig(PRETRAINING)
    q, k, v, d_out, positions = speed_inputs(T)

    def step():
        dca_attention(q, k, v, positions, positions, rope, config, D**-0.5, backend="triton").backward(d_out)

    for variable, candidates in (("CHUNKLLAMA_BWD_DKDV_CONFIG", DKDV_CONFIGS), ("CHUNKLLAMA_BWD_DQ_CONFIG", DQ_CONFIGS)):
        _tune_one(variable, candidates, step, [q, k, v], T, rows, info)
    best = {n: os.environ.pop(n, None) for n in ("CHUNKLLAMA_BWD_DKDV_CONFIG", "CHUNKLLAMA_BWD_DQ_CONFIG")}
    return best


def run_parity(T: int, rows: list, info: dict) -> None:
    rope, config = make_rope(), DCAConfig(1024)
    gen = torch.Generator(device="cuda").manual_seed(1)
    batch, hq, hk = 2, 16, 4
    q, k, v, g = (torch.randn(batch, h, T, D, device="cuda", generator=gen).bfloat16().float() for h in (hq, hk, hk, hq))
    kpos = torch.arange(T, device="cuda")[None] - torch.tensor([0, 301], device="cuda")[:, None]
    rotation = key_rope_positions(kpos.clamp(min=0), config.chunk_len)
    scale = D**-0.5

    def grads(dtype, backend):
        leaves = [t.to(dtype, copy=True).requires_grad_(True) for t in (q, k, v)]
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
                  "| tiles | T | DCA fwd ms | DCA fwd+bwd ms | SDPA fwd ms | SDPA fwd+bwd ms | fwd+bwd DCA/SDPA "
                  "| bwd DCA/SDPA | DCA peak GiB | SDPA peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in speed:
            tiles = ", ".join(f"{n.split('_')[2].lower()} {t}" for n, t in r.get("tiles", {}).items()) or "defaults"
            lines.append(f"| {tiles} | {r['T']} | {r['dca_fwd_ms']:.2f} | {r['dca_fwd_bwd_ms']:.2f} | {r['sdpa_fwd_ms']:.2f} | "
                         f"{r['sdpa_fwd_bwd_ms']:.2f} | {r['fwd_bwd_dca_over_sdpa']:.2f}x | {r['bwd_dca_over_sdpa']:.2f}x | "
                         f"{r['dca_peak_gib']:.2f} | {r['sdpa_peak_gib']:.2f} |")
    for r in (r for r in rows if r["bench"] == "tune"):
        lines += ["", f"Tiling of `{r['variable']}` (head_dim {r['head_dim']}) at T={r['T']} "
                  f"(forward + backward ms): best `{r['best']}`", "", "| config | ms |", "|---|---|"]
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
    global D
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384, 32768])
    parser.add_argument("--parity-length", type=int, default=2048)
    parser.add_argument("--tune", type=int, default=0, metavar="T",
                        help="first time the backward kernels' tilings at this length (see tune_backward)")
    parser.add_argument("--head-dim", type=int, default=D, choices=[64, 128],
                        help="head_dim of the attention shapes (32 q / 8 kv heads either way)")
    parser.add_argument("--stem", default="backward", help="results file names: STEM.json and STEM.md")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    D = args.head_dim
    info = device_info()
    rows: list = []
    tiles = tune_backward(args.tune, rows, info) if args.tune else {}
    if args.parity_length:
        run_with_tiles(tiles, lambda: run_parity(args.parity_length, rows, info))
    for T in args.lengths:
        run_speed(T, rows, info, tiles)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    write_md(rows, args.out / f"{args.stem}.md")
    print(f"wrote {args.out / args.stem}.json and .md")


if __name__ == "__main__":
    main()
