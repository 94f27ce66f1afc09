"""Where do the DCA paths lose precision? A CPU emulation of their rounding steps (no GPU needed).

Usage:
    python bench/emulate_rounding.py [--out bench/results]

One attention piece (one query rotation, as each DCA phase is), head_dim 64, 1024 queries x 4096
keys, bf16 inputs, computed in float64 with bf16 rounding inserted exactly where each path rounds:

- ``reference``: the reference path on CUDA: the query rotated by ``apply_rope`` in bf16 (cos/sin
  rounded to bf16, each product and the sum rounded), scores of bf16 operands accumulated wide and
  scaled afterwards, probabilities rounded to bf16 for P·V (as the fused SDPA kernels do), output
  rounded to bf16;
- ``triton``: the kernels: the query rotated in fp32 and pre-scaled by ``scale·log2(e)``, rounded
  once to bf16; probabilities rounded to bf16 for P·V; output rounded;
- ``triton_qsplit``: as ``triton`` with the rotated query kept as bf16 hi + lo (two dots), what the
  decode kernel now does;
- ``floor``: exact everything, output rounded to bf16 (no path can beat it).

Inputs: random, plus one key with large scores (a sink, as real models have), at rotation positions
100, 3000 and 6144 (DCA's inter position), 6 seeds. Max abs error vs the exact result.

A second table emulates one **decode** step as the GPU tests run it (64 query rows, 20,481 random
keys, head_dim 128, no sink; scores ~N(0, 1), so the weights spread over many keys). There the
reference path takes its static route, fp32 from the bf16 inputs to the output (only the output is
rounded: the floor), and the decode kernel's query split already makes its scores exact, so what is
left is P·V:

- ``decode_p_rounded``: the weights rounded to bf16 for one P·V dot (the kernel before the weight split);
- ``decode_p_split``: the weights as bf16 hi + lo, two dots (``CHUNKLLAMA_DECODE_PSPLIT``, default);
- ``decode_floor``: exact, output rounded (= the reference path's decode).

Writes ``rounding_emulation.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

LOG2E = 1.4426950408889634
D, N_Q, N_K = 64, 1024, 4096


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float64)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((-x[..., D // 2:], x[..., :D // 2]), -1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_scale: float, round_p: bool) -> torch.Tensor:
    s = q @ k.T * score_scale
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    p = bf16(e) if round_p else e
    return bf16((p @ v) / e.sum(-1, keepdim=True))


def trial(seed: int, position: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    q = bf16(torch.randn(N_Q, D, generator=gen, dtype=torch.float64) * 2)
    k = bf16(torch.randn(N_K, D, generator=gen, dtype=torch.float64))
    v = bf16(torch.randn(N_K, D, generator=gen, dtype=torch.float64))
    k[0] = bf16(k[0] * 0.2)
    k[0, :6] += 8.0  # a sink: large scores for every query
    v[0] = bf16(v[0] * 0.05)
    inv_freq = (1.0 / (1e5 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))).float()
    angle = (torch.tensor(float(position), dtype=torch.float32) * inv_freq).double()  # fp32 angles, as rope.py
    angle = torch.cat((angle, angle))
    cos, sin = angle.cos(), angle.sin()
    q_exact = q * cos + rotate_half(q) * sin
    scale = D**-0.5
    exact = torch.softmax(q_exact @ k.T * scale, -1) @ v
    q_ref = bf16(bf16(q * bf16(cos)) + bf16(rotate_half(q) * bf16(sin)))
    q_tri = q_exact * scale * LOG2E
    hi = bf16(q_tri)
    outs = {
        "reference": attend(q_ref, k, v, scale, True),
        "triton": attend(hi, k, v, 1 / LOG2E, True),
        "triton_qsplit": attend(hi + bf16(q_tri - hi), k, v, 1 / LOG2E, True),
        "floor": attend(q_exact, k, v, scale, False),
    }
    return {name: (out - exact).abs().max().item() for name, out in outs.items()}


def decode_trial(seed: int, rows: int = 64, keys: int = 20_481, dim: int = 128) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1000 + seed)
    q = bf16(torch.randn(rows, dim, generator=gen, dtype=torch.float64))
    k = bf16(torch.randn(keys, dim, generator=gen, dtype=torch.float64))
    v = bf16(torch.randn(keys, dim, generator=gen, dtype=torch.float64))
    s = q @ k.T * dim**-0.5
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    l = e.sum(-1, keepdim=True)
    exact = (e @ v) / l
    hi = bf16(e)
    outs = {"decode_p_rounded": bf16((hi @ v) / l), "decode_p_split": bf16(((hi + bf16(e - hi)) @ v) / l),
            "decode_floor": bf16(exact)}
    return {name: (out - exact).abs().max().item() for name, out in outs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    errors: dict[str, list[float]] = {}
    for seed in range(6):
        for position in (100, 3000, 6144):
            for name, err in trial(seed, position).items():
                errors.setdefault(name, []).append(err)
    for seed in range(6):
        for name, err in decode_trial(seed).items():
            errors.setdefault(name, []).append(err)
    stats = {name: {"median": statistics.median(v), "max": max(v)} for name, v in errors.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rounding_emulation.json").write_text(json.dumps({"stats": stats, "errors": errors}, indent=1))
    ref = stats["reference"]
    lines = ["# Rounding emulation of one DCA attention piece (bench/emulate_rounding.py, CPU, float64 + bf16 rounding)",
             "", "| path | median max-abs error | max | median / reference |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['median']:.2e} | {s['max']:.2e} | {s['median'] / ref['median']:.2f} |"
              for name, s in stats.items() if not name.startswith("decode")]
    floor = stats["decode_floor"]
    lines += ["", "## One decode step (64 rows x 20,481 keys, head_dim 128, random; reference path = fp32 = floor)", "",
              "| path | median max-abs error | max | median / reference (floor) |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['median']:.2e} | {s['max']:.2e} | {s['median'] / floor['median']:.2f} |"
              for name, s in stats.items() if name.startswith("decode")]
    (args.out / "rounding_emulation.md").write_text("\n".join(lines + [""]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
