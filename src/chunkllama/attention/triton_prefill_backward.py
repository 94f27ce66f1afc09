"""Backward of the fused DCA prefill kernel (Triton): dQ, dK, dV recomputed from the saved log-sum-exp.

FlashAttention-2's scheme, with DCA's three query rotations inside. With ``s = scale · R(p)q · k``
(``R(p)`` the rotation of the phase the pair belongs to, times the rope attention scaling; keys are
already rotated), ``P = exp(s - lse)``, ``D_i = rowsum(dO ∘ O)``::

    dV_j = Σ_i P_ij dO_i          dS_ij = P_ij (dO_i · V_j - D_i)
    dK_j = scale · Σ_i dS_ij R(p_ij) q_i
    dq_i = scale · Σ_phase R(p_phase,i)ᵀ Σ_{j in phase} dS_ij k_j

Four kernels:

1. :func:`_delta_kernel`: ``D = rowsum(dO ∘ O)`` in fp32, ``(B, Hq, Tq)``.
2. :func:`_rotate_queries_kernel`: the three rotations of every query (intra, successive, inter: the
   forward's fp32 rotation, pre-scaled, rounded once to the input dtype) into one ``(3, B, Hq, Tq, D)``
   buffer, so the key-major kernel below loads a rotated tile instead of re-rotating each query tile
   once per key tile (the rotation gathers cos/sin rows per query: it cost more than the dots).
3. :func:`_dkdv_phased_kernel`: one program per ``BLOCK_N`` keys (tiles aligned to key *positions*, as
   in the forward) of one KV head; it walks the query heads of its group (GQA: their contributions sum)
   and the query tiles that can see the keys. When ``chunk_len`` is a multiple of ``BLOCK_N`` (and
   ``BLOCK_N`` of ``BLOCK_M``) query tiles are aligned to positions too, so each (key tile, query tile)
   pair has one chunk relation: the rotated copy to read is a scalar of the loop index, and the walk is
   FlashAttention-2's loop (four dots, no ``where``) over the full tiles past the diagonal, with masks
   only on the diagonal and on partial edge tiles. Otherwise :func:`_dkdv_kernel` takes query tiles by
   index and, for a pair that straddles a chunk boundary, three rotations and three dots of each kind.
4. :func:`_dq_kernel`: one program per ``BLOCK_M`` query rows of one query head, walking the key tiles
   in the forward's phases (inter, successive, intra before the block, the masked diagonal; a general
   per-element path for blocks that straddle a chunk boundary). Queries and keys are read as half tiles
   (``D/2`` columns), each key tile once: the scores are two half dots, and ``dS · K`` accumulates in the
   rotated frame as two half tiles, so the transpose rotation (``x_lo = y_lo cos + y_hi sin``,
   ``x_hi = y_hi cos - y_lo sin``) is elementwise, once per phase.

Tiles (``_configs``) were chosen with ``bench/bench_backward.py --tune`` on an H200. Accumulating ``dq``
inside the dK/dV walk with atomic adds (FlashAttention-2's way: five dots per pair instead of seven) was
tried and was slower there (28.0 against 21.9 ms forward + backward at 16k, Llama-3-8B heads).

Every output element is written by exactly one program: no atomics, the same result every run.
Extra memory: ``lse`` and ``D`` (fp32, ``B · Hq · Tq`` each), the rotated queries (three times the
query's size, for the duration of the backward) and the cos/sin tables; no ``T × T`` buffer. Assumption (what :mod:`chunkllama.patching` produces): within a row, key positions are
``index - offset`` and the queries are the last ``Tq`` keys (positions contiguous too; left padding
negative).

:func:`dca_prefill_trainable` is the differentiable entry point: the custom op
``chunkllama::dca_prefill_train`` (forward kernel with its log-sum-exp) with
``chunkllama::dca_prefill_backward`` registered as its autograd formula (``torch.library``), so it
works eagerly and under ``torch.compile``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_prefill import LOG2E, _query_at, launch_fitting, launch_prefill, rope_tables, tuning_override

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _query_in(q_head, stride_qm, offs_m, row_in, rot_pos, Cos, Sin, attn_scaling, qk_scale,
              DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The forward's rotated, pre-scaled query tile (:func:`.triton_prefill._query_at`, fp32) rounded once to
    ``DTYPE`` for the tensor-core dots of the backward."""
    return _query_at(q_head, stride_qm, offs_m, row_in, rot_pos, Cos, Sin, attn_scaling, qk_scale, HEAD_DIM).to(DTYPE)


