"""chunkllama.positions against the oracle's pure-Python rules (tests/oracle.py)."""

from __future__ import annotations

import math
import itertools

import pytest
import torch

from chunkllama import positions as P
from oracle import CODES, pair_query_position, pair_relation

GEOMETRIES = [(20, 24), (4, 6), (5, 5), (3, 7), (1, 2)]  # (chunk_len, chunk_size)
CODE_OF = {P.MASKED: CODES["masked"], P.INTRA: CODES["intra"], P.SUCCESSIVE: CODES["successive"], P.INTER: CODES["inter"]}


@pytest.mark.parametrize("chunk_len,chunk_size", GEOMETRIES)
def test_key_positions(chunk_len, chunk_size):
    pos = torch.arange(0, 5 * chunk_len + 3)
    got = P.key_rope_positions(pos, chunk_len)
    assert got.tolist() == [p % chunk_len for p in pos.tolist()]
    assert got.dtype == torch.int64


@pytest.mark.parametrize("chunk_len,chunk_size", GEOMETRIES)
def test_query_positions_are_the_three_rotations(chunk_len, chunk_size):
    pos = torch.arange(0, 5 * chunk_len + 3)[None]
    intra, successive, inter = P.query_rope_positions(pos, chunk_len, chunk_size)
    for i, p in enumerate(pos[0].tolist()):
        assert int(intra[0, i]) == pair_query_position(p, p, chunk_len, chunk_size)  # same chunk
        if p >= chunk_len:  # a key in the previous chunk
            prev = (p // chunk_len - 1) * chunk_len
            assert int(successive[0, i]) == pair_query_position(p, prev, chunk_len, chunk_size)
        else:
            assert int(successive[0, i]) == min(p % chunk_len + chunk_len, chunk_size)
        if p >= 2 * chunk_len:
            assert int(inter[0, i]) == pair_query_position(p, 0, chunk_len, chunk_size)
        assert int(inter[0, i]) == chunk_size
    assert intra.shape == successive.shape == inter.shape == pos.shape


@pytest.mark.parametrize("chunk_len,chunk_size", GEOMETRIES)
def test_chunk_relation_every_pair(chunk_len, chunk_size):
    span = list(range(-3, 4 * chunk_len + 2))
    q = torch.tensor(span)[:, None]
    k = torch.tensor(span)[None, :]
    rel = P.chunk_relation(q, k, chunk_len)
    assert rel.dtype == torch.int8 and rel.shape == (len(span), len(span))
    for (i, pq), (j, pk) in itertools.product(enumerate(span), repeat=2):
        assert CODE_OF[int(rel[i, j])] == CODES[pair_relation(pq, pk, chunk_len)], (pq, pk)


def test_chunk_relation_broadcasts_over_batch():
    q = torch.tensor([[5, 6, 25], [-1, 0, 21]])[:, :, None]
    k = torch.tensor([[0, 4, 25], [-1, 0, 1]])[:, None, :]
    rel = P.chunk_relation(q, k, 20)
    assert rel.shape == (2, 3, 3)
    for b, i, j in itertools.product(range(2), range(3), range(3)):
        assert CODE_OF[int(rel[b, i, j])] == CODES[pair_relation(int(q[b, i, 0]), int(k[b, 0, j]), 20)]


def test_row_offsets_and_positions_left_padding():
    # row 0: no padding; row 1: 3 left pads with HF's generate convention (pads get position 1)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [1, 1, 1, 0, 1, 2, 3]])
    offsets = P.row_offsets(pos, batch_size=2, q_len=7, kv_len=7)
    assert offsets.tolist() == [0, 3]
    got = P.positions_from_offsets(offsets, 0, 7)
    assert got.tolist() == [[0, 1, 2, 3, 4, 5, 6], [-3, -2, -1, 0, 1, 2, 3]]


def test_row_offsets_decode_step():
    # one new token per row after 7 cached ones; row 1 has 3 pads in front
    pos = torch.tensor([[7], [4]])
    offsets = P.row_offsets(pos, batch_size=2, q_len=1, kv_len=8)
    assert offsets.tolist() == [0, 3]
    assert P.positions_from_offsets(offsets, 7, 1).tolist() == [[7], [4]]
    assert P.positions_from_offsets(offsets, 0, 8)[1].tolist() == [-3, -2, -1, 0, 1, 2, 3, 4]


def test_row_offsets_broadcast_row_and_bad_length():
    pos = torch.arange(5, 9)[None]  # (1, Tq) shared by the batch, after 5 cached tokens
    assert P.row_offsets(pos, batch_size=3, q_len=4, kv_len=9).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        P.row_offsets(pos, batch_size=1, q_len=3, kv_len=9)


@pytest.mark.parametrize("real", [1, 2, 3, 7])
@pytest.mark.parametrize("pad_value", [1, 0])  # HF's generate gives pads 1; some code uses 0
def test_row_offsets_rows_with_few_real_tokens(real, pad_value):
    """Pads share one position, so a row with one or two real tokens ties with them at the maximum."""
    length = 9
    row = [pad_value] * (length - real) + list(range(real))
    pos = torch.tensor([list(range(length)), row])
    offsets = P.row_offsets(pos, batch_size=2, q_len=length, kv_len=length)
    assert offsets.tolist() == [0, length - real]
    # decode step after it: one new token per row
    step = torch.tensor([[length], [real]])
    assert P.row_offsets(step, batch_size=2, q_len=1, kv_len=length + 1).tolist() == [0, length - real]


def test_row_offsets_right_padding_and_shifted_positions():
    pos = torch.tensor([[0, 1, 2, 3, 1, 1], [0, 1, 1, 1, 1, 1], [5, 6, 7, 8, 9, 10]])
    assert P.row_offsets(pos, batch_size=3, q_len=6, kv_len=6).tolist() == [0, 0, -5]


# ----------------------------------------------------------------------------- one sequence per row
@pytest.mark.parametrize(
    "row",
    [
        [0, 1, 2, 3, 4, 5, 6],  # plain
        [1, 1, 1, 0, 1, 2, 3],  # left padding, HF's pads at 1
        [0, 0, 0, 0, 0, 1, 2],  # left padding with pads at 0
        [0, 1, 2, 3, 1, 1, 1],  # right padding (the padding hook's pads at 1)
        [0, 1, 1, 1, 1, 1, 1],  # right padding after one real token
        [5, 6, 7, 8, 9, 10, 11],  # a later piece of a prompt
        [1, 1, 1, 1, 1, 1, 0],  # one real token, left padded
    ],
)
def test_padding_is_not_a_broken_row(row):
    assert not P.broken_rows(torch.tensor([row])).any()


@pytest.mark.parametrize(
    "row",
    [
        [0, 1, 2, 3, 0, 1, 2],  # two packed sequences
        [0, 1, 2, 0, 1, 0, 1],  # three
        [0, 1, 2, 3, 4, 5, 0],  # a packed last sequence of one token
        [1, 1, 0, 1, 2, 0, 1],  # packed after left padding
        [0, 1, 2, 10, 11, 12, 13],  # a jump
    ],
)
def test_packed_or_jumping_rows_are_broken(row):
    rows = torch.tensor([list(range(7)), row])
    assert P.broken_rows(rows).tolist() == [False, True]


def test_step_positions_rejects_broken_rows_with_a_clear_error_only_for_several_tokens():
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(ValueError, match="packed sequences.*own row"):
        P.step_positions(packed, 1, 6, 0, chunk_len=4, device=torch.device("cpu"))
    P.step_positions(packed, 1, 6, 0, chunk_len=4, device=torch.device("cpu"), check_rows=False)  # not checked
    P.step_positions(torch.tensor([[3]]), 1, 1, 8, chunk_len=4, device=torch.device("cpu"))  # decode: never read


def test_step_positions_with_a_device_side_cache_length():
    """A static cache reports its length as a tensor: the same positions, computed without reading it."""
    cpu = torch.device("cpu")
    # (past, position ids): a left-padded prefill, then two tokens after 7 cached ones (row 0 had 2 pads)
    for past, pos in ((0, torch.tensor([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])), (7, torch.tensor([[5, 6], [7, 8]]))):
        q_len = pos.shape[1]
        as_int = P.step_positions(pos, 2, q_len, past, chunk_len=4, device=cpu)
        as_tensor = P.step_positions(pos, 2, q_len, torch.tensor(past), chunk_len=4, device=cpu)
        for name in ("query", "offsets", "key_rotation"):
            assert torch.equal(getattr(as_int, name), getattr(as_tensor, name)), name
        assert torch.equal(as_int.keys(past + q_len), as_tensor.keys(past + q_len))
        assert torch.equal(as_int.query.clamp(min=0) % 4, as_int.key_rotation)
    assert as_int.keys(9).tolist() == [[-2, -1, 0, 1, 2, 3, 4, 5, 6], list(range(9))]
    step = P.step_positions(None, 2, 2, torch.tensor(7), chunk_len=4, device=cpu)
    assert step.query.tolist() == [[7, 8], [7, 8]] and step.key_rotation.tolist() == [[3, 0], [3, 0]]


def test_logn_query_factors_are_one_below_the_base_and_grow_with_the_log():
    from chunkllama.positions import logn_query_factors

    pos = torch.tensor([[-1, 0, 7, 8, 31, 63]])
    got = logn_query_factors(pos, 0.5, 8)
    expected = [max(1.0, 1.0 + 0.5 * math.log((max(p, 0) + 1) / 8)) for p in pos[0].tolist()]
    assert got.dtype == torch.float32 and got.shape == (1, 6)
    assert got[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert got[0, :4].tolist() == [1.0, 1.0, 1.0, pytest.approx(1 + 0.5 * math.log(9 / 8))]
    assert torch.equal(logn_query_factors(pos, 0.0, 8), torch.ones(1, 6))
