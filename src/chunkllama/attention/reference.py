"""Readable PyTorch Dual Chunk Attention: exact, never a T×T matrix.

:func:`reference_dca_attention` picks one of three exact paths:

- **static** (:func:`static_dca_attention`): every decision is made from tensor shapes, never from
  position values, so it never waits for the device and ``torch.compile(fullgraph=True)`` traces
  it. Each query is rotated three ways and scored against every key in one matmul; the chunk
  relation of each pair picks its score. Taken for few query rows (decode, speculative steps:
  ``groups * Tq <= STATIC_MAX_ROWS``, where it costs one pass over the keys like plain decoding)
  and always while ``torch.compile`` traces (prefill then costs ~3x the dense QK^T products).
- **chunked** (:mod:`.chunked`: a few fused attention calls per chunk) when each row's positions are
  contiguous — always the case inside a patched model — for prefill. It reads the positions on
  the host once per call.
- **blocked** (below) otherwise.

Blocked path: queries are taken ``block_q`` at a time and keys ``block_k`` at a time. For each block pair the
score of every (query, key) pair uses the query rotation its chunk relation asks for
(:mod:`chunkllama.positions`); each key block's partial softmax is merged into the running result
through its log-sum-exp in fp32. Peak extra memory is
``O(B · Hq · block_q · (block_k + D))``, independent of the sequence length.
"""

from __future__ import annotations

import torch

from ..config import DCAConfig
from ..positions import INTER, INTRA, SUCCESSIVE, chunk_relation, query_rope_positions
from ..rope import RotaryParams, apply_rope
from .chunked import chunked_dca_attention, contiguous_offsets
from .merge import merge_partials

DEFAULT_BLOCK = 1024
STATIC_MAX_ROWS = 64  # query rows per KV head up to which the static path is taken in eager mode
_STATIC_BLOCK_Q = 256


def _block_size(chunk_len: int, limit: int) -> int:
    """Largest divisor of ``chunk_len`` not above ``limit`` (blocks then align with chunks), or ``limit``
    when the best divisor would be tiny."""
    if chunk_len <= limit:
        return chunk_len
    best = max(d for d in range(1, limit + 1) if chunk_len % d == 0)
    return best if best >= limit // 4 else limit


def _gaps_present(
    q_chunk_range: tuple[int, int], k_chunk_range: tuple[int, int]
) -> set[int]:
    """Chunk relations that can occur between a query block and a key block (a superset)."""
    lo = q_chunk_range[0] - k_chunk_range[1]
    hi = q_chunk_range[1] - k_chunk_range[0]
    found = set()
    if lo <= 0 <= hi:
        found.add(INTRA)
    if lo <= 1 <= hi:
        found.add(SUCCESSIVE)
    if hi >= 2:
        found.add(INTER)
    return found


