"""Which Triton kernel runs DCA, and whether one can.

:func:`unsupported_reason` is asked by :func:`chunkllama.attention.resolve_backend`;
:func:`launch` runs :mod:`.triton_decode` for a few query rows per KV head
(``groups * Tq <= 64``: decode, speculative steps) and :mod:`.triton_prefill` otherwise. When autograd
needs a backward (grad mode on, an input requires grad) it runs the prefill kernel with its fused
backward (:func:`.triton_prefill_backward.dca_prefill_trainable`), whatever the shape.

Both kernels assume what :mod:`chunkllama.patching` produces: within a batch row, key positions are
``index - offset`` (left padding negative). Set ``CHUNKLLAMA_CHECK_POSITIONS=1`` to verify that on
every call (one device sync per call).
"""

from __future__ import annotations

import os

import torch
import triton  # ImportError here means "unavailable": see resolve_backend

from ..config import DCAConfig
from ..rope import RotaryParams
from .autograd import needs_grad
from .fp8 import is_packed, packed_width
from .triton_fp8 import dequantize, quantize_pair
from .triton_launch import triton_release
from .triton_decode import dca_decode, decode_rows
from .triton_prefill import dca_prefill
from .triton_prefill_backward import dca_prefill_trainable

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)


def _decode_max_rows(value: str) -> int:
    if value not in ("16", "32", "64"):
        raise ValueError(f"CHUNKLLAMA_DECODE_MAX_ROWS={value!r}: use 16, 32 or 64 (the decode kernel's row tiles)")
    return int(value)


# Pieces of at most this many packed query rows (``groups * Tq`` rounded up to a power of two, at least 16:
# one new token for up to 16 query heads per KV head) go to the split-K decode kernel, more to the prefill
# kernel. The decode kernel at 64 rows (a 20-token piece of SmolLM2, 3 heads per KV head, after a
# 32k-token cache) hit an illegal memory access on the H200 (triton 3.6, 2026-12-03, inside
# `chunkllama serve`), while the CPU interpreter computes the same shape exactly. A later direct GPU test
# (`test_gpu_decode_kernel_with_32_and_64_rows`) faulted again at 64 rows and passed at 32; the default
# stays at 16, the only tile that generate, serving and the benches have run.
# ``CHUNKLLAMA_DECODE_MAX_ROWS=32`` or ``64`` (read once, at import) sends larger pieces to the decode
# kernel again, e.g. to test its larger tiles on a GPU.
DECODE_MAX_ROWS = _decode_max_rows(os.environ.get("CHUNKLLAMA_DECODE_MAX_ROWS", "16"))


def _device_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return f"tensors are on {device.type} (the kernels need CUDA, or TRITON_INTERPRET=1 on the CPU)"
    if triton_release() < (3, 9):
        # triton 3.6's interpreter returns reductions as 1-element arrays that range() rejects.
        return f"the interpreter of triton {triton.__version__} cannot run these kernels (needs >= 3.9)"
    return None


