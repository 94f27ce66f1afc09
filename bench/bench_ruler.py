"""RULER-style grid for issue 14: tasks x lengths x methods on SmolLM2-135M, plus an attention probe.

Runs :func:`chunkllama.eval.ruler_command.run_ruler` (11 RULER tasks, greedy answers, recall scores
as fractions) and writes ``bench/results/ruler_<tag>.json`` (``{"command", "environment", "rows"}``,
rows ``{"bench": "ruler", "method", "task", "L", "score", "n", ...}``, one ``task = "average"`` row
per method and length), ``ruler_<tag>.md`` (tables) and ``ruler_<tag>.png`` (average vs length).
Rows of an earlier run with the same tag are kept unless this run recomputes them, so the grid can
be filled one length at a time (each GPU command is limited to 10 minutes)::

    export PYTHONPATH=$PWD/src
    for L in 8k 16k 32k 64k; do
      python3 bench/bench_ruler.py --model /root/m/SmolLM2-135M-Instruct.Q4_1.gguf --data .device/data \\
          --lengths $L --methods none,ntk,yarn,dca --samples 20
    done

``--probe-lengths`` adds the study of where DCA's attention goes (:mod:`chunkllama.eval.dca_probe`):
for ``niah_single_2`` prompts (essay haystack) with the needle at ``--probe-depths`` depths, the
chunk relation between the last prompt token and the needle, and per layer the attention mass on
intra / successive / inter keys and on the needle. Written to ``ruler_probe_<tag>.json`` / ``.md``.

On a CPU, small lengths only: ``--lengths 2k --samples 2 --tasks niah_single_1,vt``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from chunkllama.eval.commands import parse_lengths  # noqa: E402
from chunkllama.eval.method_specs import MethodSpec, parse_methods  # noqa: E402
from chunkllama.eval.report import environment, pivot_table, plot_vs_length  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_info import copy_to_out, git_commit, merge_rows, slug  # noqa: E402


def by_fields(*fields: str):
    """A row key of these fields, for :func:`run_info.merge_rows`."""
    return lambda row: tuple(row[f] for f in fields)


def write_tables(rows: list[dict], path: Path, header: list[str]) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    parts = header[:]
    averages = sorted((r for r in rows if r["task"] == "average"), key=lambda r: (methods.index(r["method"]), r["L"]))
    parts += ["## Average over tasks (fraction of expected strings found)", "", pivot_table(averages, "score")]
    for method in methods:
        cells = sorted((r for r in rows if r["method"] == method and r["task"] != "average"), key=lambda r: r["L"])
        parts += [f"## {method}", "", pivot_table(cells, "score", row_key="task")]
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def probe(model, tokenizer, essay: str, lengths: list[int], depths: int, seed: int,
          methods: Sequence[MethodSpec | str] = ("dca",)) -> list[dict]:
    """Attention probe of DCA on niah_single_2 prompts: needle relation and per-layer masses, for each
    DCA method spec (e.g. ``dca:pretraining_length=4096``)."""
    from chunkllama.eval.dca_probe import probe_attention
    from chunkllama.eval.methods import method_applied
    from chunkllama.eval.ruler_tasks import essay_words, make_ruler_sample

    words = essay_words(essay)
    rows = []
    for method, length in ((m, n) for m in methods for n in lengths):
        with method_applied(model, method, length) as record:
            for d in range(depths):
                depth = (d + 0.5) / depths
                sample = make_ruler_sample(tokenizer, "niah_single_2", length, index=d, seed=seed, depth=depth,
                                           essay=words)
                start = sample.needle_tokens[0]
                end = start + len(tokenizer(sample.needles[0].text, add_special_tokens=False)["input_ids"])
                report = probe_attention(model, sample.input_ids, needle=(start, end))
                layers = [vars(layer) for layer in report.layers]
                rows.append({
                    "bench": "ruler_probe", "method": record["label"], "task": "niah_single_2", "L": length,
                    "depth": depth,
                    "n_tokens": report.n_tokens, "needle": [start, end], "needle_relation": report.needle_relation[0],
                    "chunk_len": report.chunk_len, "chunk_size": report.chunk_size,
                    "inter_mass_mean": sum(x["inter"] for x in layers) / len(layers),
                    "needle_mass_mean": sum(x["needle"] for x in layers) / len(layers),
                    "needle_mass_max_layer": max(x["needle_max_head"] for x in layers),
                    "layers": layers, "config": record["dca"],
                })
                r = rows[-1]
                print(f"[probe] {r['method']} L={length:>6} depth={depth:.2f}: needle {r['needle_relation']:>10}, inter mass "
                      f"{r['inter_mass_mean']:.3f}, needle mass {r['needle_mass_mean']:.4f} "
                      f"(best head {r['needle_mass_max_layer']:.3f})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=".gguf file, model dir or hub id (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=None, help="data root holding paul_graham_essays/ (default: ../shared/data)")
    ap.add_argument("--methods", default="none,ntk,yarn,dca")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--lengths", default="8k,16k,32k,64k", help="token budgets (prompt + answer); k = 1024")
    ap.add_argument("--samples", type=int, default=20, help="prompts per task and length")
    ap.add_argument("--depths", type=int, default=None, help="NIAH depths (d+0.5)/depths; default: random like RULER")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="cap on answer tokens (default: RULER's)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default=None, help="file name tag (default: the device name)")
    ap.add_argument("--probe-lengths", default=None, help="also probe DCA's attention at these lengths")
    ap.add_argument("--probe-depths", type=int, default=5)
    ap.add_argument("--probe-methods", default="dca",
                    help="DCA method specs to probe, comma-separated (e.g. dca,dca:pretraining_length=4096)")
    ap.add_argument("--no-grid", action="store_true", help="only the probe")
    args = ap.parse_args(argv)

    from chunkllama.eval.ruler_command import check_settings, run_ruler
    from chunkllama.models import load_model

    command = "python3 bench/bench_ruler.py " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = check_settings(args.methods, args.tasks, args.lengths, args.samples, args.depths, args.data,
                              args.max_new_tokens)  # before the model loads
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    print(f"[ruler] model loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    env = {**environment(), "commit": git_commit(), "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    tag = args.tag or slug(env["device"].split(" (")[0])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs: list[Path] = []
    if not args.no_grid:
        t0 = time.perf_counter()
        rows = run_ruler((model, tokenizer), args.methods, args.tasks, settings.lengths, str(out / f"ruler_{tag}"),
                         args.samples, args.depths, args.data, args.seed, None, None, args.max_new_tokens,
                         progress=False)
        seconds = time.perf_counter() - t0
        for row in rows:
            row.update(dtype=env["dtype"], commit=env["commit"], samples=args.samples, seconds_total=round(seconds, 1))
        path = out / f"ruler_{tag}.json"
        old = json.loads(path.read_text())["rows"] if path.is_file() else []
        merged = merge_rows(old, rows, by_fields("method", "task", "L"))
        commands = (json.loads(path.read_text()).get("commands", []) if path.is_file() else []) + [command]
        path.write_text(json.dumps({"commands": commands, "environment": env, "rows": merged}, indent=2,
                                   default=str) + "\n")
        md = path.with_suffix(".md")
        write_tables(merged, md, [f"# RULER-style tasks ({env['device']}, {env['dtype']})", "",
                                  *[f"`{c}`" for c in commands], "",
                                  f"torch {env['torch']}, transformers {env['transformers']}, commit {env['commit']}",
                                  ""])
        png = plot_vs_length([r for r in merged if r["task"] == "average"], "score", out / f"ruler_{tag}.png",
                             "RULER-style tasks (average)", "score (fraction)")
        outputs += [path, md, png]
        print(f"[ruler] grid done in {seconds:.0f}s; wrote {path}", flush=True)
    if args.probe_lengths:
        from chunkllama.eval.data import essays_text

        probe_methods = parse_methods(args.probe_methods)
        if any(spec.name != "dca" for spec in probe_methods):
            raise SystemExit(f"--probe-methods takes DCA specs only; got {args.probe_methods!r}")
        rows = probe(model, tokenizer, essays_text(args.data), parse_lengths(args.probe_lengths), args.probe_depths,
                     args.seed, probe_methods)
        path = out / f"ruler_probe_{tag}.json"
        old = json.loads(path.read_text())["rows"] if path.is_file() else []
        merged = merge_rows(old, rows, by_fields("method", "L", "depth"))
        path.write_text(json.dumps({"command": command, "environment": env, "rows": merged}, indent=2,
                                   default=str) + "\n")
        md = ["# Where DCA's attention goes (niah_single_2, last prompt token)", "", f"`{command}`", "",
              "Masses are means over layers of the head-averaged attention probability of the prompt's last token; "
              "'best head on needle' is the largest single head's mass on the needle in any layer.", "",
              "| method | L | depth | needle relation | inter mass | needle mass | best head on needle |",
              "|---|---|---|---|---|---|---|"]
        for r in sorted(merged, key=lambda r: (r["method"], r["L"], r["depth"])):
            md.append(f"| {r['method']} | {r['L']} | {r['depth']:.2f} | {r['needle_relation']} | "
                      f"{r['inter_mass_mean']:.3f} | {r['needle_mass_mean']:.4f} | {r['needle_mass_max_layer']:.3f} |")
        path.with_suffix(".md").write_text("\n".join(md) + "\n", encoding="utf-8")
        outputs += [path, path.with_suffix(".md")]
    copy_to_out(outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