@triton.jit
def _delta_kernel(O, DO, Delta, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
                  Tq, num_heads, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """``Delta[b, h, m] = Σ_d O · dO`` in fp32 (contiguous ``(B, H, Tq)``)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < Tq
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=row_in[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :],
                 mask=row_in[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=row_in)


@triton.jit
def _rotate_queries_kernel(Q, QR, QPos, Cos, Sin, stride_qb, stride_qh, stride_qm, stride_rc, stride_rb, stride_rh,
                           stride_qpb, Tq, num_heads, chunk_len, chunk_size, attn_scaling, qk_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """``QR[c, b, h, m] = R(pos_c(m)) q`` for c = intra, successive, inter (:func:`_query_in`, bit for bit)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    DTYPE = QR.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < Tq
    qpos_c = tl.maximum(tl.load(QPos + b * stride_qpb + offs_m, mask=row_in, other=0).to(tl.int32), 0)
    pos_intra = qpos_c % chunk_len
    q_head = Q + b * stride_qb + h * stride_qh
    out = QR + b * stride_rb + h * stride_rh + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = _query_in(q_head, stride_qm, offs_m, row_in, pos_intra, Cos, Sin, attn_scaling, qk_scale, DTYPE, HEAD_DIM)
    tl.store(out, q, mask=row_in[:, None])
    q = _query_in(q_head, stride_qm, offs_m, row_in, tl.minimum(pos_intra + chunk_len, chunk_size), Cos, Sin,
                  attn_scaling, qk_scale, DTYPE, HEAD_DIM)
    tl.store(out + stride_rc, q, mask=row_in[:, None])
    q = _query_in(q_head, stride_qm, offs_m, row_in, tl.zeros_like(pos_intra) + chunk_size, Cos, Sin, attn_scaling,
                  qk_scale, DTYPE, HEAD_DIM)
    tl.store(out + 2 * stride_rc, q, mask=row_in[:, None])


@triton.jit
def _rotated(qr_head, copy, stride_rc, offs_m, row_in, HEAD_DIM: tl.constexpr):
    """Rows ``offs_m`` of rotation ``copy`` (0 intra, 1 successive, 2 inter) from :func:`_rotate_queries_kernel`."""
    offs_d = tl.arange(0, HEAD_DIM)
    return tl.load(qr_head + copy * stride_rc + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_in[:, None],
                   other=0.0)


# --------------------------------------------------------------------------------------------- dK, dV


@triton.jit
def _dkdv_tile_uniform(dk, dv, k, v, q, do, lse2, delta, qpos, kpos, kmask, DTYPE: tl.constexpr):
    """One query tile whose visible pairs with these keys share one rotation (``q``, rotated and pre-scaled)."""
    qk_t = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M), log2 units
    visible = (kpos[:, None] <= qpos[None, :]) & kmask[:, None]
    p_t = tl.math.exp2(tl.where(visible, qk_t, float("-inf")) - lse2[None, :])
    dv = tl.dot(p_t.to(DTYPE), do, dv)
    dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(DTYPE), q, dk)
    return dk, dv


