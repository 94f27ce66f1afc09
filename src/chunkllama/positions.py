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

import dataclasses

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
        kv_len: Tk, keys in the cache after this step's update (an int, or a 0-dim tensor).
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


def positions_from_offsets(offsets: torch.Tensor, start: int | torch.Tensor, length: int) -> torch.Tensor:
    """Positions of tensor indices ``start .. start+length-1`` for each row: ``index - offset``.

    Args:
        offsets: int64 ``(B,)`` from :func:`row_offsets`.
        start: an int or a 0-dim int64 tensor (a static cache's length: read without a host sync).
    Returns:
        int64 ``(B, length)``; entries left of a row's first real token are negative (padding).
    """
    index = torch.arange(length, device=offsets.device, dtype=torch.int64)
    if isinstance(start, torch.Tensor) or start:
        index = index + start
    return index.unsqueeze(0) - offsets.unsqueeze(1)


def broken_rows(position_ids: torch.Tensor) -> torch.Tensor:
    """Rows whose position ids restart or jump after their first run of real tokens.

    Packed sequences (several sequences in one row, position ids restarting at 0, as padding-free
    training produces) and any other gap break the one-sequence-per-row rule that
    :func:`row_offsets` relies on. Padding does not: left padding is a run of one shared position
    before the first step, right padding a run of one shared position after the last. A break is
    a drop to position 0, or any other non-step, after the row's first step and followed by a
    step (a new run). A packed first sequence of a single token reads as left padding.

    Args:
        position_ids: int ``(B, T)``.
    Returns:
        bool ``(B,)``. Vectorised: reading it is the caller's one host sync.
    """
    pos = position_ids.to(torch.int64)
    step = pos[:, 1:] == pos[:, :-1] + 1  # (B, T-1): pair (i-1, i) for i = 1..T-1
    after_first_step = (step.cumsum(-1) - step.to(torch.int64)) > 0
    next_is_step = torch.zeros_like(step)
    next_is_step[:, :-1] = step[:, 1:]
    restart = (pos[:, 1:] == 0) & (pos[:, 1:] < pos[:, :-1])
    broken = after_first_step & ~step & (next_is_step | restart)
    return broken.any(dim=-1)


def logn_query_factors(query_positions: torch.Tensor, coef: float, base: int) -> torch.Tensor:
    """Per-query attention temperature ``max(1, 1 + coef * ln((p + 1) / base))`` (issue 14's ``logn`` variant).

    A query at position ``p`` multiplies all its attention logits by this factor: 1 inside the first
    ``base`` positions, growing with the log of the position beyond them (Qwen's log-n attention; the
    length-dependent temperature of Qwen2.5-1M, taken per position so that it is causal: a cached
    decode step sees the factor a full forward gives the same token).

    Args:
        query_positions: int ``(B, Tq)`` position ids; negative (padding) gets 1.
        coef: the slope (0 = no scaling).
        base: positions below it keep factor 1.
    Returns:
        float32 ``(B, Tq)``.
    """
    tokens = (query_positions.clamp(min=0) + 1).to(torch.float32)
    return (1.0 + coef * torch.log(tokens / float(base))).clamp(min=1.0)

@dataclasses.dataclass(frozen=True)
class StepPositions:
    """Where one forward step's tokens sit, computed once per forward and shared by every layer.

    Attributes:
        query: int64 ``(B, Tq)``: position ids of this step's tokens; negative marks padding.
        offsets: int64 ``(B,)``: key ``j`` of row ``b`` in the cache has position ``j - offsets[b]``.
        key_rotation: int64 ``(B, Tq)``: where this step's keys are rotated (``position % chunk_len``,
            padding at 0).
    """

    query: torch.Tensor
    offsets: torch.Tensor
    key_rotation: torch.Tensor
    # tensors derived from the above, computed by the first layer that asks and shared by the rest
    _memo: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def _derived(self, key: tuple, compute) -> torch.Tensor:
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = compute()
        return found

    def keys(self, kv_len: int) -> torch.Tensor:
        """Positions of all ``kv_len`` keys in the cache after this step's update: int64 ``(B, kv_len)``.

        Computed once per length and shared by every layer of the step (treat it as read-only).
        """
        return self._derived(("keys", kv_len), lambda: positions_from_offsets(self.offsets, 0, kv_len))

    def key_rotation_for(self, chunk_len: int) -> torch.Tensor:
        """Like ``key_rotation`` for another ``chunk_len`` (a layer with its own window): int64 ``(B, Tq)``."""
        return self._derived(("rotation", chunk_len), lambda: key_rope_positions(self.query.clamp(min=0), chunk_len))

    def logn_factors(self, coef: float, base: int) -> torch.Tensor:
        """:func:`logn_query_factors` of this step's queries: float32 ``(B, Tq)``, once per step."""
        return self._derived(("logn", coef, base), lambda: logn_query_factors(self.query, coef, base))


def step_positions(
    position_ids: torch.Tensor | None,
    batch_size: int,
    q_len: int,
    past: int | torch.Tensor,
    chunk_len: int,
    device: torch.device,
    check_rows: bool = True,
) -> StepPositions:
    """The :class:`StepPositions` of ``q_len`` new tokens after ``past`` cached ones.

    Args:
        position_ids: int ``(B, Tq)`` or ``(1, Tq)``, or None for ``past .. past+Tq-1``.
        past: tokens already cached (int, or a 0-dim tensor: no host sync).
        check_rows: with ``q_len > 1``, raise ``ValueError`` for rows that :func:`broken_rows`
            flags (one host sync per forward; pass False where that is not allowed, e.g. while
            ``torch.compile`` traces).
    """
    if position_ids is None:
        position_ids = positions_from_offsets(torch.zeros(1, dtype=torch.int64, device=device), past, q_len)
    position_ids = position_ids.to(device)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if check_rows and q_len > 1 and bool(broken_rows(position_ids).any()):
        raise ValueError(
            "position_ids restart or jump inside a row (packed sequences?). Dual Chunk Attention "
            "needs one sequence per row with positions counting up by one: put each sequence in "
            "its own row (left-pad to one length and pass the attention_mask), or run them one by one."
        )
    offsets = row_offsets(position_ids, batch_size, q_len, past + q_len)
    query = positions_from_offsets(offsets, past, q_len)
    return StepPositions(query, offsets, key_rope_positions(query.clamp(min=0), chunk_len))
