"""Rotary embeddings at arbitrary positions, with the model's own frequencies and scaling.

The computation mirrors transformers' rotary modules step for step (fp32 angles
``position * inv_freq``, ``cat(freqs, freqs)``, ``cos * attention_scaling`` cast to the
activation dtype), so wherever DCA positions equal the true positions, rotations are bit-identical
to the unpatched model's.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class RotaryParams:
    """The model's rotary frequencies as they are at call time.

    Attributes:
        inv_freq: fp32 ``(D/2,)``, already rope-scaled (linear/PI, NTK, YaRN, llama3).
        attention_scaling: multiplied into cos and sin (YaRN's attention factor; 1.0 otherwise).
    """

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0


def rope_cos_sin(rope: RotaryParams, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin at integer positions.

    Args:
        positions: int64 ``(B, T)``, non-negative.
        dtype: dtype of the activations they will multiply.
    Returns:
        ``(cos, sin)``, each ``(B, 1, T, D)`` in ``dtype`` (broadcast over heads).
    """
    inv_freq = rope.inv_freq
    if inv_freq.device != positions.device or inv_freq.dtype != torch.float32:
        inv_freq = inv_freq.to(device=positions.device, dtype=torch.float32)
    freqs = positions.unsqueeze(-1).to(torch.float32) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if rope.attention_scaling != 1.0:  # multiplying by 1.0 is exact: skipped to save host time
        cos, sin = cos * rope.attention_scaling, sin * rope.attention_scaling
    if dtype != torch.float32:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos.unsqueeze(1), sin.unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, rope: RotaryParams, positions: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``(B, H, T, D)``, any float dtype) at int64 ``positions`` ``(B, T)``; same shape and dtype."""
    cos, sin = rope_cos_sin(rope, positions, x.dtype)
    return x * cos + rotate_half(x) * sin
