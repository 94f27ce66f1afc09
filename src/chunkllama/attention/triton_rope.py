"""Rotate keys in one pass (Triton): ``x * cos + rotate_half(x) * sin``, bit-identical to PyTorch.

:func:`rotate_at` is what the patched model calls: it takes the integer positions and the fp32
``inv_freq`` and computes the angles, cos and sin inside the kernel (one launch instead of the
~8 PyTorch ops of :func:`chunkllama.rope.rope_cos_sin` plus the rotation). Under ``torch.compile``
it is the custom op ``chunkllama::rope_at`` (fake implementation registered), so dynamo keeps it
in the graph. :func:`rotate` takes precomputed ``cos``/``sin``.

The PyTorch expression (:func:`chunkllama.rope.apply_rope`, as in transformers) runs five kernels over
the keys (two products, a negation, a concatenation, a sum), each reading and writing the whole
tensor: at 32k tokens of a Llama-2-7B layer that is ~1.4 ms per layer. This kernel reads the keys
once and writes them once. It rounds exactly where PyTorch does (each product to the key dtype,
then the sum), and takes ``cos``/``sin`` as :func:`chunkllama.rope.rope_cos_sin` made them, so the
result equals :func:`~chunkllama.rope.apply_rope` bit for bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .autograd import needs_grad
from .triton_launch import CachedLaunch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_HEAD_DIMS = (64, 128, 256)
# No FMA: round where PyTorch rounds (the interpreter has no such option and never fuses).
_EXACT = {} if _INTERPRET else {"enable_fp_fusion": False}


@triton.jit
def _rotate_tile(x_base, offs_d, mask, cos, sin, HEAD_DIM: tl.constexpr, dtype: tl.constexpr):
    """``x * cos + rotate_half(x) * sin`` of one tile, each product rounded to ``dtype``, then the sum."""
    HALF: tl.constexpr = HEAD_DIM // 2
    partner = (offs_d + HALF) % HEAD_DIM
    x = tl.load(x_base + offs_d[None, :], mask=mask, other=0.0)
    x_partner = tl.load(x_base + partner[None, :], mask=mask, other=0.0)
    rotated_half = tl.where(offs_d[None, :] < HALF, -x_partner, x_partner)  # rotate_half(x), exact
    # PyTorch's reduced-precision ops compute in fp32 and round each result to the tensor dtype.
    first = (x.to(tl.float32) * cos.to(tl.float32)).to(dtype)
    second = (rotated_half.to(tl.float32) * sin.to(tl.float32)).to(dtype)
    return (first.to(tl.float32) + second.to(tl.float32)).to(dtype)


@triton.jit
def _rope_at_kernel(
    X, Pos, InvFreq, Out,
    stride_xb, stride_xh, stride_xt,
    stride_pb,
    stride_ob, stride_oh, stride_ot,
    T, num_heads, attn_scaling,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Rotation at integer positions: angles ``pos * inv_freq`` in fp32, cos/sin times ``attn_scaling``
    rounded to the key dtype, as :func:`chunkllama.rope.rope_cos_sin` computes them."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    t_in = offs_t < T
    mask = t_in[:, None]
    rows = offs_t.to(tl.int64)[:, None]
    dtype = Out.dtype.element_ty
    pos = tl.load(Pos + b * stride_pb + offs_t, mask=t_in, other=0).to(tl.float32)
    angle = pos[:, None] * tl.load(InvFreq + offs_d % HALF)[None, :]
    cos = (tl.cos(angle) * attn_scaling).to(dtype)
    sin = (tl.sin(angle) * attn_scaling).to(dtype)
    out = _rotate_tile(X + b * stride_xb + h * stride_xh + rows * stride_xt, offs_d, mask, cos, sin, HEAD_DIM, dtype)
    tl.store(Out + b * stride_ob + h * stride_oh + rows * stride_ot + offs_d[None, :], out, mask=mask)


@triton.jit
def _rope_kernel(
    X, Cos, Sin, Out,
    stride_xb, stride_xh, stride_xt,
    stride_cb, stride_ct,
    stride_ob, stride_oh, stride_ot,
    T, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_t < T)[:, None]
    rows = offs_t.to(tl.int64)[:, None]
    c_off = b * stride_cb + rows * stride_ct + offs_d[None, :]
    cos = tl.load(Cos + c_off, mask=mask, other=0.0)
    sin = tl.load(Sin + c_off, mask=mask, other=0.0)
    dtype = Out.dtype.element_ty
    out = _rotate_tile(X + b * stride_xb + h * stride_xh + rows * stride_xt, offs_d, mask, cos, sin, HEAD_DIM, dtype)
    tl.store(Out + b * stride_ob + h * stride_oh + rows * stride_ot + offs_d[None, :], out, mask=mask)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in one kernel.

    Args:
        x: ``(B, H, T, D)``, float16/bfloat16/float32, last dim contiguous, D in 64/128/256.
        cos, sin: ``(B, 1, T, D)`` (or ``(1, 1, T, D)``) in ``x.dtype``, last dim contiguous.
    Returns:
        a new tensor shaped and laid out like ``x`` (``torch.empty_like``).
    """
    batch, heads, length, head_dim = x.shape
    _check_x(x)
    if cos.dtype != x.dtype or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("cos and sin must have x's dtype, one layout and a contiguous last dim.")
    out = torch.empty_like(x)
    sx, sc, so = x.stride(), cos.stride(), out.stride()
    cos_batch_stride = 0 if cos.shape[0] == 1 else sc[0]
    block_t = _block_t(head_dim)
    grid = (triton.cdiv(length, block_t), batch * heads)
    _rope_kernel[grid](
        x, cos, sin, out,
        sx[0], sx[1], sx[2], cos_batch_stride, sc[2], so[0], so[1], so[2],
        length, heads, HEAD_DIM=head_dim, BLOCK_T=block_t, num_warps=1 if _INTERPRET else 4, **_EXACT,
    )
    return out


