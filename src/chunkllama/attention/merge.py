"""Exact combination of partial softmax-attention results through their log-sum-exp."""

from __future__ import annotations

import torch


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention results computed over disjoint key sets.

    Args:
        out_a, out_b: fp32 ``(..., T, Dv)``, each normalised over its own keys (0 where it saw none).
        lse_a, lse_b: fp32 ``(..., T)``, log-sum-exp of each part's scores (``-inf`` where it saw none).
    Returns:
        ``(out, lse)`` in fp32: exactly softmax attention over the union of both key sets.
        Rows that saw no key in either part get ``out = 0`` and ``lse = -inf``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weight_a = torch.exp(lse_a - safe).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a * weight_a + out_b * weight_b, lse
