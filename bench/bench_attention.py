"""DCA attention speed: fused Triton kernels vs one causal SDPA-flash call vs the three-call composition.

Usage (CUDA):
    python bench/bench_attention.py [--lengths 8192 16384 32768 65536 131072]
        [--decode-lengths 16384 32768 65536 131072] [--tune] [--tune-length 16384] [--tune-decode]
        [--tune-decode-lengths 16384 131072] [--kv-heads 8|32] [--layout bhtd|bthd] [--pretraining-length 8192]
        [--q-heads 32] [--head-dim 128|64] [--out bench/results] [--stem attention]

Shapes: batch 1, 32 query heads / 8 KV heads, head_dim 128 (SmolLM2-135M: ``--q-heads 9 --kv-heads 3
--head-dim 64``), bf16, pretraining length 8192
(chunk_size 6144, local_window 1024, chunk_len 5120). Random inputs (never zeros).

- ``dca_ms``: :func:`chunkllama.attention.dca_attention` with ``backend="triton"`` (unrotated queries,
  keys as cached), positions included.
- ``sdpa_ms``: ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`` under the
  flash backend on the same tensors (decode: one query, no mask).
- ``sdpa_default_backend_ms``: the same causal call with no backend forced (K/V repeated to the query
  heads, as an unpatched model does): cuDNN on Hopper with recent torch, which the end-to-end
  comparison meets.
- decode ``sdpa_default_graph_ms``: one query through SDPA with no backend forced, K/V repeated to the
  query heads (transformers' ``repeat_kv`` path, taken when an attention mask is passed, e.g. padded
  batches), as CUDA-graph replays. A batch-1 decode in transformers 5.x passes no mask and calls SDPA
  with ``enable_gqa`` instead: ``sdpa_gqa_graph_ms`` (no backend forced; cuDNN on Hopper).
- ``three_call_ms``: the published approach: three rotated copies of the queries, per query chunk one
  causal flash call (own chunk), one over the previous chunk and one over all earlier chunks, merged
  by log-sum-exp in fp32 (``torch.ops.aten._scaled_dot_product_flash_attention``, which returns the LSE;
  K/V repeated to the query heads beforehand, outside the timing).
- TFLOP/s = ``2 * T**2 * Hq * D / time`` (issue 3's causal count).
Each output is also checked against the three-call composition (max abs difference).

Timing: ``triton.testing.do_bench`` (CUDA events, warm-up, median; it flushes L2 between runs).
Decode is also timed as CUDA-graph replays (``*_graph_ms``: GPU time alone, as a server that
captures its decode step sees it) and by the host time of one eager call (``*_host_us``), since a
one-token step is short enough for the Python launch path to show.
Writes ``STEM.json`` (rows ``{"bench": "prefill"|"decode", "T", "dca_ms", "sdpa_ms", ...}``) and
``STEM.md`` (``--stem``, default ``attention``); ``--lengths`` with no value skips prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from chunkllama.attention import dca_attention
from chunkllama.config import DCAConfig
from chunkllama.positions import query_rope_positions
from chunkllama.rope import RotaryParams, apply_rope

HQ, HK, D = 32, 8, 128  # changed from the command line (--q-heads, --kv-heads, --head-dim), as LAYOUT (--layout)
PRETRAINING = 8192
LAYOUT = "bhtd"
DECODE_CONFIGS = ["128,8,2,4", "128,8,2,2", "128,8,3,4", "128,8,2,8", "128,8,1,4", "64,8,2,4", "64,8,3,2", "64,4,3,2",
                  "128,4,2,2", "128,4,2,4", "64,4,4,4", "64,4,2,8", "64,8,4,2", "128,8,2,1"]
TUNE_CONFIGS = ["128,64,8,3", "128,128,8,3", "128,64,4,3", "128,128,8,2", "64,64,4,3", "128,64,8,4", "128,64,8,2"]


def device_info() -> dict:
    import triton
    import transformers

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def bench_ms(fn, rep_ms: float = 500.0) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=100, rep=rep_ms, return_mode="median"))


def graph_ms(fn, rep_ms: float = 200.0) -> float:
    """Median time of ``fn`` captured in a CUDA graph and replayed: GPU time without the Python launch path."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay, rep_ms)


def host_us(fn, calls: int = 200, rounds: int = 1, warmup: int = 10) -> float:
    """Host time of one call (the Python path and the launches), GPU work left to run behind it;
    the best of ``rounds`` rounds of ``calls`` calls (the host is shared with the driver's threads)."""
    import time

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
        torch.cuda.synchronize()
    return best / calls * 1e6


