"""An independent, dense Dual Chunk Attention oracle for tiny sizes.

Written from ``DESIGN.md`` alone; it deliberately imports nothing from ``chunkllama`` so that a
mistake in the package's position math cannot hide in the reference too. It is slow and
quadratic on purpose: it builds, for every (query, key) pair, the position the query is rotated
to, rotates a separate copy of the query for each pair, and forms the full ``Tq × Tk`` score
matrix before one softmax.

Rules (DESIGN.md, "What DCA computes"), for query position ``pq`` and key position ``pk``
(position ids; negative means padding):

* chunk of a position: ``p // chunk_len``; in-chunk position ``p % chunk_len``.
* a key is rotated at ``pk % chunk_len``.
* the pair is masked when ``pk > pq`` or either is padding; otherwise
  - same chunk → query rotated at ``pq % chunk_len`` (intra),
  - key in the previous chunk → at ``min(pq % chunk_len + chunk_len, chunk_size)`` (successive),
  - key in an earlier chunk → at ``chunk_size`` (inter).

:mod:`tests.test_oracle` checks these matrices and the attention itself against per-pair
brute force in pure Python.
"""

from __future__ import annotations

import math

import torch

MASKED, INTRA, SUCCESSIVE, INTER = "masked", "intra", "successive", "inter"
CODES = {MASKED: 0, INTRA: 1, SUCCESSIVE: 2, INTER: 3}


# ----------------------------------------------------------------------------- scalar rules
def pair_relation(pq: int, pk: int, chunk_len: int) -> str:
    """The chunk relation of one (query, key) pair, as plain Python."""
    if pq < 0 or pk < 0 or pk > pq:
        return MASKED
    gap = pq // chunk_len - pk // chunk_len
    if gap == 0:
        return INTRA
    if gap == 1:
        return SUCCESSIVE
    return INTER


def pair_query_position(pq: int, pk: int, chunk_len: int, chunk_size: int) -> int | None:
    """The position a query is rotated to for this key (None when masked)."""
    relation = pair_relation(pq, pk, chunk_len)
    if relation == MASKED:
        return None
    if relation == INTRA:
        return pq % chunk_len
    if relation == SUCCESSIVE:
        return min(pq % chunk_len + chunk_len, chunk_size)
    return chunk_size


def key_position(pk: int, chunk_len: int) -> int:
    return pk % chunk_len


# ----------------------------------------------------------------------------- dense matrices
def relation_codes(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """``(B, Tq, Tk)`` int64 codes (``CODES``) of every pair; ``q_pos (B, Tq)``, ``k_pos (B, Tk)``."""
    pq = q_pos[:, :, None].to(torch.int64)
    pk = k_pos[:, None, :].to(torch.int64)
    gap = torch.div(pq, chunk_len, rounding_mode="floor") - torch.div(pk, chunk_len, rounding_mode="floor")
    codes = torch.full(gap.shape, CODES[INTER], dtype=torch.int64)
    codes[gap == 1] = CODES[SUCCESSIVE]
    codes[gap == 0] = CODES[INTRA]
    visible = (pk <= pq) & (pk >= 0) & (pq >= 0)
    codes[~visible] = CODES[MASKED]
    return codes


def query_position_matrix(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_len: int, chunk_size: int) -> torch.Tensor:
    """``(B, Tq, Tk)`` int64: where the query of each pair is rotated (0 for masked pairs)."""
    codes = relation_codes(q_pos, k_pos, chunk_len)
    in_chunk = torch.remainder(q_pos.to(torch.int64), chunk_len)[:, :, None].expand_as(codes)
    successive = torch.clamp(in_chunk + chunk_len, max=chunk_size)
    pos = torch.zeros_like(codes)
    pos = torch.where(codes == CODES[INTRA], in_chunk, pos)
    pos = torch.where(codes == CODES[SUCCESSIVE], successive, pos)
    pos = torch.where(codes == CODES[INTER], torch.full_like(pos, chunk_size), pos)
    return pos


# ----------------------------------------------------------------------------- rotary
def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0, angle_dtype: torch.dtype = torch.float32
):
    """cos/sin (``angle_dtype``, ``positions.shape + (D,)``) as HF rotary modules compute them:
    angles ``position * inv_freq`` (fp32 in HF), ``cat(freqs, freqs)``, times the attention scaling."""
    freqs = positions.to(angle_dtype)[..., None] * inv_freq.to(angle_dtype)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


