"""The DCA attention op and its backend dispatch.

``dca_attention`` is the single entry point: model code calls it and never knows which kernel
runs. Backends: ``"reference"`` (PyTorch, any device) and ``"triton"`` (fused CUDA kernels,
see :mod:`chunkllama.attention.triton_dispatch`); ``"auto"`` takes Triton where it supports the
inputs and the reference elsewhere.
"""

from __future__ import annotations

import dataclasses
import types

import torch

from ..config import DCAConfig
from ..rope import RotaryParams, apply_rope
from .fp8 import dequantize_kv, is_packed, quantize_kv, unpacked_dim
from .reference import reference_dca_attention

BACKENDS = ("auto", "reference", "triton")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"Unknown DCA backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    return backend


@dataclasses.dataclass(frozen=True)
class LoadedBackend:
    """A backend name with its kernel modules imported once (see :func:`load_backend`).

    Passing one instead of a name keeps every call free of imports, which ``torch.compile``
    (``fullgraph=True``) cannot trace and which cost host time on every decode step.

    Attributes:
        name: "auto", "reference" or "triton".
        kernels: :mod:`.triton_dispatch`, or None when Triton is not asked for or not available.
        rope_kernel: :mod:`.triton_rope`, or None likewise.
        unavailable: why ``kernels`` is None (None when it is not).
    """

    name: str
    kernels: types.ModuleType | None = None
    rope_kernel: types.ModuleType | None = None
    unavailable: str | None = None

    def __deepcopy__(self, memo: dict) -> "LoadedBackend":
        return self  # immutable; modules cannot be copied

    def __reduce__(self) -> tuple:
        return load_backend, (self.name,)  # pickles by name, imports again on load


def load_backend(backend: str | LoadedBackend) -> LoadedBackend:
    """Resolve a backend name once: check it and import the Triton kernels it may use."""
    if isinstance(backend, LoadedBackend):
        return backend
    check_backend(backend)
    if backend == "reference":
        return LoadedBackend("reference", unavailable="backend='reference' was asked for")
    try:
        from . import triton_dispatch, triton_rope
    except ImportError as exc:  # triton not installed, or kernels not built for this platform
        return LoadedBackend(backend, unavailable=f"the Triton kernels are unavailable ({exc})")
    return LoadedBackend(backend, triton_dispatch, triton_rope)


def _triton_unsupported_reason(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str | LoadedBackend = "auto"
) -> str | None:
    """Why the Triton kernels cannot take these inputs (None when they can)."""
    loaded = load_backend(backend)
    if loaded.kernels is None:
        return loaded.unavailable
    return loaded.kernels.unsupported_reason(query, key, value)