def blocked_dca_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    rope: RotaryParams,
    config: DCAConfig,
    scale: float,
    block_q: int | None = None,
    block_k: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dual Chunk Attention for arbitrary per-pair positions, block by block (CPU or CUDA; fp32, bf16, fp16).

    See :func:`chunkllama.attention.dca_attention` for the argument contract. Arithmetic is fp32
    throughout (blocks are upcast), the output is cast back to ``query.dtype``.
    Returns ``out`` ``(B, Hq, Tq, Dv)``, and with ``return_lse`` also the fp32 log-sum-exp
    ``(B, Hq, Tq)`` of the scaled scores (``-inf`` for rows that see no key).
    """
    batch, q_heads, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    value_dim = value.shape[-1]
    chunk_len, chunk_size = config.chunk_len, int(config.chunk_size)  # type: ignore[arg-type]
    block_q = block_q or _block_size(chunk_len, DEFAULT_BLOCK)
    block_k = block_k or _block_size(chunk_len, DEFAULT_BLOCK)

    # Block-skipping decisions are made on the host once, so the loop never syncs with the device.
    q_pos_host = query_positions.detach().to("cpu", torch.int64)
    k_pos_host = key_positions.detach().to("cpu", torch.int64)

    out = torch.empty(batch, q_heads, q_len, value_dim, dtype=query.dtype, device=query.device)
    lse_out = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=query.device) if return_lse else None

    for q_start in range(0, q_len, block_q):
        q_end = min(q_start + block_q, q_len)
        rows = q_end - q_start
        q_pos = query_positions[:, q_start:q_end]
        q_host = q_pos_host[:, q_start:q_end]
        q_valid = q_host[q_host >= 0]
        acc = torch.zeros(batch, kv_heads, groups * rows, value_dim, dtype=torch.float32, device=query.device)
        lse = torch.full((batch, kv_heads, groups * rows), float("-inf"), dtype=torch.float32, device=query.device)
        if q_valid.numel():
            q_block = _fp32(query[:, :, q_start:q_end]) * scale
            rotated = {
                kind: apply_rope(q_block, rope, pos.clamp(min=0)).reshape(batch, kv_heads, groups * rows, -1)
                for kind, pos in zip((INTRA, SUCCESSIVE, INTER), query_rope_positions(q_pos, chunk_len, chunk_size))
            }
            q_max = int(q_valid.max())
            q_chunks = (int(q_valid.min()) // chunk_len, q_max // chunk_len)
            for k_start in range(0, kv_len, block_k):
                k_end = min(k_start + block_k, kv_len)
                k_host = k_pos_host[:, k_start:k_end]
                k_valid = k_host[k_host >= 0]
                if not k_valid.numel() or int(k_valid.min()) > q_max:
                    continue
                kinds = _gaps_present(q_chunks, (int(k_valid.min()) // chunk_len, int(k_valid.max()) // chunk_len))
                relation = chunk_relation(q_pos[:, :, None], key_positions[:, None, k_start:k_end], chunk_len)
                relation = relation.unsqueeze(1).unsqueeze(1)  # (B, 1, 1, rows, cols): shared by heads
                k_block = key[:, :, k_start:k_end].to(torch.float32).transpose(-1, -2)
                scores = torch.full(
                    (batch, kv_heads, groups, rows, k_end - k_start), float("-inf"),
                    dtype=torch.float32, device=query.device,
                )
                for kind in kinds:
                    part = torch.matmul(rotated[kind], k_block).view_as(scores)
                    scores = torch.where(relation == kind, part, scores)
                scores = scores.view(batch, kv_heads, groups * rows, -1)
                block_lse = torch.logsumexp(scores, dim=-1)
                safe = torch.where(torch.isfinite(block_lse), block_lse, torch.zeros_like(block_lse))
                probs = torch.exp(scores - safe.unsqueeze(-1))
                block_out = torch.matmul(probs, value[:, :, k_start:k_end].to(torch.float32))
                acc, lse = merge_partials(acc, lse, block_out, block_lse)
        out[:, :, q_start:q_end] = acc.view(batch, q_heads, rows, value_dim).to(query.dtype)
        if lse_out is not None:
            lse_out[:, :, q_start:q_end] = lse.view(batch, q_heads, rows)
    return (out, lse_out) if return_lse else out


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def _static_relation(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~chunkllama.positions.chunk_relation` in the form the static path consumes, in few ops.

    Args:
        q_pos: int64 ``(B, n)``; k_pos: int64 ``(B, m)``.
    Returns:
        ``pick`` int64 ``(B, 1, 1, 1, n, m)``: 0 intra, 1 successive, 2 inter (the row of the stacked
        rotations to read); ``masked`` bool ``(B, 1, 1, n, m)``: future keys and padding.
    """
    q_chunk = torch.div(q_pos, chunk_len, rounding_mode="floor")[:, :, None]
    k_chunk = torch.div(k_pos, chunk_len, rounding_mode="floor")[:, None, :]
    pick = (q_chunk - k_chunk).clamp_(0, 2)
    # a padding query (negative) sees only keys with smaller positions, all padding too
    masked = (k_pos[:, None, :] > q_pos[:, :, None]) | (k_pos < 0)[:, None, :]
    return pick[:, None, None, None], masked[:, None, None]


