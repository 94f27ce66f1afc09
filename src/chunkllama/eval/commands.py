"""``chunkllama eval ppl|passkey|needle|longqa``: one typed function per task, plus its parser.

Each ``run_*`` function is the Python API of its command: it loads the model (or takes one),
runs every method at every length, writes ``--output`` (``summary.json``, ``samples.jsonl``,
``table.md``, plots) and returns the summary rows. :func:`register` adds the ``eval`` command and
its four subcommands to an ``argparse`` sub-parser collection.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

from .methods import parse_methods
from .report import pivot_table, plot_vs_length, write_report

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
    from .perplexity import evaluate_ppl, tokenize_corpus

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
    from .passkey_task import evaluate_passkey

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
    from .needle import depth_grid, evaluate_needle, plot_heatmap

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


def _read(path: Path) -> list[dict[str, Any]]:
    from .data import read_jsonl

    return read_jsonl(path)


# ----------------------------------------------------------------------------- argparse
def _common(p: argparse.ArgumentParser, methods: str, lengths: str | None) -> None:
    p.add_argument("--model", default=None, help="hub id, model dir or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--methods", nargs="+", default=[methods],
                   help="methods: none, pi, ntk, yarn, dca; comma-separated or repeated; options as "
                        "dca:chunk_size=4096,local_window=512 (default: %(default)s)")
    if lengths is not None:
        p.add_argument("--lengths", nargs="+", default=[lengths], help="lengths in tokens, e.g. 4k,8k,16k (k = 1024)")
    p.add_argument("--output", default=None, help="output folder (summary.json, samples.jsonl, table.md, plots)")
    p.add_argument("--pretraining-length", type=int, default=None,
                   help="the model's original window (default: from its config)")
    p.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _chat_flag(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--chat", dest="chat", action="store_const", const=True, default=None,
                   help="always use the tokenizer's chat template")
    g.add_argument("--no-chat", dest="chat", action="store_const", const=False, help="never use the chat template")


def _cmd_ppl(a: argparse.Namespace) -> None:
    run_ppl(a.model, a.methods, a.lengths, a.data, a.output or "out/ppl", a.windows, a.stride, a.slice_size,
            a.pretraining_length, a.dtype, a.device, not a.no_progress)


def _cmd_passkey(a: argparse.Namespace) -> None:
    run_passkey(a.model, a.methods, a.lengths, a.output or "out/passkey", a.depths, a.trials, a.greedy,
                a.pretraining_length, a.dtype, a.device, not a.no_progress)


def _cmd_needle(a: argparse.Namespace) -> None:
    run_needle(a.model, a.methods, a.lengths, a.data, a.output or "out/needle", a.depths, a.max_new_tokens, a.chat,
               a.pretraining_length, a.dtype, a.device, not a.no_progress)


def _cmd_longqa(a: argparse.Namespace) -> None:
    run_longqa(a.model, a.methods, a.tasks, a.data, a.output or "out/longqa", a.max_length, a.limit,
               a.max_new_tokens, a.chat, a.pretraining_length, a.dtype, a.device, not a.no_progress)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` with subcommands ``ppl``, ``passkey``, ``needle``, ``longqa``.

    Each subcommand sets ``func`` (a callable taking the parsed namespace) as its default.
    """
    parser = subparsers.add_parser("eval", help="evaluate long-context methods (ppl, passkey, needle, longqa)",
                                   description="Compare none/pi/ntk/yarn/dca on long-context tasks.")
    tasks = parser.add_subparsers(dest="eval_task", metavar="{ppl,passkey,needle,longqa}")
    tasks.required = True

    p = tasks.add_parser("ppl", help="PG19 perplexity (ChunkLlama protocol)")
    _common(p, DEFAULT_METHODS, "4k,8k")
    p.add_argument("--data", default=None, help="data root holding pg19/, the pg19 folder, or hf://emozilla/pg19-test")
    p.add_argument("--windows", type=int, default=2, help="evenly spaced windows per length (default 2)")
    p.add_argument("--stride", type=int, default=None, help="window stride instead of --windows (paper: 256)")
    p.add_argument("--slice-size", type=int, default=2048, help="positions per lm_head/cross-entropy slice")
    p.set_defaults(func=_cmd_ppl)

    p = tasks.add_parser("passkey", help="passkey retrieval, lengths x depths")
    _common(p, DEFAULT_METHODS, "4k,8k")
    p.add_argument("--depths", type=int, default=5, help="depths per length: (d+0.5)/depths (default 5)")
    p.add_argument("--trials", type=int, default=1, help="prompts per depth (default 1 = the standard protocol)")
    p.add_argument("--greedy", action="store_true", help="score by greedy decoding instead of teacher forcing")
    p.set_defaults(func=_cmd_passkey)

    p = tasks.add_parser("needle", help="needle in a haystack (Paul Graham essays) + heatmap")
    _common(p, "dca", "4k,8k")
    p.add_argument("--data", default=None, help="data root holding paul_graham_essays/, or that folder")
    p.add_argument("--depths", type=int, default=11, help="depth percents 0..100 (default 11: step 10)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    _chat_flag(p)
    p.set_defaults(func=_cmd_needle)

    p = tasks.add_parser("longqa", help="L-Eval / few-shot long-document QA")
    _common(p, "none,dca", None)
    p.add_argument("--data", default=None,
                   help="a .jsonl file, a folder of them, a root holding leval/, or hf://L4NLP/LEval")
    p.add_argument("--tasks", nargs="+", default=None, help="task names (file stems), e.g. coursera tpo")
    p.add_argument("--max-length", default="16k", help="prompt + answer tokens; longer documents are cut in the middle")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each task")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: exam 32, f1 128, rouge 256")
    _chat_flag(p)
    p.set_defaults(func=_cmd_longqa)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m chunkllama.eval.commands eval ppl ...`` (the same as ``chunkllama eval ...``)."""
    parser = argparse.ArgumentParser(prog="chunkllama")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
