"""Long prompts in one ``generate`` call: does it fit, how long, how much memory — beside the planner's prediction.

Usage (GPU; random bf16 weights of a built-in shape, DCA with ``pretraining_length`` 8192):
    python bench/bench_scale.py --lengths 256k 512k 1M                  # Llama-3-8B shapes, full depth
    python bench/bench_scale.py --lengths 1M --layers 4                 # memory per layer at 1M, quickly
    python bench/bench_scale.py --lengths 128k --throughput             # chunked vs one-shot prefill tokens/s
    python bench/bench_scale.py --lengths 128k --throughput-only --throughput-pieces 5120 10240 20480   # piece sizes
    python bench/bench_scale.py --lengths 1M --kv-dtype fp8 --layers 8   # FP8 KV cache rows (merged into scale.json)
    python bench/bench_scale.py --shape smollm2-135m --layers 2 --lengths 4k --device cpu   # smoke run

For each length: one ``model.generate(ids (1, T), max_new_tokens=N)`` with the prefill in pieces
(``--prefill-chunk``, default DCA's ``chunk_len``; 0 = one shot) through
:func:`chunkllama.prefill.enable_chunked_prefill`; records whether it finished (``ok``; an
out-of-memory error is a row, not a crash), ``seconds``, ``peak_gib`` (``torch.cuda.max_memory_allocated``,
weights included) and the planner's prediction for the same run (``planned_gib``, without its
reserve) and at the shape's full depth (``planned_full_depth_gib``). ``--throughput`` times the
prefill (``max_new_tokens=1``) in pieces and in one shot (alternating, best of two each) and writes their ratio.
``--kv-dtype fp8`` stores the KV cache as FP8 rows (``apply_dca(..., kv_cache_dtype="fp8")``) and plans
with it. Writes ``scale.json`` and ``scale.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch
import transformers

import chunkllama
from chunkllama.planner import GIB, SHAPES, Shape, make_plan, parse_size
from chunkllama.prefill import enable_chunked_prefill, resolve_prefill_chunk_size
from run_info import merge_rows


def build_model(shape_name: str, layers: int | None, device: str, dtype: torch.dtype) -> torch.nn.Module:
    fields = dict(SHAPES[shape_name])
    if layers:
        fields["num_hidden_layers"] = layers
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_generate(model: torch.nn.Module, length: int, new_tokens: int, device: str, **kwargs) -> dict:
    """One generate call; ``{"ok", "seconds", "peak_gib", "error"}``."""
    ids = torch.randint(3, model.config.vocab_size, (1, length), device=device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0, **kwargs)
        _sync(device)
        ok, error = True, None
    except torch.OutOfMemoryError as oom:
        ok, error = False, str(oom).splitlines()[0][:200]
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None
    return {"ok": ok, "seconds": round(seconds, 2), "peak_gib": None if peak is None else round(peak, 2), "error": error}


def _row_key(row: dict) -> tuple:
    return (row["bench"], row["T"], row["shape"], row["layers"], row["prefill_chunk"], row.get("kv_dtype", "bf16"),
            row["device"], row.get("alloc_conf"))


def write_md(rows: list[dict], path: Path) -> None:
    """``scale.md`` from all merged rows (device and versions of the newest row)."""
    last = rows[-1]
    lines = [
        f"# Long prompts in one generate call — {last['device']}, random {last['dtype'].removeprefix('torch.')} weights, "
        f"DCA L={last['dca_config']['pretraining_length']}, torch {last['torch']}, transformers {last['transformers']}", "",
        "Rows from all runs merged (`scale.json`); `layers` below the shape's depth measure memory per layer "
        "(the planner's full-depth column scales them).", "",
        "| shape | layers | KV cache | prefill pieces | T | new | ok | seconds | peak GiB | planned GiB | "
        "planned at full depth GiB |", "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['shape']} | {r['layers']} | {r.get('kv_dtype') or 'bf16'} | {r['prefill_chunk'] or 'one shot'} | "
              f"{r['T']} | {r['new_tokens']} | {r['ok']} | {r['seconds']} | {r['peak_gib']} | {r['planned_gib']} | "
              f"{r['planned_full_depth_gib']} |" for r in rows if r["bench"] == "scale"]
    throughput = [r for r in rows if r["bench"] == "scale_prefill_throughput"]
    if throughput:
        lines += ["", "Prefill (`max_new_tokens=1`) in pieces vs one shot, alternating in one process, best of two each:", "",
                  "| shape | layers | T | piece tokens | allocator | prefill in pieces s | one shot s | "
                  "pieces / one shot tokens/s |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['layers']} | {r['T']} | {r['prefill_chunk']} | {r.get('alloc_conf') or 'default'} | "
                  f"{r['chunked_seconds']} | {r['one_shot_seconds']} | {r['chunked_vs_one_shot_tokens_per_s']} |"
                  for r in throughput]
    lines += ["", "Reproduce one row: `python bench/bench_scale.py --shape <shape> [--layers N] --lengths <T> "
              "[--throughput | --throughput-only --throughput-pieces N ...] [--kv-dtype fp8]` (see the module docstring); "
              "`--report-only` rewrites this file from `scale.json`."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape (memory per layer)")
    parser.add_argument("--lengths", nargs="+", default=["256k", "512k", "1M"])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--pretraining-length", type=int, default=8192)
    parser.add_argument("--prefill-chunk", type=int, default=None, help="tokens per piece; default chunk_len, 0 one shot")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--kv-dtype", default="auto", choices=["auto", "fp8"], help="KV cache storage (fp8: e4m3 + scales)")
    parser.add_argument("--throughput", action="store_true", help="also time prefill in pieces vs one shot")
    parser.add_argument("--throughput-only", action="store_true", help="only the pieces-vs-one-shot timing (no scale row)")
    parser.add_argument("--throughput-pieces", type=int, nargs="+", default=None, metavar="TOKENS",
                        help="piece sizes to time against one shot (default: the --prefill-chunk piece)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--report-only", action="store_true", help="rewrite scale.md from scale.json, measure nothing")
    args = parser.parse_args()
    if args.report_only:
        write_md(json.loads((args.out / "scale.json").read_text()), args.out / "scale.md")
        return
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(args.shape, args.layers, args.device, dtype)
    dca = chunkllama.DCAConfig(args.pretraining_length)
    chunkllama.apply_dca(model, dca, backend=args.backend, kv_cache_dtype=args.kv_dtype)
    piece = resolve_prefill_chunk_size(dca, args.prefill_chunk)
    enable_chunked_prefill(model, piece)
    full_shape = Shape.from_config(SHAPES[args.shape])
    shape = dataclasses.replace(full_shape, layers=args.layers or full_shape.layers)
    model_dtype = "bf16" if dtype == torch.bfloat16 else "fp32"
    plan_kwargs = dict(new_tokens=args.new_tokens, dtype=model_dtype, kv_dtype="fp8" if args.kv_dtype == "fp8" else model_dtype,
                       prefill_chunk=piece, dca=dca, reserve=0)
    common = {
        "shape": args.shape, "layers": shape.layers, "dca_config": dca.to_dict(), "prefill_chunk": piece,
        "backend": args.backend, "dtype": str(dtype), "kv_dtype": plan_kwargs["kv_dtype"],
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or None,
    }
    # kernels compile on first use: warm up so no timed call pays for it
    timed_generate(model, 2 * (piece or 4096) + 17, 2, args.device)
    rows = []
    for text in [] if args.throughput_only else args.lengths:
        length = parse_size(text, what="length")
        plan, full = make_plan(shape, length=length, **plan_kwargs), make_plan(full_shape, length=length, **plan_kwargs)
        row = {"bench": "scale", "T": length, **timed_generate(model, length, args.new_tokens, args.device),
               "new_tokens": args.new_tokens, "planned_gib": round(plan.total(piece is not None) / GIB, 2),
               "planned_full_depth_gib": round(full.total(piece is not None) / GIB, 2), **common}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.throughput or args.throughput_only:
        pieces = args.throughput_pieces or [piece]
        for text in args.lengths:
            length = parse_size(text, what="length")
            chunked: dict[int, list] = {size: [] for size in pieces}
            one_shot = []
            for _ in range(2):  # alternating, best of two each: the machine's drift hits all alike
                for size in pieces:
                    chunked[size].append(timed_generate(model, length, 1, args.device, prefill_chunk_size=size))
                one_shot.append(timed_generate(model, length, 1, args.device, prefill_chunk_size=None))
            best_one_shot = min(r["seconds"] for r in one_shot)
            for size in pieces:
                best_chunked = min(r["seconds"] for r in chunked[size])
                row = {"bench": "scale_prefill_throughput", "T": length, "chunked_seconds": best_chunked,
                       "one_shot_seconds": best_one_shot, "all_chunked_seconds": [r["seconds"] for r in chunked[size]],
                       "all_one_shot_seconds": [r["seconds"] for r in one_shot],
                       "ok": all(r["ok"] for r in chunked[size] + one_shot),
                       "chunked_vs_one_shot_tokens_per_s": round(best_one_shot / best_chunked, 3),
                       **common, "prefill_chunk": size}
                print(json.dumps(row), flush=True)
                rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    # earlier runs' rows (other depths, lengths or cache dtypes) stay; a row measured again replaces its old one
    path = args.out / "scale.json"
    rows = merge_rows(json.loads(path.read_text()) if path.exists() else [], rows, _row_key)
    (args.out / "scale.json").write_text(json.dumps(rows, indent=1) + "\n")
    write_md(rows, args.out / "scale.md")


if __name__ == "__main__":
    main()
