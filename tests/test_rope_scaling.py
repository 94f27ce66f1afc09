"""Rope scaling underneath DCA: linear/PI, dynamic NTK, YaRN (with its attention factor), llama3.

In transformers 5.x scaling lives in ``config.rope_parameters`` (``rope_type``, ``rope_theta``,
``factor``, ...). DCA must rotate with the model's own (scaled) ``inv_freq`` and multiply cos/sin
by its ``attention_scaling``; the oracle model reads both from the model's rotary module.
"""

from __future__ import annotations

import pytest
import torch

from chunkllama import apply_dca
from oracle import install_oracle, rope_cos_sin
from tiny_models import CHUNK_LEN, CHUNK_SIZE, PRETRAINING_LENGTH, make_model, random_ids, rotary_of

TOL = 1e-5

# rope_parameters each type needs (checked on transformers 5.17 and 5.24), plus max_position_embeddings.
SCALINGS = {
    "linear": (dict(rope_type="linear", factor=2.0, rope_theta=10000.0), 128),
    # dynamic NTK rescales once the input is longer than max_position_embeddings: keep that at 32
    "dynamic": (dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0), PRETRAINING_LENGTH),
    "yarn": (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=PRETRAINING_LENGTH, rope_theta=10000.0), 128),
    "llama3": (
        dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=PRETRAINING_LENGTH, rope_theta=10000.0),
        256,
    ),
}


def _model(family, scaling):
    params, max_positions = SCALINGS[scaling]
    return make_model(family, rope_parameters=dict(params), max_position_embeddings=max_positions)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_scaled_rope_under_dca_matches_oracle(family, scaling, monkeypatch):
    dca = apply_dca(_model(family, scaling), pretraining_length=PRETRAINING_LENGTH)
    oracle = _model(family, scaling)
    install_oracle(oracle, monkeypatch, CHUNK_LEN, CHUNK_SIZE)
    rotary = rotary_of(dca)
    assert rotary.rope_type == scaling
    ids = random_ids(1, 101, seed=31)
    for length in (20, 21, 41, 80, 101):
        err = (_logits(dca, ids[:, :length]) - _logits(oracle, ids[:, :length])).abs().max().item()
        assert err <= TOL, f"{family}/{scaling} T={length}: {err:.3g}"
    # The scaling matters here: the same model with unscaled RoPE gives other logits.
    unscaled = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH)
    assert (_logits(unscaled, ids) - _logits(dca, ids)).abs().max() > 100 * TOL


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_scaled_rope_one_chunk_equals_unpatched(scaling):
    plain = _model("llama", scaling)
    dca = apply_dca(_model("llama", scaling), pretraining_length=PRETRAINING_LENGTH)
    ids = random_ids(2, CHUNK_LEN, seed=32)
    assert (_logits(dca, ids) - _logits(plain, ids)).abs().max() <= TOL


@pytest.mark.parametrize("scaling", ["linear", "yarn", "llama3"])
def test_oracle_rotation_equals_the_models_own_rotary_module(scaling):
    """The oracle's cos/sin at arbitrary positions are exactly what the model's rotary module computes."""
    rotary = rotary_of(_model("llama", scaling))
    positions = torch.tensor([[0, 1, 5, 19, 20, 24, 63]])
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    o_cos, o_sin = rope_cos_sin(positions, rotary.inv_freq, rotary.attention_scaling)
    assert torch.equal(cos, o_cos) and torch.equal(sin, o_sin)


def test_dynamic_ntk_frequencies_follow_the_true_length():
    """Dynamic NTK rescales inv_freq from the true sequence length (read at call time by DCA)."""
    model = apply_dca(_model("llama", "dynamic"), pretraining_length=PRETRAINING_LENGTH)
    rotary = rotary_of(model)
    original = rotary.original_inv_freq.clone()
    _logits(model, random_ids(1, 20, seed=1))
    assert torch.equal(rotary.inv_freq, original)
    _logits(model, random_ids(1, 101, seed=1))
    assert not torch.equal(rotary.inv_freq, original)


def test_yarn_attention_factor_is_applied(monkeypatch):
    model = apply_dca(_model("llama", "yarn"), pretraining_length=PRETRAINING_LENGTH)
    rotary = rotary_of(model)
    assert rotary.attention_scaling == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1.0)
    ids = random_ids(1, 90, seed=33)
    with_factor = _logits(model, ids)
    monkeypatch.setattr(rotary, "attention_scaling", 1.0)
    without = _logits(model, ids)
    assert (with_factor - without).abs().max() > 100 * TOL
    # and the oracle without the factor agrees with DCA without it: the factor is the only change
    oracle = _model("llama", "yarn")
    install_oracle(oracle, monkeypatch, CHUNK_LEN, CHUNK_SIZE)
    monkeypatch.setattr(rotary_of(oracle), "attention_scaling", 1.0)
    assert (_logits(oracle, ids) - without).abs().max() <= TOL
