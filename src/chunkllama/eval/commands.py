"""``chunkllama eval ppl|passkey|needle|longqa``: the Python API and the CLI commands.

Each ``run_*`` function is the Python API of a task: it loads the model (or takes a
``(model, tokenizer)`` pair), runs every method at every length, writes ``output``
(``summary.json``, ``samples.jsonl``, ``table.md``, plots) and returns the summary rows. The
``eval_*`` functions are the same with keyword-only, CLI-typed parameters; ``chunkllama.cli``
registers them as ``eval ppl``, ``eval passkey``, ``eval needle`` and ``eval longqa``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

DEFAULT_METHODS = "none,yarn,ntk,dca"


def parse_length(text: str) -> int:
    """``"4096"``, ``"4k"`` (= 4096), ``"1.5k"`` -> tokens."""
    text = text.strip().lower()
    if text.endswith("k"):
        return int(round(float(text[:-1]) * 1024))
    return int(text)


def parse_lengths(items: str | Sequence[str]) -> list[int]:
    if isinstance(items, str):
        items = [items]
    return [parse_length(p) for item in items for p in str(item).split(",") if p.strip()]


def _load(model: Any, dtype: str | None, device: str | None) -> tuple[Any, Any]:
    if isinstance(model, tuple):
        return model
    from ..models import load_model

    t0 = time.perf_counter()
    loaded = load_model(model, dtype=dtype, device=device)
    print(f"loaded {model or 'default model (SmolLM2-135M-Instruct)'} in {time.perf_counter() - t0:.1f}s", flush=True)
    return loaded


def _model_name(model: Any) -> str:
    return "SmolLM2-135M-Instruct (default)" if model is None else (str(model) if not isinstance(model, tuple) else "<given>")


def run_ppl(
    model: Any = None,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    lengths: str | Sequence[str] = "4k,8k",
    data: str | None = None,
    output: str = "out/ppl",
    n_windows: int = 2,
    stride: int | None = None,
    slice_size: int = 2048,
    pretraining_length: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """PG19 perplexity. ``model`` is a name/path for :func:`chunkllama.load_model`, None for the
    default model, or a ``(model, tokenizer)`` pair."""
    from .data import pg19_corpus
    from .methods import parse_methods
    from .perplexity import evaluate_ppl, tokenize_corpus
    from .report import pivot_table, plot_vs_length, write_report

    lm, tokenizer = _load(model, dtype, device)
    t0 = time.perf_counter()
    tokens = tokenize_corpus(tokenizer, pg19_corpus(data))
    print(f"pg19 corpus: {tokens.numel()} tokens (tokenized in {time.perf_counter() - t0:.1f}s)", flush=True)
    specs, ls = parse_methods(methods), parse_lengths(lengths)
    rows, samples = evaluate_ppl(lm, tokens, ls, specs, n_windows, stride, slice_size, pretraining_length, progress)
    table = pivot_table(rows, "ppl")
    settings = {"model": _model_name(model), "n_corpus_tokens": tokens.numel(), "n_windows": n_windows,
                "stride": stride, "methods": [s.label for s in specs], "lengths": ls}
    write_report(output, "ppl", rows, samples, table, settings)
    plot_vs_length(rows, "ppl", Path(output) / "ppl_vs_length.png", "PG19 perplexity", "perplexity", log_y=True)
    print(table, flush=True)
    return rows


def run_passkey(
    model: Any = None,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    lengths: str | Sequence[str] = "4k,8k",
    output: str = "out/passkey",
    depths: int = 5,
    trials: int = 1,
    greedy: bool = False,
    pretraining_length: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Passkey retrieval over lengths x ``depths`` depths (``trials`` prompts per depth)."""
    from .methods import parse_methods
    from .passkey_task import evaluate_passkey
    from .report import pivot_table, plot_vs_length, write_report

    lm, tokenizer = _load(model, dtype, device)
    specs, ls = parse_methods(methods), parse_lengths(lengths)
    rows, samples = evaluate_passkey(lm, tokenizer, ls, specs, depths, trials, greedy, pretraining_length, progress)
    table = pivot_table(rows, lambda r: f"{r['correct']}/{r['n']}")
    settings = {"model": _model_name(model), "depths": depths, "trials_per_depth": trials,
                "scoring": "greedy" if greedy else "teacher_forcing", "methods": [s.label for s in specs], "lengths": ls}
    write_report(output, "passkey", rows, samples, table, settings)
    plot_vs_length(rows, "passkey", Path(output) / "passkey_vs_length.png", "Passkey retrieval", "accuracy")
    print(table, flush=True)
    return rows


