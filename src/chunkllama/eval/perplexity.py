"""PG19 perplexity (ChunkLlama protocol), without full-vocabulary logits for the whole window.

Protocol (``../shared/DEVICE.md``): the books sorted by name, joined with ``"\\n\\n"``, tokenized
once without special tokens into ``N`` tokens. For a length ``L`` either ``n_windows`` evenly
spaced windows start at ``w * (N - L) // (n_windows - 1)`` (the quick protocol; 2 windows start at
0 and ``N - L``), or windows start every ``stride`` tokens (the paper uses 256). The loss is
taken over all ``L - 1`` next-token predictions of every window, ``ppl = exp(mean)``.

The model's decoder runs once per window; ``lm_head`` and the cross-entropy are then applied to
``slice_size`` positions at a time (fp32), so memory is ``O(slice_size * vocab)``, not
``O(L * vocab)``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .methods import MethodSpec, method_applied


def tokenize_corpus(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole corpus as one int64 stream, without BOS/EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def window_starts(n_tokens: int, length: int, n_windows: int = 2, stride: int | None = None) -> list[int]:
    """Start offsets of the windows of ``length`` tokens in a stream of ``n_tokens``.

    With ``stride``: ``0, stride, 2*stride, ...`` while the window fits (``n_windows`` ignored).
    Otherwise ``n_windows`` evenly spaced starts ``w * (n_tokens - length) // (n_windows - 1)``.
    """
    if length > n_tokens:
        raise ValueError(f"Window of {length} tokens does not fit a corpus of {n_tokens} tokens.")
    if length < 2:
        raise ValueError("Windows need at least 2 tokens.")
    if stride is not None:
        if stride <= 0:
            raise ValueError("stride must be positive")
        return list(range(0, n_tokens - length + 1, stride))
    if n_windows < 1:
        raise ValueError("n_windows must be >= 1")
    if n_windows == 1:
        return [0]
    return [w * (n_tokens - length) // (n_windows - 1) for w in range(n_windows)]


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    head = model.get_output_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or head is None:
        decoder = getattr(model, getattr(model, "base_model_prefix", "model"))
    return decoder, head


@torch.no_grad()
def sequence_nll(model: nn.Module, input_ids: torch.Tensor, slice_size: int = 2048) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods of ``input_ids`` ``(1, T)`` and their count ``T-1``.

    Runs the decoder once, then ``lm_head`` + fp32 cross-entropy over ``slice_size`` positions at
    a time.
    """
    decoder, head = _decoder_and_head(model)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # (1, T, H)
    labels = input_ids[0, 1:]
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = labels.numel()
    for start in range(0, n, slice_size):
        stop = min(start + slice_size, n)
        logits = head(hidden[0, start:stop]).float()
        total += F.cross_entropy(logits, labels[start:stop], reduction="sum").double()
    return float(total), n


def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    length: int,
    n_windows: int = 2,
    stride: int | None = None,
    slice_size: int = 2048,
    on_window: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` over windows of ``length`` tokens of ``tokens`` (1-D stream)."""
    starts = window_starts(tokens.numel(), length, n_windows, stride)
    total, count = 0.0, 0
    windows = []
    for start in starts:
        t0 = time.perf_counter()
        nll, n = sequence_nll(model, tokens[start : start + length].unsqueeze(0), slice_size)
        total += nll
        count += n
        row = {"start": start, "nll": nll, "n": n, "ppl": math.exp(nll / n), "seconds": time.perf_counter() - t0}
        windows.append(row)
        if on_window is not None:
            on_window(row)
    return {"ppl": math.exp(total / count), "nll_mean": total / count, "n_predictions": count, "windows": windows}


def evaluate_ppl(
    model: nn.Module,
    tokens: torch.Tensor,
    lengths: Sequence[int],
    methods: Sequence[MethodSpec],
    n_windows: int = 2,
    stride: int | None = None,
    slice_size: int = 2048,
    pretraining_length: int | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Perplexity for every (method, length). Returns ``(summary rows, per-window samples)``."""
    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    total = len(methods) * len(lengths)
    bar = tqdm(total=total, desc="ppl", disable=not progress)
    for spec in methods:
        for length in lengths:
            bar.set_postfix_str(f"{spec.label} L={length}")
            with method_applied(model, spec, length, pretraining_length) as record:
                result = perplexity(model, tokens, length, n_windows, stride, slice_size)
            for w in result["windows"]:
                samples.append({"task": "ppl", "method": spec.label, "L": length, **w})
            rows.append(
                {
                    "task": "ppl",
                    "method": spec.label,
                    "L": length,
                    "ppl": result["ppl"],
                    "nll_mean": result["nll_mean"],
                    "n_predictions": result["n_predictions"],
                    "n_windows": len(result["windows"]),
                    "stride": stride,
                    "config": record,
                }
            )
            bar.update(1)
            bar.write(f"ppl {spec.label:>8} L={length:>6}: {result['ppl']:.3f}")
    bar.close()
    return rows, samples
