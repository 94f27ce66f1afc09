"""Dual Chunk Attention for a few query tokens against a long cache (Triton, split-K / flash-decoding).

Shapes follow HF: ``query (B, Hq, Tq, D)`` (unrotated, ``Tq`` small), ``key``/``value`` ``(B, Hk, Tk, D)``
with keys rotated at ``p % chunk_len``.

Pass 1 (``_dca_decode_split_kernel``), grid ``(B * Hk, splits)``: one program packs the ``groups * Tq``
query rows that share one KV head (GQA: K/V are read once per KV head, never repeated), keeps the
three rotations of those rows in registers (each as a high and a low part: the query keeps fp32
precision through the score dots) and walks its share of the visible key tiles. Tiles
wholly in chunks ``<= c-2`` take one dot (inter rotation); tiles near the query's chunk take one dot
per rotation and pick per element. P·V takes the softmax weights as bf16 high + low parts too (two
dots; ``CHUNKLLAMA_DECODE_PSPLIT=0`` rounds them once): the reference path decodes in fp32, and one
rounding of the weights put the kernel at 1.36x its error on an H200 (the 1.2x rule of issue 16).
It writes its normalised partial output and log2-sum-exp in fp32.
Pass 2 (``_dca_decode_merge_kernel``), grid ``(B * Hk, groups * Tq)``: merges the splits by
log-sum-exp in fp32 and writes ``out`` in the input dtype.

Merging inside pass 1 instead (the last split program of a head merges, found through an atomic
counter) saves one launch on the host but was measured slower on the GPU (H100, 16k cache: 60 us vs
47 us per step in CUDA-graph replays): one program merging serially is the tail of the step.

Same position assumption as :mod:`.triton_prefill` (keys ``index - offset`` per row).
Extra memory: ``B * Hk * splits * rows * (D + 1)`` fp32 (rows = ``groups * Tq`` padded to >= 16).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .triton_fp8 import _load_kv, check_kv, kernel_kv
from .triton_launch import CachedLaunch
from .triton_prefill import LOG2E, tuning_override

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rotated_query(q_ptrs, q_sw_ptrs, row_mask, rot_pos, inv_freq, sign, attn_scaling, qk_scale, DTYPE: tl.constexpr):
    """Load the query tile and rotate it at per-row positions ``rot_pos``, pre-scaled by ``qk_scale``.

    Returned as two tiles in ``DTYPE`` whose sum is the fp32 rotation to ~16 significant bits
    (``hi`` rounded, ``lo`` the rounding error): the scores take one dot of each, so the query
    loses no precision to the low-precision dot (the reference path's rotated query is one
    bf16 tensor). Decode is bound by reading K/V, so the second dot should cost little; not yet
    timed on a GPU (``CHUNKLLAMA_DECODE_QSPLIT=0`` restores the single dot for A/B runs).
    """
    q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0).to(tl.float32)
    q_sw = tl.load(q_sw_ptrs, mask=row_mask[:, None], other=0.0).to(tl.float32)
    angle = rot_pos.to(tl.float32)[:, None] * inv_freq[None, :]
    cos = tl.cos(angle) * attn_scaling
    sin = tl.sin(angle) * attn_scaling
    rotated = (q * cos + sign[None, :] * q_sw * sin) * qk_scale
    hi = rotated.to(DTYPE)
    return hi, (rotated - hi.to(tl.float32)).to(DTYPE)


@triton.jit
def _scores(q_hi, q_lo, k, QSPLIT: tl.constexpr):
    """``(q_hi + q_lo) @ k`` in fp32 (two low-precision dots into one accumulator); ``q_hi @ k`` without ``QSPLIT``."""
    qk = tl.dot(q_hi, k)
    if QSPLIT:
        qk = tl.dot(q_lo, k, qk)
    return qk


@triton.jit
def _weighted_values(p, v, DTYPE: tl.constexpr, PSPLIT: tl.constexpr):
    """``p @ v`` in fp32 for fp32 weights ``p``: with ``PSPLIT`` as ``p_hi @ v + p_lo @ v`` (``p`` split
    into ``DTYPE`` parts, so the weights keep ~16 bits), else one dot of ``p`` rounded to ``DTYPE``."""
    p_hi = p.to(DTYPE)
    pv = tl.dot(p_hi, v)
    if PSPLIT:
        pv = tl.dot((p - p_hi.to(tl.float32)).to(DTYPE), v, pv)
    return pv


@triton.jit(do_not_specialize=["Tk"])  # the cache grows by a token per step: one compiled kernel for all lengths
def _dca_decode_split_kernel(
    Q, K, V, KS, VS, OPart, LPart, QPos, KPos, InvFreq,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    Tq, Tk, num_kv_heads, groups, chunk_len, chunk_size, attn_scaling, qk_scale,
    SPLITS, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QSPLIT: tl.constexpr,
    PSPLIT: tl.constexpr, FP8: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    hk = pid_bh % num_kv_heads
    DTYPE = Q.dtype.element_ty
    HALF: tl.constexpr = HEAD_DIM // 2

    rows = tl.arange(0, BLOCK_M)
    g = rows // Tq
    tok = rows % Tq
    row_in = rows < groups * Tq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    qpos = tl.load(QPos + b * Tq + tok, mask=row_in, other=-1).to(tl.int32)
    q_hi = tl.max(qpos, 0)
    q_lo = tl.min(tl.where(qpos >= 0, qpos, q_hi), 0)
    koff = (Tk - 1) - tl.load(KPos + b * Tk + Tk - 1).to(tl.int32)

    sw_d = (offs_d + HALF) % HEAD_DIM
    sign = tl.where(offs_d < HALF, -1.0, 1.0)
    inv_freq = tl.load(InvFreq + offs_d % HALF)
    q_base = Q + b * stride_qb + (hk * groups + g)[:, None] * stride_qh + tok[:, None] * stride_qm
    q_ptrs = q_base + offs_d[None, :]
    q_sw_ptrs = q_base + sw_d[None, :]
    qpos_c = tl.maximum(qpos, 0)
    in_chunk = qpos_c % chunk_len
    qa_hi, qa_lo = _rotated_query(q_ptrs, q_sw_ptrs, row_in, in_chunk, inv_freq, sign, attn_scaling, qk_scale, DTYPE)
    qb_hi, qb_lo = _rotated_query(q_ptrs, q_sw_ptrs, row_in, tl.minimum(in_chunk + chunk_len, chunk_size), inv_freq,
                                  sign, attn_scaling, qk_scale, DTYPE)
    qi_hi, qi_lo = _rotated_query(q_ptrs, q_sw_ptrs, row_in, tl.zeros_like(in_chunk) + chunk_size, inv_freq, sign,
                                  attn_scaling, qk_scale, DTYPE)
    qc = qpos_c // chunk_len
    c_lo = tl.maximum(q_lo, 0) // chunk_len

    if FP8:  # packed rows: strides in rows of D + 4 bytes; KS/VS are the fp32 views (scale at D/4)
        k_row0 = b * stride_kb + hk * stride_kh
        v_row0 = b * stride_vb + hk * stride_vh
        k_base = K + k_row0 * (HEAD_DIM + 4)
        v_base = V + v_row0 * (HEAD_DIM + 4)
        ks_base = KS + k_row0 * ((HEAD_DIM + 4) // 4) + HEAD_DIM // 4
        vs_base = VS + v_row0 * ((HEAD_DIM + 4) // 4) + HEAD_DIM // 4
    else:
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        ks_base = KS
        vs_base = VS
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_tiles = (tl.maximum(q_hi, -1) + BLOCK_N) // BLOCK_N  # 0 when every row is padding
    per_split = tl.cdiv(n_tiles, SPLITS)
    t_lo = split * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)
    inter_pos_end = (c_lo - 1) * chunk_len  # keys below this position are inter for every row
    for t in range(t_lo, t_hi):
        kpos = t * BLOCK_N + offs_n
        kidx = koff + kpos
        kmask = kidx < Tk
        k, v, k_scale, v_scale = _load_kv(k_base, v_base, ks_base, vs_base, stride_kn, stride_vn, kidx, kmask, offs_d,
                                          DTYPE, HEAD_DIM, FP8, True)
        if (t + 1) * BLOCK_N <= inter_pos_end:
            qk = _scores(qi_hi, qi_lo, k, QSPLIT)
        else:
            gap = qc[:, None] - (kpos // chunk_len)[None, :]
            qk = _scores(qa_hi, qa_lo, k, QSPLIT)
            qk = tl.where(gap == 1, _scores(qb_hi, qb_lo, k, QSPLIT), qk)
            qk = tl.where(gap >= 2, _scores(qi_hi, qi_lo, k, QSPLIT), qk)
        if FP8:
            qk = qk * k_scale[None, :]
        visible = (kpos[None, :] <= qpos[:, None]) & kmask[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8:
            p = p * v_scale[None, :]  # each key's value scale on its column of P (the normaliser summed P)
        acc = acc * alpha[:, None] + _weighted_values(p, v, DTYPE, PSPLIT)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    part = (pid_bh * SPLITS + split) * BLOCK_M + rows
    tl.store(OPart + part[:, None] * HEAD_DIM + offs_d[None, :], out)
    tl.store(LPart + part, lse)


@triton.jit
def _dca_decode_merge_kernel(
    OPart, LPart, Out, QPos,
    stride_ob, stride_oh, stride_om,
    Tq, num_kv_heads, groups,
    SPLITS, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per (batch, KV head, packed row): all splits of that row, ``BLOCK_S`` at a time."""
    pid_bh = tl.program_id(0)
    row = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    hk = pid_bh % num_kv_heads
    g = row // Tq
    tok = row % Tq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    base = pid_bh * SPLITS * BLOCK_M + row  # split s of this row: base + s * BLOCK_M
    m = tl.max(tl.full([BLOCK_S], float("-inf"), dtype=tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_S], dtype=tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        in_s = s0 + offs_s < SPLITS
        part = base + (s0 + offs_s) * BLOCK_M
        lse = tl.load(LPart + part, mask=in_s, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.math.exp2(lse - m_safe)
        alpha = tl.math.exp2(m - m_safe)
        o = tl.load(OPart + part[:, None] * HEAD_DIM + offs_d[None, :], mask=(in_s & (w > 0))[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        l_i = l_i * alpha + tl.sum(w, 0)
        m = m_new
    qpos = tl.load(QPos + b * Tq + tok)
    keep = (l_i > 0) & (qpos >= 0)
    out = tl.where(keep, acc / tl.where(keep, l_i, 1.0), 0.0)
    tl.store(Out + b * stride_ob + (hk * groups + g) * stride_oh + tok * stride_om + offs_d,
             out.to(Out.dtype.element_ty))


_SPLIT_PASS = CachedLaunch(_dca_decode_split_kernel)
_MERGE_PASS = CachedLaunch(_dca_decode_merge_kernel)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


LONG_CACHE = 98_304  # cache length from which the split pass runs 4 warps instead of 8


def _decode_config(kv_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, num_warps, num_stages, programs per SM) of the split pass for a cache of ``kv_len`` keys.

    From ``bench_attention.py --tune-decode`` on an H200 (graph replays, Llama-3-8B shapes,
    ``results/attention_decode_h200*.md``): 64-key tiles in 3 stages beat the H100's 128 x 2 at every
    length (16k 43 vs 51 us, 128k 189 vs 222 us); 4 warps win from ~128k (169 us) and lose below.
    """
    override = tuning_override("CHUNKLLAMA_DECODE_CONFIG", 4)  # "BN,warps,stages,programs_per_sm"
    if override:  # also under the interpreter, where the tests run the GPU's 64-key tiles this way
        return override
    if _INTERPRET:
        return 16, 1, 1, 1
    return 64, 8 if kv_len < LONG_CACHE else 4, 3, 2


def query_split() -> bool:
    """Whether the score dots take each rotated query as bf16 ``hi + lo`` (default) or as one rounded tile
    (``CHUNKLLAMA_DECODE_QSPLIT=0``: the kernel as it was before the split, e.g. for A/B timing)."""
    return os.environ.get("CHUNKLLAMA_DECODE_QSPLIT", "1") != "0"


def weight_split() -> bool:
    """Whether P·V takes the softmax weights as bf16 ``hi + lo`` (default) or rounded once
    (``CHUNKLLAMA_DECODE_PSPLIT=0``). The reference path decodes in fp32 throughout (its static path),
    so one rounding of the weights is the decode kernel's largest error term above the output's own
    rounding (``bench/emulate_rounding.py``, decode table); the second dot is cheap where the K/V read
    bounds the step."""
    return os.environ.get("CHUNKLLAMA_DECODE_PSPLIT", "1") != "0"


def decode_rows(q_heads: int, kv_heads: int, q_len: int) -> int:
    """Packed query rows per KV head (``groups * Tq``) rounded up to a power of two, at least 16."""
    return max(16, 1 << ((q_heads // kv_heads) * q_len - 1).bit_length())


def _launch(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    query_positions: torch.Tensor, key_positions: torch.Tensor,
    inv_freq: torch.Tensor, attn_scaling: float, chunk_len: int, chunk_size: int, scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """Body of :func:`dca_decode` (inputs checked and converted), also the custom op's."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    block_m = decode_rows(q_heads, kv_heads, q_len)
    block_n, warps, stages, per_sm = _decode_config(kv_len)
    device = query.device
    if splits is None:
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 4
        want = -(-per_sm * sms // (batch * kv_heads))
        splits = max(1, min(want, -(-kv_len // (2 * block_n)), 256))
    o_part = torch.empty(batch * kv_heads * splits * block_m, head_dim, dtype=torch.float32, device=device)
    l_part = torch.empty(batch * kv_heads * splits * block_m, dtype=torch.float32, device=device)
    out = torch.empty(batch, q_len, q_heads, head_dim, dtype=query.dtype, device=device).transpose(1, 2)
    sq, so = query.stride(), out.stride()
    groups = q_heads // kv_heads
    k, v, ks, vs, skb, skh, skn, svb, svh, svn, fp8 = kernel_kv(key, value)
    _SPLIT_PASS.launch(
        (batch * kv_heads, splits), query, k, v, ks, vs, o_part, l_part, query_positions, key_positions, inv_freq,
        sq[0], sq[1], sq[2], skb, skh, skn, svb, svh, svn,
        q_len, kv_len, kv_heads, groups, chunk_len, chunk_size, float(attn_scaling), float(scale * LOG2E),
        splits, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, QSPLIT=query_split(),
        PSPLIT=weight_split(), FP8=fp8, num_warps=warps, num_stages=stages,
    )
    _MERGE_PASS.launch(
        (batch * kv_heads, groups * q_len), o_part, l_part, out, query_positions, so[0], so[1], so[2], q_len, kv_heads, groups,
        splits, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_S=16 if _INTERPRET else 32, num_warps=1 if _INTERPRET else 4,
    )
    return out


_decode_op = torch.library.custom_op("chunkllama::dca_decode", _launch, mutates_args=())


@_decode_op.register_fake
def _(query, key, value, query_positions, key_positions, inv_freq, attn_scaling, chunk_len, chunk_size, scale,
      splits=None):
    batch, q_heads, q_len, head_dim = query.shape
    return query.new_empty(batch, q_len, q_heads, head_dim).transpose(1, 2)


def dca_decode(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    query_positions: torch.Tensor, key_positions: torch.Tensor,
    inv_freq: torch.Tensor, attn_scaling: float, chunk_len: int, chunk_size: int, scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """Launch split-K decode + merge. Shapes as :func:`chunkllama.attention.dca_attention`; returns ``out``
    (``(B, Hq, Tq, D)`` laid out as ``(B, Tq, Hq, D)`` in memory).

    ``query_positions``/``key_positions`` must be int64 on the device of ``query``, ``inv_freq``
    fp32 there too (:func:`chunkllama.attention.triton_dispatch.launch` sees to it). Under
    ``torch.compile`` this is the custom op ``chunkllama::dca_decode`` (fake implementation
    registered, so the graph does not break); eagerly the launcher runs directly, without the
    dispatcher's round trip.
    """
    check_kv(query, key, value, "dca_decode")
    if not query_positions.is_contiguous():
        query_positions = query_positions.contiguous()
    if not key_positions.is_contiguous():
        key_positions = key_positions.contiguous()
    if torch.compiler.is_compiling():
        return _decode_op(query, key, value, query_positions, key_positions, inv_freq, attn_scaling, chunk_len,
                          chunk_size, scale, splits)
    return _launch(query, key, value, query_positions, key_positions, inv_freq, attn_scaling, chunk_len,
                   chunk_size, scale, splits)
