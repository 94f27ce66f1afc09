"""FP8 (e4m3) keys and values with one fp32 scale per token and head, packed in one byte tensor.

Layout — a **packed row** per (batch, KV head, token): ``D`` bytes of ``float8_e4m3fn`` holding
``x / s`` followed by the 4 bytes of the fp32 scale ``s = max|x| / 448`` (little-endian, as the
device stores fp32). A packed cache is a ``uint8`` tensor ``(B, Hk, T, D + 4)``; :func:`dequantize_kv`
gives back ``(B, Hk, T, D)`` with ``x ≈ fp8 * s``.

Why one tensor: the KV cache stays an ordinary tensor of shape ``(B, Hk, T, ·)``, so every cache
that transformers builds (``DynamicCache`` in ``generate``, static caches) and every operation on it
(append, crop, batch select, beam reorder, the serving engine's slicing, left padding and prefix
reuse) works unchanged, on every transformers release: the scale travels with its token. A row of
zeros (padding) dequantizes to zeros. Cost per element: ``1 + 4/D`` bytes (``1.03`` for ``D = 128``,
``1.06`` for 64) instead of 2 for bf16.

Per-token scales follow outliers token by token and need no calibration: a new token is quantized
on its own when it is appended. The relative rounding error of e4m3 is at most 2⁻⁴ per element
(3 mantissa bits, round to nearest); values below ``2⁻⁹·s`` flush toward zero.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_BYTES = 4
KV_CACHE_DTYPES = ("auto", "fp8")


def check_kv_cache_dtype(kv_cache_dtype: str) -> str:
    """``"auto"`` (the model's dtype) or ``"fp8"`` (packed e4m3 rows); anything else raises ValueError."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"Unknown kv_cache_dtype {kv_cache_dtype!r}; choose 'auto' (the model's dtype) or 'fp8' "
            "(e4m3 keys/values with one fp32 scale per token and head: about half the memory)."
        )
    return kv_cache_dtype


def is_packed(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds packed FP8 rows (see the module docstring): they are the only uint8 keys/values."""
    return tensor.dtype == torch.uint8


def packed_width(head_dim: int) -> int:
    """Bytes of one packed row: ``head_dim`` fp8 values and a 4-byte fp32 scale."""
    return head_dim + SCALE_BYTES


def unpacked_dim(packed: torch.Tensor) -> int:
    """``D`` of packed rows ``(..., D + 4)``."""
    return packed.shape[-1] - SCALE_BYTES


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """Packed FP8 rows of ``x``.

    Args:
        x: ``(..., D)`` floating point, ``D`` a multiple of 4.
    Returns:
        uint8 ``(..., D + 4)``, contiguous: per row the e4m3 bytes of ``x / s`` and the fp32 ``s = max|x| / 448``
        (``s`` is the smallest positive fp32 for an all-zero row, which then stays zero).
    """
    head_dim = x.shape[-1]
    if head_dim % SCALE_BYTES:
        raise ValueError(f"FP8 KV rows need a head_dim divisible by 4 (the fp32 scale stays aligned); got {head_dim}.")
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).div_(FP8_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
    # x / s lies in [-448, 448] up to the division's rounding; clamp so no value becomes NaN in e4m3
    quantized = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    packed = torch.empty(*x.shape[:-1], packed_width(head_dim), dtype=torch.uint8, device=x.device)
    packed[..., :head_dim] = quantized.view(torch.uint8)
    packed.view(torch.float32)[..., head_dim // SCALE_BYTES : head_dim // SCALE_BYTES + 1] = scale
    return packed


def scales(packed: torch.Tensor) -> torch.Tensor:
    """The fp32 scale of every packed row: ``(..., D + 4)`` uint8 → ``(...)`` fp32 (a view where strides allow)."""
    return _as_float32(packed)[..., unpacked_dim(packed) // SCALE_BYTES]


def dequantize_kv(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(..., D + 4)`` packed rows → ``(..., D)`` in ``dtype``: ``fp8 * s`` computed in fp32, then rounded to ``dtype``."""
    head_dim = unpacked_dim(packed)
    values = packed[..., :head_dim].view(FP8_DTYPE).float()
    return (values * scales(packed).unsqueeze(-1)).to(dtype)


def _as_float32(packed: torch.Tensor) -> torch.Tensor:
    try:
        return packed.view(torch.float32)
    except RuntimeError:  # a view whose strides or offset are not multiples of 4 bytes
        return packed.contiguous().view(torch.float32)


__all__ = [
    "FP8_DTYPE", "FP8_MAX", "KV_CACHE_DTYPES", "check_kv_cache_dtype", "dequantize_kv", "is_packed",
    "packed_width", "quantize_kv", "scales", "unpacked_dim",
]
