"""Accuracy cost of the FP8 KV cache: PG19 perplexity and passkey with DCA, bf16 cache vs FP8 cache.

SmolLM2-135M-Instruct (bf16 weights), DCA with its defaults, the protocols of ``chunkllama.eval`` and
``../shared/DEVICE.md`` (2 evenly spaced PG19 windows per length; 5 passkey trials at depths
(t+0.5)/5, teacher-forced scoring), once with ``kv_cache_dtype="auto"`` (bf16 keys/values) and once
with ``"fp8"`` (:mod:`chunkllama.attention.fp8`). Perplexity runs one forward per window without a
cache, which with the FP8 option attends to exactly what an FP8 cache would hold.

Writes ``fp8_quality.json`` (rows ``{"bench": "fp8_quality", "kv_cache_dtype", "L", "ppl",
"passkey_correct", ...}``) and ``fp8_quality.md`` (both caches side by side, the perplexity change in
percent, passkey trials that changed) under ``--out-dir``; with ``$OUT`` set, copies both there.

Usage (GPU machine, model and data staged as in ../shared/DEVICE.md; ~1-2 min on an H200)::

    python3 bench/bench_fp8_quality.py --model /root/m/SmolLM2-135M-Instruct.Q4_1.gguf --data .device/data

On a CPU, small lengths only: ``--lengths 2k --trials 1 --windows 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from chunkllama.eval import passkey as pk  # noqa: E402
from chunkllama.eval.commands import parse_lengths  # noqa: E402
from chunkllama.eval.data import pg19_corpus  # noqa: E402
from chunkllama.eval.methods import method_applied, parse_method  # noqa: E402
from chunkllama.eval.perplexity import perplexity, tokenize_corpus  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from bench_quality import _versions  # noqa: E402

CACHES = ("auto", "fp8")


def _cell(model, tokenizer, tokens, length: int, kv: str, args) -> dict:
    spec = parse_method(f"dca:kv_cache_dtype={kv}" if kv != "auto" else "dca")
    row: dict = {"bench": "fp8_quality", "kv_cache_dtype": kv, "L": length}
    start = time.perf_counter()
    with torch.no_grad(), method_applied(model, spec, length) as record:
        row["config"] = record
        result = perplexity(model, tokens, length, n_windows=args.windows)
        row["ppl"], row["ppl_windows"] = result["ppl"], [w["ppl"] for w in result["windows"]]
        verdicts = [pk.score_teacher_forcing(model, p).correct
                    for p in pk.passkey_prompts(tokenizer, length, n_trials=args.trials)]
    row["passkey_by_trial"], row["passkey_correct"], row["passkey_n"] = verdicts, sum(verdicts), len(verdicts)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=".gguf file, model dir or hub id (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=None, help="data root holding pg19/ (default: ../shared/data or .device/data)")
    ap.add_argument("--lengths", default="16k,32k,64k", help="k = 1024")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)

    from chunkllama.models import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    tokens = tokenize_corpus(tokenizer, pg19_corpus(args.data))
    print(f"[fp8] model ({dtype}) and {tokens.numel()} PG19 tokens ready in {time.perf_counter() - t0:.1f}s", flush=True)
    versions = _versions()
    command = "python3 bench/bench_fp8_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lengths = parse_lengths(args.lengths)
    rows = []
    for length in lengths:
        for kv in CACHES:
            row = {**_cell(model, tokenizer, tokens, length, kv, args), "dtype": dtype, **versions}
            rows.append(row)
            print(f"[fp8] L={length:>6} cache {kv:>4}: ppl {row['ppl']:.3f} passkey {row['passkey_correct']}/"
                  f"{row['passkey_n']} [{row['seconds']:.1f}s]", flush=True)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "fp8_quality.json"
    json_path.write_text(json.dumps({"command": command, "rows": rows}, indent=2, default=str) + "\n")
    md = [f"# FP8 KV cache vs bf16 cache: PG19 perplexity / passkey with DCA ({versions['device']}, {dtype} weights)", "",
          f"`{command}`", "", f"torch {versions['torch']}, transformers {versions['transformers']}, "
          f"triton {versions['triton']}, chunkllama {versions['chunkllama']} ({versions['commit']}); "
          f"{args.windows} PG19 windows and {args.trials} passkey trials per length", "",
          f"| L | ppl, {dtype} cache | ppl, FP8 cache | ppl change | passkey, {dtype} | passkey, FP8 | trials that changed |",
          "|---|---|---|---|---|---|---|"]
    for length in lengths:
        a, b = (next(r for r in rows if r["L"] == length and r["kv_cache_dtype"] == kv) for kv in CACHES)
        changed = sum(x != y for x, y in zip(a["passkey_by_trial"], b["passkey_by_trial"]))
        md.append(f"| {length // 1024}k | {a['ppl']:.3f} | {b['ppl']:.3f} | {100 * (b['ppl'] / a['ppl'] - 1):+.2f}% | "
                  f"{a['passkey_correct']}/{a['passkey_n']} | {b['passkey_correct']}/{b['passkey_n']} | {changed} |")
    md_path = json_path.with_suffix(".md")
    md_path.write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    if os.environ.get("OUT") and Path(os.environ["OUT"]).resolve() != out.resolve():
        for path in (json_path, md_path):
            shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