@triton.jit
def _dkdv_tile_mixed(dk, dv, k, v, qr_head, stride_rc, offs_m, row_in, do, lse2, delta, qpos, qc, kpos, kmask,
                     chunk_len, DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One query tile whose pairs with these keys have different chunk relations: three rotations."""
    gap = qc[None, :] - (kpos // chunk_len)[:, None]
    qa = _rotated(qr_head, 0, stride_rc, offs_m, row_in, HEAD_DIM)
    qk_t = tl.dot(k, tl.trans(qa))
    qb = _rotated(qr_head, 1, stride_rc, offs_m, row_in, HEAD_DIM)
    qk_t = tl.where(gap == 1, tl.dot(k, tl.trans(qb)), qk_t)
    qi = _rotated(qr_head, 2, stride_rc, offs_m, row_in, HEAD_DIM)
    qk_t = tl.where(gap >= 2, tl.dot(k, tl.trans(qi)), qk_t)
    visible = (kpos[:, None] <= qpos[None, :]) & kmask[:, None]
    p_t = tl.math.exp2(tl.where(visible, qk_t, float("-inf")) - lse2[None, :])
    dv = tl.dot(p_t.to(DTYPE), do, dv)
    dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(tl.where(gap == 0, ds_t, 0.0).to(DTYPE), qa, dk)
    dk = tl.dot(tl.where(gap == 1, ds_t, 0.0).to(DTYPE), qb, dk)
    dk = tl.dot(tl.where(gap >= 2, ds_t, 0.0).to(DTYPE), qi, dk)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    QR, K, V, DO, DK, DV, Lse, Delta, QPos, KPos,
    stride_rc, stride_rb, stride_rh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_qpb, stride_kpb,
    Tq, Tk, num_q_heads, num_kv_heads, groups, chunk_len,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0)  # key tile: positions t*BLOCK_N .. t*BLOCK_N + BLOCK_N - 1
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    hk = pid_bh % num_kv_heads
    DTYPE = QR.dtype.element_ty
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    koff = (Tk - 1) - tl.load(KPos + b * stride_kpb + Tk - 1).to(tl.int32)  # key index of position 0
    kpos = t * BLOCK_N + offs_n
    kidx = koff + kpos
    kmask = kidx < Tk
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if koff + t * BLOCK_N < Tk:
        k = tl.load(K + b * stride_kb + hk * stride_kh + kidx[:, None] * stride_kn + offs_d[None, :],
                    mask=kmask[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + hk * stride_vh + kidx[:, None] * stride_vn + offs_d[None, :],
                    mask=kmask[:, None], other=0.0)
        ck_lo = (t * BLOCK_N) // chunk_len
        ck_hi = (t * BLOCK_N + BLOCK_N - 1) // chunk_len
        qoff = (Tq - 1) - tl.load(QPos + b * stride_qpb + Tq - 1).to(tl.int32)  # query index of position 0
        m_lo = tl.maximum(t * BLOCK_N + qoff, 0) // BLOCK_M  # first query tile with a row that sees these keys
        m_hi = tl.cdiv(Tq, BLOCK_M)
        for g in range(0, groups):
            h = hk * groups + g
            qr_head = QR + b * stride_rb + h * stride_rh
            do_head = DO + b * stride_dob + h * stride_doh
            row_base = (b * num_q_heads + h) * Tq
            for m in range(m_lo, m_hi):
                offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
                row_in = offs_m < Tq
                qpos = tl.load(QPos + b * stride_qpb + offs_m, mask=row_in, other=-1).to(tl.int32)
                lse2 = tl.load(Lse + row_base + offs_m, mask=row_in, other=float("inf"))
                delta = tl.load(Delta + row_base + offs_m, mask=row_in, other=0.0)
                do = tl.load(do_head + offs_m[:, None] * stride_dom + offs_d[None, :], mask=row_in[:, None], other=0.0)
                qc = tl.maximum(qpos, 0) // chunk_len
                # chunk range of the tile's (non-padding) rows, from the contiguous positions
                cq_lo = tl.maximum(m * BLOCK_M - qoff, 0) // chunk_len
                cq_hi = tl.maximum(tl.minimum(m * BLOCK_M + BLOCK_M - 1, Tq - 1) - qoff, 0) // chunk_len
                gap_lo = cq_lo - ck_hi
                gap_hi = cq_hi - ck_lo
                if (gap_lo == gap_hi) | (gap_lo >= 2):
                    q = _rotated(qr_head, tl.minimum(tl.maximum(gap_lo, 0), 2), stride_rc, offs_m, row_in, HEAD_DIM)
                    dk, dv = _dkdv_tile_uniform(dk, dv, k, v, q, do, lse2, delta, qpos, kpos, kmask, DTYPE)
                else:
                    dk, dv = _dkdv_tile_mixed(dk, dv, k, v, qr_head, stride_rc, offs_m, row_in, do, lse2, delta, qpos,
                                              qc, kpos, kmask, chunk_len, DTYPE, HEAD_DIM)
    # the rotated queries carried qk_scale = scale * log2(e); dK needs scale alone
    dk = dk * (1.0 / 1.4426950408889634)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + kidx[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kmask[:, None])
    tl.store(DV + b * stride_dvb + hk * stride_dvh + kidx[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kmask[:, None])


@triton.jit
def _dkdv_steps(dk, dv, k, v, qr_head, stride_rc, do_head, stride_dom, lse_head, delta_head, qoff, s_lo, s_hi,
                n0, ck, chunk_len, Tq, DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Query tiles ``[s_lo, s_hi)`` (tiles of ``BLOCK_M`` query *positions*, each inside one chunk) against
    the key tile at positions ``n0 ..``, of chunk ``ck``. The tile's rotation is a scalar (its chunk
    minus ``ck``, at most 2), so the loop body is the plain FlashAttention-2 step. ``MASKED``: rows may
    lie outside ``[0, Tq)`` and the causal mask applies (diagonal and edge tiles); otherwise neither."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_r = tl.arange(0, BLOCK_M)
    kpos = n0 + tl.arange(0, BLOCK_N)
    for s in range(s_lo, s_hi):
        qp = s * BLOCK_M + offs_r
        idx = qoff + qp
        copy = tl.minimum((s * BLOCK_M) // chunk_len - ck, 2)
        q_ptrs = qr_head + copy * stride_rc + idx[:, None] * HEAD_DIM + offs_d[None, :]
        do_ptrs = do_head + idx[:, None] * stride_dom + offs_d[None, :]
        if MASKED:
            row_in = (idx >= 0) & (idx < Tq)
            q = tl.load(q_ptrs, mask=row_in[:, None], other=0.0)
            lse2 = tl.load(lse_head + idx, mask=row_in, other=float("inf"))
        else:
            q = tl.load(q_ptrs)
            lse2 = tl.load(lse_head + idx)
        qk_t = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M), log2 units
        if MASKED:
            qk_t = tl.where(kpos[:, None] <= qp[None, :], qk_t, float("-inf"))
        p_t = tl.math.exp2(qk_t - lse2[None, :])
        if MASKED:
            do = tl.load(do_ptrs, mask=row_in[:, None], other=0.0)
            delta = tl.load(delta_head + idx, mask=row_in, other=0.0)
        else:
            do = tl.load(do_ptrs)
            delta = tl.load(delta_head + idx)
        dv = tl.dot(p_t.to(DTYPE), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(DTYPE), q, dk)
    return dk, dv


@triton.jit
def _dkdv_phased_kernel(
    QR, K, V, DO, DK, DV, Lse, Delta, QPos, KPos,
    stride_rc, stride_rb, stride_rh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_qpb, stride_kpb,
    Tq, Tk, num_q_heads, num_kv_heads, groups, chunk_len,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """:func:`_dkdv_kernel` when ``chunk_len`` is a multiple of ``BLOCK_N`` and ``BLOCK_N`` of ``BLOCK_M``:
    query tiles are aligned to positions too, so every (key tile, query tile) pair has one rotation and
    the walk is three loops per query head: masked tiles up to the end of the diagonal (and a partial
    first tile), the unmasked full tiles, and a partial last tile."""
    t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    hk = pid_bh % num_kv_heads
    DTYPE = QR.dtype.element_ty
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    koff = (Tk - 1) - tl.load(KPos + b * stride_kpb + Tk - 1).to(tl.int32)  # key index of position 0
    qoff = (Tq - 1) - tl.load(QPos + b * stride_qpb + Tq - 1).to(tl.int32)  # query index of position 0
    n0 = t * BLOCK_N
    kidx = koff + n0 + offs_n
    kmask = kidx < Tk
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_last = Tq - 1 - qoff  # position of the last query
    if (koff + n0 < Tk) & (q_last >= n0):
        k = tl.load(K + b * stride_kb + hk * stride_kh + kidx[:, None] * stride_kn + offs_d[None, :],
                    mask=kmask[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + hk * stride_vh + kidx[:, None] * stride_vn + offs_d[None, :],
                    mask=kmask[:, None], other=0.0)
        ck = n0 // chunk_len
        first = tl.maximum(n0, -qoff)  # first position with a query row that can see the tile
        s_first = first // BLOCK_M
        s_end = (q_last + BLOCK_M) // BLOCK_M  # one past the tile of the last query
        body_lo = tl.maximum((n0 + BLOCK_N) // BLOCK_M, (first + BLOCK_M - 1) // BLOCK_M)
        body_hi = tl.maximum((q_last + 1) // BLOCK_M, body_lo)  # full tiles only
        head_hi = tl.minimum(body_lo, s_end)
        tail_lo = tl.maximum(body_hi, head_hi)
        for g in range(0, groups):
            h = hk * groups + g
            qr_head = QR + b * stride_rb + h * stride_rh
            do_head = DO + b * stride_dob + h * stride_doh
            row_base = (b * num_q_heads + h) * Tq
            dk, dv = _dkdv_steps(dk, dv, k, v, qr_head, stride_rc, do_head, stride_dom, Lse + row_base,
                                 Delta + row_base, qoff, s_first, head_hi, n0, ck, chunk_len, Tq, DTYPE, HEAD_DIM,
                                 BLOCK_M, BLOCK_N, True)
            dk, dv = _dkdv_steps(dk, dv, k, v, qr_head, stride_rc, do_head, stride_dom, Lse + row_base,
                                 Delta + row_base, qoff, body_lo, body_hi, n0, ck, chunk_len, Tq, DTYPE, HEAD_DIM,
                                 BLOCK_M, BLOCK_N, False)
            dk, dv = _dkdv_steps(dk, dv, k, v, qr_head, stride_rc, do_head, stride_dom, Lse + row_base,
                                 Delta + row_base, qoff, tail_lo, s_end, n0, ck, chunk_len, Tq, DTYPE, HEAD_DIM,
                                 BLOCK_M, BLOCK_N, True)
    dk = dk * (1.0 / 1.4426950408889634)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + kidx[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kmask[:, None])
    tl.store(DV + b * stride_dvb + hk * stride_dvh + kidx[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kmask[:, None])


# ------------------------------------------------------------------------------------------------- dQ


@triton.jit
def _unrotate_add(dq_lo, dq_hi, acc_lo, acc_hi, rot_pos, Cos, Sin, HALF: tl.constexpr):
    """``dq += R(rot_pos)ᵀ acc`` with ``acc`` and ``dq`` as (low, high) half tiles ``(BLOCK_M, D/2)``."""
    t_off = rot_pos[:, None] * HALF + tl.arange(0, HALF)[None, :]
    cos = tl.load(Cos + t_off)
    sin = tl.load(Sin + t_off)
    return dq_lo + acc_lo * cos + acc_hi * sin, dq_hi + acc_hi * cos - acc_lo * sin


@triton.jit
def _dq_phase(dq_lo, dq_hi, qr_head, copy, stride_rc, offs_m, row_in, rot_pos, do, lse2, delta, qpos, k_base,
              v_base, stride_kn, stride_vn, koff, t_lo, t_hi, Tk, Cos, Sin, DTYPE: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Key tiles ``[t_lo, t_hi)`` that every row scores with rotation ``copy`` (at ``rot_pos``):
    ``dq += R(rot_pos)ᵀ Σ dS · K``. Queries and keys are taken as (low, high) half tiles ``(·, D/2)``,
    each key tile loaded once: the scores are two half dots, and ``dS · K`` stays in halves, so the
    transpose rotation at the end is elementwise. ``MASKED``: the causal mask and the key bound apply
    (diagonal tiles); otherwise every key is visible to every row (rows without keys have ``lse = +inf``)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_rows = qr_head + copy * stride_rc + offs_m[:, None] * HEAD_DIM
    q_lo = tl.load(q_rows + offs_h[None, :], mask=row_in[:, None], other=0.0)
    q_hi = tl.load(q_rows + HALF + offs_h[None, :], mask=row_in[:, None], other=0.0)
    acc_lo = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    for t in range(t_lo, t_hi):
        kpos = t * BLOCK_N + offs_n
        kidx = koff + kpos
        k_rows = k_base + kidx[:, None] * stride_kn
        v_rows = v_base + kidx[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            kmask = kidx < Tk
            k_lo = tl.load(k_rows + offs_h[None, :], mask=kmask[:, None], other=0.0)
            k_hi = tl.load(k_rows + HALF + offs_h[None, :], mask=kmask[:, None], other=0.0)
        else:
            k_lo = tl.load(k_rows + offs_h[None, :])
            k_hi = tl.load(k_rows + HALF + offs_h[None, :])
        qk = tl.dot(q_hi, tl.trans(k_hi), tl.dot(q_lo, tl.trans(k_lo)))
        if MASKED:
            qk = tl.where((kpos[None, :] <= qpos[:, None]) & kmask[None, :], qk, float("-inf"))
            v = tl.load(v_rows, mask=kmask[:, None], other=0.0)
        else:
            v = tl.load(v_rows)
        p = tl.math.exp2(qk - lse2[:, None])
        ds = (p * (tl.dot(do, tl.trans(v)) - delta[:, None])).to(DTYPE)
        acc_lo = tl.dot(ds, k_lo, acc_lo)
        acc_hi = tl.dot(ds, k_hi, acc_hi)
    return _unrotate_add(dq_lo, dq_hi, acc_lo, acc_hi, rot_pos, Cos, Sin, HALF)


@triton.jit
def _dq_part(dq_lo, dq_hi, ds, pick, k_lo, k_hi, rot_pos, Cos, Sin, DTYPE: tl.constexpr, HALF: tl.constexpr):
    """The pairs ``pick`` of one general tile: ``dq += R(rot_pos)ᵀ (dS[pick] · K)``."""
    part = tl.where(pick, ds, 0.0).to(DTYPE)
    return _unrotate_add(dq_lo, dq_hi, tl.dot(part, k_lo), tl.dot(part, k_hi), rot_pos, Cos, Sin, HALF)


@triton.jit
def _dq_kernel(
    QR, K, V, DO, DQ, Lse, Delta, QPos, KPos, Cos, Sin,
    stride_rc, stride_rb, stride_rh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_qpb, stride_kpb,
    Tq, Tk, num_q_heads, groups, chunk_len, chunk_size, dq_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    num_m = tl.cdiv(Tq, BLOCK_M)
    start_m = num_m - 1 - tl.program_id(0)  # heaviest (latest) query blocks first
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_q_heads).to(tl.int64)
    h = pid_bh % num_q_heads
    hk = h // groups
    DTYPE = QR.dtype.element_ty

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_h = tl.arange(0, HALF)
    row_in = offs_m < Tq
    qpos = tl.load(QPos + b * stride_qpb + offs_m, mask=row_in, other=-1).to(tl.int32)
    row_valid = qpos >= 0
    q_hi = tl.max(qpos, 0)
    q_lo = tl.min(tl.where(row_valid, qpos, q_hi), 0)
    koff = (Tk - 1) - tl.load(KPos + b * stride_kpb + Tk - 1).to(tl.int32)

    qr_head = QR + b * stride_rb + h * stride_rh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    row_base = pid_bh.to(tl.int64) * Tq
    lse2 = tl.load(Lse + row_base + offs_m, mask=row_in, other=float("inf"))
    delta = tl.load(Delta + row_base + offs_m, mask=row_in, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=row_in[:, None], other=0.0)

    qpos_c = tl.maximum(qpos, 0)
    pos_intra = qpos_c % chunk_len
    pos_succ = tl.minimum(pos_intra + chunk_len, chunk_size)
    pos_inter = tl.zeros_like(pos_intra) + chunk_size

    dq_lo = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    dq_hi = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    if q_hi >= 0:
        c_lo = q_lo // chunk_len
        c_hi = q_hi // chunk_len
        inter_end = (tl.maximum(c_lo - 1, 0) * chunk_len) // BLOCK_N  # tiles inside chunks <= c_lo - 2
        if inter_end > 0:
            dq_lo, dq_hi = _dq_phase(dq_lo, dq_hi, qr_head, 2, stride_rc, offs_m, row_in, pos_inter, do, lse2, delta,
                                     qpos, k_base, v_base, stride_kn, stride_vn, koff, 0, inter_end, Tk, Cos, Sin,
                                     DTYPE, HEAD_DIM, BLOCK_M, BLOCK_N, False)
        last_tile = q_hi // BLOCK_N + 1
        if (c_lo == c_hi) & (chunk_len % BLOCK_N == 0):
            tiles_per_chunk = chunk_len // BLOCK_N
            succ_lo = tl.maximum(c_lo - 1, 0) * tiles_per_chunk
            intra_lo = c_lo * tiles_per_chunk
            diag_lo = tl.maximum((q_lo + 1) // BLOCK_N, intra_lo)  # tiles before it: visible to every row
            if intra_lo > succ_lo:
                dq_lo, dq_hi = _dq_phase(dq_lo, dq_hi, qr_head, 1, stride_rc, offs_m, row_in, pos_succ, do, lse2,
                                         delta, qpos, k_base, v_base, stride_kn, stride_vn, koff, succ_lo, intra_lo,
                                         Tk, Cos, Sin, DTYPE, HEAD_DIM, BLOCK_M, BLOCK_N, False)
            dq_lo, dq_hi = _dq_phase(dq_lo, dq_hi, qr_head, 0, stride_rc, offs_m, row_in, pos_intra, do, lse2, delta,
                                     qpos, k_base, v_base, stride_kn, stride_vn, koff, intra_lo, diag_lo, Tk, Cos,
                                     Sin, DTYPE, HEAD_DIM, BLOCK_M, BLOCK_N, False)
            dq_lo, dq_hi = _dq_phase(dq_lo, dq_hi, qr_head, 0, stride_rc, offs_m, row_in, pos_intra, do, lse2, delta,
                                     qpos, k_base, v_base, stride_kn, stride_vn, koff, diag_lo, last_tile, Tk, Cos,
                                     Sin, DTYPE, HEAD_DIM, BLOCK_M, BLOCK_N, True)
        else:
            # General tiles: per-element chunk relation, three rotations, each part rotated back.
            qc = qpos_c // chunk_len
            for t in range(inter_end, last_tile):
                kpos = t * BLOCK_N + offs_n
                kidx = koff + kpos
                kmask = kidx < Tk
                k_t = tl.load(k_base + kidx[None, :] * stride_kn + offs_d[:, None], mask=kmask[None, :], other=0.0)
                gap = qc[:, None] - (kpos // chunk_len)[None, :]
                qa = _rotated(qr_head, 0, stride_rc, offs_m, row_in, HEAD_DIM)
                qk = tl.dot(qa, k_t)
                qb = _rotated(qr_head, 1, stride_rc, offs_m, row_in, HEAD_DIM)
                qk = tl.where(gap == 1, tl.dot(qb, k_t), qk)
                qi = _rotated(qr_head, 2, stride_rc, offs_m, row_in, HEAD_DIM)
                qk = tl.where(gap >= 2, tl.dot(qi, k_t), qk)
                visible = (kpos[None, :] <= qpos[:, None]) & kmask[None, :]
                p = tl.math.exp2(tl.where(visible, qk, float("-inf")) - lse2[:, None])
                v_t = tl.load(v_base + kidx[None, :] * stride_vn + offs_d[:, None], mask=kmask[None, :], other=0.0)
                ds = p * (tl.dot(do, v_t) - delta[:, None])
                k_rows = k_base + kidx[:, None] * stride_kn
                k_lo = tl.load(k_rows + offs_h[None, :], mask=kmask[:, None], other=0.0)
                k_hi = tl.load(k_rows + HALF + offs_h[None, :], mask=kmask[:, None], other=0.0)
                dq_lo, dq_hi = _dq_part(dq_lo, dq_hi, ds, gap == 0, k_lo, k_hi, pos_intra, Cos, Sin, DTYPE, HALF)
                dq_lo, dq_hi = _dq_part(dq_lo, dq_hi, ds, gap == 1, k_lo, k_hi, pos_succ, Cos, Sin, DTYPE, HALF)
                dq_lo, dq_hi = _dq_part(dq_lo, dq_hi, ds, gap >= 2, k_lo, k_hi, pos_inter, Cos, Sin, DTYPE, HALF)

    dq_rows = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm
    out_dtype = DQ.dtype.element_ty
    tl.store(dq_rows + offs_h[None, :], (dq_lo * dq_scale).to(out_dtype), mask=row_in[:, None])
    tl.store(dq_rows + HALF + offs_h[None, :], (dq_hi * dq_scale).to(out_dtype), mask=row_in[:, None])


# ------------------------------------------------------------------------------------------ launchers


def _configs(head_dim: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of the dK/dV kernel and of the dQ kernel."""
    dkdv = tuning_override("CHUNKLLAMA_BWD_DKDV_CONFIG", 4)
    dq = tuning_override("CHUNKLLAMA_BWD_DQ_CONFIG", 4)
    if _INTERPRET:
        return dkdv or (16, 16, 1, 1), dq or (16, 16, 1, 1)
    # bench/bench_backward.py --tune (bench/results/backward_tune_h200*.log): H200, bf16
    if head_dim <= 64:
        return dkdv or (64, 64, 4, 3), dq or (64, 64, 4, 3)
    return dkdv or (64, 128, 8, 3), dq or (128, 64, 8, 3)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def dca_prefill_backward(
    d_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor,
    inv_freq: torch.Tensor, attn_scaling: float, chunk_len: int, chunk_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`~.triton_prefill.dca_prefill` w.r.t. ``query`` (unrotated), ``key`` (as passed:
    rotated) and ``value``.

    Args:
        d_out: ``(B, Hq, Tq, D)``, any strides with a contiguous last dim (made so otherwise).
        query, key, value, positions, inv_freq, attn_scaling, chunk_len, chunk_size, scale: the forward's.
        out: the forward's output; lse: its fp32 ``(B, Hq, Tq)`` contiguous log2-domain log-sum-exp
            (:func:`~.triton_prefill.launch_prefill` with ``return_lse=True``).
    Returns:
        ``(dq, dk, dv)`` shaped and typed like ``query``, ``key``, ``value``; ``dk``/``dv`` are 0 at padding keys.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    d_out = _last_dim_contiguous(d_out)
    delta = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=query.device)
    cos_table, sin_table = rope_tables(inv_freq, chunk_size)
    dkdv_config, dq_config = _configs(head_dim)
    block_d = 16 if _INTERPRET else 64
    _delta_kernel[(triton.cdiv(q_len, block_d), batch * q_heads)](
        out, d_out, delta, out.stride(0), out.stride(1), out.stride(2),
        d_out.stride(0), d_out.stride(1), d_out.stride(2), q_len, q_heads,
        HEAD_DIM=head_dim, BLOCK_M=block_d, num_warps=1 if _INTERPRET else 4,
    )
    # the three rotations of every query, once (rows past Tq are never read)
    q_rot = torch.empty(3, batch, q_heads, q_len, head_dim, dtype=query.dtype, device=query.device)
    rc, rb, rh = q_rot.stride(0), q_rot.stride(1), q_rot.stride(2)
    _rotate_queries_kernel[(triton.cdiv(q_len, block_d), batch * q_heads)](
        query, q_rot, query_positions, cos_table, sin_table, query.stride(0), query.stride(1), query.stride(2),
        rc, rb, rh, query_positions.stride(0), q_len, q_heads, chunk_len, chunk_size, float(attn_scaling),
        float(scale * LOG2E), HEAD_DIM=head_dim, BLOCK_M=block_d, num_warps=1 if _INTERPRET else 4,
    )
    dq = torch.empty_like(query)
    dk = torch.zeros_like(key)  # padding keys (negative positions) are never visited: their gradient is 0
    dv = torch.zeros_like(value)

    def launch_dkdv(config: tuple[int, int, int, int]) -> None:
        bm1, bn1, w1, s1 = config
        common = (
            rc, rb, rh,
            key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2),
            d_out.stride(0), d_out.stride(1), d_out.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            query_positions.stride(0), key_positions.stride(0),
            q_len, kv_len, q_heads, kv_heads, q_heads // kv_heads, chunk_len,
        )
        grid = (triton.cdiv(kv_len, bn1), batch * kv_heads)
        meta = {"HEAD_DIM": head_dim, "BLOCK_M": bm1, "BLOCK_N": bn1, "num_warps": w1, "num_stages": s1}
        if chunk_len % bn1 == 0 and bn1 % bm1 == 0:  # query tiles by position: one rotation per tile pair
            _dkdv_phased_kernel[grid](q_rot, key, value, d_out, dk, dv, lse, delta, query_positions, key_positions,
                                      *common, **meta)
        else:
            _dkdv_kernel[grid](q_rot, key, value, d_out, dk, dv, lse, delta, query_positions, key_positions, *common,
                               **meta)

    def launch_dq(config: tuple[int, int, int, int]) -> None:
        bm2, bn2, w2, s2 = config
        _dq_kernel[(triton.cdiv(q_len, bm2), batch * q_heads)](
            q_rot, key, value, d_out, dq, lse, delta, query_positions, key_positions, cos_table, sin_table,
            rc, rb, rh,
            key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2),
            d_out.stride(0), d_out.stride(1), d_out.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            query_positions.stride(0), key_positions.stride(0),
            q_len, kv_len, q_heads, q_heads // kv_heads, chunk_len, chunk_size, float(scale * attn_scaling),
            HEAD_DIM=head_dim, BLOCK_M=bm2, BLOCK_N=bn2, num_warps=w2, num_stages=s2,
        )

    # smaller tiles where the defaults (sized for 2-byte inputs) run out of shared memory, e.g. fp32
    launch_fitting(launch_dkdv, dkdv_config)
    launch_fitting(launch_dq, dq_config)
    return dq, dk, dv