def resolve_backend(
    backend: str | LoadedBackend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> str:
    """The backend that will actually run: "reference" or "triton"."""
    loaded = load_backend(backend)
    if loaded.name == "reference":
        return "reference"
    reason = _triton_unsupported_reason(query, key, value, loaded)
    if reason is None:
        return "triton"
    if loaded.name == "triton":
        raise ValueError(f"backend='triton' cannot run these inputs: {reason}. Use backend='auto' or 'reference'.")
    return "reference"


def rotate_keys(
    key: torch.Tensor, rope: RotaryParams, positions: torch.Tensor, backend: str | LoadedBackend = "auto"
) -> torch.Tensor:
    """Keys rotated at ``positions``: :func:`chunkllama.rope.apply_rope`, bit for bit.

    Where ``backend`` would run the Triton kernels on ``key`` (CUDA, fp16/bf16, head_dim 64/128),
    the rotation is one fused kernel (:func:`.triton_rope.rotate_at`: angles, cos and sin computed
    inside from ``positions`` and ``rope.inv_freq``) instead of ~13 PyTorch ops.

    Args:
        key: ``(B, H, T, D)``.
        positions: int64 ``(B, T)``, non-negative.
    Returns:
        ``(B, H, T, D)`` in ``key.dtype``.
    """
    loaded = load_backend(backend)
    # With gradients the kernel's backward is the transpose rotation (the same kernel at -positions).
    if loaded.rope_kernel is not None and loaded.kernels.rope_unsupported_reason(key) is None:
        return loaded.rope_kernel.rotate_at(key, positions, rope.inv_freq, rope.attention_scaling)
    return apply_rope(key, rope, positions)


def quantize_keys_values(
    key: torch.Tensor, value: torch.Tensor, backend: str | LoadedBackend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(B, Hk, T, D)`` as packed FP8 rows ``(B, Hk, T, D + 4)`` uint8 (:mod:`.fp8`).

    Where ``backend`` would run the Triton kernels on ``key`` (CUDA, fp16/bf16, head_dim 64/128), one
    kernel launch does both (:func:`.triton_fp8.quantize_pair`, bit for bit the same); elsewhere
    :func:`.fp8.quantize_kv` twice.
    """
    loaded = load_backend(backend)
    if (loaded.kernels is not None and key.shape == value.shape and value.stride(-1) == 1
            and _triton_unsupported_reason(key, key, key, loaded) is None):
        return loaded.kernels.quantize_pair(key, value)
    return quantize_kv(key), quantize_kv(value)


def dca_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    rope: RotaryParams,
    config: DCAConfig,
    scale: float | None = None,
    backend: str | LoadedBackend = "auto",
) -> torch.Tensor:
    """Dual Chunk Attention of ``query`` over ``key``/``value``.

    Args:
        query: ``(B, Hq, Tq, D)``, **not** rotated; it is rotated here three ways.
        key: ``(B, Hk, Tk, D)``, already rotated at ``key_positions % config.chunk_len`` (as cached).
            ``Hq`` must be a multiple of ``Hk`` (GQA: query head ``h`` reads key head ``h // (Hq/Hk)``).
            Or packed FP8 rows, uint8 ``(B, Hk, Tk, D + 4)`` (:mod:`.fp8`; value then packed too): the
            Triton kernels read them directly, the reference path dequantizes them to ``query.dtype``.
        value: ``(B, Hk, Tk, Dv)``, or packed like ``key``.
        query_positions: int64 ``(B, Tq)``: position ids of the queries; negative marks padding.
        key_positions: int64 ``(B, Tk)``: position ids of the keys; negative marks padding.
            A query sees the keys with ``0 <= key_position <= query_position`` (causal by
            position, so a prompt fed in pieces against a cache works the same as in one go).
        rope: the model's rotary frequencies and attention scaling.
        config: chunk lengths.
        scale: softmax scale; defaults to ``D ** -0.5``.
        backend: "auto", "reference" or "triton", or a :class:`LoadedBackend` (no import per call).
    Returns:
        ``(B, Hq, Tq, Dv)`` in ``query.dtype``. Rows that see no key (padding) are 0.
        Softmax statistics are kept in fp32 whatever the input dtype. Differentiable in ``query``,
        ``key`` and ``value`` on both backends (reference: :mod:`.autograd`; Triton: the prefill kernel's
        fused backward, :mod:`.triton_prefill_backward`, taken whenever gradients are needed).
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "dca_attention expects (batch, heads, seq, head_dim) tensors; got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}."
        )
    batch, q_heads, q_len, head_dim = query.shape
    if is_packed(key) != is_packed(value):
        raise ValueError(f"key ({key.dtype}) and value ({value.dtype}) must both be packed FP8 rows (uint8) or neither.")
    key_dim = unpacked_dim(key) if is_packed(key) else key.shape[-1]
    if key.shape[0] != batch or value.shape[0] != batch or key_dim != head_dim:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree on batch or head_dim.")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} disagree on batch, heads or length.")
    if q_heads % key.shape[1]:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({key.shape[1]}).")
    if tuple(query_positions.shape) != (batch, q_len) or tuple(key_positions.shape) != (batch, key.shape[2]):
        raise ValueError(
            f"positions must be (B, Tq)=({batch}, {q_len}) and (B, Tk)=({batch}, {key.shape[2]}); got "
            f"{tuple(query_positions.shape)} and {tuple(key_positions.shape)}."
        )
    scale = head_dim**-0.5 if scale is None else scale
    loaded = load_backend(backend)
    # With gradients the Triton path runs the prefill kernel and its fused backward (any query count).
    if resolve_backend(loaded, query, key, value) == "triton":
        return loaded.kernels.launch(query, key, value, query_positions, key_positions, rope, config, scale)
    if is_packed(key):
        key, value = dequantize_kv(key, query.dtype), dequantize_kv(value, query.dtype)
    return reference_dca_attention(query, key, value, query_positions, key_positions, rope, config, scale)


__all__ = [
    "BACKENDS", "LoadedBackend", "dca_attention", "load_backend", "quantize_keys_values", "reference_dca_attention",
    "resolve_backend", "rotate_keys",
]
