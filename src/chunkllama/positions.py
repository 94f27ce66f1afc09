"""Pure index math of Dual Chunk Attention (no tensors beyond integer position ids).

A token at position ``p`` (its position id, not its index in the tensor) lies in chunk
``p // chunk_len`` at in-chunk position ``p % chunk_len``. Keys are rotated at
``p_k % chunk_len``; a query is rotated three ways, depending on which chunk the key is in:

============  ==============================  ==========================================
relation      keys                            query rotated at
============  ==============================  ==========================================
INTRA         same chunk, ``p_k <= p_q``       ``p_q % chunk_len``
SUCCESSIVE    the previous chunk              ``min(p_q % chunk_len + chunk_len, chunk_size)``
INTER         any earlier chunk               ``chunk_size``
MASKED        future keys, padding (p < 0)    —
============  ==============================  ==========================================

So every relative distance stays ``<= chunk_size``. All functions broadcast like torch ops.
"""

from __future__ import annotations

import torch

MASKED, INTRA, SUCCESSIVE, INTER = 0, 1, 2, 3
RELATION_NAMES = {MASKED: "masked", INTRA: "intra", SUCCESSIVE: "successive", INTER: "inter"}


def key_rope_positions(positions: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """Positions at which keys are rotated (and cached): ``p % chunk_len``. Shape as input, int64."""
    return torch.remainder(positions, chunk_len)


def query_rope_positions(
    positions: torch.Tensor, chunk_len: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three positions at which a query is rotated: ``(intra, successive, inter)``.

    Each has the shape of ``positions`` (int64). ``inter`` is the constant ``chunk_size``.
    """
    intra = torch.remainder(positions, chunk_len)
    successive = torch.clamp(intra + chunk_len, max=chunk_size)
    inter = torch.full_like(intra, chunk_size)
    return intra, successive, inter


def chunk_relation(query_positions: torch.Tensor, key_positions: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """Relation code (MASKED/INTRA/SUCCESSIVE/INTER) of every query/key pair.

    Args:
        query_positions: int64, shape ``(..., Tq, 1)`` or broadcastable to it.
        key_positions: int64, shape ``(..., 1, Tk)`` or broadcastable to it.
    Returns:
        int8 tensor of the broadcast shape. Negative positions (padding) are MASKED.
    """
    q_chunk = torch.div(query_positions, chunk_len, rounding_mode="floor")
    k_chunk = torch.div(key_positions, chunk_len, rounding_mode="floor")
    gap = q_chunk - k_chunk
    relation = torch.where(gap == 0, INTRA, torch.where(gap == 1, SUCCESSIVE, INTER))
    visible = (key_positions <= query_positions) & (key_positions >= 0) & (query_positions >= 0)
    return torch.where(visible, relation, MASKED).to(torch.int8)


def row_offsets(position_ids: torch.Tensor, batch_size: int, q_len: int, kv_len: int) -> torch.Tensor:
    """Per-row offset ``index - position`` of the current queries within the key sequence.

    Positions are taken to be contiguous within a row (``position = index - offset``), which is
    what ``generate`` produces for left-padded batches. The offset is read at the last query whose
    position is one more than its left neighbour's (the end of the run of real tokens), or at the
    last query when there is no such step (a single query, or a row with one real token). Padding
    tokens all share one position (HF gives them 1), so they never form a step; the largest
    position would not do, since a row with one or two real tokens ties with its pads at 1.

    Args:
        position_ids: int, shape ``(B, Tq)`` or ``(1, Tq)``: position ids of the current queries.
        batch_size: B.
        q_len: Tq; the queries are the last Tq entries of the kv_len keys.
        kv_len: Tk, keys in the cache after this step's update.
    Returns:
        int64 tensor of shape ``(B,)``.
    """
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.shape[-1] != q_len:
        raise ValueError(f"position_ids has {position_ids.shape[-1]} entries per row, expected {q_len}.")
    position_ids = position_ids.to(torch.int64).expand(batch_size, q_len)
    index = torch.arange(q_len, device=position_ids.device)
    steps = torch.zeros_like(position_ids, dtype=torch.bool)
    steps[:, 1:] = position_ids[:, 1:] == position_ids[:, :-1] + 1
    anchor = torch.where(steps, index, -1).amax(dim=-1)
    anchor = torch.where(anchor >= 0, anchor, q_len - 1)
    anchor_pos = position_ids.gather(1, anchor.unsqueeze(1)).squeeze(1)
    return (kv_len - q_len + anchor) - anchor_pos


def positions_from_offsets(offsets: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Positions of tensor indices ``start .. start+length-1`` for each row: ``index - offset``.

    Args:
        offsets: int64 ``(B,)`` from :func:`row_offsets`.
    Returns:
        int64 ``(B, length)``; entries left of a row's first real token are negative (padding).
    """
    index = torch.arange(start, start + length, device=offsets.device, dtype=torch.int64)
    return index.unsqueeze(0) - offsets.unsqueeze(1)
