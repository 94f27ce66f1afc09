"""The attention probe: dense DCA weights of chosen query rows vs the oracle, per-layer masses on a model."""

from __future__ import annotations

import pytest
import torch

from chunkllama import apply_dca, patching
from chunkllama.attention import dca_attention
from chunkllama.config import DCAConfig
from chunkllama.eval.dca_probe import dca_attention_weights, probe_attention, recording_dca_inputs
from chunkllama.rope import RotaryParams, apply_rope
from oracle import oracle_attention, relation_codes
from tiny_models import CHUNK_LEN, CHUNK_SIZE, PRETRAINING_LENGTH, make_model


def _inputs(length: int = 61, pad: int = 5, head_dim: int = 16):
    config = DCAConfig(PRETRAINING_LENGTH)
    assert (config.chunk_len, config.chunk_size) == (CHUNK_LEN, CHUNK_SIZE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    rope = RotaryParams(inv_freq, 1.0)
    q = torch.randn(2, 4, length, head_dim)
    k_raw = torch.randn(2, 2, length, head_dim)
    v = torch.randn(2, 2, length, head_dim)
    positions = torch.stack([torch.arange(length), torch.arange(length) - pad])  # row 1 left-padded
    k = apply_rope(k_raw, rope, torch.remainder(positions.clamp(min=0), CHUNK_LEN))
    return q, k_raw, k, v, positions, rope, config


def test_weights_match_the_dense_oracle():
    q, k_raw, k, v, positions, rope, config = _inputs()
    probs, relations = dca_attention_weights(q, k, positions, positions, rope, config)
    out = torch.matmul(probs, v.repeat_interleave(2, dim=1))
    expected = oracle_attention(q, k_raw, v, positions, positions, rope.inv_freq, CHUNK_LEN, CHUNK_SIZE)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, dca_attention(q, k, v, positions, positions, rope, config, backend="reference"),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(relations.long(), relation_codes(positions, positions, CHUNK_LEN))
    sums = probs.sum(-1)
    torch.testing.assert_close(sums[0], torch.ones_like(sums[0]))
    assert torch.all(sums[1, :, :5] == 0) and torch.allclose(sums[1, :, 5:], torch.ones_like(sums[1, :, 5:]))
    # a subset of rows is the same as those rows of the full computation
    some, some_rel = dca_attention_weights(q, k, positions, positions, rope, config, rows=[-1, 20, 3])
    torch.testing.assert_close(some, probs[:, :, [60, 20, 3]])
    assert torch.equal(some_rel, relations[:, [60, 20, 3]])


@pytest.fixture()
def dca_model():
    model = make_model("llama")
    apply_dca(model, PRETRAINING_LENGTH)
    return model


def test_recorded_inputs_reproduce_the_op(dca_model):
    ids = torch.randint(3, 96, (1, 75))
    seen = []

    def check(inputs):
        probs, _ = dca_attention_weights(inputs["query"], inputs["key"], inputs["query_positions"],
                                         inputs["key_positions"], inputs["rope"], inputs["config"], inputs["scale"])
        groups = inputs["query"].shape[1] // inputs["value"].shape[1]
        mine = torch.matmul(probs, inputs["value"].float().repeat_interleave(groups, dim=1))
        op = dca_attention(inputs["query"], inputs["key"], inputs["value"], inputs["query_positions"],
                           inputs["key_positions"], inputs["rope"], inputs["config"], inputs["scale"], "reference")
        torch.testing.assert_close(mine, op.float(), rtol=1e-4, atol=1e-4)
        seen.append(inputs["query"].shape)

    original = patching.dca_attention
    with torch.no_grad(), recording_dca_inputs(dca_model, check):
        dca_model(input_ids=ids, use_cache=False)
    assert patching.dca_attention is original and len(seen) == 2


def test_probe_reports_relation_and_mass(dca_model):
    ids = torch.randint(3, 96, (90,))
    report = probe_attention(dca_model, ids, needle=(5, 9), rows=(-1, 70, 45))
    assert report.rows == (89, 70, 45) and report.chunk_len == CHUNK_LEN and len(report.layers) == 2
    # row 89 is in chunk 4, 70 in chunk 3, 45 in chunk 2; the needle (token 5) is in chunk 0
    assert report.needle_relation == ("inter", "inter", "inter")
    for layer in report.layers:
        assert layer.intra + layer.successive + layer.inter == pytest.approx(1.0, abs=1e-5)
        assert 0 < layer.needle <= layer.inter + 1e-6 and layer.needle <= layer.needle_max_head + 1e-6
        assert min(layer.intra, layer.successive, layer.inter) > 0
    near = probe_attention(dca_model, ids, needle=(80, 82), rows=(-1,))
    assert near.needle_relation == ("intra",)
    short = probe_attention(dca_model, ids[:CHUNK_LEN], needle=(0, 2))
    assert short.needle_relation == ("intra",)
    assert all(layer.intra == pytest.approx(1.0) and layer.inter == 0 for layer in short.layers)
    assert report.to_dict()["layers"][0]["layer"] == 0


def test_probe_needs_dca_and_a_valid_span():
    model = make_model("llama")
    with pytest.raises(ValueError, match="apply_dca"):
        probe_attention(model, torch.arange(3, 30))
    apply_dca(model, PRETRAINING_LENGTH)
    with pytest.raises(ValueError, match="needle span"):
        probe_attention(model, torch.arange(3, 30), needle=(20, 40))
