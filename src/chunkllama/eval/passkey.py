"""Passkey retrieval: a 5-digit key hidden at a chosen depth in a haystack of repeated filler.

The protocol (``../shared/DEVICE.md``; the ChunkLlama / landmark-attention format), for a target
length ``L`` in tokens and trial ``t`` of ``n_trials``:

- key ``K = random.Random(t).randint(10000, 99999)``; depth ``(t + 0.5) / n_trials``;
- ``n = (L - 80) // tokens(FILLER + " ")`` filler units, ``int(depth * n)`` of them before the key;
- prompt = ``TASK_DESCRIPTION + "\\n" + filler*n_before + "\\nThe pass key is K. Remember it.
  K is the pass key.\\n" + filler*n_after + QUESTION``, filler units joined by single spaces;
- answer = the tokens of ``" " + str(K)``; tokens are counted without special tokens (no BOS).

Scoring by teacher forcing (:func:`score_teacher_forcing`): correct iff, fed the prompt followed by
the answer, the model's argmax at every answer position is that answer token (the same verdict as
greedy decoding, in one forward pass). Only the hidden states at the answer positions go through
the LM head, so full-vocabulary logits are never materialised for the whole prompt.
:func:`score_greedy` decodes instead, with the KV cache.

All functions are deterministic and keep no state; the model is whatever the caller passes (with
or without DCA applied).
"""

from __future__ import annotations

import dataclasses
import inspect
import random
from typing import Any, Callable, Sequence

import torch

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
RESERVED_TOKENS = 80  # room for the task description, key line and question
KEY_RANGE = (10000, 99999)


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no BOS/EOS)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey trial.

    Attributes:
        input_ids: the prompt's tokens (ends with ``"... The pass key is"``).
        answer_ids: the tokens of ``" " + str(passkey)``, the expected continuation.
        passkey: the 5-digit key.
        depth: fraction of the filler units placed before the key line.
        length: the target length ``L`` the prompt was built for (``len(input_ids) <= length``).
        n_filler: filler units in total; ``n_before`` of them precede the key line.
        n_before: see ``n_filler``.
        text: the prompt as a string.
    """

    input_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    passkey: int
    depth: float
    length: int
    n_filler: int
    n_before: int
    text: str

    @property
    def key_line(self) -> str:
        return KEY_LINE.format(key=self.passkey)


@dataclasses.dataclass(frozen=True)
class PasskeyResult:
    """The verdict on one prompt: ``predicted_ids`` are the model's tokens at the answer positions."""

    correct: bool
    predicted_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


def trial_passkey(trial: int) -> int:
    """The key of trial ``trial``: ``random.Random(trial).randint(10000, 99999)``."""
    return random.Random(trial).randint(*KEY_RANGE)


def trial_depth(trial: int, n_trials: int) -> float:
    """Depth of trial ``trial`` of ``n_trials``: ``(trial + 0.5) / n_trials`` (evenly spread, never 0 or 1)."""
    if n_trials <= 0 or not 0 <= trial < n_trials:
        raise ValueError(f"trial must be in [0, n_trials), got trial={trial}, n_trials={n_trials}.")
    return (trial + 0.5) / n_trials


def filler_count(tokenizer: Any, length: int) -> int:
    """Filler units for a prompt of ``length`` tokens: ``(length - 80) // tokens(FILLER + " ")``."""
    n = (length - RESERVED_TOKENS) // len(_encode(tokenizer, FILLER + " "))
    if n <= 0:
        raise ValueError(f"length={length} is too short for a passkey prompt (needs > {RESERVED_TOKENS} + one filler unit).")
    return n


def passkey_text(passkey: int, n_filler: int, n_before: int) -> str:
    """The prompt string with ``n_before`` of ``n_filler`` filler units before the key line."""
    if not 0 <= n_before <= n_filler:
        raise ValueError(f"n_before must be in [0, n_filler={n_filler}], got {n_before}.")
    before = " ".join([FILLER] * n_before)
    after = " ".join([FILLER] * (n_filler - n_before))
    return TASK_DESCRIPTION + "\n" + before + KEY_LINE.format(key=passkey) + after + QUESTION


