"""DCAConfig: the three lengths that define Dual Chunk Attention, validated once.

The paper's defaults for a model pretrained on ``L`` tokens are ``chunk_size = 3L//4`` and
``local_window = L//8``. ``chunk_len = chunk_size - local_window`` is the real stride between
chunks. Qwen2.5-1M models ship the same three numbers in their ``config.json`` under
``dual_chunk_attention_config`` (keys ``chunk_size``, ``local_size``,
``original_max_position_embeddings``); :meth:`DCAConfig.from_model_config` reads that and
:meth:`DCAConfig.to_hf_dict` writes it back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

HF_CONFIG_KEY = "dual_chunk_attention_config"


def _require_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"DCAConfig: {name} must be an int, got {value!r} ({type(value).__name__}).")
    return value


@dataclasses.dataclass(frozen=True)
class DCAConfig:
    """Lengths of Dual Chunk Attention, in tokens.

    Args:
        pretraining_length: the window ``L`` the model was pretrained on (4096 for Llama-2,
            8192 for Llama-3 and SmolLM2, 32768 for Mistral-v0.2 / Qwen1.5).
        chunk_size: largest position a query is ever rotated to; defaults to ``3L//4``.
            Must be ``<= pretraining_length`` so no relative distance exceeds the window.
        local_window: tokens of the previous chunk that successive-chunk queries see at their
            true distance; defaults to ``L//8``. Must be ``< chunk_size``.
    """

    pretraining_length: int
    chunk_size: int | None = None
    local_window: int | None = None

    def __post_init__(self) -> None:
        length = _require_int("pretraining_length", self.pretraining_length)
        if length <= 0:
            raise ValueError(
                f"DCAConfig: pretraining_length must be positive, got {length}. Pass the context "
                "window the model was trained with, e.g. 4096 for Llama-2 or 8192 for Llama-3."
            )
        chunk = self.chunk_size if self.chunk_size is not None else 3 * length // 4
        local = self.local_window if self.local_window is not None else length // 8
        _require_int("chunk_size", chunk)
        _require_int("local_window", local)
        if chunk <= 0:
            raise ValueError(f"DCAConfig: chunk_size must be positive, got {chunk}.")
        if chunk > length:
            raise ValueError(
                f"DCAConfig: chunk_size ({chunk}) must not exceed pretraining_length ({length}); "
                "otherwise queries are rotated to positions the model never saw. "
                f"Leave chunk_size unset for the default 3*L//4 = {3 * length // 4}."
            )
        if local < 0:
            raise ValueError(f"DCAConfig: local_window must be >= 0, got {local}.")
        if local >= chunk:
            raise ValueError(
                f"DCAConfig: local_window ({local}) must be smaller than chunk_size ({chunk}); "
                f"the chunk stride chunk_size - local_window would be {chunk - local}. "
                f"Leave local_window unset for the default L//8 = {length // 8}."
            )
        object.__setattr__(self, "chunk_size", chunk)
        object.__setattr__(self, "local_window", local)

    @property
    def chunk_len(self) -> int:
        """Stride between chunks: ``chunk_size - local_window``."""
        return self.chunk_size - self.local_window  # type: ignore[operator]

    def to_hf_dict(self) -> dict[str, int]:
        """The Qwen2.5-1M ``dual_chunk_attention_config`` form of this config."""
        return {
            "chunk_size": int(self.chunk_size),  # type: ignore[arg-type]
            "local_size": int(self.local_window),  # type: ignore[arg-type]
            "original_max_position_embeddings": self.pretraining_length,
        }

    def to_dict(self) -> dict[str, int]:
        """Plain dict with the resolved values and ``chunk_len`` (for result files)."""
        return {
            "pretraining_length": self.pretraining_length,
            "chunk_size": int(self.chunk_size),  # type: ignore[arg-type]
            "local_window": int(self.local_window),  # type: ignore[arg-type]
            "chunk_len": self.chunk_len,
        }

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any]) -> "DCAConfig":
        """Build from a ``dual_chunk_attention_config`` mapping (Qwen2.5-1M key names)."""
        missing = [k for k in ("original_max_position_embeddings",) if k not in data]
        if missing:
            raise ValueError(
                f"{HF_CONFIG_KEY} lacks {missing}; it needs original_max_position_embeddings "
                f"and may give chunk_size and local_size. Got keys: {sorted(data)}."
            )
        return cls(
            pretraining_length=data["original_max_position_embeddings"],
            chunk_size=data.get("chunk_size"),
            local_window=data.get("local_size"),
        )

    @classmethod
    def from_model_config(cls, model_config: Any) -> "DCAConfig | None":
        """Read ``dual_chunk_attention_config`` from a HF config; None when it has none."""
        data = getattr(model_config, HF_CONFIG_KEY, None)
        if not data:
            return None
        return cls.from_hf_dict(data)

    def write_to_model_config(self, model_config: Any) -> None:
        """Store this config as ``model_config.dual_chunk_attention_config`` (saved by save_pretrained)."""
        setattr(model_config, HF_CONFIG_KEY, self.to_hf_dict())


PIECE_CHUNKS = 2  # DCA chunk strides per default prefill piece


def default_prefill_chunk_size(config: DCAConfig) -> int:
    """The default piece size for a model patched with ``config``: two DCA chunk strides, ``2 * chunk_len``.

    E.g. 10240 tokens for Llama-3 (``pretraining_length`` 8192), 5120 for Llama-2 (4096). Why two: at 128k
    tokens, Llama-3-8B shapes on an H200, prefill in pieces of one / two / four chunk strides ran at
    0.937 / 0.965 / 0.979 of one-shot prefill's tokens/s (``bench/results/scale.md``); two stay above
    0.95 while the activations stay bounded by a 10k-token piece.
    """
    return PIECE_CHUNKS * config.chunk_len
