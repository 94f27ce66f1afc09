"""Quality benchmark: PG19 perplexity + passkey accuracy for none / yarn / ntk / dca at 4k-64k.

Reproduces the table of ``../shared/DEVICE.md`` (SmolLM2-135M-Instruct, bf16) with the exact
protocols of ``chunkllama.eval`` (2 evenly spaced PG19 windows per length; 5 passkey trials at
depths (t+0.5)/5, teacher-forced scoring). Writes ``bench/results/quality_<device>.json`` (one
row per method and length: ``{"bench": "quality", "method", "L", "ppl", "passkey", "device",
versions..., "config"}``) and a ``.md`` table next to it; with ``$OUT`` set, copies both there.

Usage (GPU machine; see ../shared/DEVICE.md for staging the model and data)::

    python3 bench/bench_quality.py --model /root/m/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data .device/data --lengths 4k,8k,16k,32k,64k --methods none,yarn,ntk,dca

On a CPU, small lengths only: ``--lengths 2k,4k --passkey-lengths 4k``.
"""

from __future__ import annotations

import argparse
import json
import math
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
from chunkllama.eval.methods import method_applied, parse_methods  # noqa: E402
from chunkllama.eval.perplexity import perplexity, tokenize_corpus  # noqa: E402
from chunkllama.eval.report import environment  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_info import git_commit, slug  # noqa: E402

# ../shared/DEVICE.md, H100 bf16: (ppl, passkey correct of 5) per method and length in k.
REFERENCE = {
    "none": {4: (21.79, 5), 8: (23.28, 4), 16: (54.25, 0), 32: (408, 0), 64: (1677, 0)},
    "yarn": {4: (21.79, 5), 8: (23.28, 4), 16: (23.30, 3), 32: (25.67, 4), 64: (35.50, 2)},
    "ntk": {4: (21.79, 5), 8: (23.28, 4), 16: (24.03, 4), 32: (36.75, 5), 64: (88.5, 1)},
    "dca": {4: (21.78, 5), 8: (23.27, 5), 16: (22.69, 5), 32: (22.39, 1), 64: (23.33, 0)},
}


