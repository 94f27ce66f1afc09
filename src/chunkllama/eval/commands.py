"""``chunkllama eval ppl|passkey|needle|longqa``: the Python API and the CLI commands.

Each ``run_*`` function is the Python API of a task: it loads the model (or takes a
``(model, tokenizer)`` pair), runs every method at every length, writes ``output``
(``summary.json``, ``samples.jsonl``, ``table.md``, plots) and returns the summary rows. The
``eval_*`` functions are the same with keyword-only, CLI-typed parameters; ``chunkllama.cli``
registers them as ``eval ppl``, ``eval passkey``, ``eval needle`` and ``eval longqa``.

Every ``run_*`` checks its inputs and finds its data files before it loads the model, and this
module imports nothing heavy at import time (the command line reads it for ``--help``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Sequence

from .. import options
from ..distributed import is_main_process
from .method_specs import methods as checked_methods

DEFAULT_METHODS = "none,yarn,ntk,dca"


def parse_length(text: str | int) -> int:
    """``"4096"``, ``"4k"`` (= 4096), ``"1.5k"`` -> tokens (raises :class:`chunkllama.options.OptionError`)."""
    return options.length(text)


def parse_lengths(items: str | Sequence[str]) -> list[int]:
    """``"4k,8k"`` or ``["4k", "8192"]`` -> ``[4096, 8192]``."""
    if isinstance(items, str):
        items = [items]
    return [parse_length(p) for item in items for p in str(item).split(",") if p.strip()]


def _data_path(data: str | None, accepted: str, find: Any) -> Any:
    """``find(data)`` (a data loader); a missing path or data folder becomes a ``--data`` error."""
    if data is not None and not str(data).startswith("hf://") and not Path(data).expanduser().exists():
        raise options.OptionError(data, "no such file or directory", accepted, option="--data")
    try:
        return find(data)
    except FileNotFoundError as exc:
        raise options.OptionError(data if data is not None else "(default)", str(exc).rstrip("."), accepted,
                                  option="--data") from None


def _checked(option: str, check: Any, value: Any) -> Any:
    """``check(value)``, naming ``option`` in the error (the Python API gets the same one-line errors)."""
    try:
        return check(value)
    except options.OptionError as exc:
        raise exc.for_option(option) from None


def _load(model: Any, dtype: str | None, device: str | None) -> tuple[Any, Any]:
    if isinstance(model, tuple):
        return model
    from ..models import conversion_notice, load_model

    notice = conversion_notice(model)
    if notice:
        print(notice, flush=True)
    t0 = time.perf_counter()
    loaded = load_model(model, dtype=dtype, device=device, dca=False)  # each method applies itself
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
    from .method_specs import parse_methods

    specs = _checked("--methods", parse_methods, methods)
    ls = _checked("--lengths", parse_lengths, lengths)
    corpus = _data_path(data, "a folder holding pg19/, the pg19 folder itself, or hf://emozilla/pg19-test",
                        pg19_corpus)
    from .perplexity import evaluate_ppl, tokenize_corpus
    from .report import pivot_table, plot_vs_length, write_report

    lm, tokenizer = _load(model, dtype, device)
    t0 = time.perf_counter()
    tokens = tokenize_corpus(tokenizer, corpus)
    print(f"pg19 corpus: {tokens.numel()} tokens (tokenized in {time.perf_counter() - t0:.1f}s)", flush=True)
    rows, samples = evaluate_ppl(lm, tokens, ls, specs, n_windows, stride, slice_size, pretraining_length, progress)
    table = pivot_table(rows, "ppl")
    settings = {"model": _model_name(model), "n_corpus_tokens": tokens.numel(), "n_windows": n_windows,
                "stride": stride, "methods": [s.label for s in specs], "lengths": ls}
    if is_main_process():  # under torchrun every rank computed the same rows; one writes them
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
    from .method_specs import parse_methods

    specs = _checked("--methods", parse_methods, methods)
    ls = _checked("--lengths", parse_lengths, lengths)
    from .passkey_task import evaluate_passkey
    from .report import pivot_table, plot_vs_length, write_report

    lm, tokenizer = _load(model, dtype, device)
    rows, samples = evaluate_passkey(lm, tokenizer, ls, specs, depths, trials, greedy, pretraining_length, progress)
    table = pivot_table(rows, lambda r: f"{r['correct']}/{r['n']}")
    settings = {"model": _model_name(model), "depths": depths, "trials_per_depth": trials,
                "scoring": "greedy" if greedy else "teacher_forcing", "methods": [s.label for s in specs], "lengths": ls}
    if is_main_process():
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
    from .method_specs import parse_methods

    specs = _checked("--methods", parse_methods, methods)
    ls = _checked("--lengths", parse_lengths, lengths)
    haystack = _data_path(data, "a folder holding paul_graham_essays/, or that folder itself", essays_text)
    from .needle import depth_grid, evaluate_needle, plot_heatmap
    from .report import pivot_table, write_report

    grid = depth_grid(depths)
    lm, tokenizer = _load(model, dtype, device)
    rows, samples = evaluate_needle(lm, tokenizer, haystack, ls, grid, specs, max_new_tokens, chat,
                                    pretraining_length, progress)
    table = pivot_table(rows, lambda r: f"{r['found']}/{r['n']}")
    settings = {"model": _model_name(model), "depths": grid, "methods": [s.label for s in specs], "lengths": ls,
                "max_new_tokens": max_new_tokens}
    if is_main_process():
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
    from .method_specs import parse_methods

    specs = _checked("--methods", parse_methods, methods)
    length = _checked("--max-length", parse_length, max_length)
    task_names = [t.strip() for item in ([tasks] if isinstance(tasks, str) else (tasks or []))
                  for t in item.split(",") if t.strip()]
    if isinstance(data, str) and data.startswith("hf://"):
        if not task_names:
            raise options.OptionError(data, "a hub source needs the task names", "--tasks NAMES, e.g. coursera,tpo",
                                      option="--data")
        records = {t: leval_task(data, t) for t in task_names}
    else:
        found = _data_path(data, "a .jsonl file, a folder of them, a folder holding leval/, or hf://L4NLP/LEval",
                           leval_task_files)
        missing = [t for t in task_names if t not in found]
        if missing:
            raise options.OptionError(tasks, f"no task {', '.join(missing)} in the data",
                                      ", ".join(sorted(found)) or "(none found)", option="--tasks")
        records = {t: _read(found[t]) for t in (task_names or found)}
    from .longqa import evaluate_longqa
    from .report import pivot_table, write_report

    lm, tokenizer = _load(model, dtype, device)
    rows, samples = evaluate_longqa(lm, tokenizer, records, specs, length, limit, max_new_tokens, chat,
                                    pretraining_length, progress)
    table = pivot_table(rows, "score", row_key="task", col_key="method", col_format=str)
    settings = {"model": _model_name(model), "max_length": length, "limit": limit, "tasks": list(records),
                "methods": [s.label for s in specs]}
    if is_main_process():
        write_report(output, "longqa", rows, samples, table, settings)
    print(table, flush=True)
    return rows


def _read(path: Path) -> list[dict[str, Any]]:  # noqa: D103
    from .data import read_jsonl

    return read_jsonl(path)


# ----------------------------------------------------------------------------- CLI commands
# Typed functions registered in chunkllama.cli.COMMANDS as "eval ppl", "eval passkey", ...; their
# keyword-only parameters become --options, Annotated checks run while the arguments are parsed,
# and the docstrings' Args: are the help (a default is stated there only when it is not a value).

Model = Annotated[str | None, options.model]
Methods = Annotated[str, checked_methods]
Lengths = Annotated[str, options.lengths]
Count = Annotated[int, options.positive_int]
OptionalCount = Annotated[int | None, options.positive_int]
Dtype = Annotated[str | None, options.dtype]
Device = Annotated[str | None, options.device]
Output = Annotated[str, options.writable_dir]

def eval_ppl(
    *,
    model: Model = None,
    methods: Methods = DEFAULT_METHODS,
    lengths: Lengths = "4k,8k",
    data: str | None = None,
    output: Output = "out/ppl",
    windows: Count = 2,
    stride: OptionalCount = None,
    slice_size: Count = 2048,
    pretraining_length: OptionalCount = None,
    dtype: Dtype = None,
    device: Device = None,
    progress: bool = True,
) -> int:
    """PG19 perplexity (ChunkLlama protocol) for several methods and lengths.

    The books (sorted, joined with blank lines) are tokenized once; each length is scored on
    --windows evenly spaced windows (or every --stride tokens) with the loss over all next-token
    predictions. Writes summary.json, samples.jsonl, table.md and ppl_vs_length.png to --output.

    Args:
        methods: comma-separated: none, pi, ntk, yarn, dca; options like dca:chunk_size=4096,local_window=512
            (dca: chunk_size, local_window, pretraining_length, backend, kv_cache_dtype, logit_scale,
            logn_scale, logn_base, layer_window, layer_window_layers; pi/ntk/yarn: factor).
        lengths: comma-separated lengths in tokens; 4k = 4096.
        data: folder holding pg19/ (or the pg19 folder, or hf://emozilla/pg19-test); default: ../shared/data.
        output: output folder.
        windows: evenly spaced windows per length (2: the first and the last L tokens).
        stride: score windows every this many tokens instead (the paper uses 256).
        slice_size: positions per lm_head + cross-entropy slice (memory vs speed).
        model: hub id, model directory or .gguf file; default: SmolLM2-135M-Instruct (bundled).
        pretraining_length: the model's original window; default: from its config.
        dtype: bfloat16, float16 or float32; default: bfloat16 on CUDA, float32 on CPU.
        device: cpu, cuda, cuda:N, or auto (the model split over all GPUs by accelerate); default: cuda
            when available. Under torchrun: leave out (each rank's shard is on its own GPU).
        progress: show progress bars.
    """
    run_ppl(model, methods, lengths, data, output, windows, stride, slice_size, pretraining_length, dtype, device,
            progress)
    return 0


def eval_passkey(
    *,
    model: Model = None,
    methods: Methods = DEFAULT_METHODS,
    lengths: Lengths = "4k,8k",
    output: Output = "out/passkey",
    depths: Count = 5,
    trials: Count = 1,
    greedy: bool = False,
    pretraining_length: OptionalCount = None,
    dtype: Dtype = None,
    device: Device = None,
    progress: bool = True,
) -> int:
    """Passkey retrieval swept over lengths x depths for several methods.

    Prompts follow the ChunkLlama format (key Random(t), depth (d+0.5)/depths); answers are scored by
    teacher forcing (or greedy decoding). Writes summary.json, samples.jsonl, table.md and
    passkey_vs_length.png to --output.

    Args:
        methods: comma-separated: none, pi, ntk, yarn, dca; options like dca:chunk_size=4096,local_window=512
            (dca: chunk_size, local_window, pretraining_length, backend, kv_cache_dtype, logit_scale,
            logn_scale, logn_base, layer_window, layer_window_layers; pi/ntk/yarn: factor).
        lengths: comma-separated lengths in tokens; 4k = 4096.
        output: output folder.
        depths: depths per length, at (d+0.5)/depths.
        trials: prompts (different keys) per depth; 1 is the standard protocol.
        greedy: score by greedy decoding instead of teacher forcing (same verdict, slower).
        model: hub id, model directory or .gguf file; default: SmolLM2-135M-Instruct (bundled).
        pretraining_length: the model's original window; default: from its config.
        dtype: bfloat16, float16 or float32; default: bfloat16 on CUDA, float32 on CPU.
        device: cpu, cuda, cuda:N, or auto (the model split over all GPUs by accelerate); default: cuda
            when available. Under torchrun: leave out (each rank's shard is on its own GPU).
        progress: show progress bars.
    """
    run_passkey(model, methods, lengths, output, depths, trials, greedy, pretraining_length, dtype, device, progress)
    return 0


def eval_needle(
    *,
    model: Model = None,
    methods: Methods = "dca",
    lengths: Lengths = "4k,8k",
    data: str | None = None,
    output: Output = "out/needle",
    depths: Count = 11,
    max_new_tokens: Count = 32,
    chat: bool | None = None,
    pretraining_length: OptionalCount = None,
    dtype: Dtype = None,
    device: Device = None,
    progress: bool = True,
) -> int:
    """Needle in a haystack (Paul Graham essays): depth x length grid and a heatmap per method.

    Writes summary.json, samples.jsonl (every answer), table.md and needle_<method>.png to --output.

    Args:
        methods: comma-separated: none, pi, ntk, yarn, dca; options like dca:chunk_size=4096,local_window=512
            (dca: chunk_size, local_window, pretraining_length, backend, kv_cache_dtype, logit_scale,
            logn_scale, logn_base, layer_window, layer_window_layers; pi/ntk/yarn: factor).
        lengths: comma-separated prompt lengths in tokens; 4k = 4096.
        data: folder holding paul_graham_essays/ (or that folder); default: ../shared/data.
        output: output folder.
        depths: needle depths, evenly spaced from 0% to 100% (11: every 10%).
        max_new_tokens: tokens generated per answer.
        chat: use the tokenizer's chat template; default: when it has one.
        model: hub id, model directory or .gguf file; default: SmolLM2-135M-Instruct (bundled).
        pretraining_length: the model's original window; default: from its config.
        dtype: bfloat16, float16 or float32; default: bfloat16 on CUDA, float32 on CPU.
        device: cpu, cuda, cuda:N, or auto (the model split over all GPUs by accelerate); default: cuda
            when available. Under torchrun: leave out (each rank's shard is on its own GPU).
        progress: show progress bars.
    """
    run_needle(model, methods, lengths, data, output, depths, max_new_tokens, chat, pretraining_length, dtype,
               device, progress)
    return 0


def eval_longqa(
    *,
    model: Model = None,
    methods: Methods = "none,dca",
    tasks: str | None = None,
    data: str | None = None,
    output: Output = "out/longqa",
    max_length: Annotated[str, options.length_text] = "16k",
    limit: OptionalCount = None,
    max_new_tokens: OptionalCount = None,
    chat: bool | None = None,
    pretraining_length: OptionalCount = None,
    dtype: Dtype = None,
    device: Device = None,
    progress: bool = True,
) -> int:
    """Long-document QA: L-Eval tasks (exam / F1 / ROUGE) or the seed's few-shot JSONL layout.

    Documents longer than --max-length are cut in the middle. Writes summary.json (task, method,
    score, n), samples.jsonl (every question and answer) and table.md to --output.

    Args:
        methods: comma-separated: none, pi, ntk, yarn, dca; options like dca:chunk_size=4096,local_window=512
            (dca: chunk_size, local_window, pretraining_length, backend, kv_cache_dtype, logit_scale,
            logn_scale, logn_base, layer_window, layer_window_layers; pi/ntk/yarn: factor).
        tasks: comma-separated task names (JSONL file stems), e.g. coursera,tpo; default: all found.
        data: a .jsonl file, a folder of them, a folder holding leval/, or hf://L4NLP/LEval; default: ../shared/data.
        output: output folder.
        max_length: prompt + answer tokens (4k = 4096); the methods are set up for this length.
        limit: score only the first N questions of each task; default: all.
        max_new_tokens: tokens generated per answer; default: 32 (exam), 128 (f1), 256 (rouge).
        chat: use the tokenizer's chat template; default: when it has one.
        model: hub id, model directory or .gguf file; default: SmolLM2-135M-Instruct (bundled).
        pretraining_length: the model's original window; default: from its config.
        dtype: bfloat16, float16 or float32; default: bfloat16 on CUDA, float32 on CPU.
        device: cpu, cuda, cuda:N, or auto (the model split over all GPUs by accelerate); default: cuda
            when available. Under torchrun: leave out (each rank's shard is on its own GPU).
        progress: show progress bars.
    """
    run_longqa(model, methods, tasks, data, output, max_length, limit, max_new_tokens, chat, pretraining_length,
               dtype, device, progress)
    return 0