def static_dca_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    rope: RotaryParams,
    config: DCAConfig,
    scale: float,
    block_q: int | None = None,
    block_k: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dual Chunk Attention with no host reads of positions (decode; ``torch.compile``).

    Same contract as :func:`blocked_dca_attention`. The three rotations of a query block are
    stacked as rows, so one fp32 matmul per key block scores every (query, key) pair all three
    ways; :func:`~chunkllama.positions.chunk_relation` picks the right one (or masks the pair).
    Blocks are fixed by shapes alone: with few rows all keys form one block
    (extra memory ``O(B · Hq · 3 · Tq · Tk)`` fp32), else ``block_q`` x ``block_k`` tiles merged
    through their log-sum-exp (no block is skipped: ~3x the QK^T work of dense attention).
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    chunk_len, chunk_size = config.chunk_len, int(config.chunk_size)  # type: ignore[arg-type]
    block_q = block_q or min(q_len, _STATIC_BLOCK_Q)
    block_k = block_k or (kv_len if groups * block_q <= STATIC_MAX_ROWS else DEFAULT_BLOCK)
    outs, lses = [], []
    for q_start in range(0, q_len, block_q):
        q_end = min(q_start + block_q, q_len)
        rows = q_end - q_start
        q_pos = query_positions[:, q_start:q_end]
        # (B, 3·rows): the intra, successive and inter positions, one after the other
        three = torch.cat(query_rope_positions(q_pos.clamp(min=0), chunk_len, chunk_size), dim=1)
        q_block = _fp32(query[:, :, q_start:q_end]) * scale
        rotated = apply_rope(q_block.repeat(1, 1, 3, 1), rope, three).reshape(batch, kv_heads, groups * 3 * rows, head_dim)
        acc = lse = None
        for k_start in range(0, kv_len, block_k):
            k_end = min(k_start + block_k, kv_len)
            cols = k_end - k_start
            scores = torch.matmul(rotated, _fp32(key[:, :, k_start:k_end]).transpose(-1, -2))
            scores = scores.view(batch, kv_heads, groups, 3, rows, cols)
            pick, masked = _static_relation(q_pos, key_positions[:, k_start:k_end], chunk_len)
            scores = scores.gather(3, pick.expand(batch, kv_heads, groups, 1, rows, cols)).squeeze(3)
            scores = scores.masked_fill(masked, float("-inf"))
            scores = scores.view(batch, kv_heads, groups * rows, cols)
            block_lse = torch.logsumexp(scores, dim=-1)
            safe = torch.where(torch.isfinite(block_lse), block_lse, torch.zeros_like(block_lse))
            probs = torch.exp(scores - safe.unsqueeze(-1))
            block_out = torch.matmul(probs, _fp32(value[:, :, k_start:k_end]))
            if acc is None:
                acc, lse = block_out, block_lse
            else:
                acc, lse = merge_partials(acc, lse, block_out, block_lse)
        if acc is None:  # no keys at all
            acc = torch.zeros(batch, kv_heads, groups * rows, value.shape[-1], dtype=torch.float32, device=query.device)
            lse = torch.full((batch, kv_heads, groups * rows), float("-inf"), dtype=torch.float32, device=query.device)
        outs.append(acc.view(batch, q_heads, rows, -1))
        lses.append(lse.view(batch, q_heads, rows))
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).to(query.dtype)
    if not return_lse:
        return out
    return out, lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)


def reference_dca_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    rope: RotaryParams,
    config: DCAConfig,
    scale: float,
    block_q: int | None = None,
    block_k: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dual Chunk Attention in plain PyTorch (CPU or CUDA; fp32, bf16, fp16).

    Same contract as :func:`blocked_dca_attention`. Without forced block sizes: the static path
    while ``torch.compile`` traces or for few query rows, the chunked fused path when positions are
    contiguous per row, the blocked path otherwise (see the module docstring).
    """
    if block_q is None and block_k is None:
        groups = query.shape[1] // key.shape[1]
        if torch.compiler.is_compiling() or groups * query.shape[2] <= STATIC_MAX_ROWS:
            return static_dca_attention(
                query, key, value, query_positions, key_positions, rope, config, scale, return_lse=return_lse
            )
        offsets = contiguous_offsets(query_positions.detach().cpu(), key_positions.detach().cpu())
        if offsets is not None:
            out, lse = chunked_dca_attention(query, key, value, offsets, rope, config, scale)
            return (out, lse) if return_lse else out
    return blocked_dca_attention(
        query, key, value, query_positions, key_positions, rope, config, scale, block_q, block_k, return_lse
    )
