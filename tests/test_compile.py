"""``torch.compile(model, fullgraph=True)`` of a patched model traces without a graph break and
equals eager: prefill, and a decode step against a static cache (the ``generate`` +
``cache_implementation="static"`` + compile setup) and a dynamic one.

Compiling is slow on a 2-core CPU, so these tests use dynamo's ``eager`` backend (the graph is
captured in full — ``fullgraph=True`` fails on any break or host read — then run by PyTorch
without code generation; inductor would add minutes and test PyTorch, not chunkllama) and
one-layer models. The attention forward is one function for every family; the only family
branch in it is Qwen3's q/k norm, so llama and qwen3 run by default and the other families
under ``-m slow``.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from chunkllama import apply_dca
from tiny_models import PRETRAINING_LENGTH, make_model, random_ids

TOL = 1e-5
PROMPT, PAD, CACHE = 50, 7, 64
FAST = ("llama", "qwen3")
FAMILY_PARAMS = [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in ("llama", "qwen3", "mistral", "qwen2", "mixtral")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model):
    return torch.compile(model, fullgraph=True, backend="eager", dynamic=False)


def _batch():
    """Two rows, the second left-padded, with the mask and position ids ``generate`` passes."""
    ids = random_ids(2, PROMPT, seed=31)
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, :PAD] = 0
    ids[1, :PAD] = 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, positions


def _decode_step(model, cache_kind, run):
    """Prefill eagerly into a fresh cache, then one decode step through ``run`` (eager or compiled).

    ``cache_position`` is passed as ``generate`` does up to 5.3 (where the model would otherwise
    count a static cache's filled slots with a data-dependent reduction); later releases ignore it.
    """
    ids, mask, positions = _batch()
    if cache_kind == "static":
        cache = transformers.StaticCache(config=model.config, max_cache_len=CACHE)
    else:
        cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :-1], mask[:, :-1], positions[:, :-1], cache, use_cache=True, cache_position=torch.arange(PROMPT - 1))
        step = torch.arange(PROMPT - 1, PROMPT)
        return run(ids[:, -1:], mask, positions[:, -1:], cache, use_cache=True, cache_position=step).logits


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_compiled_decode_step_with_a_static_cache_equals_eager(family):
    if family == "mixtral":  # MoE experts: transformers' own code must compile first
        try:
            _decode_step(make_model(family, num_hidden_layers=1), "static", _compiled(make_model(family, num_hidden_layers=1)))
        except Exception as exc:  # noqa: BLE001 - any failure of the unpatched model
            pytest.skip(f"the unpatched {family} model does not compile with this transformers: {str(exc)[:200]}")
        torch._dynamo.reset()
    model = apply_dca(make_model(family, num_hidden_layers=1), pretraining_length=PRETRAINING_LENGTH)
    eager = _decode_step(model, "static", model)
    compiled = _decode_step(model, "static", _compiled(model))
    assert (compiled - eager).abs().max().item() <= TOL


def test_compiled_prefill_and_dynamic_cache_decode_equal_eager():
    model = apply_dca(make_model("llama", num_hidden_layers=1), pretraining_length=PRETRAINING_LENGTH)
    ids, mask, positions = _batch()
    with torch.no_grad():
        eager = model(ids, mask, positions, use_cache=False).logits
        compiled = _compiled(model)(ids, mask, positions, use_cache=False).logits
    valid = mask.bool()
    assert (compiled - eager)[valid].abs().max().item() <= TOL
    torch._dynamo.reset()
    eager = _decode_step(model, "dynamic", model)
    compiled = _decode_step(model, "dynamic", _compiled(model))
    assert (compiled - eager).abs().max().item() <= TOL


def test_compiled_decode_with_the_logn_temperature_equals_eager():
    """The per-query temperature (issue 14's ``logn_scale``) stays inside one graph."""
    model = apply_dca(make_model("llama", num_hidden_layers=1), pretraining_length=PRETRAINING_LENGTH,
                      logn_scale=0.5, logn_base=16)
    plain = apply_dca(make_model("llama", num_hidden_layers=1), pretraining_length=PRETRAINING_LENGTH)
    eager = _decode_step(model, "static", model)
    compiled = _decode_step(model, "static", _compiled(model))
    assert (compiled - eager).abs().max().item() <= TOL
    assert (_decode_step(plain, "static", plain) - eager).abs().max().item() > 100 * TOL  # the option is on
