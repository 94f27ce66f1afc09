"""merge_partials: the log-sum-exp combination of partial softmax results is exact and fp32."""

from __future__ import annotations

import pytest
import torch

from chunkllama.attention.merge import merge_partials


def _partial(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ values, lse


@pytest.mark.parametrize("split", [1, 5, 17, 31])
def test_merge_of_two_key_sets_equals_full_softmax(split):
    gen = torch.Generator().manual_seed(split)
    scores = torch.randn(2, 3, 7, 32, generator=gen) * 4
    values = torch.randn(2, 3, 32, 5, generator=gen)
    full_out, full_lse = _partial(scores, values)
    a = _partial(scores[..., :split], values[..., :split, :])
    b = _partial(scores[..., split:], values[..., split:, :])
    out, lse = merge_partials(*a, *b)
    torch.testing.assert_close(out, full_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, full_lse, rtol=0, atol=1e-5)
    out2, lse2 = merge_partials(*b, *a)  # symmetric
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-5)


def test_merge_many_parts_in_sequence_and_extreme_scores():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 2, 4, 40, generator=gen) * 30  # large logits: naive exp would overflow
    scores[..., 3] = 200.0
    values = torch.randn(1, 2, 40, 3, generator=gen)
    full_out, full_lse = _partial(scores, values)
    acc = torch.zeros(1, 2, 4, 3)
    lse = torch.full((1, 2, 4), float("-inf"))
    for start in range(0, 40, 7):
        acc, lse = merge_partials(acc, lse, *_partial(scores[..., start : start + 7], values[..., start : start + 7, :]))
    assert torch.isfinite(acc).all()
    torch.testing.assert_close(acc, full_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, full_lse, rtol=1e-6, atol=1e-4)


def test_empty_parts_give_zero_not_nan():
    out_a = torch.zeros(2, 4, 3)
    lse_a = torch.full((2, 4), float("-inf"))
    out_b = torch.randn(2, 4, 3)
    lse_b = torch.randn(2, 4)
    lse_b[1] = float("-inf")  # row group 1 saw nothing in either part
    out_b[1] = 0
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert not out.isnan().any()
    torch.testing.assert_close(out[0], out_b[0])
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    torch.testing.assert_close(lse[0], lse_b[0])


def test_merge_keeps_fp32():
    out_a, lse_a = torch.randn(3, 2), torch.randn(3)
    out_b, lse_b = torch.randn(3, 2), torch.randn(3)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert out.dtype == lse.dtype == torch.float32
    weights = torch.softmax(torch.stack([lse_a, lse_b]), dim=0)
    torch.testing.assert_close(out, out_a * weights[0, :, None] + out_b * weights[1, :, None])
