"""Choosing the next token and turning tokens into streamed text.

- :class:`SamplingParams`: what one request asks for (length, temperature, top-p, seed, stop
  strings), validated on construction.
- :func:`next_tokens`: one next token per row of a ``(batch, vocab)`` logits tensor, greedy or
  sampled (temperature, then top-p / nucleus), in fp32 whatever the logits' dtype.
- :class:`TextStream`: incremental detokenisation of one sequence. Each :meth:`TextStream.push`
  returns only text that is final: never half of a multi-byte UTF-8 character, never text that
  might still turn out to be the start of a stop string. The deltas concatenated are exactly
  :attr:`TextStream.text`.

Shared by the single-conversation engine (:mod:`.engine`) and the batched server engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import torch

FinishReason = Literal["stop", "length", "abort"]
#: ``"stop"``: EOS / end-of-turn token or a stop string; ``"length"``: ``max_new_tokens`` (or the
#: context) ran out; ``"abort"``: the caller stopped the answer (Ctrl-C, client gone).
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort")

_REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 byte sequence to


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one answer.

    Attributes:
        max_new_tokens: the most tokens generated (at least 1).
        temperature: 0 means greedy (argmax); > 0 divides the logits before sampling.
        top_p: nucleus sampling: sample only from the smallest set of tokens whose probability
            adds up to at least ``top_p`` (0 < top_p <= 1; 1 keeps every token). Ignored when greedy.
        seed: seed of the sampling random generator (None: not seeded). Ignored when greedy.
        stop: strings that end the answer when generated; the stop string itself is not part of
            the answer. A single string or a list is accepted and stored as a tuple.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        try:
            stop = tuple(stop)
        except TypeError:
            raise ValueError(f"stop must be a string or a sequence of strings, got {self.stop!r}") from None
        for item in stop:
            if not isinstance(item, str) or not item:
                raise ValueError(f"every stop string must be a non-empty string, got {item!r} in stop={self.stop!r}")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0)."""
        return self.temperature == 0.0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A random generator on ``device`` seeded with :attr:`seed`; None when greedy or unseeded."""
        if self.greedy or self.seed is None:
            return None
        generator = torch.Generator(device=torch.device(device))
        generator.manual_seed(self.seed)
        return generator


def next_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token of each row.

    Args:
        logits: ``(batch, vocab)``, any float dtype; the logits of the last position of each row.
        params: greedy when ``params.temperature == 0``, else softmax of ``logits / temperature``
            restricted to the top-``top_p`` nucleus (always at least the most likely token).
        generator: random generator for sampling, on the logits' device (None: torch's global one).

    Returns:
        ``(batch,)`` int64 token ids on the logits' device.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    scores = logits.float()
    if params.greedy:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability mass of the tokens ranked above
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)  # the top token always stays (before = 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


class TextStream:
    """Incremental detokenisation of one generated sequence, with EOS and stop-string handling.

    Push token ids one at a time; each push returns the newly printable text. Text is held back
    while it ends in an incomplete UTF-8 character (the tokenizer decodes those to U+FFFD) or
    while its end could be the beginning of a stop string. Decoding works on a small window of
    recent tokens (the previous token(s) plus the new ones), so the cost per token does not grow
    with the answer's length and tokenizers that drop a word's leading space when it starts a
    decode (SentencePiece) still produce the right spaces.

    Args:
        tokenizer: a Hugging Face tokenizer (``decode`` is used, with ``skip_special_tokens=True``).
        stop: stop strings (the answer ends before the first one; it is not part of :attr:`text`).
        eos_token_ids: token ids that end the answer (EOS, end-of-turn); they are not decoded.
    """

    def __init__(self, tokenizer: Any, stop: Iterable[str] = (), eos_token_ids: Iterable[int] = frozenset()):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._eos = frozenset(int(t) for t in eos_token_ids)
        self._ids: list[int] = []
        self._prefix = 0  # decode window start: the token(s) before the last confirmed text
        self._read = 0  # tokens up to here are confirmed into self._decoded
        self._decoded = ""  # confirmed decoded text (may still hold a stop string)
        self._emitted = 0  # characters of self._decoded already returned
        self._text: str | None = None  # the final text once finished
        self.finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        """True once EOS, a stop string, or :meth:`finish` ended the sequence."""
        return self.finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids pushed so far, EOS excluded (a copy)."""
        return list(self._ids)

    @property
    def text(self) -> str:
        """All text so far, without the stop string and anything after it (held-back text included)."""
        if self._text is not None:
            return self._text
        return self._decoded

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it makes printable (often "" or a word)."""
        if self.finished:
            raise RuntimeError(f"TextStream already finished ({self.finish_reason}); no more tokens can be pushed")
        token_id = int(token_id)
        if token_id in self._eos:
            return self.finish("stop")
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self._decoded += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release()

    def finish(self, reason: FinishReason) -> str:
        """End the sequence for ``reason`` (no-op if already finished); return the text held back."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        if self.finished:
            return ""
        # Tokens not yet confirmed (an incomplete character at the very end) decode as they are.
        tail = self._decode(self._ids[self._prefix :])[len(self._decode(self._ids[self._prefix : self._read])) :]
        self._decoded += tail
        self._read = len(self._ids)
        cut = self._find_stop(self._decoded)
        text = self._decoded if cut is None else self._decoded[:cut]
        self._text = text
        self.finish_reason = "stop" if cut is not None else reason
        delta = text[self._emitted :]
        self._emitted = len(text)
        return delta

    # --- internals ---------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _find_stop(self, text: str) -> int | None:
        """Index of the earliest stop string in ``text`` (searching only where one could newly end)."""
        start = max(0, self._emitted - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _release(self) -> str:
        cut = self._find_stop(self._decoded)
        if cut is not None:
            self._text = self._decoded[:cut]
            self.finish_reason = "stop"
            delta = self._text[self._emitted :]
            self._emitted = len(self._text)
            return delta
        safe = len(self._decoded) - self._held_back(self._decoded)
        delta = self._decoded[self._emitted : safe]
        self._emitted = max(self._emitted, safe)
        return delta

    def _held_back(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the beginning of some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
