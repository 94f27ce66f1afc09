"""Training through a patched model: ``loss.backward()`` gives the oracle-patched model's gradients.

The oracle model is the same random model with each attention ``forward`` replaced by the dense
float64 DCA of :mod:`oracle` (plain differentiable ops), so its autograd gradients are the truth.
Lengths span one, two and three chunks (``chunk_len = 20``), with and without left padding.
"""

from __future__ import annotations

import pytest
import torch

from chunkllama import apply_dca, remove_dca
from oracle import install_oracle
from tiny_models import CHUNK_LEN, CHUNK_SIZE, PRETRAINING_LENGTH, make_model, random_ids

REL_TOL = 1e-4  # of each parameter's largest gradient entry; fp32 model vs fp64 attention


def _loss(model, ids, **kwargs):
    logits = model(ids, use_cache=False, **kwargs).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _gradients(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    _loss(model, ids, **kwargs).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_gradients_match(got, want, label):
    assert got.keys() == want.keys() and got
    for name, expected in want.items():
        scale = expected.abs().max().item()
        err = (got[name] - expected).abs().max().item()
        assert err <= REL_TOL * scale + 1e-7, f"{label} {name}: max abs err {err:.3g} of max {scale:.3g}"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_parameter_gradients_match_oracle_model(family, monkeypatch):
    dca = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH)
    oracle = make_model(family)
    install_oracle(oracle, monkeypatch, CHUNK_LEN, CHUNK_SIZE)
    ids = random_ids(1, 61, seed=3)
    for length in (21, 41, 61):  # two and three chunks, one token past each boundary
        _assert_gradients_match(_gradients(dca, ids[:, :length]), _gradients(oracle, ids[:, :length]), f"{family} T={length}")


def test_parameter_gradients_match_oracle_model_with_left_padding(monkeypatch):
    dca = apply_dca(make_model("llama"), pretraining_length=PRETRAINING_LENGTH)
    oracle = make_model("llama")
    install_oracle(oracle, monkeypatch, CHUNK_LEN, CHUNK_SIZE)
    ids = random_ids(2, 50, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)
    kwargs = dict(attention_mask=mask, position_ids=position_ids)
    _assert_gradients_match(_gradients(dca, ids, **kwargs), _gradients(oracle, ids, **kwargs), "llama padded")


def test_remove_dca_after_training_restores_the_plain_forward():
    model = apply_dca(make_model("qwen3"), pretraining_length=PRETRAINING_LENGTH)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ids = random_ids(2, 45, seed=5)
    for _ in range(2):
        optimizer.zero_grad()
        _loss(model, ids).backward()
        optimizer.step()
    remove_dca(model)
    plain = make_model("qwen3")
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, plain(ids, use_cache=False).logits)
        assert not torch.equal(plain(ids, use_cache=False).logits, make_model("qwen3")(ids, use_cache=False).logits)
