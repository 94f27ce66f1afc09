"""Keys and values to packed FP8 rows in one kernel launch (:func:`quantize_pair`), bit for bit as
:func:`chunkllama.attention.fp8.quantize_kv`; and back (:func:`dequantize`, for prefill: see
:func:`chunkllama.attention.triton_dispatch.launch`). Also what the decode kernel needs to read packed
rows: :func:`_load_kv` (tiles converted to the query dtype, per-key scales), :func:`kernel_kv`, :func:`check_kv`.

The PyTorch version is ~8 small ops per tensor; in decode that is 16 launches per layer and token
(0.29 ms per layer on an H200, measured) for one token's keys and values. Here one launch does both:
grid ``(row blocks, B * H, 2)``, the last axis picking keys or values. Per row: ``s = max|x| / 448``
(at least the smallest normal fp32), ``x / s`` clamped to ±448 and rounded to e4m3 (nearest even),
stored with ``s`` behind it. Divisions round to nearest (``div_rn``) as PyTorch's do.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fp8 import FP8_DTYPE, FP8_MAX, is_packed, packed_width

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TINY = float(torch.finfo(torch.float32).tiny)


@triton.jit
def _round_to_e4m3(q):
    """``q`` (fp32, ``|q| <= 448``) rounded to the nearest e4m3 value (ties to even), still as fp32.

    Done in fp32 arithmetic so that the conversion to ``float8e4nv`` afterwards is exact: the triton
    3.9 interpreter's own fp32 -> e4m3 rounding drops the carry into the exponent (127.2 -> 64). The
    step between e4m3 values near ``q`` is ``2^(e - 3)`` for exponent ``e >= -6``, ``2^-9`` below
    (subnormals); ``(y + 1.5·2^23) - 1.5·2^23`` rounds ``y = |q| / step`` (``<= 16``) to an integer,
    ties to even; dividing and multiplying by a power of two is exact."""
    bits = q.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((3 - exponent + 127) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0
    rounded = ((tl.abs(q) * inverse + magic) - magic) * step
    return tl.where(bits < 0, -rounded, rounded)  # the sign bit kept, also on zeros (-0 stays -0, as in PyTorch)


@triton.jit
def _quantize_rows(X, Out, OutScale, x_row, out_row, mask, offs_d, HEAD_DIM: tl.constexpr):
    x = tl.load(X + x_row[:, None] + offs_d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.maximum(tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.1754943508222875e-38)
    q = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
    q = _round_to_e4m3(tl.minimum(tl.maximum(q, -448.0), 448.0)).to(tl.float8e4nv)
    ROW: tl.constexpr = HEAD_DIM + 4
    tl.store(Out + out_row[:, None] * ROW + offs_d[None, :], q, mask=mask[:, None])
    tl.store(OutScale + out_row * (ROW // 4) + HEAD_DIM // 4, scale, mask=mask)


@triton.jit
def _quantize_pair_kernel(
    K, V, KOut, VOut, KScale, VScale,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    T, num_heads, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_t < T
    rows = offs_t.to(tl.int64)
    out_row = pid_bh.to(tl.int64) * T + rows  # packed outputs are contiguous (B, H, T, D + 4)
    if tl.program_id(2) == 0:
        _quantize_rows(K, KOut, KScale, b * stride_kb + h * stride_kh + rows * stride_kt, out_row, mask, offs_d,
                       HEAD_DIM)
    else:
        _quantize_rows(V, VOut, VScale, b * stride_vb + h * stride_vh + rows * stride_vt, out_row, mask, offs_d,
                       HEAD_DIM)


@triton.jit
def _dequantize_kernel(P, PScale, Out, stride_pb, stride_ph, stride_ob, stride_oh, stride_ot, T, num_heads,
                       HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """Packed rows (strides in rows) -> ``fp8 * s`` in fp32, rounded once to ``Out``'s dtype."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_t < T
    ROW: tl.constexpr = HEAD_DIM + 4
    row = b * stride_pb + h * stride_ph + offs_t.to(tl.int64)
    x = tl.load(P + row[:, None] * ROW + offs_d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    scale = tl.load(PScale + row * (ROW // 4) + HEAD_DIM // 4, mask=mask, other=0.0)
    out = (x * scale[:, None]).to(Out.dtype.element_ty)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_t.to(tl.int64)[:, None] * stride_ot + offs_d[None, :], out,
             mask=mask[:, None])


def dequantize(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed rows ``(B, H, T, D + 4)`` (back to back, batch/head strides whole rows) -> ``(B, H, T, D)`` in
    ``dtype``: :func:`chunkllama.attention.fp8.dequantize_kv` in one launch, without its fp32 temporary."""
    batch, heads, length, row = packed.shape
    head_dim = row - 4
    out = torch.empty(batch, heads, length, head_dim, dtype=dtype, device=packed.device)
    if out.numel() == 0:
        return out
    block_t = _block_t(head_dim)
    _dequantize_kernel[(triton.cdiv(length, block_t), batch * heads)](
        packed.view(FP8_DTYPE), packed.view(torch.float32), out, packed.stride(0) // row, packed.stride(1) // row,
        out.stride(0), out.stride(1), out.stride(2), length, heads,
        HEAD_DIM=head_dim, BLOCK_T=block_t, num_warps=1 if _INTERPRET else 4,
    )
    return out


@triton.jit
def _load_kv(k_base, v_base, ks_base, vs_base, stride_kn, stride_vn, kidx, kmask, offs_d,
             DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, FP8: tl.constexpr, MASKED: tl.constexpr):
    """Key tile ``(D, BLOCK_N)`` (transposed) and value tile ``(BLOCK_N, D)`` of keys ``kidx``, in ``DTYPE``,
    and their per-key scales ``(BLOCK_N,)`` fp32.

    ``FP8``: packed rows (:mod:`.fp8`) of ``D + 4`` bytes (a compile-time stride, so that the compiler
    knows rows are 4-byte aligned); the e4m3 bytes are converted to ``DTYPE`` here, exactly, and the
    scales are read from the fp32 view of the same rows (``ks_base``/``vs_base`` point at row 0's scale).
    Otherwise the scales are 1 (unused)."""
    if FP8:
        ROW: tl.constexpr = HEAD_DIM + 4
        k_ptrs = k_base + kidx[None, :] * ROW + offs_d[:, None]
        v_ptrs = v_base + kidx[:, None] * ROW + offs_d[None, :]
    else:
        k_ptrs = k_base + kidx[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = v_base + kidx[:, None] * stride_vn + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=kmask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if FP8:
        SROW: tl.constexpr = (HEAD_DIM + 4) // 4
        if MASKED:
            k_scale = tl.load(ks_base + kidx * SROW, mask=kmask, other=0.0)
            v_scale = tl.load(vs_base + kidx * SROW, mask=kmask, other=0.0)
        else:
            k_scale = tl.load(ks_base + kidx * SROW)
            v_scale = tl.load(vs_base + kidx * SROW)
        k = k.to(DTYPE)
        v = v.to(DTYPE)
    else:
        k_scale = 1.0
        v_scale = 1.0
    return k, v, k_scale, v_scale


def kernel_kv(key: torch.Tensor, value: torch.Tensor) -> tuple:
    """What the kernels take for ``key``/``value``: ``(K, V, KS, VS, key strides (3), value strides (3), fp8)``.

    Packed FP8 rows (uint8 ``(B, Hk, T, D + 4)``, rows back to back) become their ``float8_e4m3fn`` view
    (the data) and their fp32 view (the scales), with batch/head/token strides counted in rows; other
    keys/values pass as they are, strides in elements, and ``KS``/``VS`` are placeholders.
    """
    if not is_packed(key):
        return (key, value, key, value, key.stride(0), key.stride(1), key.stride(2),
                value.stride(0), value.stride(1), value.stride(2), False)
    row = key.shape[-1]
    return (key.view(FP8_DTYPE), value.view(FP8_DTYPE), key.view(torch.float32), value.view(torch.float32),
            key.stride(0) // row, key.stride(1) // row, 1, value.stride(0) // row, value.stride(1) // row, 1, True)


def check_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, name: str) -> None:
    """Raise ValueError unless the kernels can read these tensors (head_dim, row layout)."""
    head_dim = query.shape[-1]
    row = head_dim + 4 if is_packed(key) else head_dim
    if head_dim not in (64, 128) or key.shape[-1] != row or value.shape[-1] != row:
        raise ValueError(f"{name} needs head_dim 64 or 128 for query, key and value (+4 bytes for packed FP8 rows); "
                         f"got {head_dim}, {key.shape[-1]}, {value.shape[-1]}.")
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError(f"{name} needs query, key and value with a contiguous last dimension.")
    if is_packed(key) != is_packed(value):
        raise ValueError(f"{name}: key and value must both be packed FP8 rows or neither.")
    if is_packed(key) and any(t.stride(2) != row or t.stride(1) % row or t.stride(0) % row for t in (key, value)):
        raise ValueError(f"{name} needs packed FP8 rows back to back (token stride {row} bytes, batch/head strides whole rows).")


def _block_t(head_dim: int) -> int:
    return 16 if _INTERPRET else max(1, 2048 // head_dim)


def _quantize_pair(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Body of :func:`quantize_pair` (checked inputs), also the custom op's."""
    batch, heads, length, head_dim = key.shape
    shape = (batch, heads, length, packed_width(head_dim))
    k_out = torch.empty(shape, dtype=torch.uint8, device=key.device)
    v_out = torch.empty(shape, dtype=torch.uint8, device=key.device)
    if k_out.numel() == 0:
        return k_out, v_out
    sk, sv = key.stride(), value.stride()
    block_t = _block_t(head_dim)
    _quantize_pair_kernel[(triton.cdiv(length, block_t), batch * heads, 2)](
        key, value, k_out.view(FP8_DTYPE), v_out.view(FP8_DTYPE), k_out.view(torch.float32), v_out.view(torch.float32),
        sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], length, heads,
        HEAD_DIM=head_dim, BLOCK_T=block_t, num_warps=1 if _INTERPRET else 4,
    )
    return k_out, v_out


_quantize_op = torch.library.custom_op("chunkllama::quantize_kv_pair", _quantize_pair, mutates_args=())


@_quantize_op.register_fake
def _(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*key.shape[:-1], packed_width(key.shape[-1]))
    return key.new_empty(shape, dtype=torch.uint8), key.new_empty(shape, dtype=torch.uint8)


def quantize_pair(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(B, H, T, D)`` (fp16/bf16/fp32, last dim contiguous, ``D`` 64 or 128, same shape)
    to packed FP8 rows, two new contiguous uint8 tensors ``(B, H, T, D + 4)``."""
    if key.shape != value.shape or key.shape[-1] not in (64, 128) or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError(f"quantize_pair needs keys and values of one shape, head_dim 64 or 128, contiguous last "
                         f"dim; got {tuple(key.shape)}, {tuple(value.shape)}.")
    if torch.compiler.is_compiling():
        return _quantize_op(key, value)
    return _quantize_pair(key, value)


assert FP8_MAX == 448.0 and _TINY == 1.1754943508222875e-38  # the constants written into the kernel

__all__ = ["check_kv", "dequantize", "kernel_kv", "quantize_pair"]
