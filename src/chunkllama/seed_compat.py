"""The seed's one-liners: ``replace_with_chunkllama(pretraining_length=4096)`` and siblings.

Each patches the ``__init__`` of one family's base model class so that every model of that
family constructed afterwards (``from_pretrained`` included) gets :func:`apply_dca` with these
settings. Unlike the seed, nothing is stored in module globals: the settings live in the returned
:class:`FamilyPatch`, which undoes the class patch with ``.undo()`` (or as a context manager), and
each model still carries its own per-instance patch (``remove_dca(model)`` works as usual).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from .attention import check_backend
from .config import DCAConfig
from .patching import apply_dca

_BASE_MODELS = {
    "llama": [("transformers.models.llama.modeling_llama", "LlamaModel")],
    "mistral": [("transformers.models.mistral.modeling_mistral", "MistralModel")],
    "mixtral": [("transformers.models.mixtral.modeling_mixtral", "MixtralModel")],
    "qwen": [
        ("transformers.models.qwen2.modeling_qwen2", "Qwen2Model"),
        ("transformers.models.qwen3.modeling_qwen3", "Qwen3Model"),
    ],
}
_PATCHED_INIT = "_chunkllama_family_patch"


class FamilyPatch:
    """A class-level patch installed by ``replace_with_chunk*``; undo it with :meth:`undo`."""

    def __init__(self, family: str, config: DCAConfig, backend: str = "auto") -> None:
        check_backend(backend)  # fail here, not later inside every model's __init__
        self.family = family
        self.config = config
        self.backend = backend
        self._originals: list[tuple[type, Any]] = []
        for module_name, class_name in _BASE_MODELS[family]:
            cls = getattr(importlib.import_module(module_name), class_name)
            if _PATCHED_INIT in cls.__dict__:  # a previous replace_with_* for this family: replace it
                cls.__dict__[_PATCHED_INIT].undo()
            original_init = cls.__init__
            self._originals.append((cls, original_init))
            cls.__init__ = self._wrap(original_init)
            setattr(cls, _PATCHED_INIT, self)

    def _wrap(self, original_init: Any) -> Any:
        patch = self

        @functools.wraps(original_init)
        def init_with_dca(model: Any, *args: Any, **kwargs: Any) -> None:
            original_init(model, *args, **kwargs)
            apply_dca(model, patch.config, backend=patch.backend)

        return init_with_dca

    def undo(self) -> None:
        """Restore the classes; models built before keep DCA until ``remove_dca(model)``."""
        for cls, original_init in self._originals:
            if cls.__dict__.get(_PATCHED_INIT) is self:
                cls.__init__ = original_init
                delattr(cls, _PATCHED_INIT)
        self._originals = []

    def __enter__(self) -> "FamilyPatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"FamilyPatch({self.family!r}, {self.config})"


def _replace(family: str, pretraining_length: int, local_window_size: int | None, backend: str) -> FamilyPatch:
    return FamilyPatch(family, DCAConfig(pretraining_length, local_window=local_window_size), backend)


def replace_with_chunkllama(
    pretraining_length: int = 4096, local_window_size: int | None = None, backend: str = "auto", **_seed_only: Any
) -> FamilyPatch:
    """DCA for every Llama model built afterwards (seed-compatible; ``max_prompt_length`` is accepted and unused)."""
    return _replace("llama", pretraining_length, local_window_size, backend)


def replace_with_chunkmistral(
    pretraining_length: int = 32768, local_window_size: int | None = None, backend: str = "auto", **_seed_only: Any
) -> FamilyPatch:
    """DCA for every Mistral model built afterwards."""
    return _replace("mistral", pretraining_length, local_window_size, backend)


def replace_with_chunkmixtral(
    pretraining_length: int = 32768, local_window_size: int | None = None, backend: str = "auto", **_seed_only: Any
) -> FamilyPatch:
    """DCA for every Mixtral model built afterwards."""
    return _replace("mixtral", pretraining_length, local_window_size, backend)


def replace_with_chunkqwen(
    pretraining_length: int = 32768, local_window_size: int | None = None, backend: str = "auto", **_seed_only: Any
) -> FamilyPatch:
    """DCA for every Qwen2/2.5 and Qwen3 model built afterwards."""
    return _replace("qwen", pretraining_length, local_window_size, backend)