def run_needle(
    model: Any = None,
    methods: str | Sequence[str] = "dca",
    lengths: str | Sequence[str] = "4k,8k",
    data: str | None = None,
    output: str = "out/needle",
    depths: int = 11,
    max_new_tokens: int = 32,
    chat: bool | None = None,
    pretraining_length: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Needle in a haystack over lengths x ``depths`` evenly spaced depths; one heatmap per method."""
    from .data import essays_text
    from .methods import parse_methods
    from .needle import depth_grid, evaluate_needle, plot_heatmap
    from .report import pivot_table, write_report

    lm, tokenizer = _load(model, dtype, device)
    specs, ls = parse_methods(methods), parse_lengths(lengths)
    grid = depth_grid(depths)
    rows, samples = evaluate_needle(lm, tokenizer, essays_text(data), ls, grid, specs, max_new_tokens, chat,
                                    pretraining_length, progress)
    table = pivot_table(rows, lambda r: f"{r['found']}/{r['n']}")
    settings = {"model": _model_name(model), "depths": grid, "methods": [s.label for s in specs], "lengths": ls,
                "max_new_tokens": max_new_tokens}
    write_report(output, "needle", rows, samples, table, settings)
    for spec in specs:
        safe = "".join(ch if ch.isalnum() or ch in "-_=" else "_" for ch in spec.label)
        plot_heatmap(samples, spec.label, Path(output) / f"needle_{safe}.png",
                     f"Pressure Testing {_model_name(model)} + {spec.label}\n"
                     'Fact Retrieval Across Context Lengths ("Needle In A HayStack")')
    print(table, flush=True)
    return rows


def run_longqa(
    model: Any = None,
    methods: str | Sequence[str] = "none,dca",
    tasks: str | Sequence[str] | None = None,
    data: str | None = None,
    output: str = "out/longqa",
    max_length: str | int = "16k",
    limit: int | None = None,
    max_new_tokens: int | None = None,
    chat: bool | None = None,
    pretraining_length: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """L-Eval (or few-shot JSONL) QA; ``limit`` = first N questions of each task."""
    from .data import leval_task, leval_task_files
    from .longqa import evaluate_longqa
    from .methods import parse_methods
    from .report import pivot_table, write_report

    lm, tokenizer = _load(model, dtype, device)
    specs = parse_methods(methods)
    task_names = [t for item in ([tasks] if isinstance(tasks, str) else (tasks or [])) for t in item.split(",") if t]
    if isinstance(data, str) and data.startswith("hf://"):
        if not task_names:
            raise ValueError("With --data hf://... name the tasks with --tasks (e.g. coursera,tpo).")
        records = {t: leval_task(data, t) for t in task_names}
    else:
        records = {t: _read(p) for t, p in leval_task_files(data, task_names or None).items()}
    length = parse_length(str(max_length))
    rows, samples = evaluate_longqa(lm, tokenizer, records, specs, length, limit, max_new_tokens, chat,
                                    pretraining_length, progress)
    table = pivot_table(rows, "score", row_key="task", col_key="method", col_format=str)
    settings = {"model": _model_name(model), "max_length": length, "limit": limit, "tasks": list(records),
                "methods": [s.label for s in specs]}
    write_report(output, "longqa", rows, samples, table, settings)
    print(table, flush=True)
    return rows


def _read(path: Path) -> list[dict[str, Any]]:  # noqa: D103
    from .data import read_jsonl

    return read_jsonl(path)


# ----------------------------------------------------------------------------- CLI commands
# Typed functions registered in chunkllama.cli.COMMANDS as "eval ppl", "eval passkey", ...; their
# keyword-only parameters become --options and the docstrings' Args: their help.


def eval_ppl(
    *,
    model: str | None = None,
    methods: str = DEFAULT_METHODS,
    lengths: str = "4k,8k",
    data: str | None = None,
    output: str = "out/ppl",
    windows: int = 2,
    stride: int | None = None,
    slice_size: int = 2048,
    pretraining_length: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> int:
    """PG19 perplexity (ChunkLlama protocol) for several methods and lengths.

    The books (sorted, joined with blank lines) are tokenized once; each length is scored on
    --windows evenly spaced windows (or every --stride tokens) with the loss over all next-token
    predictions. Writes summary.json, samples.jsonl, table.md and ppl_vs_length.png to --output.

    Args:
        model: hub id, model directory or .gguf file; default: SmolLM2-135M-Instruct.
        methods: comma-separated: none, pi, ntk, yarn, dca; options like dca:chunk_size=4096,local_window=512.
        lengths: comma-separated lengths in tokens; 4k = 4096.
        data: folder holding pg19/ (or the pg19 folder, or hf://emozilla/pg19-test); default ../shared/data.
        output: output folder.
        windows: evenly spaced windows per length (2: the first and the last L tokens).
        stride: score windows every this many tokens instead (the paper uses 256).
        slice_size: positions per lm_head + cross-entropy slice (memory vs speed).
        pretraining_length: the model's original window; default: from its config.
        dtype: bfloat16, float16 or float32; default: bf16 on CUDA, fp32 on CPU.
        device: cpu or cuda; default: cuda when available.
        progress: show progress bars.
    """
    run_ppl(model, methods, lengths, data, output, windows, stride, slice_size, pretraining_length, dtype, device,
            progress)
    return 0


def eval_passkey(
    *,
    model: str | None = None,
    methods: str = DEFAULT_METHODS,
    lengths: str = "4k,8k",
    output: str = "out/passkey",
    depths: int = 5,
    trials: int = 1,
    greedy: bool = False,
    pretraining_length: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> int:
    """Passkey retrieval swept over lengths x depths for several methods.

    Prompts follow the ChunkLlama format (key Random(t), depth (d+0.5)/depths); answers are scored by
    teacher forcing (or greedy decoding). Writes summary.json, samples.jsonl, table.md and
    passkey_vs_length.png to --output.

    Args:
        model: hub id, model directory or .gguf file; default: SmolLM2-135M-Instruct.
        methods: comma-separated: none, pi, ntk, yarn, dca; options like dca:chunk_size=4096,local_window=512.
        lengths: comma-separated lengths in tokens; 4k = 4096.
        output: output folder.
        depths: depths per length, at (d+0.5)/depths.
        trials: prompts (different keys) per depth; 1 is the standard protocol.
        greedy: score by greedy decoding instead of teacher forcing (same verdict, slower).
        pretraining_length: the model's original window; default: from its config.
        dtype: bfloat16, float16 or float32; default: bf16 on CUDA, fp32 on CPU.
        device: cpu or cuda; default: cuda when available.
        progress: show progress bars.
    """
    run_passkey(model, methods, lengths, output, depths, trials, greedy, pretraining_length, dtype, device, progress)
    return 0


def eval_needle(
    *,
    model: str | None = None,
    methods: str = "dca",
    lengths: str = "4k,8k",
    data: str | None = None,
    output: str = "out/needle",
    depths: int = 11,
    max_new_tokens: int = 32,
    chat: bool | None = None,
    pretraining_length: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> int:
    """Needle in a haystack (Paul Graham essays): depth x length grid and a heatmap per method.

    Writes summary.json, samples.jsonl (every answer), table.md and needle_<method>.png to --output.

    Args:
        model: hub id, model directory or .gguf file; default: SmolLM2-135M-Instruct.
        methods: comma-separated: none, pi, ntk, yarn, dca; options like dca:chunk_size=4096,local_window=512.
        lengths: comma-separated prompt lengths in tokens; 4k = 4096.
        data: folder holding paul_graham_essays/ (or that folder); default ../shared/data.
        output: output folder.
        depths: needle depths, evenly spaced from 0% to 100% (11: every 10%).
        max_new_tokens: tokens generated per answer.
        chat: use the tokenizer's chat template (default: when it has one).
        pretraining_length: the model's original window; default: from its config.
        dtype: bfloat16, float16 or float32; default: bf16 on CUDA, fp32 on CPU.
        device: cpu or cuda; default: cuda when available.
        progress: show progress bars.
    """
    run_needle(model, methods, lengths, data, output, depths, max_new_tokens, chat, pretraining_length, dtype,
               device, progress)
    return 0


def eval_longqa(
    *,
    model: str | None = None,
    methods: str = "none,dca",
    tasks: str | None = None,
    data: str | None = None,
    output: str = "out/longqa",
    max_length: str = "16k",
    limit: int | None = None,
    max_new_tokens: int | None = None,
    chat: bool | None = None,
    pretraining_length: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> int:
    """Long-document QA: L-Eval tasks (exam / F1 / ROUGE) or the seed's few-shot JSONL layout.

    Documents longer than --max-length are cut in the middle. Writes summary.json (task, method,
    score, n), samples.jsonl (every question and answer) and table.md to --output.

    Args:
        model: hub id, model directory or .gguf file; default: SmolLM2-135M-Instruct.
        methods: comma-separated: none, pi, ntk, yarn, dca; options like dca:chunk_size=4096,local_window=512.
        tasks: comma-separated task names (JSONL file stems), e.g. coursera,tpo; default: all found.
        data: a .jsonl file, a folder of them, a folder holding leval/, or hf://L4NLP/LEval; default ../shared/data.
        output: output folder.
        max_length: prompt + answer tokens (4k = 4096); the methods are set up for this length.
        limit: score only the first N questions of each task.
        max_new_tokens: tokens generated per answer; default: 32 (exam), 128 (f1), 256 (rouge).
        chat: use the tokenizer's chat template (default: when it has one).
        pretraining_length: the model's original window; default: from its config.
        dtype: bfloat16, float16 or float32; default: bf16 on CUDA, fp32 on CPU.
        device: cpu or cuda; default: cuda when available.
        progress: show progress bars.
    """
    run_longqa(model, methods, tasks, data, output, max_length, limit, max_new_tokens, chat, pretraining_length,
               dtype, device, progress)
    return 0


if __name__ == "__main__":  # python -m chunkllama.eval.commands ppl ...  ==  chunkllama eval ppl ...
    import sys

    from ..cli import main

    sys.exit(main(["eval", *sys.argv[1:]]))