# ----------------------------------------------------------------------------- attention
def oracle_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    inv_freq: torch.Tensor,
    chunk_len: int,
    chunk_size: int,
    scale: float | None = None,
    attention_scaling: float = 1.0,
    upcast: bool = True,
    angle_dtype: torch.dtype = torch.float32,
    return_lse: bool = False,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dense DCA attention.

    Args:
        query: ``(B, Hq, Tq, D)``, **not** rotated.
        key: ``(B, Hk, Tk, D)``, **not** rotated (the oracle rotates it at ``pk % chunk_len``).
        value: ``(B, Hk, Tk, Dv)``. Query head ``h`` reads key/value head ``h // (Hq // Hk)``.
        q_pos, k_pos: int ``(B, Tq)`` / ``(B, Tk)`` position ids; negative = padding.
        upcast: True → everything after the cos/sin tables runs in float64 (the reference);
            False → "plain PyTorch in the input dtype", HF-eager style: rotation and matmuls in
            the input dtype, softmax in fp32 cast back (the low-precision baseline of the
            flash-attention test rule).
        angle_dtype: dtype of the rotary angles; fp32 like HF, float64 to compare with
            :func:`brute_force_attention_row`.
        return_lse: also return the log-sum-exp of the scaled scores, ``(B, Hq, Tq)`` float64
            (``-inf`` for rows that see no key).
        row_scale: optional ``(B, Tq)`` factors multiplying each query row's scores (a per-query
            temperature).
    Returns:
        ``(B, Hq, Tq, Dv)`` in ``query.dtype``; rows that see no key are 0.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    work = torch.float64 if upcast else query.dtype

    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)

    k_cos, k_sin = rope_cos_sin(torch.remainder(k_pos.to(torch.int64).clamp(min=0), chunk_len), inv_freq, attention_scaling, angle_dtype)
    k_rot = rotate(key.to(work), k_cos[:, None].to(work), k_sin[:, None].to(work))  # (B, Hq, Tk, D)

    pair_pos = query_position_matrix(q_pos, k_pos, chunk_len, chunk_size)  # (B, Tq, Tk)
    q_cos, q_sin = rope_cos_sin(pair_pos, inv_freq, attention_scaling, angle_dtype)  # (B, Tq, Tk, D)
    q_pairs = query.to(work)[:, :, :, None, :]  # (B, Hq, Tq, 1, D)
    q_rot = rotate(q_pairs, q_cos[:, None].to(work), q_sin[:, None].to(work))  # (B, Hq, Tq, Tk, D)
    scores = torch.einsum("bhqkd,bhkd->bhqk", q_rot, k_rot) * scale  # (B, Hq, Tq, Tk)
    if row_scale is not None:
        scores = scores * row_scale[:, None, :, None].to(scores.dtype)

    visible = relation_codes(q_pos, k_pos, chunk_len)[:, None] != CODES[MASKED]
    scores = scores.to(torch.float64 if upcast else torch.float32).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key
    out = torch.matmul(probs.to(work), value.to(work)).to(query.dtype)
    if return_lse:
        return out, torch.logsumexp(scores.to(torch.float64), dim=-1)
    return out


def plain_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    inv_freq: torch.Tensor,
    scale: float | None = None,
    attention_scaling: float = 1.0,
    upcast: bool = True,
) -> torch.Tensor:
    """Ordinary RoPE attention at the true positions (causal by position), same conventions:
    DCA with one chunk longer than any position is exactly that."""
    huge = 1 << 40
    return oracle_attention(query, key, value, q_pos, k_pos, inv_freq, huge, huge, scale, attention_scaling, upcast)


