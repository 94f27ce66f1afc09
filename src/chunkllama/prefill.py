"""Chunked prefill in ``model.generate`` for DCA-patched models, through transformers' own machinery.

transformers (5.x) can already prefill a prompt in pieces: ``generate(..., prefill_chunk_size=N)``
feeds ``N`` tokens at a time against the growing KV cache (``GenerationMixin._prefill``), and
``generate`` asks every piece for the logits of its last position only (``logits_to_keep=1``).
With DCA that is exact — keys enter the cache already rotated at their chunk-relative position,
and each piece's queries are placed by their position ids — and it bounds the prefill activations
by the piece instead of the prompt (the MLP of a 1M-token prompt at once is tens of GiB).

What this module adds is a default for patched models: :func:`enable_chunked_prefill` gives *one
model instance* a ``generate`` that fills in ``prefill_chunk_size`` when the caller chose none.
Nothing shared changes: not the class, not ``model.config``, not ``model.generation_config`` (so
``save_pretrained`` writes the original settings); :func:`disable_chunked_prefill` removes it.

The caller "chose" when any of these holds, and then the call is passed through untouched:

- ``prefill_chunk_size=...`` is given to ``generate`` (``None`` there means one-shot prefill);
- a ``generation_config`` with ``prefill_chunk_size`` set is given, or the model's own
  ``generation_config.prefill_chunk_size`` is set.

The default is also left out where transformers' chunked prefill does not apply or differs
between releases: ``use_cache=False`` (chunking needs a cache), ``inputs_embeds`` (5.17 splits
only ``input_ids``), and a cache that already holds tokens (5.17 re-feeds the prompt from
position 0; 5.24 slices it) — those calls prefill in one shot as before.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

from torch import nn

from .compat import GENERATE_CHUNKS_PREFILL
from .config import DCAConfig, default_prefill_chunk_size

_STATE = "_chunkllama_prefill"
_MISSING = object()
_CACHE_ARGS = ("past_key_values", "cache")  # the cache's keyword up to 5.2x / after


@dataclasses.dataclass(frozen=True)
class _PrefillPatch:
    """Kept on the model instance: the default piece size and the ``generate`` it replaced."""

    chunk_size: int
    original_generate: Any  # an instance-level ``generate`` that was there before, or _MISSING


def resolve_prefill_chunk_size(config: DCAConfig, prefill_chunk_size: int | None) -> int | None:
    """The piece size a patched model gets: ``None`` → the default, ``0`` → off (returns ``None``).

    Raises:
        ValueError: for anything but ``None`` or an int ``>= 0``.
    """
    if prefill_chunk_size is None:
        return default_prefill_chunk_size(config)
    _check_size(prefill_chunk_size, allow_zero=True)
    return prefill_chunk_size or None


def _check_size(size: Any, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(size, bool) or not isinstance(size, int) or size < low:
        off = " (or 0 to switch the default off)" if allow_zero else ""
        raise ValueError(
            f"prefill_chunk_size must be a whole number of tokens >= 1{off}, got {size!r}; "
            "e.g. 4096 feeds a long prompt to the model 4096 tokens at a time."
        )


def _generation_config_arg(args: tuple, kwargs: dict[str, Any]) -> Any:
    # generate(inputs=None, generation_config=None, ...) in 5.17 and 5.24
    return kwargs["generation_config"] if "generation_config" in kwargs else (args[1] if len(args) > 1 else None)


def _caller_chose(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> bool:
    if "prefill_chunk_size" in kwargs:
        return True
    for config in (_generation_config_arg(args, kwargs), getattr(model, "generation_config", None)):
        if getattr(config, "prefill_chunk_size", None) is not None:
            return True
    return False


def _chunking_applies(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> bool:
    if not GENERATE_CHUNKS_PREFILL or kwargs.get("inputs_embeds") is not None:
        return False
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        config = _generation_config_arg(args, kwargs) or getattr(model, "generation_config", None)
        use_cache = getattr(config, "use_cache", True)
    if use_cache is False:
        return False
    for name in _CACHE_ARGS:
        cache = kwargs.get(name)
        if cache is not None and (not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0):
            return False
    return True


def _generate_with_chunked_prefill(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``generate`` of a model with a default prefill piece size (see the module docstring)."""
    patch: _PrefillPatch = self.__dict__[_STATE]
    if not _caller_chose(self, args, kwargs) and _chunking_applies(self, args, kwargs):
        kwargs["prefill_chunk_size"] = patch.chunk_size
    if patch.original_generate is not _MISSING:
        return patch.original_generate(*args, **kwargs)
    return type(self).generate(self, *args, **kwargs)


def enable_chunked_prefill(model: nn.Module, chunk_size: int | None) -> nn.Module:
    """Give this model instance's ``generate`` a default ``prefill_chunk_size`` of ``chunk_size`` tokens.

    Replaces an earlier setting; ``chunk_size=None`` is :func:`disable_chunked_prefill`. A model
    without ``generate`` (e.g. a base ``LlamaModel``) is returned unchanged. Returns the model.

    Raises:
        ValueError: if ``chunk_size`` is not an int ``>= 1`` (or ``None``).
    """
    if chunk_size is None:
        return disable_chunked_prefill(model)
    _check_size(chunk_size)
    if not callable(getattr(model, "generate", None)):
        return model
    disable_chunked_prefill(model)
    original = model.__dict__.get("generate", _MISSING)
    object.__setattr__(model, _STATE, _PrefillPatch(chunk_size, original))
    object.__setattr__(model, "generate", types.MethodType(_generate_with_chunked_prefill, model))
    return model


def disable_chunked_prefill(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_chunked_prefill` on this instance exactly; a no-op if it was never enabled."""
    patch = model.__dict__.get(_STATE)
    if patch is None:
        return model
    object.__delattr__(model, "generate")
    if patch.original_generate is not _MISSING:
        object.__setattr__(model, "generate", patch.original_generate)
    object.__delattr__(model, _STATE)
    return model


def get_prefill_chunk_size(model: nn.Module) -> int | None:
    """The default prefill piece size this instance's ``generate`` uses (``None``: one-shot, HF's default)."""
    patch = model.__dict__.get(_STATE)
    return patch.chunk_size if patch is not None else None
