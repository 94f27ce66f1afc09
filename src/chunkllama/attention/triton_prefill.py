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

**Query split** (``QSPLIT``, :func:`query_split`): the rotated query is fp32 in registers; rounded once
to bf16 for the score dots, its rounding error moves a large score (a sink key) by ~1% of its weight,
the one error term the kernel had above the output's own rounding (``bench/emulate_rounding.py``).
With the split the query is ``hi + lo`` (both bf16, ``lo`` the rounding error of ``hi``), scored as two
dots into one fp32 accumulator, and the kernel's error is the output-rounding floor (tests:
``tests/attention/test_triton_precision.py``). ``lo`` is staged like ``hi``, through a scratch tensor
laid out as ``out`` (one more query-sized tensor while the kernel runs). Cost: a third dot per key
tile and, on triton 3.6, one more ``BLOCK_M x D`` shared-memory buffer per phase
(:func:`shared_memory`): on by default for head_dim <= 64 (the default model's; it fits the default
tiles), off for head_dim 128, where it fits only with 64-row query blocks (not timed yet).
``CHUNKLLAMA_PREFILL_QSPLIT=0/1`` overrides; a split that would not fit, or fails to launch for shared
memory, falls back to the single tile with a warning.

Assumption (what :mod:`chunkllama.patching` produces): within a row, key positions are
``index - offset`` (contiguous; padding negative, on the left). Query positions are read per row.
Extra memory: cos/sin tables of ``2 * (chunk_size + 1) * D/2`` fp32 (3 MiB for chunk_size 6144,
D 128); none for the staged queries without the split, one query-sized tensor with it. The tables
replace in-kernel ``sin``/``cos``, which cost ~25% at 8k tokens.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _query_at(q_head, stride_qm, offs_m, row_mask, rot_pos, Cos, Sin, attn_scaling, qk_scale,
              HEAD_DIM: tl.constexpr):
    """Rows ``offs_m`` of ``q_head`` rotated at per-row positions ``rot_pos`` (cos/sin gathered from the
    ``(chunk_size+1, D/2)`` fp32 tables, times ``attn_scaling``), pre-scaled by ``qk_scale``, in fp32.
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
    return (q * cos + sign[None, :] * q_sw * sin) * qk_scale


@triton.jit
def _split(q, DTYPE: tl.constexpr):
    """fp32 ``q`` as ``(hi, lo)`` in ``DTYPE``: ``hi`` rounded, ``lo`` its rounding error rounded (their sum
    carries ~16 significant bits for bf16)."""
    hi = q.to(DTYPE)
    return hi, (q - hi.to(tl.float32)).to(DTYPE)


@triton.jit
def _scores(q_hi, q_lo, k, QSPLIT: tl.constexpr):
    """``(q_hi + q_lo) @ k`` in fp32 (two low-precision dots into one accumulator); ``q_hi @ k`` without
    ``QSPLIT`` (``q_lo`` unused)."""
    qk = tl.dot(q_hi, k)
    if QSPLIT:
        qk = tl.dot(q_lo, k, qk)
    return qk


@triton.jit
def _staged_query_at(q_head, stride_qm, o_head, lo_head, stride_om, offs_m, row_mask, rot_pos, Cos, Sin,
                     attn_scaling, qk_scale, DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, QSPLIT: tl.constexpr):
    """:func:`_query_at` in ``DTYPE``, written to this block's rows of the output and read back: a tile
    loaded from memory feeds the tensor cores from shared memory instead of occupying registers through
    the loop. With ``QSPLIT`` the rounding error (``lo``) takes the same way through this block's rows of
    the scratch ``lo_head`` (laid out as the output). Returns ``(hi, lo)``; ``lo`` is ``hi`` without ``QSPLIT``."""
    q = _query_at(q_head, stride_qm, offs_m, row_mask, rot_pos, Cos, Sin, attn_scaling, qk_scale, HEAD_DIM)
    hi, lo = _split(q, DTYPE)
    rows = offs_m[:, None] * stride_om + tl.arange(0, HEAD_DIM)[None, :]
    tl.debug_barrier()  # every warp is done with the previous staged query
    tl.store(o_head + rows, hi, mask=row_mask[:, None])
    if QSPLIT:
        tl.store(lo_head + rows, lo, mask=row_mask[:, None])
    tl.debug_barrier()
    hi = tl.load(o_head + rows, mask=row_mask[:, None], other=0.0)
    if QSPLIT:
        lo = tl.load(lo_head + rows, mask=row_mask[:, None], other=0.0)
    else:
        lo = hi
    return hi, lo


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
def _pure_phase(acc, l_i, m_i, q, q_err, k_base, v_base, stride_kn, stride_vn, koff, t_lo, t_hi,
                offs_n, offs_d, BLOCK_N: tl.constexpr, QSPLIT: tl.constexpr):
    """Key tiles ``[t_lo, t_hi)`` (in position units of BLOCK_N), all visible to every row, one rotation."""
    for t in range(t_lo, t_hi):
        kidx = koff + t * BLOCK_N + offs_n
        k = tl.load(k_base + kidx[None, :] * stride_kn + offs_d[:, None])
        qk = _scores(q, q_err, k, QSPLIT)
        v = tl.load(v_base + kidx[:, None] * stride_vn + offs_d[None, :])
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v)
    return acc, l_i, m_i


@triton.jit
def _diagonal_phase(acc, l_i, m_i, q, q_err, k_base, v_base, stride_kn, stride_vn, koff, t_lo, t_hi, Tk, qpos,
                    offs_n, offs_d, BLOCK_N: tl.constexpr, QSPLIT: tl.constexpr):
    """Intra-chunk key tiles ``[t_lo, t_hi)`` with the causal mask by position."""
    for t in range(t_lo, t_hi):
        kpos = t * BLOCK_N + offs_n
        kidx = koff + kpos
        kmask = kidx < Tk
        k = tl.load(k_base + kidx[None, :] * stride_kn + offs_d[:, None], mask=kmask[None, :], other=0.0)
        qk = _scores(q, q_err, k, QSPLIT)
        visible = (kpos[None, :] <= qpos[:, None]) & kmask[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        v = tl.load(v_base + kidx[:, None] * stride_vn + offs_d[None, :], mask=kmask[:, None], other=0.0)
        acc, l_i, m_i = _softmax_step_masked(acc, l_i, m_i, qk, v)
    return acc, l_i, m_i


# Lengths (and the position tensors' row strides, which equal them) change with every request; left
# specialized, each new combination of "divisible by 16" would compile the kernel again (tens of seconds).
@triton.jit(do_not_specialize=["stride_qpb", "stride_kpb", "Tq", "Tk"])
def _dca_prefill_kernel(
    Q, K, V, Out, QLo, Lse, QPos, KPos, Cos, Sin,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_qpb, stride_kpb,
    Tq, Tk, num_q_heads, groups, chunk_len, chunk_size, attn_scaling, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QSPLIT: tl.constexpr,
    STORE_LSE: tl.constexpr,
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
    lo_head = QLo + b * stride_ob + h * stride_oh  # laid out as Out
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
            q, q_err = _staged_query_at(q_head, stride_qm, o_head, lo_head, stride_om, offs_m, row_in,
                                        pos_inter, Cos, Sin, attn_scaling, qk_scale, DTYPE, HEAD_DIM, QSPLIT)
            acc, l_i, m_i = _pure_phase(acc, l_i, m_i, q, q_err, k_base, v_base, stride_kn, stride_vn, koff, 0,
                                        inter_end, offs_n, offs_d, BLOCK_N, QSPLIT)
        last_tile = q_hi // BLOCK_N + 1
        if (c_lo == c_hi) & (chunk_len % BLOCK_N == 0):
            tiles_per_chunk = chunk_len // BLOCK_N
            succ_lo = tl.maximum(c_lo - 1, 0) * tiles_per_chunk
            intra_lo = c_lo * tiles_per_chunk
            diag_lo = (q_lo + 1) // BLOCK_N
            if intra_lo > succ_lo:  # Phase 2: the previous chunk
                q, q_err = _staged_query_at(q_head, stride_qm, o_head, lo_head, stride_om, offs_m, row_in,
                                            pos_succ, Cos, Sin, attn_scaling, qk_scale, DTYPE, HEAD_DIM, QSPLIT)
                acc, l_i, m_i = _pure_phase(acc, l_i, m_i, q, q_err, k_base, v_base, stride_kn, stride_vn, koff,
                                            succ_lo, intra_lo, offs_n, offs_d, BLOCK_N, QSPLIT)
            q, q_err = _staged_query_at(q_head, stride_qm, o_head, lo_head, stride_om, offs_m, row_in,
                                        pos_intra, Cos, Sin, attn_scaling, qk_scale, DTYPE, HEAD_DIM, QSPLIT)
            # Phase 3: own chunk, before the block's first query.  Phase 4: the diagonal, masked.
            acc, l_i, m_i = _pure_phase(acc, l_i, m_i, q, q_err, k_base, v_base, stride_kn, stride_vn, koff,
                                        intra_lo, diag_lo, offs_n, offs_d, BLOCK_N, QSPLIT)
            acc, l_i, m_i = _diagonal_phase(acc, l_i, m_i, q, q_err, k_base, v_base, stride_kn, stride_vn, koff,
                                            diag_lo, last_tile, Tk, qpos, offs_n, offs_d, BLOCK_N, QSPLIT)
        else:
            # General tiles: per-element relation, one score product per rotation (two dots with QSPLIT).
            qc = qpos_c // chunk_len
            for t in range(inter_end, last_tile):
                kpos = t * BLOCK_N + offs_n
                kidx = koff + kpos
                kmask = kidx < Tk
                k = tl.load(k_base + kidx[None, :] * stride_kn + offs_d[:, None], mask=kmask[None, :], other=0.0)
                gap = qc[:, None] - (kpos // chunk_len)[None, :]
                qa, qa_err = _split(_query_at(q_head, stride_qm, offs_m, row_in, pos_intra, Cos, Sin, attn_scaling,
                                              qk_scale, HEAD_DIM), DTYPE)
                qk = _scores(qa, qa_err, k, QSPLIT)
                qb, qb_err = _split(_query_at(q_head, stride_qm, offs_m, row_in, pos_succ, Cos, Sin, attn_scaling,
                                              qk_scale, HEAD_DIM), DTYPE)
                qk = tl.where(gap == 1, _scores(qb, qb_err, k, QSPLIT), qk)
                qi, qi_err = _split(_query_at(q_head, stride_qm, offs_m, row_in, pos_inter, Cos, Sin, attn_scaling,
                                              qk_scale, HEAD_DIM), DTYPE)
                qk = tl.where(gap >= 2, _scores(qi, qi_err, k, QSPLIT), qk)
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


def _config(head_dim: int, qsplit: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head_dim, with or without the query split."""
    if _INTERPRET:
        return 16, 16, 1, 1
    override = tuning_override("CHUNKLLAMA_PREFILL_CONFIG", 4)  # "BM,BN,warps,stages"
    if override:
        return override
    if head_dim <= 64:
        return 128, 64, 4, 3
    if qsplit:  # the split's staged tiles do not fit beside 3 stages of 128x64 at BLOCK_M 128 (shared_memory)
        return 64, 64, 4, 3
    return 128, 64, 8, 3


