"""chunkllama: training-free long context for Hugging Face LLMs through Dual Chunk Attention."""

from .attention import dca_attention
from .config import DCAConfig
from .patching import SUPPORTED_MODELS, apply_dca, get_dca_config, is_dca_applied, remove_dca
from .seed_compat import (
    FamilyPatch,
    replace_with_chunkllama,
    replace_with_chunkmistral,
    replace_with_chunkmixtral,
    replace_with_chunkqwen,
)

__version__ = "0.1.0"

__all__ = [
    "DCAConfig",
    "FamilyPatch",
    "SUPPORTED_MODELS",
    "apply_dca",
    "dca_attention",
    "get_dca_config",
    "is_dca_applied",
    "load_model",
    "remove_dca",
    "replace_with_chunkllama",
    "replace_with_chunkmistral",
    "replace_with_chunkmixtral",
    "replace_with_chunkqwen",
]


def __getattr__(name: str):
    # load_model pulls in the GGUF/hub loading stack; import it only when asked for.
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(f"module 'chunkllama' has no attribute {name!r}")
