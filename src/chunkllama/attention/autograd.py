"""Exact gradients for the fused attention pieces of the reference path.

The chunked reference path (:mod:`.chunked`) computes each piece of DCA with a fused kernel that
returns ``(out, lse)`` and merges the pieces through their log-sum-exp (:mod:`.merge`). PyTorch's
fused kernels (``_scaled_dot_product_flash_attention_for_cpu``,
``_scaled_dot_product_efficient_attention``) return ``lse`` **without a gradient**, so autograd
through them silently drops the merge's ``d lse`` term: gradients are right for one piece (one
chunk) and wrong from two chunks on. :class:`AttendWithLse` wraps such a kernel with a backward
that includes that term.

Backward (FlashAttention's recomputation from the saved log-sum-exp), per query block, fp32::

    P  = exp(scale · Q Kᵀ − lse)              (masked pairs: 0)
    dV = Pᵀ dO
    dP = dO Vᵀ
    dS = P ∘ (dP − (rowsum(dO ∘ O) − dLSE))
    dQ = scale · dS K,   dK = scale · dSᵀ Q

Only one block of ``P`` exists at a time, so memory stays linear in the length (no T×T).
The Triton path has its own fused backward (:mod:`.triton_prefill_backward`).
"""

from __future__ import annotations

from typing import Callable

import torch

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], "tuple[torch.Tensor, torch.Tensor]"]

#: Elements of one block of recomputed probabilities (fp32): 2**24 = 64 MiB per temporary.
_BLOCK_ELEMENTS = 1 << 24


def needs_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd will record an op on ``tensors`` (grad mode on and one requires grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def attention_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor | None,
    d_lse: torch.Tensor | None,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of softmax attention with respect to ``query``, ``key`` and ``value``.

    Args:
        query: ``(B, H, n, D)``; key: ``(B, H, m, D)``; value: ``(B, H, m, Dv)`` (same heads).
        out: fp32 ``(B, H, n, Dv)``, the forward output; lse: fp32 ``(B, H, n)``, the forward
            log-sum-exp of the scaled scores (``-inf`` for rows that saw no key).
        d_out: ``(B, H, n, Dv)`` or None (no gradient reached ``out``).
        d_lse: ``(B, H, n)`` or None (no gradient reached ``lse``).
        causal: square, top-left aligned causal mask (``n == m``).
    Returns:
        ``(dq, dk, dv)`` in the dtypes of ``query``, ``key``, ``value``. Arithmetic is fp32.
    """
    batch, heads, n, _ = query.shape
    m = key.shape[2]
    f32 = torch.float32
    d_out = torch.zeros_like(out) if d_out is None else d_out.to(f32)
    delta = (d_out * out).sum(-1)  # (B, H, n)
    if d_lse is not None:
        delta = delta - d_lse.to(f32)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    k32, v32 = key.to(f32), value.to(f32)
    dq = torch.empty(query.shape, dtype=f32, device=query.device)
    dk = torch.zeros(key.shape, dtype=f32, device=key.device)
    dv = torch.zeros(value.shape, dtype=f32, device=value.device)
    block = max(16, min(n, _BLOCK_ELEMENTS // max(1, batch * heads * m)))
    for start in range(0, n, block):
        end = min(start + block, n)
        cols = end if causal else m  # causal rows [start, end) see keys [0, end)
        q_blk = query[:, :, start:end].to(f32)
        scores = torch.matmul(q_blk, k32[:, :, :cols].transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(start, end, device=query.device)[:, None]
            keys = torch.arange(cols, device=query.device)[None, :]
            scores = scores.masked_fill(keys > rows, float("-inf"))
        probs = torch.exp(scores - safe_lse[:, :, start:end, None])  # masked pairs: exp(-inf) = 0
        d_out_blk = d_out[:, :, start:end]
        dv[:, :, :cols] += torch.matmul(probs.transpose(-1, -2), d_out_blk)
        d_probs = torch.matmul(d_out_blk, v32[:, :, :cols].transpose(-1, -2))
        d_scores = probs * (d_probs - delta[:, :, start:end, None])
        dq[:, :, start:end] = torch.matmul(d_scores, k32[:, :, :cols]) * scale
        dk[:, :, :cols] += torch.matmul(d_scores.transpose(-1, -2), q_blk) * scale
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


class AttendWithLse(torch.autograd.Function):
    """``(out, lse) = kernel(q, k, v, scale, causal)`` with a backward through both outputs.

    ``kernel`` is any attention over same-head ``q``/``k``/``v`` returning fp32 ``out (B, H, n, Dv)``
    and fp32 ``lse (B, H, n)``; it runs without autograd and only its results are saved (plus the
    inputs), never a probability matrix.
    """

    @staticmethod
    def forward(ctx, query, key, value, scale: float, causal: bool, kernel: Kernel):  # type: ignore[override]
        out, lse = kernel(query, key, value, scale, causal)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale, ctx.causal = scale, causal
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):  # type: ignore[override]
        query, key, value, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(query, key, value, out, lse, d_out, d_lse, ctx.scale, ctx.causal)
        return dq, dk, dv, None, None, None


def attend_with_grad(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, causal: bool, kernel: Kernel
) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`AttendWithLse` as a function; shapes as in :func:`attention_backward`."""
    return AttendWithLse.apply(query, key, value, scale, causal, kernel)