def smaller_configs(config: tuple[int, int, int, int]) -> list[tuple[int, int, int, int]]:
    """``config`` (``(BLOCK_M, BLOCK_N, num_warps, num_stages)``), then the tilings to fall back to, in
    order, when a launch runs out of shared memory (e.g. fp32 inputs, whose tiles take twice the bytes
    the bf16 defaults were sized for): two pipeline stages, then halved blocks down to 32."""
    block_m, block_n, warps, stages = config
    configs = [config]
    while True:
        if stages > 2:
            stages = 2
        elif block_m > 32:
            block_m //= 2
        elif block_n > 32:
            block_n //= 2
        else:
            return configs
        configs.append((block_m, block_n, warps, stages))


def launch_fitting(launch: Callable[[tuple[int, int, int, int]], Any], config: tuple[int, int, int, int]) -> Any:
    """``launch(config)``; on triton's ``OutOfResources`` (raised before the kernel runs) the next of
    :func:`smaller_configs`; re-raises the last error when none fits."""
    for candidate in smaller_configs(config)[:-1]:
        try:
            return launch(candidate)
        except OutOfResources:
            continue
    return launch(smaller_configs(config)[-1])


def shared_memory(head_dim: int, config: tuple[int, int, int, int], qsplit: bool, itemsize: int = 2) -> int:
    """Bytes of shared memory the kernel is expected to take (triton 3.6 on sm_90; later versions took less).

    Each of the three phases' staged query tiles (``BLOCK_M x D``; two with ``qsplit``) gets its own
    buffer, and each pipeline stage holds one ``BLOCK_N x D`` tile of K and one of V. This reproduces
    the 294,912 B that triton 3.6 asked for with the split at 128x64 / 3 stages, head_dim 128, on the
    H200 (limit 232,448 B); ``bench/inspect_prefill_sass.py --qsplit 0 1`` prints the compiler's figure.
    """
    block_m, block_n, _, stages = config
    staged = 3 * (2 if qsplit else 1) * block_m * head_dim * itemsize
    return staged + stages * 2 * block_n * head_dim * itemsize


