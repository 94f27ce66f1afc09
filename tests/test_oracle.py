"""The oracle itself is checked against per-pair brute force in pure Python (loops, math.cos).

If these pass, the oracle's dense matrices are the DESIGN.md rules and nothing else, so the
model- and op-level tests that compare the package to the oracle compare it to the spec.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from oracle import (
    CODES,
    INTER,
    INTRA,
    MASKED,
    SUCCESSIVE,
    brute_force_attention_row,
    oracle_attention,
    pair_query_position,
    pair_relation,
    plain_causal_attention,
    query_position_matrix,
    relation_codes,
    rope_cos_sin,
)

GEOMETRIES = [  # (chunk_len, chunk_size): local_window = chunk_size - chunk_len
    (20, 24),
    (4, 6),
    (5, 5),  # local_window 0: successive queries sit at chunk_size like inter ones
    (3, 7),  # local window larger than the stride
    (1, 2),
]


def _brute_relation(pq: int, pk: int, chunk_len: int) -> str:
    """Spelled out once more, by walking chunk boundaries instead of dividing."""
    if pq < 0 or pk < 0 or pk > pq:
        return MASKED
    chunk_q = chunk_k = 0
    while (chunk_q + 1) * chunk_len <= pq:
        chunk_q += 1
    while (chunk_k + 1) * chunk_len <= pk:
        chunk_k += 1
    return {0: INTRA, 1: SUCCESSIVE}.get(chunk_q - chunk_k, INTER)


@pytest.mark.parametrize("chunk_len,chunk_size", GEOMETRIES)
def test_scalar_rules_against_walking_the_chunks(chunk_len, chunk_size):
    for pq, pk in itertools.product(range(-2, 4 * chunk_len + 3), repeat=2):
        relation = pair_relation(pq, pk, chunk_len)
        assert relation == _brute_relation(pq, pk, chunk_len), (pq, pk)
        qp = pair_query_position(pq, pk, chunk_len, chunk_size)
        if relation == MASKED:
            assert qp is None
            continue
        distance = qp - pk % chunk_len
        # Every relative distance is within [0, chunk_size]: never outside the trained window.
        assert 0 <= distance <= chunk_size, (pq, pk, qp)
        if relation == INTRA:
            assert distance == pq - pk  # true distance inside a chunk
        if relation == SUCCESSIVE and pq % chunk_len + chunk_len <= chunk_size:
            assert distance == pq - pk  # the local window keeps true distances
        if relation == INTER:
            assert qp == chunk_size


@pytest.mark.parametrize("chunk_len,chunk_size", GEOMETRIES)
def test_dense_matrices_match_pair_enumeration(chunk_len, chunk_size):
    length = 4 * chunk_len + 3
    q_pos = torch.tensor([list(range(length)), [-1, -1, -1] + list(range(length - 3))])
    k_pos = q_pos.clone()
    codes = relation_codes(q_pos, k_pos, chunk_len)
    positions = query_position_matrix(q_pos, k_pos, chunk_len, chunk_size)
    for b in range(2):
        for i in range(length):
            for j in range(length):
                pq, pk = int(q_pos[b, i]), int(k_pos[b, j])
                assert int(codes[b, i, j]) == CODES[pair_relation(pq, pk, chunk_len)]
                expected = pair_query_position(pq, pk, chunk_len, chunk_size)
                if expected is not None:
                    assert int(positions[b, i, j]) == expected


def test_all_four_relations_occur_in_the_test_geometry():
    from tiny_models import CHUNK_LEN, CHUNK_SIZE

    pos = torch.arange(101)[None]
    codes = relation_codes(pos, pos, CHUNK_LEN)
    assert set(codes.unique().tolist()) == set(CODES.values())
    successive_positions = query_position_matrix(pos, pos, CHUNK_LEN, CHUNK_SIZE)[codes == CODES[SUCCESSIVE]]
    # Both successive cases occur: inside the local window (true distance) and capped at chunk_size.
    assert (successive_positions < CHUNK_SIZE).any() and (successive_positions == CHUNK_SIZE).any()


@pytest.mark.parametrize("chunk_len,chunk_size", [(4, 6), (5, 5), (3, 7)])
@pytest.mark.parametrize("q_heads,kv_heads", [(2, 1), (2, 2)])
def test_oracle_attention_matches_pure_python(chunk_len, chunk_size, q_heads, kv_heads):
    gen = torch.Generator().manual_seed(chunk_len * 100 + q_heads)
    dim, length, pad = 6, 3 * chunk_len + 2, 2
    q = torch.randn(2, q_heads, length, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(2, kv_heads, length, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(2, kv_heads, length, 5, generator=gen, dtype=torch.float64)
    inv_freq = 1.0 / (3.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    pos = torch.stack([torch.arange(length), torch.arange(length) - pad])  # row 1 is left-padded
    scale, att = 0.7, 1.3
    out = oracle_attention(
        q, k, v, pos, pos, inv_freq, chunk_len, chunk_size, scale=scale, attention_scaling=att,
        angle_dtype=torch.float64,
    )
    groups = q_heads // kv_heads
    for b in range(2):
        for h in range(q_heads):
            kh = h // groups
            keys = k[b, kh].tolist()
            values = v[b, kh].tolist()
            for i in range(length):
                row = brute_force_attention_row(
                    q[b, h, i].tolist(), keys, values, int(pos[b, i]), pos[b].tolist(), inv_freq.tolist(),
                    chunk_len, chunk_size, scale, att,
                )
                torch.testing.assert_close(out[b, h, i], torch.tensor(row, dtype=torch.float64), rtol=0, atol=1e-10)
    assert out[1, :, :pad].abs().max() == 0  # padding rows see nothing


def test_oracle_with_one_chunk_is_plain_causal_rope_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 17, 8, generator=gen) for _ in range(3))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    pos = torch.arange(17)[None]
    dca = oracle_attention(q, k, v, pos, pos, inv_freq, chunk_len=17, chunk_size=20)
    # independent check: SDPA on keys/queries rotated at their true positions
    cos, sin = rope_cos_sin(pos, inv_freq)
    half = 4

    def rot(x):
        return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[:, None]

    sdpa = torch.nn.functional.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)
    torch.testing.assert_close(dca, sdpa, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain_causal_attention(q, k, v, pos, pos, inv_freq), sdpa, rtol=0, atol=1e-5)


def test_oracle_differs_from_plain_attention_beyond_one_chunk():
    """Sanity: the oracle is not accidentally plain attention for long inputs."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=gen) for _ in range(3))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    pos = torch.arange(30)[None]
    dca = oracle_attention(q, k, v, pos, pos, inv_freq, chunk_len=8, chunk_size=10)
    plain = plain_causal_attention(q, k, v, pos, pos, inv_freq)
    assert torch.allclose(dca[:, :, :8], plain[:, :, :8], atol=1e-6)  # the first chunk is identical
    assert (dca[:, :, 8:] - plain[:, :, 8:]).abs().max() > 1e-2
