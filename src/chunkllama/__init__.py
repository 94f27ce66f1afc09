"""chunkllama: training-free long context for Hugging Face LLMs through Dual Chunk Attention.

The public names below are imported on first use (PEP 562), so ``import chunkllama`` — and the
``chunkllama`` command's ``--help`` and argument errors — do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "DCAConfig": "config",
    "FamilyPatch": "seed_compat",
    "SUPPORTED_MODELS": "patching",
    "apply_dca": "patching",
    "dca_attention": "attention",
    "get_dca_config": "patching",
    "get_kv_cache_dtype": "patching",
    "is_dca_applied": "patching",
    "load_model": "models",
    "remove_dca": "patching",
    "replace_with_chunkllama": "seed_compat",
    "replace_with_chunkmistral": "seed_compat",
    "replace_with_chunkmixtral": "seed_compat",
    "replace_with_chunkqwen": "seed_compat",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from .attention import dca_attention
    from .config import DCAConfig
    from .models import load_model
    from .patching import SUPPORTED_MODELS, apply_dca, get_dca_config, get_kv_cache_dtype, is_dca_applied, remove_dca
    from .seed_compat import (
        FamilyPatch,
        replace_with_chunkllama,
        replace_with_chunkmistral,
        replace_with_chunkmixtral,
        replace_with_chunkqwen,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