# ------------------------------------------------------------------------------- custom ops + autograd


def _train_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    query_positions: torch.Tensor, key_positions: torch.Tensor,
    inv_freq: torch.Tensor, attn_scaling: float, chunk_len: int, chunk_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = launch_prefill(query, key, value, query_positions, key_positions, inv_freq, attn_scaling, chunk_len,
                              chunk_size, scale, return_lse=True)
    return out, lse


_train_op = torch.library.custom_op("chunkllama::dca_prefill_train", _train_forward, mutates_args=())


@_train_op.register_fake
def _(query, key, value, query_positions, key_positions, inv_freq, attn_scaling, chunk_len, chunk_size, scale):
    batch, q_heads, q_len, head_dim = query.shape
    out = query.new_empty(batch, q_len, q_heads, head_dim).transpose(1, 2)
    return out, query.new_empty(batch, q_heads, q_len, dtype=torch.float32)


_backward_op = torch.library.custom_op("chunkllama::dca_prefill_backward", dca_prefill_backward, mutates_args=())


@_backward_op.register_fake
def _(d_out, query, key, value, out, lse, query_positions, key_positions, inv_freq, attn_scaling, chunk_len,
      chunk_size, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, query_positions, key_positions, inv_freq, attn_scaling, chunk_len, chunk_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, query_positions, key_positions, inv_freq)
    ctx.numbers = (attn_scaling, chunk_len, chunk_size, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, d_out, d_lse):
    query, key, value, out, lse, query_positions, key_positions, inv_freq = ctx.saved_tensors
    if d_out is None:
        d_out = torch.zeros_like(out)
    dq, dk, dv = _backward_op(d_out, query, key, value, out, lse, query_positions, key_positions, inv_freq,
                              *ctx.numbers)
    return dq, dk, dv, None, None, None, None, None, None, None


_train_op.register_autograd(_backward, setup_context=_setup_context)


def dca_prefill_trainable(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    query_positions: torch.Tensor, key_positions: torch.Tensor,
    inv_freq: torch.Tensor, attn_scaling: float, chunk_len: int, chunk_size: int, scale: float,
) -> torch.Tensor:
    """:func:`~.triton_prefill.dca_prefill` with a backward (fused kernels, see the module docstring).

    Same arguments and output; ``loss.backward()`` through the output gives ``query``, ``key`` and
    ``value`` their gradients. The forward also writes the fp32 log-sum-exp (``B · Hq · Tq · 4`` bytes),
    saved for the backward with the inputs and the output.
    """
    head_dim = query.shape[-1]
    if head_dim not in (64, 128) or value.shape[-1] != head_dim:
        raise ValueError(f"dca_prefill needs head_dim 64 or 128 for query and value; got {head_dim}, {value.shape[-1]}.")
    query, key, value = (_last_dim_contiguous(x) for x in (query, key, value))
    return _train_op(query, key, value, query_positions.contiguous(), key_positions.contiguous(), inv_freq,
                     attn_scaling, chunk_len, chunk_size, scale)[0]


__all__ = ["dca_prefill_backward", "dca_prefill_trainable"]
