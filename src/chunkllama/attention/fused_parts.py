"""Softmax attention over one group of keys, returning its log-sum-exp, through PyTorch's fused kernels.

The chunked reference path (:mod:`chunkllama.attention.chunked`) splits DCA into pieces that are
each plain attention with one query rotation; these helpers run such a piece with a fused,
memory-efficient kernel (PyTorch's CPU flash kernel, or its CUDA memory-efficient kernel) and
fall back to explicit matmuls elsewhere. They never copy K/V per query head: grouped query heads
are folded into the query length where no mask depends on the row.

The fused kernels return a log-sum-exp that carries no gradient, yet the merge of the pieces
differentiates through it; so when autograd records, each piece runs inside
:class:`~chunkllama.attention.autograd.AttendWithLse`, whose backward includes that term.
"""

from __future__ import annotations

import torch

from .autograd import attend_with_grad, needs_grad

_KEY_BLOCK = 4096  # keys per step of the explicit fallback, bounding its memory


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 matmul/softmax over key blocks; ``q (B, H, n, D)`` with as many heads as ``k``."""
    n, m = q.shape[2], k.shape[2]
    qf = q.float() * scale
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    for start in range(0, m, _KEY_BLOCK):
        end = min(start + _KEY_BLOCK, m)
        scores = torch.matmul(qf, k[:, :, start:end].float().transpose(-1, -2))
        if causal:
            rows = torch.arange(n, device=q.device)[:, None]
            cols = torch.arange(start, end, device=q.device)[None, :]
            scores = scores.masked_fill(cols > rows, float("-inf"))
        block_lse = torch.logsumexp(scores, dim=-1)
        safe = torch.where(torch.isfinite(block_lse), block_lse, torch.zeros_like(block_lse))
        block_out = torch.matmul(torch.exp(scores - safe.unsqueeze(-1)), v[:, :, start:end].float())
        new_lse = torch.logaddexp(lse, block_lse)
        new_safe = torch.where(torch.isfinite(new_lse), new_lse, torch.zeros_like(new_lse))
        out = out * torch.exp(lse - new_safe).unsqueeze(-1) + block_out * torch.exp(block_lse - new_safe).unsqueeze(-1)
        lse = new_lse
    return out, lse


def _same_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention where ``q`` has exactly ``k``'s heads. Returns ``(out fp32, lse fp32)``, both
    differentiable (exactly, through :class:`~.autograd.AttendWithLse`) when autograd records."""
    if needs_grad(q, k, v):
        return attend_with_grad(q, k, v, scale, causal, _same_heads_kernel)
    return _same_heads_kernel(q, k, v, scale, causal)


def _same_heads_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_same_heads` without autograd: a fused kernel where one takes the inputs."""
    if q.dtype == k.dtype == v.dtype and q.shape[-1] == v.shape[-1]:  # fused kernels need Dv == D
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, is_causal=causal, scale=scale
            )
            return out.float(), lse.float()
        if q.device.type == "cuda":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, is_causal=causal, scale=scale
            )[:2]
            return out.float(), lse[..., : q.shape[2]].float()
    return _explicit(q, k, v, scale, causal)


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of every query over every key (``causal``: square, top-left aligned).

    Args:
        query: ``(B, Hq, n, D)`` already rotated; ``Hq`` a multiple of ``Hk``.
        key: ``(B, Hk, m, D)``; value: ``(B, Hk, m, Dv)``. With ``causal``, ``n == m``.
    Returns:
        ``(out, lse)``: fp32 ``(B, Hq, n, Dv)`` and fp32 ``(B, Hq, n)``.
    """
    batch, q_heads, n, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    if groups == 1:
        return _same_heads(query, key, value, scale, causal)
    grouped = query.reshape(batch, kv_heads, groups, n, head_dim)
    if not causal:  # no row-dependent mask: fold the query heads of a group into its rows
        out, lse = _same_heads(grouped.reshape(batch, kv_heads, groups * n, head_dim), key, value, scale, False)
        return out.reshape(batch, q_heads, n, -1), lse.reshape(batch, q_heads, n)
    parts = [_same_heads(grouped[:, :, g], key, value, scale, True) for g in range(groups)]
    out = torch.stack([p[0] for p in parts], dim=2).reshape(batch, q_heads, n, -1)
    lse = torch.stack([p[1] for p in parts], dim=2).reshape(batch, q_heads, n)
    return out, lse
