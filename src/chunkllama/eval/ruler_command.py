"""``chunkllama eval ruler``: RULER-style tasks, the Python API (:func:`run_ruler`) and the command.

:func:`eval_ruler` is the CLI command (keyword-only, typed, its docstring's ``Args:`` are the
help); ``chunkllama.cli.COMMANDS`` registers it as ``"eval ruler"``. Every argument is checked (and
the essays read) before a model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

DEFAULT_METHODS = "none,yarn,ntk,dca"
PARTIAL_ROWS = "rows_so_far.jsonl"  # finished method x length rows while a run is going


@dataclasses.dataclass(frozen=True)
class RulerSettings:
    """Checked arguments of a run: methods, tasks, lengths, depths and the essay text (or None)."""

    methods: list[Any]
    tasks: list[str]
    lengths: list[int]
    depths: list[float] | None
    essay: str | None


def depth_list(depths: int | None) -> list[float] | None:
    """``depths`` evenly spread target depths ``(d + 0.5) / depths``; None -> RULER's random depths."""
    if depths is None:
        return None
    if depths < 1:
        raise ValueError(f"--depths must be at least 1, got {depths}.")
    return [(d + 0.5) / depths for d in range(depths)]


def check_settings(
    methods: str | Sequence[str], tasks: str | Sequence[str] | None, lengths: str | Sequence[str] | Sequence[int],
    n_samples: int, depths: int | None, data: str | None, max_new_tokens: int | None = None,
    batch_size: int = 1, prefill_chunk: int | None = None,
) -> RulerSettings:
    """Parse and check every argument; reads the essays when a selected task needs them.

    Raises:
        ValueError: a bad method, task, length, sample count, depth count or batch setting.
        FileNotFoundError: the essays are needed but not found under ``data``.
    """
    from . import ruler_tasks as rt
    from .commands import parse_lengths
    from .methods import parse_methods
    from .ruler import check_batching

    specs = parse_methods(methods)
    names = rt.parse_tasks(tasks)
    if not names:
        raise ValueError(f"No RULER tasks given; choose from all, niah, {', '.join(rt.TASK_NAMES)}.")
    if isinstance(lengths, (list, tuple)) and all(isinstance(x, int) for x in lengths):
        ls = list(lengths)
    else:
        try:
            ls = parse_lengths(lengths)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"Bad --lengths {lengths!r}: use comma-separated token counts like 8k,16k.") from exc
    if not ls:
        raise ValueError("No lengths given; use e.g. --lengths 8k,16k,32k.")
    shortest = max(rt.TASKS[t].max_new_tokens for t in names) + 64
    if min(ls) < shortest:
        raise ValueError(f"Length {min(ls)} is too short for the RULER tasks {', '.join(names)}: use at least {shortest}.")
    if n_samples < 1:
        raise ValueError(f"--samples must be at least 1, got {n_samples}.")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}.")
    check_batching(batch_size, prefill_chunk)
    essay = None
    if rt.needs_essay(names):
        from .data import essays_text

        essay = essays_text(data)
    return RulerSettings(specs, names, ls, depth_list(depths), essay)