def unsupported_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these ``(B, H, T, D)`` tensors; None when they can.

    Asked once per layer and token while decoding, so the common case (CUDA, bf16/fp16, same dtype)
    is decided in a few attribute reads."""
    device = query.device
    reason = _device_reason(device)
    if reason is not None:
        return reason
    if key.device != device or value.device != device:
        return "query, key and value are on different devices"
    dtype = query.dtype
    packed = key.dtype == torch.uint8 and value.dtype == torch.uint8
    if dtype not in SUPPORTED_DTYPES or not (packed or key.dtype == value.dtype == dtype):
        return (f"dtype {dtype}/{key.dtype}/{value.dtype} (supported: float16 or bfloat16, all the same, "
                "or packed FP8 keys and values)")
    head_dim = query.shape[-1]
    row = packed_width(head_dim) if packed else head_dim
    if head_dim not in SUPPORTED_HEAD_DIMS or key.shape[-1] != row or value.shape[-1] != row:
        return f"head_dim {head_dim} / key, value widths {key.shape[-1]}, {value.shape[-1]} (supported: 64 or 128, equal)"
    if query.shape[2] > key.shape[2]:
        return f"more queries ({query.shape[2]}) than keys ({key.shape[2]})"
    if key.shape[2] == 0:
        return "no keys"
    return None


def rope_unsupported_reason(key: torch.Tensor) -> str | None:
    """Why :func:`.triton_rope.rotate_at` cannot rotate ``key`` ``(B, H, T, D)``; None when it can (the
    kernel is bit for bit :func:`chunkllama.rope.apply_rope`, so which one runs never changes a result)."""
    reason = _device_reason(key.device)
    if reason is not None:
        return reason
    if key.dtype not in SUPPORTED_DTYPES or key.shape[-1] not in SUPPORTED_HEAD_DIMS or key.stride(-1) != 1:
        return f"dtype {key.dtype}, head_dim {key.shape[-1]} (supported: float16 or bfloat16, 64 or 128, contiguous)"
    return None


def _check_positions(query_positions: torch.Tensor, key_positions: torch.Tensor) -> None:
    index = torch.arange(key_positions.shape[1], device=key_positions.device)
    offsets = index - key_positions
    if not bool((offsets == offsets[:, -1:]).logical_or(key_positions < 0).all()):
        raise ValueError("Triton DCA kernels need key positions index - offset per row (contiguous).")


def _rows_ok(tensor: torch.Tensor) -> bool:
    """Whether the kernels can read ``tensor``'s rows as they are: contiguous last dimension; packed FP8
    rows also back to back, with batch and head strides whole rows (the kernels address them in rows)."""
    if tensor.stride(-1) != 1:
        return False
    if not is_packed(tensor):
        return True
    row = tensor.shape[-1]
    return tensor.stride(2) == row and tensor.stride(1) % row == 0 and tensor.stride(0) % row == 0


def _int64_on(positions: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``positions`` as int64 on ``device`` (the same tensor when it already is; the kernels' launchers
    make them contiguous)."""
    if positions.dtype != torch.int64 or positions.device != device:
        positions = positions.to(device=device, dtype=torch.int64)
    return positions


def launch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    rope: RotaryParams,
    config: DCAConfig,
    scale: float,
) -> torch.Tensor:
    """DCA through the fused kernels, contract of :func:`chunkllama.attention.dca_attention`, for inputs
    that :func:`unsupported_reason` accepted (the caller checks once; decode comes here once per layer
    and token, so nothing is checked twice)."""
    if not torch.compiler.is_compiling() and os.environ.get("CHUNKLLAMA_CHECK_POSITIONS", "0") == "1":
        _check_positions(query_positions, key_positions)
    # Conversions only when needed: on the decode path every call's host time counts.
    if query.stride(-1) != 1:
        query = query.contiguous()
    if not _rows_ok(key):
        key = key.contiguous()
    if not _rows_ok(value):
        value = value.contiguous()
    query_positions = _int64_on(query_positions, query.device)
    key_positions = _int64_on(key_positions, query.device)
    inv_freq = rope.inv_freq
    if inv_freq.dtype != torch.float32 or inv_freq.device != query.device or not inv_freq.is_contiguous():
        inv_freq = inv_freq.to(device=query.device, dtype=torch.float32).contiguous()
    args = (
        query, key, value, query_positions, key_positions,
        inv_freq, float(rope.attention_scaling), config.chunk_len, int(config.chunk_size), scale,
    )
    if needs_grad(query, key, value):
        return dca_prefill_trainable(*args)
    rows = decode_rows(query.shape[1], key.shape[1], query.shape[2])
    if rows <= DECODE_MAX_ROWS:
        return dca_decode(*args)
    if is_packed(key):
        # The decode kernel reads packed FP8 rows; a prefill piece reads the layer's cache dequantized to the
        # query dtype (one memory-bound pass, ~1% of a 5120-token piece's attention at long caches), since a
        # prefill kernel reading FP8 directly measured 2.0x the bf16 kernel's time (H200, 16k and 64k: the
        # e4m3 -> bf16 conversion in registers; branch fp8-kv-unsquashed has it).
        key, value = dequantize(key, query.dtype), dequantize(value, query.dtype)
        args = (query, key, value) + args[3:]
    return dca_prefill(*args)


__all__ = ["unsupported_reason", "rope_unsupported_reason", "launch", "dca_prefill", "dca_prefill_trainable", "dca_decode", "quantize_pair"]