def _check_x(x: torch.Tensor) -> None:
    if x.shape[-1] not in SUPPORTED_HEAD_DIMS or x.stride(-1) != 1:
        raise ValueError(f"rotate needs head_dim in {SUPPORTED_HEAD_DIMS} and a contiguous last dim; got {tuple(x.shape)}.")


def _block_t(head_dim: int) -> int:
    return 16 if _INTERPRET else max(1, 4096 // head_dim)


_ROPE_AT = CachedLaunch(_rope_at_kernel)


def _rope_at(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attn_scaling: float) -> torch.Tensor:
    """Body of :func:`rotate_at` (checked inputs), as a custom op so ``torch.compile`` keeps it in the graph."""
    batch, heads, length, head_dim = x.shape
    out = torch.empty_like(x)
    sx, so = x.stride(), out.stride()
    pos_batch_stride = 0 if positions.shape[0] == 1 else positions.stride(0)
    block_t = _block_t(head_dim)
    _ROPE_AT.launch(
        (triton.cdiv(length, block_t), batch * heads), x, positions, inv_freq, out,
        sx[0], sx[1], sx[2], pos_batch_stride, so[0], so[1], so[2],
        length, heads, float(attn_scaling),
        HEAD_DIM=head_dim, BLOCK_T=block_t, num_warps=1 if _INTERPRET else 4, **_EXACT,
    )
    return out


_rope_at_op = torch.library.custom_op("chunkllama::rope_at", _rope_at, mutates_args=())


@_rope_at_op.register_fake
def _(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attn_scaling: float) -> torch.Tensor:
    return torch.empty_like(x)


def _rope_at_setup(ctx, inputs, output) -> None:
    _, positions, inv_freq, attn_scaling = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.attn_scaling = attn_scaling


def _rope_at_backward(ctx, grad):
    """The transpose rotation: ``R(p)ᵀ = R(-p)`` (cos even, sin odd), the same kernel at ``-positions``."""
    positions, inv_freq = ctx.saved_tensors
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    return _rope_at_op(grad, -positions, inv_freq, ctx.attn_scaling), None, None, None


_rope_at_op.register_autograd(_rope_at_backward, setup_context=_rope_at_setup)


def rotate_at(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attn_scaling: float = 1.0) -> torch.Tensor:
    """:func:`chunkllama.rope.apply_rope` at ``positions`` in one kernel (cos/sin computed inside).

    Args:
        x: ``(B, H, T, D)``, float16/bfloat16/float32, last dim contiguous, D in 64/128/256.
        positions: integer ``(B, T)`` or ``(1, T)``, non-negative, on ``x``'s device.
        inv_freq: fp32 ``(D/2,)`` on ``x``'s device.
        attn_scaling: multiplied into cos and sin.
    Returns:
        a new tensor shaped and laid out like ``x`` (``torch.empty_like``), in ``x.dtype``.
        Differentiable in ``x`` (the gradient is the transpose rotation, one launch of the same kernel).
    """
    _check_x(x)
    if positions.dim() != 2 or positions.shape[1] != x.shape[2] or positions.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"positions must be (B, T) or (1, T) for x {tuple(x.shape)}; got {tuple(positions.shape)}.")
    if positions.stride(-1) != 1:
        positions = positions.contiguous()
    if inv_freq.dtype != torch.float32 or inv_freq.device != x.device or inv_freq.stride(-1) != 1:
        inv_freq = inv_freq.to(device=x.device, dtype=torch.float32).contiguous()
    if torch.compiler.is_compiling() or needs_grad(x):  # the op carries the backward (rotation at -positions)
        return _rope_at_op(x, positions, inv_freq, attn_scaling)
    return _rope_at(x, positions, inv_freq, attn_scaling)  # eager: no dispatcher round trip (~10 us)
