"""Fused Dual Chunk Attention for prefill and chunked prefill (Triton, one pass, online softmax).

Shapes follow HF: ``query (B, Hq, Tq, D)`` (unrotated), ``key``/``value`` ``(B, Hk, Tk, D)`` with keys
already rotated at ``p % chunk_len``; ``Tq <= Tk``, queries may be a suffix of the keys (chunked
prefill against a cache) and rows may be left-padded (negative positions).

One program takes ``BLOCK_M`` consecutive query rows of one query head and walks the keys it can see
in tiles of ``BLOCK_N``. Key tiles are aligned to key *positions* (tile ``t`` holds positions
``t*BLOCK_N .. t*BLOCK_N+BLOCK_N-1``), so when ``chunk_len % BLOCK_N == 0`` chunk boundaries fall on
tile boundaries and the walk splits into pure phases, each with one query rotation computed once
(fp32 angles ``position * inv_freq``, as :mod:`chunkllama.rope`):

1. **inter**: tiles of chunks ``<= c-2``: query rotated at ``chunk_size``, no mask;
2. **successive**: tiles of chunk ``c-1``: query rotated at ``min(p % chunk_len + chunk_len, chunk_size)``, no mask;
3. **intra**: tiles of chunk ``c`` wholly before the block's first query: rotated at ``p % chunk_len``, no mask;
4. **diagonal**: the remaining intra tiles, causal mask by position.

A query block that straddles a chunk boundary (or a ``chunk_len`` that tiles do not divide) takes
the **general** path for the tiles near it: per-element relation, up to three dots, ``where``.
The multiply-adds are those of causal attention except in general tiles.

Each phase's rotated query tile is written to the block's own rows of ``out`` and read back before
its key loop (``_staged_query_at``): loaded from memory, the tile reaches the tensor cores through
shared memory, where a tile computed in registers would hold 32 registers per thread through the
loop. That freed room is worth ~7% (Llama-2 shapes, 32k, H100); ``out`` is overwritten at the end.

Assumption (what :mod:`chunkllama.patching` produces): within a row, key positions are
``index - offset`` (contiguous; padding negative, on the left). Query positions are read per row.
Extra memory: cos/sin tables of ``2 * (chunk_size + 1) * D/2`` fp32 (3 MiB for chunk_size 6144,
D 128); none for the staged queries. The tables replace in-kernel ``sin``/``cos``, which cost ~25% at 8k tokens.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _query_at(q_head, stride_qm, offs_m, row_mask, rot_pos, Cos, Sin, attn_scaling, qk_scale,
              DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows ``offs_m`` of ``q_head`` rotated at per-row positions ``rot_pos`` (cos/sin gathered from the
    ``(chunk_size+1, D/2)`` fp32 tables, times ``attn_scaling``), pre-scaled by ``qk_scale``.
    Pointer tiles are built here so that none stays live across the key loops."""
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_d = tl.arange(0, HEAD_DIM)
    sign = tl.where(offs_d < HALF, -1.0, 1.0)
    row_ptrs = q_head + offs_m[:, None] * stride_qm
    q = tl.load(row_ptrs + offs_d[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
    partner = (offs_d + HALF) % HEAD_DIM  # rotate_half's source column; frequencies are cat(f, f)
    q_sw = tl.load(row_ptrs + partner[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
    t_off = rot_pos[:, None] * HALF + (offs_d % HALF)[None, :]
    cos = tl.load(Cos + t_off) * attn_scaling
    sin = tl.load(Sin + t_off) * attn_scaling
    return ((q * cos + sign[None, :] * q_sw * sin) * qk_scale).to(DTYPE)


@triton.jit
def _staged_query_at(q_head, stride_qm, o_head, stride_om, offs_m, row_mask, rot_pos, Cos, Sin, attn_scaling,
                     qk_scale, DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """:func:`_query_at`, written to this block's rows of the output and read back: a tile loaded from
    memory feeds the tensor cores from shared memory instead of occupying registers through the loop."""
    q = _query_at(q_head, stride_qm, offs_m, row_mask, rot_pos, Cos, Sin, attn_scaling, qk_scale, DTYPE, HEAD_DIM)
    o_ptrs = o_head + offs_m[:, None] * stride_om + tl.arange(0, HEAD_DIM)[None, :]
    tl.debug_barrier()  # every warp is done with the previous staged query
    tl.store(o_ptrs, q, mask=row_mask[:, None])
    tl.debug_barrier()
    return tl.load(o_ptrs, mask=row_mask[:, None], other=0.0)


@triton.jit
def _softmax_step(acc, l_i, m_i, qk, v):
    """Online-softmax update with scores ``qk`` (log2 domain, no ``-inf``)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _softmax_step_masked(acc, l_i, m_i, qk, v):
    """Online-softmax update where ``qk`` may hold ``-inf`` (masked) entries, whole rows included."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _pure_phase(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, koff, t_lo, t_hi,
                offs_n, offs_d, BLOCK_N: tl.constexpr):
    """Key tiles ``[t_lo, t_hi)`` (in position units of BLOCK_N), all visible to every row, one rotation."""
    for t in range(t_lo, t_hi):
        kidx = koff + t * BLOCK_N + offs_n
        k = tl.load(k_base + kidx[None, :] * stride_kn + offs_d[:, None])
        qk = tl.dot(q, k)
        v = tl.load(v_base + kidx[:, None] * stride_vn + offs_d[None, :])
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v)
    return acc, l_i, m_i


@triton.jit
def _diagonal_phase(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, koff, t_lo, t_hi, Tk, qpos,
                    offs_n, offs_d, BLOCK_N: tl.constexpr):
    """Intra-chunk key tiles ``[t_lo, t_hi)`` with the causal mask by position."""
    for t in range(t_lo, t_hi):
        kpos = t * BLOCK_N + offs_n
        kidx = koff + kpos
        kmask = kidx < Tk
        k = tl.load(k_base + kidx[None, :] * stride_kn + offs_d[:, None], mask=kmask[None, :], other=0.0)
        qk = tl.dot(q, k)
        visible = (kpos[None, :] <= qpos[:, None]) & kmask[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        v = tl.load(v_base + kidx[:, None] * stride_vn + offs_d[None, :], mask=kmask[:, None], other=0.0)
        acc, l_i, m_i = _softmax_step_masked(acc, l_i, m_i, qk, v)
    return acc, l_i, m_i


@triton.jit
def _dca_prefill_kernel(
    Q, K, V, Out, Lse, QPos, KPos, Cos, Sin,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_qpb, stride_kpb,
    Tq, Tk, num_q_heads, groups, chunk_len, chunk_size, attn_scaling, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STORE_LSE: tl.constexpr,
):
    num_m = tl.cdiv(Tq, BLOCK_M)
    start_m = num_m - 1 - tl.program_id(0)  # heaviest (latest) query blocks first
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_q_heads).to(tl.int64)  # int64 batch offsets: B*H*T*D may exceed 2**31
    h = pid_bh % num_q_heads
    hk = h // groups
    DTYPE = Q.dtype.element_ty

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < Tq
    qpos = tl.load(QPos + b * stride_qpb + offs_m, mask=row_in, other=-1).to(tl.int32)
    row_valid = qpos >= 0
    q_hi = tl.max(qpos, 0)
    q_lo = tl.min(tl.where(row_valid, qpos, q_hi), 0)
    koff = (Tk - 1) - tl.load(KPos + b * stride_kpb + Tk - 1).to(tl.int32)  # key index of position 0

    q_head = Q + b * stride_qb + h * stride_qh
    o_head = Out + b * stride_ob + h * stride_oh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    qpos_c = tl.maximum(qpos, 0)
    in_chunk = qpos_c % chunk_len
    pos_intra = in_chunk
    pos_succ = tl.minimum(in_chunk + chunk_len, chunk_size)
    pos_inter = tl.zeros_like(in_chunk) + chunk_size

    has_rows = q_hi >= 0
    if has_rows:
        c_lo = q_lo // chunk_len
        c_hi = q_hi // chunk_len
        # Phase 1: tiles wholly inside chunks <= c_lo - 2 (inter for every row of the block).
        inter_end = (tl.maximum(c_lo - 1, 0) * chunk_len) // BLOCK_N
        if inter_end > 0:
            q = _staged_query_at(q_head, stride_qm, o_head, stride_om, offs_m, row_in, pos_inter, Cos, Sin,
                                 attn_scaling, qk_scale, DTYPE, HEAD_DIM)
            acc, l_i, m_i = _pure_phase(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, koff, 0, inter_end,
                                        offs_n, offs_d, BLOCK_N)
        last_tile = q_hi // BLOCK_N + 1
        if (c_lo == c_hi) & (chunk_len % BLOCK_N == 0):
            tiles_per_chunk = chunk_len // BLOCK_N
            succ_lo = tl.maximum(c_lo - 1, 0) * tiles_per_chunk
            intra_lo = c_lo * tiles_per_chunk
            diag_lo = (q_lo + 1) // BLOCK_N
            if intra_lo > succ_lo:  # Phase 2: the previous chunk
                q = _staged_query_at(q_head, stride_qm, o_head, stride_om, offs_m, row_in, pos_succ, Cos, Sin,
                                     attn_scaling, qk_scale, DTYPE, HEAD_DIM)
                acc, l_i, m_i = _pure_phase(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, koff,
                                            succ_lo, intra_lo, offs_n, offs_d, BLOCK_N)
            q = _staged_query_at(q_head, stride_qm, o_head, stride_om, offs_m, row_in, pos_intra, Cos, Sin,
                                 attn_scaling, qk_scale, DTYPE, HEAD_DIM)
            # Phase 3: own chunk, before the block's first query.  Phase 4: the diagonal, masked.
            acc, l_i, m_i = _pure_phase(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, koff,
                                        intra_lo, diag_lo, offs_n, offs_d, BLOCK_N)
            acc, l_i, m_i = _diagonal_phase(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, koff,
                                            diag_lo, last_tile, Tk, qpos, offs_n, offs_d, BLOCK_N)
        else:
            # General tiles: per-element relation, one dot per rotation.
            qc = qpos_c // chunk_len
            for t in range(inter_end, last_tile):
                kpos = t * BLOCK_N + offs_n
                kidx = koff + kpos
                kmask = kidx < Tk
                k = tl.load(k_base + kidx[None, :] * stride_kn + offs_d[:, None], mask=kmask[None, :], other=0.0)
                gap = qc[:, None] - (kpos // chunk_len)[None, :]
                qa = _query_at(q_head, stride_qm, offs_m, row_in, pos_intra, Cos, Sin, attn_scaling, qk_scale,
                              DTYPE, HEAD_DIM)
                qk = tl.dot(qa, k)
                qb = _query_at(q_head, stride_qm, offs_m, row_in, pos_succ, Cos, Sin, attn_scaling, qk_scale,
                              DTYPE, HEAD_DIM)
                qk = tl.where(gap == 1, tl.dot(qb, k), qk)
                qi = _query_at(q_head, stride_qm, offs_m, row_in, pos_inter, Cos, Sin, attn_scaling, qk_scale,
                              DTYPE, HEAD_DIM)
                qk = tl.where(gap >= 2, tl.dot(qi, k), qk)
                visible = (kpos[None, :] <= qpos[:, None]) & kmask[None, :]
                qk = tl.where(visible, qk, float("-inf"))
                v = tl.load(v_base + kidx[:, None] * stride_vn + offs_d[None, :], mask=kmask[:, None], other=0.0)
                acc, l_i, m_i = _softmax_step_masked(acc, l_i, m_i, qk, v)

    keep = row_valid & (l_i > 0)
    out = acc / tl.where(keep, l_i, 1.0)[:, None]
    out = tl.where(keep[:, None], out, 0.0)
    tl.debug_barrier()  # the staged queries are read before the output overwrites them
    o_ptrs = o_head + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_in[:, None])
    if STORE_LSE:  # log2-domain log-sum-exp of the scaled scores, +inf for rows that saw no key
        lse = tl.where(keep, m_i + tl.math.log2(tl.where(keep, l_i, 1.0)), float("inf"))
        tl.store(Lse + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=row_in)


def tuning_override(name: str, count: int) -> tuple[int, ...] | None:
    """``count`` comma-separated ints from environment variable ``name`` (benchmark tuning runs), or None."""
    env = os.environ.get(name)
    if not env:
        return None
    values = tuple(int(x) for x in env.split(","))
    if len(values) != count:
        raise ValueError(f"{name}={env!r}: expected {count} comma-separated integers.")
    return values


def _config(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head_dim."""
    if _INTERPRET:
        return 16, 16, 1, 1
    override = tuning_override("CHUNKLLAMA_PREFILL_CONFIG", 4)  # "BM,BN,warps,stages"
    if override:
        return override
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3


def rope_tables(inv_freq: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every rotation position ``0..chunk_size``: fp32 ``(chunk_size + 1, D/2)`` each,
    computed as :mod:`chunkllama.rope` does (fp32 angles ``position * inv_freq``)."""
    angles = torch.arange(chunk_size + 1, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos().contiguous(), angles.sin().contiguous()


def _launch(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    query_positions: torch.Tensor, key_positions: torch.Tensor,
    inv_freq: torch.Tensor, attn_scaling: float, chunk_len: int, chunk_size: int, scale: float,
) -> torch.Tensor:
    """Body of :func:`dca_prefill` (inputs checked and converted), also the custom op's."""
    return launch_prefill(query, key, value, query_positions, key_positions, inv_freq, attn_scaling, chunk_len,
                          chunk_size, scale)[0]


def launch_prefill(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    query_positions: torch.Tensor, key_positions: torch.Tensor,
    inv_freq: torch.Tensor, attn_scaling: float, chunk_len: int, chunk_size: int, scale: float,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the kernel: ``(out, lse)``; ``lse`` is None unless ``return_lse``, else fp32 ``(B, Hq, Tq)``
    contiguous, the **log2**-domain log-sum-exp of the scaled scores (``+inf`` for rows that saw no key),
    what :mod:`.triton_prefill_backward` recomputes probabilities from."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    # (B, T, H, D) in memory, as SDPA-flash returns it: the model's transpose + reshape is then free.
    out = torch.empty(batch, q_len, q_heads, head_dim, dtype=query.dtype, device=query.device).transpose(1, 2)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=query.device) if return_lse else None
    cos_table, sin_table = rope_tables(inv_freq, chunk_size)
    block_m, block_n, warps, stages = _config(head_dim)
    grid = (triton.cdiv(q_len, block_m), batch * q_heads)
    _dca_prefill_kernel[grid](
        query, key, value, out, out if lse is None else lse, query_positions, key_positions, cos_table, sin_table,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        query_positions.stride(0), key_positions.stride(0),
        q_len, kv_len, q_heads, q_heads // kv_heads, chunk_len, chunk_size, float(attn_scaling), float(scale * LOG2E),
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STORE_LSE=return_lse, num_warps=warps, num_stages=stages,
    )
    return out, lse


_prefill_op = torch.library.custom_op("chunkllama::dca_prefill", _launch, mutates_args=())


@_prefill_op.register_fake
def _(query, key, value, query_positions, key_positions, inv_freq, attn_scaling, chunk_len, chunk_size, scale):
    batch, q_heads, q_len, head_dim = query.shape
    return query.new_empty(batch, q_len, q_heads, head_dim).transpose(1, 2)


def dca_prefill(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    query_positions: torch.Tensor, key_positions: torch.Tensor,
    inv_freq: torch.Tensor, attn_scaling: float, chunk_len: int, chunk_size: int, scale: float,
) -> torch.Tensor:
    """Launch the fused prefill kernel. Shapes as :func:`chunkllama.attention.dca_attention`; returns ``out``
    (``(B, Hq, Tq, D)`` laid out as ``(B, Tq, Hq, D)`` in memory).

    ``query_positions``/``key_positions`` must be int64 on the device of ``query``, ``inv_freq``
    fp32 there too (:func:`chunkllama.attention.triton_dispatch.launch` sees to it). Under
    ``torch.compile`` this is the custom op ``chunkllama::dca_prefill`` (fake implementation
    registered); eagerly the launcher runs directly.

    This op has no gradient: with inputs that require one it raises; use
    :func:`chunkllama.attention.triton_prefill_backward.dca_prefill_trainable` (same arguments), as
    :func:`chunkllama.attention.triton_dispatch.launch` does.
    """
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        raise RuntimeError("dca_prefill has no backward; call triton_prefill_backward.dca_prefill_trainable "
                           "(same arguments) when inputs require gradients.")
    q_heads, head_dim = query.shape[1], query.shape[-1]
    if head_dim not in (64, 128) or value.shape[-1] != head_dim:
        raise ValueError(f"dca_prefill needs head_dim 64 or 128 for query and value; got {head_dim}, {value.shape[-1]}.")
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("dca_prefill needs query, key and value with a contiguous last dimension.")
    if q_heads % key.shape[1]:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({key.shape[1]}).")
    if query_positions.stride(-1) != 1:
        query_positions = query_positions.contiguous()
    if key_positions.stride(-1) != 1:
        key_positions = key_positions.contiguous()
    if torch.compiler.is_compiling():
        return _prefill_op(query, key, value, query_positions, key_positions, inv_freq, attn_scaling, chunk_len,
                           chunk_size, scale)
    return _launch(query, key, value, query_positions, key_positions, inv_freq, attn_scaling, chunk_len,
                   chunk_size, scale)