def make_passkey_prompt(
    tokenizer: Any,
    length: int,
    *,
    trial: int = 0,
    n_trials: int = 1,
    depth: float | None = None,
    passkey: int | None = None,
    exact: bool = False,
) -> PasskeyPrompt:
    """Build trial ``trial`` of ``n_trials`` of the passkey test at ``length`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (called with ``add_special_tokens=False``).
        length: the target length ``L``; the prompt has at most ``L`` tokens (``L - 80`` of filler
            plus the fixed text, which is shorter than 80 tokens for common tokenizers).
        trial, n_trials: select the key (``random.Random(trial)``) and, unless ``depth`` is given,
            the depth ``(trial + 0.5) / n_trials``.
        depth: overrides the depth, a fraction in ``[0, 1]``.
        passkey: overrides the key.
        exact: make the prompt exactly ``length`` tokens: the protocol's prompt, topped up with the
            first tokens of further filler units just before the question (``text`` is then the
            decoded prompt). Off by default, as the protocol's prompts are a little shorter.
    """
    if depth is None:
        depth = trial_depth(trial, n_trials)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}.")
    key = trial_passkey(trial) if passkey is None else passkey
    n_filler = filler_count(tokenizer, length)
    n_before = int(depth * n_filler)
    text = passkey_text(key, n_filler, n_before)
    input_ids = _encode(tokenizer, text)
    if exact and len(input_ids) < length:
        question = _encode(tokenizer, QUESTION)
        body = _encode(tokenizer, text.removesuffix(QUESTION))
        unit = _encode(tokenizer, " " + FILLER)
        missing = length - len(body) - len(question)
        if missing >= 0:
            input_ids = body + (unit * (missing // len(unit) + 1))[:missing] + question
            text = tokenizer.decode(input_ids)
    return PasskeyPrompt(
        input_ids=tuple(input_ids),
        answer_ids=tuple(_encode(tokenizer, " " + str(key))),
        passkey=key,
        depth=depth,
        length=length,
        n_filler=n_filler,
        n_before=n_before,
        text=text,
    )


def passkey_prompts(tokenizer: Any, length: int, n_trials: int = 5) -> list[PasskeyPrompt]:
    """All ``n_trials`` trials of the protocol at ``length`` tokens."""
    return [make_passkey_prompt(tokenizer, length, trial=t, n_trials=n_trials) for t in range(n_trials)]


# --- running the model -------------------------------------------------------------------------


def _split_model(model: Any) -> tuple[Any, Any]:
    """``(base model returning hidden states, LM head)`` of a causal LM."""
    head = model.get_output_embeddings()
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        raise TypeError(f"{type(model).__name__} is not a causal LM with a separate base model and LM head.")
    return base, head


def _cache_kwarg(base: Any) -> str:
    """The name the base model's forward uses for the KV cache (``cache`` in newer transformers)."""
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older releases take no config
        return DynamicCache()


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def answer_logits(model: Any, input_ids: Sequence[int] | torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """Next-token logits at ``positions`` of one sequence, shape ``(len(positions), vocab)``, fp32.

    Runs the base model once without a cache and applies the LM head to the hidden states at
    ``positions`` only.
    """
    base, head = _split_model(model)
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=_device(model)).reshape(1, -1)
    hidden = base(input_ids=ids, use_cache=False).last_hidden_state
    index = torch.as_tensor(list(positions), dtype=torch.long, device=hidden.device)
    return head(hidden[0, index]).float()


def score_teacher_forcing(model: Any, prompt: PasskeyPrompt) -> PasskeyResult:
    """Correct iff the argmax at every answer position is the answer token (one forward pass)."""
    ids = list(prompt.input_ids) + list(prompt.answer_ids[:-1])
    start = len(prompt.input_ids) - 1
    positions = range(start, start + len(prompt.answer_ids))
    predicted = tuple(int(i) for i in answer_logits(model, ids, positions).argmax(-1).tolist())
    return PasskeyResult(predicted == prompt.answer_ids, predicted, prompt.answer_ids)


@torch.inference_mode()
def prefill(
    model: Any,
    input_ids: Sequence[int] | torch.Tensor,
    *,
    cache: Any = None,
    chunk: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor | None, Any]:
    """Run the tokens of ``input_ids`` that ``cache`` does not hold yet; returns ``(hidden, cache)``.

    ``cache`` (a HF cache, default: a new empty one) must hold exactly the first
    ``cache.get_seq_length()`` tokens of ``input_ids``; it is extended in place. The remaining
    tokens go ``chunk`` at a time (all at once when None). ``hidden`` is the final hidden state of
    the last token, shape ``(1, hidden)`` (None when nothing was left to run). ``on_step(n)`` is
    called after each forward with the number of tokens it consumed.
    """
    base, _ = _split_model(model)
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=_device(model)).reshape(1, -1)
    cache = _new_cache(model) if cache is None else cache
    done = int(cache.get_seq_length())
    if done > ids.shape[1]:
        raise ValueError(f"the cache holds {done} tokens, more than the {ids.shape[1]} given.")
    step = max(1, chunk) if chunk is not None else max(1, ids.shape[1] - done)
    hidden = None
    for start in range(done, ids.shape[1], step):
        piece = ids[:, start : start + step]
        hidden = base(input_ids=piece, use_cache=True, **{_cache_kwarg(base): cache}).last_hidden_state[:, -1]
        if on_step is not None:
            on_step(piece.shape[1])
    return hidden, cache


@torch.inference_mode()
def greedy_generate(
    model: Any,
    input_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    prefill_chunk: int | None = None,
    on_step: Callable[[int], None] | None = None,
    cache: Any = None,
) -> list[int]:
    """Greedy decoding of one sequence with the KV cache; returns the new tokens.

    The prompt is prefilled ``prefill_chunk`` tokens at a time (all at once when None), then one
    token per step. Logits are computed for the last position of each step only. ``on_step(n)`` is
    called after each forward with the number of prompt tokens (prefill) or 1 (decode) it consumed.
    ``cache``, when given, already holds a prefix of the prompt (see :func:`prefill`); it must leave
    at least the prompt's last token to run, and it is extended in place.
    """
    base, head = _split_model(model)
    hidden, cache = prefill(model, input_ids, cache=cache, chunk=prefill_chunk, on_step=on_step)
    if hidden is None:
        raise ValueError("nothing to prefill: the prompt is empty or the cache already holds all of it.")
    cache_arg = {_cache_kwarg(base): cache}
    new_tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = head(hidden).float().argmax(-1)
        new_tokens.append(int(token))
        if len(new_tokens) == max_new_tokens:
            break
        hidden = base(input_ids=token.reshape(1, 1), use_cache=True, **cache_arg).last_hidden_state[:, -1]
        if on_step is not None:
            on_step(1)
    return new_tokens


def score_greedy(
    model: Any, prompt: PasskeyPrompt, max_new_tokens: int | None = None, *, prefill_chunk: int | None = None
) -> PasskeyResult:
    """Correct iff greedy decoding starts with the answer tokens.

    ``max_new_tokens`` defaults to the answer's length; ``predicted_ids`` holds all new tokens.
    """
    n = len(prompt.answer_ids) if max_new_tokens is None else max_new_tokens
    new = tuple(greedy_generate(model, prompt.input_ids, n, prefill_chunk=prefill_chunk))
    return PasskeyResult(new[: len(prompt.answer_ids)] == prompt.answer_ids, new, prompt.answer_ids)