def _versions() -> dict:
    env = environment()
    try:
        import triton  # type: ignore[import-not-found]

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    env["commit"] = git_commit()
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=".gguf file, model dir or hub id (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=None, help="data root holding pg19/ (default: ../shared/data or .device/data)")
    ap.add_argument("--methods", default="none,yarn,ntk,dca")
    ap.add_argument("--lengths", default="4k,8k,16k,32k,64k", help="perplexity lengths (k = 1024)")
    ap.add_argument("--passkey-lengths", default=None, help="passkey lengths (default: --lengths)")
    ap.add_argument("--trials", type=int, default=5, help="passkey trials per length (depth (t+0.5)/trials)")
    ap.add_argument("--windows", type=int, default=2, help="PG19 windows per length")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default=None, help="file name tag (default: the device name)")
    ap.add_argument("--needle-lengths", default=None,
                    help="also run the needle test with DCA at these lengths (e.g. 4k,8k,16k,32k) and write "
                         "needle_dca_<tag>.png/.json (needs paul_graham_essays/ under --data)")
    ap.add_argument("--needle-depths", type=int, default=11)
    args = ap.parse_args(argv)

    from chunkllama.models import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"[quality] model loaded in {time.perf_counter() - t0:.1f}s ({dtype}, {next(model.parameters()).device})",
          flush=True)
    t0 = time.perf_counter()
    tokens = tokenize_corpus(tokenizer, pg19_corpus(args.data))
    print(f"[quality] pg19: {tokens.numel()} tokens, tokenized in {time.perf_counter() - t0:.1f}s", flush=True)

    versions = _versions()
    methods = parse_methods(args.methods)
    ppl_lengths = parse_lengths(args.lengths)
    pk_lengths = parse_lengths(args.passkey_lengths) if args.passkey_lengths else ppl_lengths
    lengths = sorted(set(ppl_lengths) | set(pk_lengths))
    command = "python3 bench/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    for spec in methods:
        for length in lengths:
            row = {"bench": "quality", "method": spec.label, "L": length, "ppl": None, "passkey": None,
                   "passkey_correct": None, "passkey_n": None, "dtype": dtype, **versions}
            t1 = time.perf_counter()
            try:
                with method_applied(model, spec, length) as record:
                    row["config"] = record
                    if length in ppl_lengths:
                        result = perplexity(model, tokens, length, n_windows=args.windows)
                        row["ppl"] = result["ppl"]
                        row["ppl_windows"] = [w["ppl"] for w in result["windows"]]
                    if length in pk_lengths:
                        verdicts = [pk.score_teacher_forcing(model, p).correct
                                    for p in pk.passkey_prompts(tokenizer, length, n_trials=args.trials)]
                        row["passkey_correct"], row["passkey_n"] = sum(verdicts), len(verdicts)
                        row["passkey"] = sum(verdicts) / len(verdicts)
                        row["passkey_by_trial"] = verdicts
            except torch.cuda.OutOfMemoryError as exc:  # keep going: one cell fails, the table survives
                row["error"] = f"OOM: {exc}".splitlines()[0]
                torch.cuda.empty_cache()
            row["seconds"] = round(time.perf_counter() - t1, 2)
            ref = REFERENCE.get(spec.label, {}).get(length // 1024) if length % 1024 == 0 else None
            if ref is not None:
                row["reference_ppl"], row["reference_passkey_correct"] = ref
                if row["ppl"] is not None:
                    row["ppl_rel_diff"] = row["ppl"] / ref[0] - 1
            rows.append(row)
            ppl = f"{row['ppl']:.2f}" if row["ppl"] is not None else "-"
            pkr = f"{row['passkey_correct']}/{row['passkey_n']}" if row["passkey_n"] else "-"
            diff = f" (ref {ref[0]} / {ref[1]}/5, {100 * row['ppl_rel_diff']:+.1f}%)" if "ppl_rel_diff" in row else ""
            print(f"[quality] {spec.label:>6} L={length:>6}: ppl {ppl} passkey {pkr}{diff} "
                  f"[{row['seconds']:.1f}s]{' ' + row['error'] if 'error' in row else ''}", flush=True)

    tag = args.tag or slug(versions["device"].split(" (")[0])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"quality_{tag}.json"
    json_path.write_text(json.dumps({"command": command, "rows": rows}, indent=2, default=str) + "\n")
    md = [f"# Quality: PG19 perplexity / passkey ({versions['device']}, {dtype})", "",
          f"`{command}`", "", f"torch {versions['torch']}, transformers {versions['transformers']}, "
          f"triton {versions['triton']}, chunkllama {versions['chunkllama']} ({versions['commit']})", "",
          "| method | " + " | ".join(f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths) + " |",
          "|---|" + "---|" * len(lengths)]
    for spec in methods:
        cells = []
        for length in lengths:
            r = next(r for r in rows if r["method"] == spec.label and r["L"] == length)
            ppl = f"{r['ppl']:.2f}" if r["ppl"] is not None and r["ppl"] < 1000 else (
                f"{r['ppl']:.0f}" if r["ppl"] is not None else "–")
            cells.append(f"{ppl} / {r['passkey_correct']}/{r['passkey_n']}" if r["passkey_n"] else ppl)
        md.append(f"| {spec.label} | " + " | ".join(cells) + " |")
    diffs = [abs(r["ppl_rel_diff"]) for r in rows if "ppl_rel_diff" in r]
    if diffs:
        md += ["", f"Largest |ppl difference| vs ../shared/DEVICE.md: {100 * max(diffs):.2f}% over {len(diffs)} cells."]
    md_path = json_path.with_suffix(".md")
    md_path.write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    outputs = [json_path, md_path]
    try:
        from chunkllama.eval.report import plot_vs_length

        outputs.append(plot_vs_length([r for r in rows if r["ppl"] is not None], "ppl", out / f"quality_{tag}_ppl.png",
                                      "PG19 perplexity", "perplexity", log_y=True))
        outputs.append(plot_vs_length([r for r in rows if r["passkey"] is not None], "passkey",
                                      out / f"quality_{tag}_passkey.png", "Passkey retrieval", "accuracy"))
    except Exception as exc:  # plots are a convenience; never lose the numbers over them
        print(f"[quality] plotting failed: {exc}", flush=True)
    if args.needle_lengths:
        outputs += _needle(model, tokenizer, args, tag, out, versions)
    if os.environ.get("OUT"):
        for path in outputs:
            shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    print(f"[quality] wrote {json_path} and {md_path}", flush=True)
    return 0 if all(math.isfinite(r["ppl"]) for r in rows if r["ppl"] is not None) else 1


def _needle(model, tokenizer, args, tag: str, out: Path, versions: dict) -> list[Path]:
    """Needle heatmap of DCA (the figure for docs/): depth x length, greedy answers."""
    from chunkllama.eval.data import essays_text
    from chunkllama.eval.needle import depth_grid, evaluate_needle, plot_heatmap

    lengths = parse_lengths(args.needle_lengths)
    specs = parse_methods("dca")
    t0 = time.perf_counter()
    rows, samples = evaluate_needle(model, tokenizer, essays_text(args.data), lengths, depth_grid(args.needle_depths),
                                    specs, progress=False)
    png = plot_heatmap(samples, "dca", out / f"needle_dca_{tag}.png",
                       "Pressure Testing SmolLM2-135M-Instruct + DCA\n"
                       'Fact Retrieval Across Context Lengths ("Needle In A HayStack")')
    js = out / f"needle_dca_{tag}.json"
    js.write_text(json.dumps({"bench": "needle", **versions, "rows": rows, "samples": samples}, indent=2, default=str) + "\n")
    print(f"[quality] needle done in {time.perf_counter() - t0:.0f}s: "
          + ", ".join(f"{r['L']}: {r['found']}/{r['n']}" for r in rows), flush=True)
    return [png, js]


if __name__ == "__main__":
    sys.exit(main())
