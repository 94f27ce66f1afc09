"""DCA as a few fused attention calls per query chunk, for rows whose positions are contiguous.

Positions produced by the model patch are always ``index - offset`` per row (left padding gives
each row its own offset). Then the queries of chunk ``c`` see:

- **intra**: keys of chunk ``c`` up to themselves — a rectangle of earlier keys with no mask plus
  a square, causal block (top-left = bottom-right aligned, so no mask tensor is ever built);
- **successive**: all keys of chunk ``c-1``, no mask;
- **inter**: all keys of chunks ``0 .. c-2``, no mask, one constant query rotation;

each one :func:`~chunkllama.attention.fused_parts.attend` call, merged through their log-sum-exp in
fp32. The fused kernels keep memory linear in the key count; the extra memory is the three rotated
copies of one chunk of queries.
"""

from __future__ import annotations

import torch

from ..config import DCAConfig
from ..positions import query_rope_positions
from ..rope import RotaryParams, apply_rope
from .fused_parts import attend
from .merge import merge_partials


def contiguous_offsets(query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor | None:
    """Per-row offsets if every row has positions ``index - offset`` (queries = the last keys), else None.

    Args:
        query_positions: int64 ``(B, Tq)`` on the CPU; key_positions: int64 ``(B, Tk)`` on the CPU.
    Returns:
        int64 ``(B,)`` on the CPU, or None.
    """
    q_len, kv_len = query_positions.shape[1], key_positions.shape[1]
    if q_len > kv_len:
        return None
    index = torch.arange(kv_len, dtype=torch.int64)
    offsets = index[-1] - key_positions[:, -1]
    if not torch.equal(key_positions, index[None, :] - offsets[:, None]):
        return None
    if not torch.equal(query_positions, key_positions[:, kv_len - q_len :]):
        return None
    return offsets


def _row_group(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offset: int,
    rope: RotaryParams,
    config: DCAConfig,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DCA for rows that share one offset. Shapes as in :func:`chunked_dca_attention`.

    Returns ``(out (B', Hq, Tq, Dv) in query.dtype, lse (B', Hq, Tq) fp32)``.
    """
    batch, q_heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    chunk_len, chunk_size = config.chunk_len, int(config.chunk_size)  # type: ignore[arg-type]
    out = torch.zeros(batch, q_heads, q_len, value.shape[-1], dtype=query.dtype, device=query.device)
    lse_out = torch.full((batch, q_heads, q_len), float("-inf"), dtype=torch.float32, device=query.device)
    first_key_pos = max(0, -offset)
    first_q_pos = max(first_key_pos, kv_len - q_len - offset)
    last_pos = kv_len - 1 - offset
    q_index = kv_len - q_len - offset  # query row of position p is p - q_index

    def keys(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:  # keys with positions [lo, hi)
        return key[:, :, lo + offset : hi + offset], value[:, :, lo + offset : hi + offset]

    for chunk in range(first_q_pos // chunk_len, last_pos // chunk_len + 1):
        start = chunk * chunk_len
        q_lo, q_hi = max(first_q_pos, start), min(last_pos, start + chunk_len - 1) + 1
        rows = query[:, :, q_lo - q_index : q_hi - q_index]
        positions = torch.arange(q_lo, q_hi, device=query.device).expand(batch, -1)
        intra, successive, inter = query_rope_positions(positions, chunk_len, chunk_size)
        q_intra = apply_rope(rows, rope, intra)
        parts = [attend(q_intra, *keys(q_lo, q_hi), scale, causal=True)]
        if max(start, first_key_pos) < q_lo:
            parts.append(attend(q_intra, *keys(max(start, first_key_pos), q_lo), scale))
        if chunk >= 1 and start > first_key_pos:
            parts.append(attend(apply_rope(rows, rope, successive), *keys(max(start - chunk_len, first_key_pos), start), scale))
        if chunk >= 2 and start - chunk_len > first_key_pos:
            parts.append(attend(apply_rope(rows, rope, inter), *keys(first_key_pos, start - chunk_len), scale))
        acc, lse = parts[0]
        for part_out, part_lse in parts[1:]:
            acc, lse = merge_partials(acc, lse, part_out, part_lse)
        out[:, :, q_lo - q_index : q_hi - q_index] = acc.to(query.dtype)
        lse_out[:, :, q_lo - q_index : q_hi - q_index] = lse
    return out, lse_out


def chunked_dca_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offsets: torch.Tensor,
    rope: RotaryParams,
    config: DCAConfig,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DCA for rows with contiguous positions (see :func:`contiguous_offsets`).

    Args:
        query: ``(B, Hq, Tq, D)`` unrotated, the last ``Tq`` of the ``Tk`` positions of each row.
        key: ``(B, Hk, Tk, D)`` rotated at ``position % chunk_len``; value ``(B, Hk, Tk, Dv)``.
        offsets: int64 ``(B,)`` (CPU): key ``j`` of row ``b`` has position ``j - offsets[b]``.
    Returns:
        ``(out (B, Hq, Tq, Dv) in query.dtype, lse (B, Hq, Tq) fp32)``; padding rows are 0 / -inf.
    """
    if bool((offsets == offsets[0]).all()):
        return _row_group(query, key, value, int(offsets[0]), rope, config, scale)
    parts = [
        _row_group(query[b : b + 1], key[b : b + 1], value[b : b + 1], int(offsets[b]), rope, config, scale)
        for b in range(query.shape[0])
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