def run_ruler(
    model: Any = None,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    tasks: str | Sequence[str] | None = "all",
    lengths: str | Sequence[str] | Sequence[int] = "4k,8k",
    output: str = "out/ruler",
    n_samples: int = 20,
    depths: int | None = None,
    data: str | None = None,
    seed: int = 42,
    chat: bool | None = None,
    prefill_chunk: int | None = None,
    max_new_tokens: int | None = None,
    pretraining_length: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
    batch_size: int = 1,
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
    sample_cache: str | None = None,
) -> list[dict[str, Any]]:
    """RULER-style tasks x lengths x methods; writes ``output`` and returns the rows.

    ``model`` is a name/path for :func:`chunkllama.load_model`, None for the default model, or a
    ``(model, tokenizer)`` pair. Output: ``summary.json``, ``samples.jsonl`` (every prompt's answer),
    ``table.md`` (scores per task and length for each method, then the averages) and
    ``ruler_vs_length.png`` (the average against length). While it runs, ``rows_so_far.jsonl`` holds
    the rows of every finished method x length, so a run cut short keeps them; it is removed once the
    report is written. ``on_rows``, ``sample_cache``: as for :func:`.ruler.evaluate_ruler`.
    """
    from ..distributed import is_main_process
    from . import ruler_tasks as rt
    from .report import pivot_table, plot_vs_length, write_report
    from .ruler import evaluate_ruler

    settings = check_settings(methods, tasks, lengths, n_samples, depths, data, max_new_tokens, batch_size,
                              prefill_chunk)
    if isinstance(model, tuple):
        lm, tokenizer = model
        name = "<given>"
    else:
        from ..models import load_model

        t0 = time.perf_counter()
        lm, tokenizer = load_model(model, dtype=dtype, device=device, dca=False)  # each method applies itself
        name = model or "SmolLM2-135M-Instruct (default)"
        print(f"loaded {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    partial = Path(output) / PARTIAL_ROWS
    if is_main_process():
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("", encoding="utf-8")

    def keep(cell: list[dict[str, Any]]) -> None:
        if is_main_process():
            with partial.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, default=str) + "\n" for r in cell)
        if on_rows is not None:
            on_rows(cell)

    rows, samples = evaluate_ruler(
        lm, tokenizer, settings.tasks, settings.lengths, settings.methods, n_samples, essay=settings.essay,
        seed=seed, depths=settings.depths, use_chat=chat, pretraining_length=pretraining_length,
        prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
        on_rows=keep, sample_cache=sample_cache,
    )
    averages = [r for r in rows if r["task"] == "average"]
    parts = []
    for spec in settings.methods:
        cells = [r for r in rows if r["method"] == spec.label and r["task"] != "average"]
        parts.append(f"### {spec.label} (score: fraction of expected strings found)\n\n"
                     + pivot_table(cells, "score", row_key="task"))
    parts.append("### average over tasks\n\n" + pivot_table(averages, "score"))
    table = "\n".join(parts)
    run_settings = {
        "model": name, "tasks": settings.tasks, "lengths": settings.lengths,
        "methods": [s.label for s in settings.methods], "n_samples": n_samples, "seed": seed,
        "depths": settings.depths or "random (RULER's 40-depth grid)", "chat": chat,
        "max_new_tokens": max_new_tokens or "RULER's per task", "batch_size": batch_size,
        "score": "string_match_all as a fraction in [0, 1] (RULER reports x100)",
        "wonderwords": rt.word_list_version(),
    }
    if is_main_process():  # under torchrun every rank computed the same rows; one writes them
        write_report(output, "ruler", rows, samples, table, run_settings)
        plot_vs_length(averages, "score", Path(output) / "ruler_vs_length.png", "RULER-style tasks (average)",
                       "score (fraction)")
        partial.unlink(missing_ok=True)  # summary.json now holds every row
    print(table, flush=True)
    return rows


def eval_ruler(
    *,
    model: str | None = None,
    methods: str = DEFAULT_METHODS,
    tasks: str = "all",
    lengths: str = "4k,8k",
    samples: int = 20,
    depths: int | None = None,
    data: str | None = None,
    output: str = "out/ruler",
    seed: int = 42,
    chat: bool | None = None,
    prefill_chunk: int | None = None,
    max_new_tokens: int | None = None,
    pretraining_length: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    batch_size: int = 1,
    sample_cache: str | None = None,
    progress: bool = True,
) -> int:
    """RULER-style synthetic tasks (NIAH variants, variable tracking, common/frequent words).

    Each task's prompts are generated offline and seeded (essays from --data, RULER's noise filler,
    wonderwords' word lists), fitted to each length (prompt + answer budget), answered by greedy
    decoding and scored by the recall of the expected strings (a fraction). Writes summary.json,
    samples.jsonl, table.md and ruler_vs_length.png to --output.

    Args:
        model: hub id, model directory or .gguf file; default: SmolLM2-135M-Instruct.
        methods: comma-separated: none, pi, ntk, yarn, dca; options like dca:chunk_size=4096,local_window=512.
        tasks: comma-separated task names, "niah" (the 8 NIAH tasks) or "all": niah_single_1..3,
            niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, fwe.
        lengths: comma-separated token budgets (prompt + answer); 4k = 4096.
        samples: prompts per task and length.
        depths: spread the NIAH needles over this many depths (d+0.5)/depths; default: random like RULER.
        data: folder holding paul_graham_essays/ (or that folder); default ../shared/data.
        output: output folder.
        seed: seed of the prompts (same seed, same prompts).
        chat: use the tokenizer's chat template (default: when it has one).
        prefill_chunk: prefill this many tokens per forward pass (default: the whole prompt at once).
        max_new_tokens: cap on generated tokens per answer; default: RULER's (128 NIAH, 30 vt, 120 cwe, 50 fwe).
        pretraining_length: the model's original window; default: from its config.
        dtype: bfloat16, float16 or float32; default: bf16 on CUDA, fp32 on CPU.
        device: cpu, cuda, cuda:N, or auto (the model split over all GPUs by accelerate); default: cuda
            when available. Under torchrun: leave out (each rank's shard is on its own GPU).
        batch_size: answer this many prompts of a task at once (left padding, one generate call);
            faster on a GPU, same prompts; not with --prefill-chunk. Methods other than dca take fewer per
            call at long lengths, so that their padding mask (batch x length x length) stays under 16 GiB.
        sample_cache: folder to keep the built prompts in; a later run with the same tokenizer, tasks,
            lengths, samples, seed, depths and essays loads them instead of building them again
            (building 11 tasks x 10 prompts of 64k took 71 s on a CPU, loading them 0.8 s).
        progress: show progress bars.
    """
    run_ruler(model, methods, tasks, lengths, output, samples, depths, data, seed, chat, prefill_chunk,
              max_new_tokens, pretraining_length, dtype, device, progress, batch_size, sample_cache=sample_cache)
    return 0