# ----------------------------------------------------------------------------- model-level oracle
def logn_row_scale(pos: torch.Tensor, coef: float, base: int) -> torch.Tensor:
    """``max(1, 1 + coef * ln((p + 1) / base))`` per position, element by element in Python floats."""
    values = [[max(1.0, 1.0 + coef * math.log((max(p, 0) + 1) / base)) for p in row] for row in pos.tolist()]
    return torch.tensor(values, dtype=torch.float64)


def oracle_attention_forward(module: torch.nn.Module, rotary: torch.nn.Module, chunk_len: int, chunk_size: int,
                             logn: tuple[float, int] | None = None):
    """A replacement ``forward`` for one HF attention module computing DCA with :func:`oracle_attention`.

    q/k/v come from the module's own projections (and Qwen3's per-head ``q_norm``/``k_norm``
    before RoPE); the rotation uses ``rotary.inv_freq`` and ``rotary.attention_scaling`` as they
    are at call time (dynamic NTK updates them from the true positions just before the layers
    run). No KV cache: use it for full forward passes only. Positions come from
    ``position_ids`` (negative = padding); pass them explicitly for padded batches. ``logn``:
    ``(coef, base)`` of a per-query temperature (:func:`logn_row_scale`).
    """

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None, **kwargs):
        assert cache is None and past_key_values is None, "the oracle model runs without a KV cache (use_cache=False)"
        batch, length = hidden_states.shape[:2]
        shape = (batch, length, -1, module.head_dim)
        q = module.q_proj(hidden_states).view(shape)
        k = module.k_proj(hidden_states).view(shape)
        if hasattr(module, "q_norm"):
            q, k = module.q_norm(q), module.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = module.v_proj(hidden_states).view(shape).transpose(1, 2)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(length)[None]
        pos = pos.expand(batch, length)
        out = oracle_attention(
            q, k, v, pos, pos, rotary.inv_freq, chunk_len, chunk_size,
            scale=module.scaling, attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
            row_scale=None if logn is None else logn_row_scale(pos, *logn),
        )
        return module.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), None

    return forward


def install_oracle(model: torch.nn.Module, monkeypatch, chunk_len: int, chunk_size: int,
                   logn: tuple[float, int] | None = None) -> None:
    """Monkeypatch every attention module of ``model`` with :func:`oracle_attention_forward`."""
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    assert len(rotaries) == 1
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "q_proj")]
    assert modules
    for module in modules:
        monkeypatch.setattr(module, "forward", oracle_attention_forward(module, rotaries[0], chunk_len, chunk_size, logn),
                            raising=False)


def brute_force_attention_row(q_vec, keys, values, pq, k_positions, inv_freq, chunk_len, chunk_size, scale, attention_scaling=1.0):
    """One head, one query, in pure Python floats (math.cos/sin, explicit loops). Tiny sizes only.

    ``q_vec``: list of D floats (unrotated); ``keys``/``values``: lists of vectors (unrotated keys).
    """
    dim = len(q_vec)
    half = dim // 2
    freqs = [float(f) for f in inv_freq]

    def rot(vec, position):
        outv = [0.0] * dim
        for i in range(half):
            angle = position * freqs[i]
            c, s = math.cos(angle) * attention_scaling, math.sin(angle) * attention_scaling
            outv[i] = vec[i] * c - vec[i + half] * s
            outv[i + half] = vec[i + half] * c + vec[i] * s
        return outv

    scores = []
    for kv, pk in zip(keys, k_positions):
        qp = pair_query_position(pq, pk, chunk_len, chunk_size)
        if qp is None:
            scores.append(None)
            continue
        qr, kr = rot(q_vec, qp), rot(kv, key_position(pk, chunk_len))
        scores.append(sum(a * b for a, b in zip(qr, kr)) * scale)
    live = [s for s in scores if s is not None]
    if not live:
        return [0.0] * len(values[0])
    top = max(live)
    weights = [0.0 if s is None else math.exp(s - top) for s in scores]
    total = sum(weights)
    return [sum(w * v[j] for w, v in zip(weights, values)) / total for j in range(len(values[0]))]
