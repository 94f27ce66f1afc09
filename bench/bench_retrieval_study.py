"""Retrieval study of issue 14: PG19 perplexity, passkey and RULER-style tasks per method spec and length,
with the issue's goal check.

For every method spec (``--methods``, e.g. ``dca:pretraining_length=4096``: DCA set up for a 4096-token
window on a model whose nominal window is 8192) and length (``--lengths``) the script runs the library's
evaluations on one loaded model:

- perplexity: :func:`chunkllama.eval.perplexity.evaluate_ppl` on ``--ppl-windows`` evenly spaced PG19
  windows (0 skips it);
- passkey: :func:`chunkllama.eval.passkey_task.evaluate_passkey`, ``--passkey-trials`` prompts per cell
  (``--passkey-depths`` depths x trials/depths keys; 20 = 4 keys x 5 depths, the issue's table),
  teacher-forced verdicts (0 skips it);
- RULER-style tasks: :func:`chunkllama.eval.ruler_command.run_ruler` with ``--ruler-samples`` prompts per
  task (0, the default, skips them; ``--ruler-tasks`` selects tasks).

Rows go to ``bench/results/retrieval_study_<tag>.json`` (``{"commands", "environment", "rows"}``):
``{"bench": "quality", "method", "L", "ppl", "passkey", ...}`` (passkey as a fraction) and
``{"bench": "ruler", "method", "task", "L", "score", ...}`` plus ``task = "average"`` rows recomputed from
the merged task rows. Rows of earlier runs are kept unless this run recomputes them (a quality row keeps
the fields this run leaves ``None``), so the grid is filled one length (or one method / task group) per
GPU command. ``retrieval_study_<tag>.md`` has a table per metric and the **goal check** per method:

- passkey >= 0.8 at both 32k and 64k;
- ppl(64k) <= 1.1 x ppl(8k);
- RULER average at 32k and at 64k above each of ``dca``, ``yarn`` and ``ntk`` present at that length (the
  averages over the tasks both methods ran);

each "met", "not met" or "incomplete" (a missing cell); the verdict is "met" when all three are, "not met"
when any is not, else "incomplete". ``--goal-base`` / ``--goal-long`` move the lengths (for tests).

Before running, the script prints an estimate of the time on an H200 (calibrated on the SmolLM2-135M runs
of ``bench/results/quality_*`` and ``chat.md``). GPU commands, one per length (see docs/ruler.md, "Study")::

    export PYTHONPATH=$PWD/src
    for L in 8k 16k 32k 64k; do
      python3 bench/bench_retrieval_study.py --model /root/m/SmolLM2-135M-Instruct.Q4_1.gguf \\
          --data .device/data --lengths $L
    done

GPU calls that each start from the committed results file write files that each hold only their own new
rows on top of it; ``--merge FILE ... --tag nvidia-h200`` folds them into one afterwards (no model loaded).

On a CPU, tiny lengths only (tests/eval/test_retrieval_study.py runs it on a tiny random model).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from chunkllama.eval.commands import parse_lengths  # noqa: E402
from chunkllama.eval.ruler import method_batch_size  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_info import copy_to_out, git_commit, slug  # noqa: E402

DEFAULT_METHODS = "dca,dca:pretraining_length=4096,dca:pretraining_length=6144,dca:pretraining_length=2048,ntk,yarn"
BASELINES = ("dca", "yarn", "ntk")
PASSKEY_GOAL = 0.8
PPL_RATIO_GOAL = 1.1
N_RULER_TASKS = 11

# ---------------------------------------------------------------------------------------------- estimate
# SmolLM2-135M, bf16, one H100/H200: bench_quality (7 forwards at 64k in ~3.5 s, at 32k ~1.2 s, 16k ~0.5 s),
# bench_chat on the H200 (decode 39 tok/s with a 64k DCA cache), docs/ruler.md (~1 s to build a 64k prompt).
SETUP_S = 30.0  # model load + PG19 tokenization + imports


def forward_s(length: int) -> float:
    """Seconds for one forward pass over ``length`` tokens (SmolLM2-135M, bf16, H100/H200)."""
    return 0.02 + 0.5 * (length / 65536) ** 1.5


def decode_step_s(length: int) -> float:
    """Seconds per generated token with a ``length``-token cache (host-bound at short lengths)."""
    return 0.02 + 0.006 * length / 65536


def estimate_seconds(n_methods: int, length: int, passkey_trials: int, ppl_windows: int, ruler_samples: int,
                     n_ruler_tasks: int = N_RULER_TASKS, ruler_new_tokens: float = 64.0,
                     ruler_batch: int | Sequence[int] = 1) -> dict[str, float]:
    """Estimated seconds of one run at one length: ``quality``, ``ruler`` (answers of ``ruler_new_tokens``
    tokens on average, about half of RULER's budgets; ``ruler_batch`` prompts decoded per step, one
    number for every method or one per method) and ``total`` (with :data:`SETUP_S`)."""
    quality = n_methods * (passkey_trials + ppl_windows) * forward_s(length)
    n_prompts = n_ruler_tasks * ruler_samples
    build = n_prompts * length / 65536  # once per length, shared by the methods
    batches = [ruler_batch] * n_methods if isinstance(ruler_batch, int) else list(ruler_batch)
    steps = [n_ruler_tasks * -(-ruler_samples // b) * ruler_new_tokens for b in batches]
    ruler = build + sum(n_prompts * forward_s(length) + n * decode_step_s(length) for n in steps)
    return {"quality": quality, "ruler": ruler if ruler_samples else 0.0,
            "total": SETUP_S + quality + (ruler if ruler_samples else 0.0)}


# ---------------------------------------------------------------------------------------------- rows
def row_key(row: dict) -> tuple:
    return row["bench"], row["method"], row.get("task"), row["L"]


def merge_rows(old: Iterable[dict], new: Iterable[dict]) -> list[dict]:
    """``old`` rows, each updated by the ``new`` row of the same (bench, method, task, L) (its non-None
    fields win: a passkey-only run keeps an earlier ppl), then the new rows no old row matched.
    ``task = "average"`` rows are dropped (see :func:`with_averages`)."""
    new = [r for r in new if r.get("task") != "average"]
    by_key = {row_key(r): r for r in new}
    merged, used = [], set()
    for r in old:
        if r.get("task") == "average":
            continue
        key = row_key(r)
        if key in by_key:
            r = {**r, **{k: v for k, v in by_key[key].items() if v is not None}}
            used.add(key)
        merged.append(r)
    return merged + [r for r in new if row_key(r) not in used]


def ruler_average(rows: Sequence[dict], method: str, length: int, tasks: Iterable[str] | None = None) -> float | None:
    """Mean RULER score of ``method`` at ``length`` over ``tasks`` (all it ran when None); None if no row."""
    scores = {r["task"]: r["score"] for r in rows if r["bench"] == "ruler" and r["method"] == method
              and r["L"] == length and r["task"] != "average" and r.get("score") is not None}
    if tasks is not None:
        tasks = set(tasks)
        if not tasks <= set(scores):
            return None
        scores = {t: s for t, s in scores.items() if t in tasks}
    return sum(scores.values()) / len(scores) if scores else None


def with_averages(rows: Sequence[dict]) -> list[dict]:
    """``rows`` plus one ``task = "average"`` row per (method, L) with RULER rows (mean over its tasks)."""
    cells = dict.fromkeys((r["method"], r["L"]) for r in rows if r["bench"] == "ruler" and r["task"] != "average")
    out = [r for r in rows if r.get("task") != "average"]
    for method, length in cells:
        tasks = sorted(r["task"] for r in rows if r["bench"] == "ruler" and r["method"] == method and r["L"] == length
                       and r["task"] != "average")
        out.append({"bench": "ruler", "method": method, "task": "average", "L": length,
                    "score": ruler_average(rows, method, length), "n_tasks": len(tasks), "tasks": tasks})
    return out


def _quality(rows: Sequence[dict], method: str, length: int, field: str) -> float | None:
    for r in rows:
        if r["bench"] == "quality" and r["method"] == method and r["L"] == length:
            return r.get(field)
    return None


def goal_check(rows: Sequence[dict], method: str, base: int = 8192, long: Sequence[int] = (32768, 65536),
               baselines: Sequence[str] = BASELINES) -> dict[str, Any]:
    """The issue's goal for one method: ``{"passkey", "ppl", "ruler", "verdict"}`` each "met" / "not met" /
    "incomplete", with the numbers behind them (``passkey_values``, ``ppl_ratio``, ``ruler_cells``)."""
    def combine(states: list[str]) -> str:
        if "not met" in states:
            return "not met"
        return "met" if states and all(s == "met" for s in states) else "incomplete"

    passkeys = [_quality(rows, method, n, "passkey") for n in long]
    passkey = combine(["incomplete" if p is None else ("met" if p >= PASSKEY_GOAL else "not met") for p in passkeys])
    ppl_base, ppl_long = _quality(rows, method, base, "ppl"), _quality(rows, method, max(long), "ppl")
    ratio = ppl_long / ppl_base if ppl_base and ppl_long is not None else None
    ppl = "incomplete" if ratio is None else ("met" if ratio <= PPL_RATIO_GOAL else "not met")
    ruler_states, cells = [], []
    for n in long:
        own_tasks = {r["task"] for r in rows if r["bench"] == "ruler" and r["method"] == method and r["L"] == n
                     and r["task"] != "average"}
        others = [b for b in baselines if b != method and any(
            r["bench"] == "ruler" and r["method"] == b and r["L"] == n and r["task"] != "average" for r in rows)]
        if not own_tasks or not others:
            ruler_states.append("incomplete")
            cells.append({"L": n, "method": None, "baselines": {}})
            continue
        cell = {"L": n, "baselines": {}}
        for b in others:
            tasks = own_tasks & {r["task"] for r in rows if r["bench"] == "ruler" and r["method"] == b and r["L"] == n}
            mine, theirs = ruler_average(rows, method, n, tasks), ruler_average(rows, b, n, tasks)
            cell["baselines"][b] = {"method": mine, "baseline": theirs, "n_tasks": len(tasks)}
            if mine is None or theirs is None:
                ruler_states.append("incomplete")
            else:
                ruler_states.append("met" if mine > theirs else "not met")
        cell["method"] = ruler_average(rows, method, n)
        cells.append(cell)
    ruler = combine(ruler_states)
    return {"method": method, "passkey": passkey, "passkey_values": dict(zip(long, passkeys)), "ppl": ppl,
            "ppl_ratio": ratio, "ruler": ruler, "ruler_cells": cells, "verdict": combine([passkey, ppl, ruler])}


# ---------------------------------------------------------------------------------------------- report
def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _table(rows: Sequence[dict], methods: list[str], lengths: list[int], cell) -> list[str]:
    lines = ["| method | " + " | ".join(_fmt_len(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell(m, n) for n in lengths) + " |")
    return lines + [""]


def write_markdown(rows: Sequence[dict], path: Path, header: list[str], base: int, long: Sequence[int]) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["L"] for r in rows})

    def num(v: Any, digits: int = 2) -> str:
        return "–" if v is None else (f"{v:.0f}" if v >= 1000 else f"{v:.{digits}f}")

    def passkey(m: str, n: int) -> str:
        r = next((r for r in rows if r["bench"] == "quality" and r["method"] == m and r["L"] == n), None)
        if r is None or r.get("passkey") is None:
            return "–"
        counts = f" ({r['passkey_correct']}/{r['passkey_n']})" if r.get("passkey_n") else ""
        return f"{r['passkey']:.2f}{counts}"

    def ruler(m: str, n: int) -> str:
        r = next((r for r in rows if r["bench"] == "ruler" and r["task"] == "average" and r["method"] == m
                  and r["L"] == n), None)
        if r is None:
            return "–"
        return num(r["score"]) + ("" if r["n_tasks"] == N_RULER_TASKS else f" ({r['n_tasks']} tasks)")

    parts = header + ["## Perplexity (PG19)", ""]
    parts += _table(rows, methods, lengths, lambda m, n: num(_quality(rows, m, n, "ppl")))
    parts += ["## Passkey (fraction correct)", ""]
    parts += _table(rows, methods, lengths, passkey)
    if any(r["bench"] == "ruler" for r in rows):
        parts += ["## RULER-style average (fraction of expected strings found)", ""]
        parts += _table(rows, methods, lengths, ruler)
        tasks = list(dict.fromkeys(r["task"] for r in rows if r["bench"] == "ruler" and r["task"] != "average"))
        for m in methods:
            cells = [r for r in rows if r["bench"] == "ruler" and r["method"] == m and r["task"] != "average"]
            if not cells:
                continue
            ls = sorted({r["L"] for r in cells})
            score = {(r["task"], r["L"]): r["score"] for r in cells}
            parts += [f"### RULER {m}", "", "| task | " + " | ".join(_fmt_len(n) for n in ls) + " |",
                      "|---|" + "---|" * len(ls)]
            parts += [f"| {t} | " + " | ".join(num(score.get((t, n))) for n in ls) + " |" for t in tasks
                      if any((t, n) in score for n in ls)]
            parts.append("")
    long_txt = " and ".join(_fmt_len(n) for n in long)
    parts += ["## Goal check", "",
              f"passkey >= {PASSKEY_GOAL} at {long_txt}; ppl({_fmt_len(max(long))}) <= {PPL_RATIO_GOAL} x "
              f"ppl({_fmt_len(base)}); RULER average at {long_txt} above each of {', '.join(BASELINES)} present "
              "(over the tasks both ran).", "",
              "| method | passkey " + " / ".join(_fmt_len(n) for n in long) + " | ppl ratio | RULER "
              + " / ".join(_fmt_len(n) for n in long) + " (best baseline) | passkey | ppl | RULER | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        g = goal_check(rows, m, base, long)
        pk = " / ".join(num(v) for v in g["passkey_values"].values())
        ru = []
        for c in g["ruler_cells"]:
            best = max((v["baseline"] for v in c["baselines"].values() if v["baseline"] is not None), default=None)
            ru.append(f"{num(c['method'])} ({num(best)})")
        parts.append(f"| {m} | {pk} | {num(g['ppl_ratio'], 3)} | {' / '.join(ru)} | {g['passkey']} | {g['ppl']} | "
                     f"{g['ruler']} | **{g['verdict']}** |")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def quality_rows(model: Any, tokenizer: Any, specs: list, lengths: list[int], tokens: Any, ppl_windows: int,
                 passkey_trials: int, passkey_depths: int,
                 on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One quality row per (method, length) from the library's perplexity and passkey evaluations;
    ``on_row`` gets each row as soon as it is measured (a run cut by a time limit keeps the finished cells)."""
    from chunkllama.eval.passkey_task import evaluate_passkey
    from chunkllama.eval.perplexity import evaluate_ppl

    rows = []
    for spec in specs:
        for length in lengths:
            t0 = time.perf_counter()
            row: dict[str, Any] = {"bench": "quality", "method": spec.label, "L": length, "ppl": None, "passkey": None}
            if ppl_windows:
                (r,), _ = evaluate_ppl(model, tokens, [length], [spec], n_windows=ppl_windows, progress=False)
                row.update(ppl=r["ppl"], ppl_windows=r["n_windows"], config=r["config"])
            if passkey_trials:
                (r,), _ = evaluate_passkey(model, tokenizer, [length], [spec], n_depths=passkey_depths,
                                           trials_per_depth=passkey_trials // passkey_depths, progress=False)
                row.update(passkey=r["passkey"], passkey_correct=r["correct"], passkey_n=r["n"],
                           passkey_by_depth=r["by_depth"], config=r["config"])
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            ppl = f"{row['ppl']:.2f}" if row["ppl"] is not None else "-"
            pk = f"{row['passkey_correct']}/{row['passkey_n']}" if row["passkey"] is not None else "-"
            print(f"[study] {spec.label:>28} L={length:>6}: ppl {ppl} passkey {pk} [{row['seconds']:.1f}s]", flush=True)
            if on_row is not None:
                on_row(row)
    return rows


def save_results(path: Path, new_rows: list[dict], new_commands: list[str], env: dict, base: int,
                 long: Sequence[int]) -> tuple[list[dict], list[Path]]:
    """Merge ``new_rows`` (and ``new_commands``) into the results file ``path`` and rewrite it with its
    tables and plots; returns the goal check per method and the files written."""
    from chunkllama.eval.report import plot_vs_length

    old = json.loads(path.read_text()) if path.is_file() else {}
    merged = with_averages(merge_rows(old.get("rows", []), new_rows))
    commands = list(old.get("commands", []))
    commands += [c for c in new_commands if c not in commands]
    goals = [goal_check(merged, m, base, long) for m in dict.fromkeys(r["method"] for r in merged)]
    path.write_text(json.dumps({"commands": commands, "environment": env, "goal": goals, "rows": merged},
                               indent=2, default=str) + "\n")
    md = path.with_suffix(".md")
    write_markdown(merged, md, [f"# Retrieval study, issue 14 ({env['device']}, {env['dtype']})", "",
                                *[f"`{c}`" for c in commands], "",
                                f"torch {env['torch']}, transformers {env['transformers']}, commit {env['commit']}",
                                ""], base, long)
    outputs = [path, md]
    stem = path.stem
    try:  # plots are a convenience; never lose the numbers over them
        q = [r for r in merged if r["bench"] == "quality"]
        plots = [([r for r in q if r.get("ppl") is not None], "ppl", "ppl", "PG19 perplexity", "perplexity", True),
                 ([r for r in q if r.get("passkey") is not None], "passkey", "passkey", "Passkey retrieval",
                  "accuracy", False),
                 ([r for r in merged if r["bench"] == "ruler" and r["task"] == "average"], "score", "ruler",
                  "RULER-style tasks (average)", "score (fraction)", False)]
        for rows, field, suffix, title, label, log in plots:
            if rows:  # no empty figures
                outputs.append(plot_vs_length(rows, field, path.parent / f"{stem}_{suffix}.png", title, label, log))
    except Exception as exc:
        print(f"[study] plotting failed: {exc}", flush=True)
    return goals, outputs


def merge_files(target: Path, sources: Sequence[Path], base: int, long: Sequence[int]) -> list[dict]:
    """Fold the rows and commands of other results files (e.g. written by several GPU calls that each started
    from the same committed file) into ``target``, in order, and rewrite its tables; no model is loaded.
    Returns the goal check per method."""
    goals: list[dict] = []
    env = json.loads(target.read_text())["environment"] if target.is_file() else None
    for source in sources:
        data = json.loads(Path(source).read_text())
        env = env or data["environment"]  # a new target takes the first file's environment
        goals, _ = save_results(target, data.get("rows", []), data.get("commands", []), env, base, long)
    return goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=".gguf file, model dir or hub id (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=None, help="data root holding pg19/ and paul_graham_essays/ "
                    "(default: ../shared/data)")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="method specs, comma-separated")
    ap.add_argument("--lengths", default="8k,16k,32k,64k", help="k = 1024; one length per GPU command fits best")
    ap.add_argument("--passkey-trials", type=int, default=20, help="passkey prompts per cell (0: skip)")
    ap.add_argument("--passkey-depths", type=int, default=5, help="depths (d+0.5)/depths; must divide the trials")
    ap.add_argument("--ppl-windows", type=int, default=2, help="PG19 windows per cell (0: skip)")
    ap.add_argument("--ruler-samples", type=int, default=0, help="RULER prompts per task and cell (0: skip)")
    ap.add_argument("--ruler-tasks", default="all", help="RULER tasks: all, niah, or names (niah_single_1,vt,...)")
    ap.add_argument("--ruler-depths", type=int, default=None, help="NIAH depths (d+0.5)/N; default RULER's random")
    ap.add_argument("--ruler-max-new-tokens", type=int, default=None, help="cap on answer tokens (default RULER's)")
    ap.add_argument("--ruler-batch-size", type=int, default=1,
                    help="RULER prompts of a task answered at once (left-padded generate; GPU)")
    ap.add_argument("--ruler-sample-cache", default=None, metavar="DIR",
                    help="keep the built RULER prompts here and reuse them in later runs (see bench_ruler_prompts.py)")
    ap.add_argument("--seed", type=int, default=42, help="RULER prompts' seed")
    ap.add_argument("--goal-base", default="8k", help="goal check: ppl base length")
    ap.add_argument("--goal-long", default="32k,64k", help="goal check: long lengths")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default=None, help="file name tag (default: the device name)")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="FILE", default=None,
                    help="no run: fold these results files' rows and commands into retrieval_study_<--tag>.json "
                         "under --out-dir (later files win) and rewrite its tables and plots")
    args = ap.parse_args(argv)

    from chunkllama.eval.method_specs import parse_methods

    base, long = parse_lengths(args.goal_base)[0], parse_lengths(args.goal_long)
    if args.merge:
        if not args.tag:
            ap.error("--merge needs --tag (the results file is retrieval_study_<tag>.json)")
        missing = [str(f) for f in args.merge if not f.is_file()]
        if missing:
            ap.error(f"--merge: no such file: {', '.join(missing)}")
        target = Path(args.out_dir) / f"retrieval_study_{args.tag}.json"
        for g in merge_files(target, args.merge, base, long):
            print(f"[study] goal {g['method']:>28}: {g['verdict']}", flush=True)
        print(f"[study] wrote {target} and {target.with_suffix('.md')}", flush=True)
        return 0
    specs = parse_methods(args.methods)
    lengths = parse_lengths(args.lengths)
    if args.passkey_trials and (args.passkey_depths < 1 or args.passkey_trials % args.passkey_depths):
        ap.error(f"--passkey-trials {args.passkey_trials} is not a multiple of --passkey-depths {args.passkey_depths}")
    if min(args.passkey_trials, args.ppl_windows, args.ruler_samples) < 0:
        ap.error("counts must be >= 0")
    settings = None
    if args.ruler_samples:
        from chunkllama.eval.ruler_command import check_settings

        settings = check_settings(args.methods, args.ruler_tasks, lengths, args.ruler_samples, args.ruler_depths,
                                  args.data, args.ruler_max_new_tokens, args.ruler_batch_size)  # before the model loads
    n_tasks = len(settings.tasks) if settings else 0
    new_tokens = min(64.0, args.ruler_max_new_tokens or 64.0)
    total = 0.0
    for length in lengths:
        batches = [method_batch_size(spec, args.ruler_batch_size, length, 2) for spec in specs]  # bf16 masks
        e = estimate_seconds(len(specs), length, args.passkey_trials, args.ppl_windows, args.ruler_samples, n_tasks,
                             new_tokens, batches)
        total += e["total"] - SETUP_S
        print(f"[study] estimate on an H200, L={_fmt_len(length)}: quality {e['quality'] / 60:.1f} min, "
              f"RULER {e['ruler'] / 60:.1f} min", flush=True)
    print(f"[study] estimate on an H200 for this run: {(total + SETUP_S) / 60:.1f} min "
          f"({len(specs)} methods, {len(lengths)} lengths)", flush=True)

    from chunkllama.eval.data import pg19_corpus
    from chunkllama.eval.perplexity import tokenize_corpus
    from chunkllama.eval.report import environment
    from chunkllama.models import load_model

    command = "python3 bench/bench_retrieval_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t_start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, dca=False)
    env = {**environment(), "commit": git_commit(), "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    tag = args.tag or slug(env["device"].split(" (")[0])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"retrieval_study_{tag}.json"

    def save(new_rows: list[dict]) -> tuple[list[dict], list[Path]]:
        for row in new_rows:
            row.update(dtype=env["dtype"], commit=env["commit"])
        return save_results(path, new_rows, [command], env, base, long)

    goals, outputs = [], []
    if args.ppl_windows or args.passkey_trials:
        tokens = tokenize_corpus(tokenizer, pg19_corpus(args.data)) if args.ppl_windows else None

        def save_row(row: dict) -> None:  # each method x length as soon as it is done
            nonlocal goals, outputs
            goals, outputs = save([dict(row)])

        quality_rows(model, tokenizer, specs, lengths, tokens, args.ppl_windows, args.passkey_trials,
                     args.passkey_depths, on_row=save_row)
    else:
        goals, outputs = save([])
    if args.ruler_samples:
        from chunkllama.eval.ruler_command import run_ruler

        run_id = hashlib.sha1(f"{args.methods}|{args.ruler_tasks}|{args.lengths}".encode()).hexdigest()[:8]
        ruler_out = out / f"retrieval_study_{tag}_ruler" / f"{slug(args.lengths)}-{run_id}"
        t0 = time.perf_counter()

        def save_cell(cell: list[dict]) -> None:  # each method x length as soon as it is done
            nonlocal goals, outputs
            seconds = round(time.perf_counter() - t0, 1)
            goals, outputs = save([{**r, "samples": args.ruler_samples, "seconds_run": seconds}
                                   for r in cell if r["task"] != "average"])

        run_ruler((model, tokenizer), args.methods, args.ruler_tasks, lengths, str(ruler_out),
                  args.ruler_samples, args.ruler_depths, args.data, args.seed, None, None,
                  args.ruler_max_new_tokens, progress=False, batch_size=args.ruler_batch_size, on_rows=save_cell,
                  sample_cache=args.ruler_sample_cache)
    seconds = time.perf_counter() - t_start
    print(f"[study] measured in {seconds:.0f}s ({seconds / 60:.1f} min, after model load)", flush=True)
    for g in goals:
        print(f"[study] goal {g['method']:>28}: passkey {g['passkey']}, ppl {g['ppl']}, RULER {g['ruler']} -> "
              f"{g['verdict']}", flush=True)
    print(f"[study] wrote {path} and {path.with_suffix('.md')}", flush=True)
    copy_to_out(outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
