"""Values of command options: parse and check one, or say what is wrong and what is accepted.

The commands (``demo``, ``eval ...``, and any later one) annotate their keyword-only parameters
with these checks, e.g. ``lengths: Annotated[str, options.lengths] = "4k,8k"``; the command line
(:mod:`chunkllama.cli`) runs the check on the text the user typed — and on string defaults —
while parsing, so a bad value is reported before anything heavy is imported or loaded. The
checks are plain functions ``str -> value`` that raise :class:`OptionError` (a ``ValueError``),
so the Python API can use them too. This module imports nothing heavy (no torch, no
transformers): ``chunkllama --help`` and every error here stay fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

LENGTH_ACCEPTED = "a token count such as 4096, or with k = 1024 such as 4k or 1.5k"
DEVICES = ("cpu", "cuda")
DTYPES = ("bfloat16", "float16", "float32")
#: KV cache storage: the model's dtype, or FP8 e4m3 with per-token scales (chunkllama.attention.fp8)
KV_DTYPES = ("auto", "fp8")


class OptionError(ValueError):
    """A bad option value: ``--option VALUE: what is wrong; accepted: what would work``.

    ``option`` may be left out when the check does not know which option it runs for; the
    command line fills it in.
    """

    def __init__(self, value: Any, problem: str, accepted: str | None = None, *, option: str | None = None):
        self.value, self.problem, self.accepted, self.option = value, problem, accepted, option
        super().__init__(str(self))

    def for_option(self, option: str) -> OptionError:
        """The same error, naming ``option`` (a ``--flag``)."""
        return OptionError(self.value, self.problem, self.accepted, option=option)

    def __str__(self) -> str:
        head = f"{self.option} {self.value}" if self.option else f"{self.value}"
        return f"{head}: {self.problem}" + (f"; accepted: {self.accepted}" if self.accepted else "")


def length(text: str | int) -> int:
    """``"4096"``, ``"4k"`` (= 4096) or ``"1.5k"`` -> tokens (a positive int)."""
    raw = str(text).strip()
    low = raw.lower()
    try:
        tokens = int(round(float(low[:-1]) * 1024)) if low.endswith("k") else int(low)
    except ValueError:
        raise OptionError(raw or repr(raw), "not a length", LENGTH_ACCEPTED) from None
    if tokens <= 0:
        raise OptionError(raw, "not positive", LENGTH_ACCEPTED)
    return tokens


def lengths(text: str) -> str:
    """A comma-separated list of lengths (checked); returns ``text`` unchanged."""
    items = [p for p in str(text).split(",") if p.strip()]
    if not items:
        raise OptionError(repr(text), "no lengths given", "comma-separated lengths such as 4k,8k,16384")
    for item in items:
        try:
            length(item)
        except OptionError as exc:
            raise OptionError(text, f"{item.strip()!r} is {exc.problem}",
                              "comma-separated lengths, each " + LENGTH_ACCEPTED) from None
    return text


def length_text(text: str) -> str:
    """One length (checked); returns ``text`` unchanged."""
    length(text)
    return text


def positive_int(text: str | int) -> int:
    """An integer >= 1."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise OptionError(text, "not a whole number", "a whole number >= 1") from None
    if value < 1:
        raise OptionError(text, "must be at least 1", "a whole number >= 1")
    return value


def fraction(text: str | float) -> float:
    """A number in ``[0, 1]``."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise OptionError(text, "not a number", "a number from 0 to 1, e.g. 0.5") from None
    if not 0.0 <= value <= 1.0:
        raise OptionError(text, "outside 0..1", "a number from 0 to 1, e.g. 0.5")
    return value


def device(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N``, or ``auto`` (the model split over all GPUs by accelerate's ``device_map="auto"``)."""
    value = str(text).strip()
    if value.lower() == "auto":
        return "auto"
    kind, _, index = value.partition(":")
    if kind not in DEVICES or (index and not (kind == "cuda" and index.isdigit())):
        raise OptionError(value, "unknown device", "cpu, cuda, cuda:N, auto")
    return value


def dtype(text: str) -> str:
    """``bfloat16``, ``float16`` or ``float32`` (also ``bf16``, ``fp16``, ``fp32``)."""
    value = str(text).strip().lower()
    short = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = short.get(value, value)
    if value not in DTYPES:
        raise OptionError(text, "unknown dtype", ", ".join(DTYPES))
    return value


def kv_dtype(text: str) -> str:
    """``auto`` (keys/values in the model's dtype) or ``fp8`` (e4m3 with one scale per token and head: ~half the memory)."""
    value = str(text).strip().lower()
    if value not in KV_DTYPES:
        raise OptionError(text, "unknown KV cache dtype", ", ".join(KV_DTYPES))
    return value


def existing_file(text: str) -> str:
    """A path to an existing file."""
    path = Path(str(text)).expanduser()
    if not path.exists():
        raise OptionError(text, "file not found", "an existing file")
    if not path.is_file():
        raise OptionError(text, "is a directory, not a file", "an existing file")
    return str(text)


def existing_path(text: str) -> str:
    """A path to an existing file or directory (``hf://...`` sources pass unchecked)."""
    if str(text).startswith("hf://"):
        return str(text)
    if not Path(str(text)).expanduser().exists():
        raise OptionError(text, "no such file or directory", "an existing path")
    return str(text)


def model(text: str | None) -> str | None:
    """A model the loader can find now: a ``.gguf`` file, a model directory, or a hub id that is
    in the local Hugging Face cache (or reachable); None is the bundled default model.

    The check is :func:`chunkllama.models.check_model_source`; it reads the disk and, for a hub id
    that is not cached, makes one short connection attempt (no retries).
    """
    from .models import ModelSourceError, check_model_source

    try:
        check_model_source(text)
    except ModelSourceError as exc:
        raise OptionError(text if text is not None else "(default)", exc.problem, exc.accepted) from None
    return text


model.checks_default = True  # type: ignore[attr-defined]  # the command line also checks a None default


def choice(values: Iterable[str]) -> Callable[[str], str]:
    """A check accepting only ``values`` (case-insensitive)."""
    allowed = tuple(values)

    def check(text: str) -> str:
        value = str(text).strip().lower()
        if value not in allowed:
            raise OptionError(text, "not one of the choices", ", ".join(allowed))
        return value

    check.__name__ = "choice"
    return check


def writable_dir(text: str) -> str:
    """A directory that exists or can be created (its nearest existing parent is writable)."""
    path = Path(str(text)).expanduser()
    if path.exists() and not path.is_dir():
        raise OptionError(text, "exists and is not a directory", "a directory path (created if missing)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise OptionError(text, f"cannot write to {parent}", "a directory you can write to")
    return str(text)