def make_rope() -> RotaryParams:
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device="cuda") / D))
    return RotaryParams(inv_freq, 1.0)


def flash(q, k, v, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return out, lse


def three_call(q, k_rep, v_rep, positions, rope, config, scale):
    """The published DCA composition: per query chunk up to three flash calls, merged by LSE (fp32)."""
    cl, cs = config.chunk_len, int(config.chunk_size)
    q_len, kv_len = q.shape[2], k_rep.shape[2]
    past = kv_len - q_len
    intra_p, succ_p, inter_p = query_rope_positions(positions, cl, cs)
    q_intra, q_succ, q_inter = (apply_rope(q, rope, p) for p in (intra_p, succ_p, inter_p))
    out = torch.empty_like(q)
    first_chunk = past // cl
    for c in range(first_chunk, (kv_len - 1) // cl + 1):
        ks, ke = c * cl, min((c + 1) * cl, kv_len)  # key range of this chunk
        qs, qe = max(ks, past) - past, ke - past  # its queries
        parts = [flash(q_intra[:, :, qs:qe], k_rep[:, :, ks:ke], v_rep[:, :, ks:ke], True, scale)]
        if c >= 1:
            parts.append(flash(q_succ[:, :, qs:qe], k_rep[:, :, ks - cl:ks], v_rep[:, :, ks - cl:ks], False, scale))
        if c >= 2:
            parts.append(flash(q_inter[:, :, qs:qe], k_rep[:, :, :ks - cl], v_rep[:, :, :ks - cl], False, scale))
        lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
        acc = sum(p[0].float() * torch.exp(p[1] - lse).unsqueeze(-1) for p in parts)
        out[:, :, qs:qe] = acc.to(q.dtype)
    return out


def sdpa_flash(q, k, v, causal, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)


def inputs(q_len: int, kv_len: int, rope: RotaryParams, config: DCAConfig, seed: int = 0):
    torch.manual_seed(seed)
    if LAYOUT == "bthd":  # what a HF model's projections give: (B, T, H, D) viewed as (B, H, T, D)
        q = torch.randn(1, q_len, HQ, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(1, kv_len, HK, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(1, kv_len, HK, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    else:
        q = torch.randn(1, HQ, q_len, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, HK, kv_len, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, HK, kv_len, D, device="cuda", dtype=torch.bfloat16)
    kpos = torch.arange(kv_len, device="cuda").unsqueeze(0)
    k = apply_rope(k, rope, kpos % config.chunk_len)
    if LAYOUT == "bthd":
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
    return q, k, v, kpos[:, kv_len - q_len:], kpos


def run_prefill(T: int, rope, config, scale, rows: list, info: dict) -> None:
    q, k, v, qpos, kpos = inputs(T, T, rope, config)
    dca = lambda: dca_attention(q, k, v, qpos, kpos, rope, config, scale, backend="triton")  # noqa: E731
    sdpa = lambda: sdpa_flash(q, k, v, True, scale)  # noqa: E731
    k_rep, v_rep = k.repeat_interleave(HQ // HK, 1), v.repeat_interleave(HQ // HK, 1)
    three = lambda: three_call(q, k_rep, v_rep, qpos, rope, config, scale)  # noqa: E731
    out = dca()
    ref = three()
    diff = (out.float() - ref.float()).abs().max().item()
    rep_ms = 300.0 if T <= 32768 else 1500.0
    dca_ms, sdpa_ms, three_ms = bench_ms(dca, rep_ms), bench_ms(sdpa, rep_ms), bench_ms(three, rep_ms)
    # what an unpatched model gets: SDPA left to pick its backend (cuDNN on Hopper with recent torch)
    default_ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=scale), rep_ms)
    flops = 2.0 * T * T * HQ * D
    row = {
        "bench": "prefill", "T": T, "dca_ms": round(dca_ms, 3), "sdpa_ms": round(sdpa_ms, 3),
        "three_call_ms": round(three_ms, 3), "dca_over_sdpa": round(dca_ms / sdpa_ms, 3),
        "sdpa_default_backend_ms": round(default_ms, 3), "dca_over_sdpa_default": round(dca_ms / default_ms, 3),
        "three_call_over_sdpa": round(three_ms / sdpa_ms, 3),
        "dca_tflops": round(flops / dca_ms / 1e9, 1), "sdpa_tflops": round(flops / sdpa_ms / 1e9, 1),
        "max_abs_diff_vs_three_call": diff, "batch": 1, "q_heads": HQ, "kv_heads": HK, "head_dim": D,
        "dtype": "bfloat16", "layout": LAYOUT, "dca_config": config.to_dict(),
        "prefill_config": os.environ.get("CHUNKLLAMA_PREFILL_CONFIG", "default"),
        "prefill_qsplit": os.environ.get("CHUNKLLAMA_PREFILL_QSPLIT", "default"), **info,
    }
    rows.append(row)
    print(json.dumps({k_: row[k_] for k_ in ("bench", "T", "dca_ms", "sdpa_ms", "three_call_ms", "dca_over_sdpa",
                                              "sdpa_default_backend_ms", "dca_over_sdpa_default",
                                              "dca_tflops", "max_abs_diff_vs_three_call")}), flush=True)
    del q, k, v, k_rep, v_rep, out, ref
    torch.cuda.empty_cache()


def run_decode(T: int, rope, config, scale, rows: list, info: dict) -> None:
    q, k, v, qpos, kpos = inputs(1, T, rope, config)
    dca = lambda: dca_attention(q, k, v, qpos, kpos, rope, config, scale, backend="triton")  # noqa: E731
    sdpa = lambda: sdpa_flash(q, k, v, False, scale)  # noqa: E731
    # Decode through flash with the query heads of a group as rows (K/V read once per KV head).
    q_packed = lambda: q.reshape(1, HK, HQ // HK, D)  # noqa: E731
    sdpa_packed = lambda: sdpa_flash(q_packed(), k, v, False, scale)  # noqa: E731

    def three():
        cl, cs = config.chunk_len, int(config.chunk_size)
        p = qpos
        qs = [apply_rope(q, rope, x).reshape(1, HK, HQ // HK, D) for x in query_rope_positions(p, cl, cs)]
        c = (T - 1) // cl
        ks = c * cl
        parts = [flash(qs[0], k[:, :, ks:], v[:, :, ks:], False, scale)]
        if c >= 1:
            parts.append(flash(qs[1], k[:, :, ks - cl:ks], v[:, :, ks - cl:ks], False, scale))
        if c >= 2:
            parts.append(flash(qs[2], k[:, :, :ks - cl], v[:, :, :ks - cl], False, scale))
        lse = torch.logsumexp(torch.stack([x[1] for x in parts]), dim=0)
        acc = sum(x[0].float() * torch.exp(x[1] - lse).unsqueeze(-1) for x in parts)
        return acc.to(q.dtype).view(1, HQ, 1, D)

    out, ref = dca(), three()
    diff = (out.float() - ref.float()).abs().max().item()
    dca_ms, three_ms, packed_ms = bench_ms(dca, 200), bench_ms(three, 200), bench_ms(sdpa_packed, 200)
    try:
        sdpa_ms, sdpa_kind = bench_ms(sdpa, 200), "flash enable_gqa"
    except RuntimeError:
        sdpa_ms, sdpa_kind = packed_ms, "flash, query heads of a group packed as rows"
    sdpa_fn = sdpa if sdpa_kind == "flash enable_gqa" else sdpa_packed
    dca_graph, sdpa_graph = graph_ms(dca), graph_ms(sdpa_fn)
    # SDPA with no backend forced on K/V repeated to the query heads (transformers' masked path)
    k_rep, v_rep = k.repeat_interleave(HQ // HK, dim=1), v.repeat_interleave(HQ // HK, dim=1)
    default_graph = graph_ms(lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, scale=scale))
    del k_rep, v_rep
    # what a batch-1 decode step of transformers 5.x runs: no mask, enable_gqa, no backend forced (cuDNN on Hopper)
    try:
        gqa_graph = graph_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True))
    except RuntimeError as exc:  # a torch build whose default backends refuse it: the row says so
        print(f"SDPA enable_gqa: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        gqa_graph = float("nan")
    dca_host, sdpa_host = host_us(dca), host_us(sdpa_fn)
    kv_bytes = 2 * T * HK * D * 2
    row = {
        "bench": "decode", "T": T, "dca_ms": round(dca_ms, 4), "sdpa_ms": round(sdpa_ms, 4), "sdpa_kind": sdpa_kind,
        "dca_graph_ms": round(dca_graph, 4), "sdpa_graph_ms": round(sdpa_graph, 4),
        "sdpa_default_graph_ms": round(default_graph, 4), "dca_over_sdpa_default_graph": round(dca_graph / default_graph, 3),
        "sdpa_gqa_graph_ms": round(gqa_graph, 4), "dca_over_sdpa_gqa_graph": round(dca_graph / gqa_graph, 3),
        "dca_over_sdpa_graph": round(dca_graph / sdpa_graph, 3),
        "dca_host_us": round(dca_host, 1), "sdpa_host_us": round(sdpa_host, 1),
        "decode_config": os.environ.get("CHUNKLLAMA_DECODE_CONFIG", "default"),
        "sdpa_packed_ms": round(packed_ms, 4), "three_call_ms": round(three_ms, 4),
        "dca_over_sdpa": round(dca_ms / sdpa_ms, 3), "three_call_over_sdpa": round(three_ms / sdpa_ms, 3),
        "dca_kv_gbps": round(kv_bytes / dca_ms / 1e6, 1), "max_abs_diff_vs_three_call": diff,
        "batch": 1, "q_heads": HQ, "kv_heads": HK, "head_dim": D, "dtype": "bfloat16",
        "dca_config": config.to_dict(), **info,
    }
    rows.append(row)
    print(json.dumps({k_: row[k_] for k_ in ("bench", "T", "dca_ms", "sdpa_ms", "sdpa_packed_ms", "three_call_ms",
                                              "dca_over_sdpa", "dca_graph_ms", "sdpa_graph_ms", "dca_over_sdpa_graph",
                                              "sdpa_default_graph_ms", "dca_over_sdpa_default_graph",
                                              "sdpa_gqa_graph_ms", "dca_over_sdpa_gqa_graph",
                                              "dca_host_us", "sdpa_host_us", "max_abs_diff_vs_three_call")}),
          flush=True)


def tune_decode(rope, config, scale, lengths: list[int]) -> str:
    """Time each of DECODE_CONFIGS (graph replay, so launch overhead does not hide the kernel); keep the best."""
    results = {}
    for cfg in DECODE_CONFIGS:
        os.environ["CHUNKLLAMA_DECODE_CONFIG"] = cfg
        total = 0.0
        for T in lengths:
            q, k, v, qpos, kpos = inputs(1, T, rope, config)
            try:
                ms = graph_ms(lambda: dca_attention(q, k, v, qpos, kpos, rope, config, scale, backend="triton"))
            except Exception as exc:  # a config the compiler rejects (shared memory)
                print(f"tune decode {cfg}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                total = float("inf")
                break
            print(f"tune decode {cfg}: {ms * 1e3:.1f} us at T={T}", flush=True)
            total += ms
        results[cfg] = total
    best = min(results, key=results.get)
    os.environ["CHUNKLLAMA_DECODE_CONFIG"] = best
    return best


def tune(rope, config, scale, T: int) -> str:
    q, k, v, qpos, kpos = inputs(T, T, rope, config)
    best = None
    for cfg in TUNE_CONFIGS:
        os.environ["CHUNKLLAMA_PREFILL_CONFIG"] = cfg
        try:
            with warnings.catch_warnings():  # a query split that falls back to one tile is a failed config
                warnings.simplefilter("error", RuntimeWarning)
                ms = bench_ms(lambda: dca_attention(q, k, v, qpos, kpos, rope, config, scale, backend="triton"), 300)
        except Exception as exc:  # a config the compiler rejects (shared memory)
            print(f"tune {cfg}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        print(f"tune {cfg}: {ms:.3f} ms at T={T}", flush=True)
        if best is None or ms < best[1]:
            best = (cfg, ms)
    assert best is not None
    os.environ["CHUNKLLAMA_PREFILL_CONFIG"] = best[0]
    return best[0]


def _cell(row: dict, key: str, digits: int) -> str:
    """``row[key]`` to ``digits`` decimals, or a dash for rows of runs that did not measure it."""
    return f"{row[key]:.{digits}f}" if key in row else "—"


def write_md(rows: list, info: dict, path: Path) -> None:
    lines = [
        f"# DCA attention: fused Triton vs SDPA flash vs three-call composition",
        "",
        f"{info['device']}, torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}. Batch 1, "
        f"{HQ} q heads / {HK} kv heads, head_dim {D}, bf16, layout {LAYOUT}, pretraining length {PRETRAINING} "
        f"({DCAConfig(PRETRAINING).to_dict()}); CHUNKLLAMA_PREFILL_QSPLIT="
        f"{os.environ.get('CHUNKLLAMA_PREFILL_QSPLIT', '(unset: default)')}. Median of CUDA-event timings (triton do_bench).",
        "",
        "## Prefill (causal, whole prompt)",
        "",
        "| T | DCA Triton ms | SDPA flash ms | three-call ms | DCA / SDPA | three-call / SDPA | DCA TFLOP/s | "
        "SDPA TFLOP/s | SDPA default backend ms | DCA / SDPA default | max abs diff vs three-call |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["bench"] == "prefill":
            lines.append(
                f"| {r['T']} | {r['dca_ms']:.2f} | {r['sdpa_ms']:.2f} | {r['three_call_ms']:.2f} | "
                f"{r['dca_over_sdpa']:.3f} | {r['three_call_over_sdpa']:.3f} | {r['dca_tflops']} | "
                f"{r['sdpa_tflops']} | {r['sdpa_default_backend_ms']:.2f} | {r['dca_over_sdpa_default']:.3f} | "
                f"{r['max_abs_diff_vs_three_call']:.2e} |"
            )
    lines += [
        "",
        "## Decode (one token against a cache of T)",
        "",
        "| cache T | DCA Triton ms | SDPA flash ms | SDPA flash, heads packed ms | three-call ms | DCA / SDPA | "
        "three-call / SDPA | DCA graph ms | SDPA graph ms | DCA / SDPA (graphs) | SDPA default backend graph ms | "
        "DCA / SDPA default (graphs) | SDPA enable_gqa graph ms | DCA / SDPA enable_gqa (graphs) | host us DCA / SDPA | "
        "DCA K/V GB/s | max abs diff vs three-call | decode config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["bench"] == "decode":
            lines.append(
                f"| {r['T']} | {r['dca_ms']:.4f} | {r['sdpa_ms']:.4f} | {r['sdpa_packed_ms']:.4f} | "
                f"{r['three_call_ms']:.4f} | {r['dca_over_sdpa']:.3f} | {r['three_call_over_sdpa']:.3f} | "
                f"{r['dca_graph_ms']:.4f} | {r['sdpa_graph_ms']:.4f} | {r['dca_over_sdpa_graph']:.3f} | "
                f"{_cell(r, 'sdpa_default_graph_ms', 4)} | {_cell(r, 'dca_over_sdpa_default_graph', 3)} | "
                f"{_cell(r, 'sdpa_gqa_graph_ms', 4)} | {_cell(r, 'dca_over_sdpa_gqa_graph', 3)} | "
                f"{r['dca_host_us']:.0f} / {r['sdpa_host_us']:.0f} | {r['dca_kv_gbps']} | {r['max_abs_diff_vs_three_call']:.2e} | "
                f"{r['decode_config']} |"
            )
    lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    global HQ, HK, D, LAYOUT, PRETRAINING
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--decode-lengths", type=int, nargs="*", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--tune", action="store_true", help="time a few tile configs at 16k first; keep the best")
    parser.add_argument("--tune-length", type=int, default=16384, help="prompt length --tune times at")
    parser.add_argument("--tune-decode", action="store_true",
                        help="time a few decode configs (graph replay) first; keep the best")
    parser.add_argument("--tune-decode-lengths", type=int, nargs="+", default=[16384, 131072],
                        help="cache lengths --tune-decode sums its graph-replay times over")
    parser.add_argument("--stem", default="attention", help="results file names: STEM.json, STEM.md")
    parser.add_argument("--kv-heads", type=int, default=8, help="8 (GQA 4, default) or 32 (MHA, Llama-2)")
    parser.add_argument("--layout", choices=["bhtd", "bthd"], default="bhtd",
                        help="memory layout of q/k/v: contiguous (B,H,T,D) or HF projection views (B,T,H,D)")
    parser.add_argument("--pretraining-length", type=int, default=8192, help="4096 for Llama-2 shapes")
    parser.add_argument("--q-heads", type=int, default=32, help="query heads (a multiple of --kv-heads)")
    parser.add_argument("--head-dim", type=int, default=128, choices=[64, 128])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs CUDA.")
    HQ, HK, D, LAYOUT, PRETRAINING = args.q_heads, args.kv_heads, args.head_dim, args.layout, args.pretraining_length
    info = device_info()
    config = DCAConfig(PRETRAINING)
    rope = make_rope()
    scale = D**-0.5
    rows: list = []
    if args.tune:
        info["tuned_prefill_config"] = tune(rope, config, scale, args.tune_length)
    if args.tune_decode:
        info["tuned_decode_config"] = tune_decode(rope, config, scale, args.tune_decode_lengths)
    for T in args.lengths:
        run_prefill(T, rope, config, scale, rows, info)
    for T in args.decode_lengths:
        run_decode(T, rope, config, scale, rows, info)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(json.dumps(rows, indent=1))
    write_md(rows, info, args.out / f"{args.stem}.md")
    print((args.out / f"{args.stem}.md").read_text())


if __name__ == "__main__":
    main()