@functools.lru_cache(maxsize=None)
def _max_shared_memory(device_index: int) -> int | None:
    """Opt-in shared memory per block of a CUDA device as triton checks it, or None where this triton's
    driver does not say (the launcher's OutOfResources fallback then decides)."""
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 (a driver API that moved: no estimate rather than no kernel)
        return None


def query_split(head_dim: int) -> bool:
    """Whether the score dots take the rotated query as ``hi + lo`` in the input dtype (two dots into one
    fp32 accumulator: the query keeps fp32 precision) rather than as one rounded tile.

    ``CHUNKLLAMA_PREFILL_QSPLIT=1`` / ``0`` forces it on / off. By default it is on for head_dim <= 64
    (the default model's), where it fits the default tiles, and off for head_dim 128, where it needs
    smaller query blocks (``_config``) besides the second dot: a speed cost not measured yet, so the
    head_dim-128 default keeps the single tile. Either way the launcher falls back to the single tile
    when the split would not fit the device's shared memory.
    """
    env = os.environ.get("CHUNKLLAMA_PREFILL_QSPLIT")
    if env:
        return env != "0"
    return head_dim <= 64


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
    qsplit = query_split(head_dim)
    if qsplit and query.device.type == "cuda":
        limit = _max_shared_memory(query.device.index if query.device.index is not None else torch.cuda.current_device())
        need = shared_memory(head_dim, _config(head_dim, True), True, query.element_size())
        if limit is not None and need > limit:
            qsplit = False
            if os.environ.get("CHUNKLLAMA_PREFILL_QSPLIT", "0") != "0":
                warnings.warn(f"dca_prefill: CHUNKLLAMA_PREFILL_QSPLIT asks for the query split, which needs ~{need} B "
                              f"of shared memory (device: {limit} B); using the single query tile.", RuntimeWarning,
                              stacklevel=2)
    args = (
        query, key, value, out, query_positions, key_positions, cos_table, sin_table,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        query_positions.stride(0), key_positions.stride(0),
        q_len, kv_len, q_heads, q_heads // kv_heads, chunk_len, chunk_size, float(attn_scaling), float(scale * LOG2E),
    )
    if qsplit:
        try:
            _run(args, head_dim, q_len, batch * q_heads, True, lse)
            return out, lse
        except OutOfResources as error:  # the estimate was too low for this triton / device
            warnings.warn(f"dca_prefill: the query split does not fit ({error}); using the single query tile.",
                          RuntimeWarning, stacklevel=2)
    _run(args, head_dim, q_len, batch * q_heads, False, lse)
    return out, lse


def _run(args: tuple, head_dim: int, q_len: int, programs_per_block: int, qsplit: bool,
         lse: torch.Tensor | None) -> None:
    """One launch of the kernel on ``args`` (those of :func:`launch_prefill` without ``QLo`` and ``Lse``).
    With ``qsplit`` the queries' low parts are staged in a scratch tensor laid out as ``Out``; ``lse``
    (fp32 ``(B, Hq, Tq)``) is written when given."""
    out = args[3]
    q_lo = torch.empty_like(out) if qsplit else out

    def launch(config: tuple[int, int, int, int]) -> None:
        block_m, block_n, warps, stages = config
        _dca_prefill_kernel[(triton.cdiv(q_len, block_m), programs_per_block)](
            *args[:4], q_lo, out if lse is None else lse, *args[4:],
            HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, QSPLIT=qsplit, STORE_LSE=lse is not None,
            num_warps=warps, num_stages=stages,
        )

    if qsplit:  # the caller falls back to the single query tile rather than to smaller blocks
        launch(_config(head_dim, qsplit))
    else:
        launch_fitting(launch, _config(head_dim, qsplit))


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
