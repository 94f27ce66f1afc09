"""``apply_dca(model, kv_cache_dtype="fp8")``: the KV cache holds packed FP8 rows, through plain ``generate``.

On the CPU the reference path reads them (dequantized); the kernels' side is ``tests/attention/test_fp8.py``.
Checked here: every family generates with the FP8 cache and stays close to the full-precision cache;
FP8 is self-consistent (prefill in pieces = one shot, cache = full forward, left padding); the cache's
bytes are what the planner says (about half); the option is read back, undone, and refused where it
cannot work (gradients, a cache already holding other tensors).
"""

from __future__ import annotations

import pytest
import torch

from chunkllama import apply_dca, get_kv_cache_dtype, remove_dca
from chunkllama.compat import GENERATE_CHUNKS_PREFILL, cache_keyword
from chunkllama.planner import Shape, kv_cache_bytes
from tiny_models import FAMILIES, PRETRAINING_LENGTH, left_padded, make_model, random_ids

NEW = 3
#: teacher-forced logits of the tiny fp32 models (head_dim 16, sharp attention), FP8 cache vs full
#: precision: relative RMS error measured 0.024 (qwen3) to 0.057 (mixtral)
LOGIT_REL_RMS = 0.1


def _generate(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
            output_logits=True, pad_token_id=0, **kwargs,
        )


def _logits(out) -> torch.Tensor:
    return torch.stack(out.logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_fp8_cache_is_close_to_full_precision(family):
    model = make_model(family)
    ids = random_ids(2, 70, seed=3)  # 4 chunks of 20
    apply_dca(model, PRETRAINING_LENGTH, kv_cache_dtype="fp8")
    out = _generate(model, ids)
    cache = out.past_key_values
    assert cache.layers[0].keys.dtype == torch.uint8 and cache.layers[0].keys.shape[-1] == 16 + 4
    assert cache.get_seq_length() == 70 + NEW - 1
    with torch.no_grad():  # teacher-forced on what was generated: FP8 cache vs full precision
        fp8 = model(out.sequences).logits
        apply_dca(model, PRETRAINING_LENGTH)
        plain = model(out.sequences).logits
    error = ((fp8 - plain).norm() / plain.norm()).item()
    print(f"{family}: FP8 vs fp32 cache, logits relative RMS error {error:.4f}")
    assert 0 < error <= LOGIT_REL_RMS


@pytest.mark.skipif(not GENERATE_CHUNKS_PREFILL, reason="generate's chunked prefill differs from one shot before "
                    "transformers 5.17, with or without FP8 (measured on 5.0); chunkllama sets no default there")
@pytest.mark.parametrize("piece", [1, 7, 20])
def test_fp8_prefill_in_pieces_equals_one_shot(piece):
    model = make_model("llama")
    apply_dca(model, PRETRAINING_LENGTH, kv_cache_dtype="fp8")
    ids, mask = left_padded([random_ids(1, 53, seed=1)[0], random_ids(1, 30, seed=2)[0]])
    one_shot = _generate(model, ids, mask, prefill_chunk_size=None)
    pieces = _generate(model, ids, mask, prefill_chunk_size=piece)
    assert torch.equal(one_shot.sequences, pieces.sequences)
    assert (_logits(one_shot) - _logits(pieces)).abs().max().item() <= 1e-5


def test_fp8_cache_equals_full_forward():
    """Decoding against the FP8 cache gives the logits a full forward (no cache, same quantization) gives."""
    model = make_model("qwen2")
    apply_dca(model, PRETRAINING_LENGTH, kv_cache_dtype="fp8")
    ids = random_ids(1, 64, seed=4)
    out = _generate(model, ids, prefill_chunk_size=None)
    with torch.no_grad():
        full = model(out.sequences[:, :-1], use_cache=False).logits[:, -NEW:]
    assert (full.transpose(0, 1) - _logits(out)).abs().max().item() <= 1e-5


def test_fp8_cache_bytes_match_the_planner_and_are_about_half():
    model = make_model("llama", head_dim=64, hidden_size=128)  # head_dim 64: 68-byte rows
    ids = random_ids(1, 50, seed=5)
    sizes = {}
    for kv in ("auto", "fp8"):
        apply_dca(model, PRETRAINING_LENGTH, kv_cache_dtype=kv)
        model.to(torch.bfloat16)
        cache = _generate(model, ids).past_key_values
        sizes[kv] = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    tokens = 50 + NEW - 1  # the last generated token is never fed back
    shape = Shape.from_config(model.config)
    assert sizes["auto"] == kv_cache_bytes(shape, tokens, kv_dtype="bf16")
    assert sizes["fp8"] == kv_cache_bytes(shape, tokens, kv_dtype="fp8")
    assert sizes["fp8"] / sizes["auto"] == pytest.approx(68 / 128)


def test_option_is_read_back_replaced_and_removed():
    model = make_model("llama")
    assert get_kv_cache_dtype(model) is None
    apply_dca(model, PRETRAINING_LENGTH, kv_cache_dtype="fp8")
    assert get_kv_cache_dtype(model) == "fp8"
    apply_dca(model, PRETRAINING_LENGTH)
    assert get_kv_cache_dtype(model) == "auto"
    remove_dca(model)
    assert get_kv_cache_dtype(model) is None
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8'"):
        apply_dca(model, PRETRAINING_LENGTH, kv_cache_dtype="int8")


def test_fp8_refuses_gradients():
    model = make_model("llama").train()
    apply_dca(model, PRETRAINING_LENGTH, kv_cache_dtype="fp8")
    with pytest.raises(NotImplementedError, match="for inference"):
        model(random_ids(1, 10), use_cache=False)


def test_fp8_refuses_a_cache_holding_other_tensors():
    from transformers import DynamicCache

    model = make_model("llama")
    ids = random_ids(1, 12)
    apply_dca(model, PRETRAINING_LENGTH)
    cache = {cache_keyword(model): DynamicCache()}
    with torch.no_grad():
        model(ids, use_cache=True, **cache)
        apply_dca(model, PRETRAINING_LENGTH, kv_cache_dtype="fp8")
        with pytest.raises(ValueError, match="already holds torch.float32"):
            model(ids[:, :1], use_cache=True, **cache)


def test_eval_method_spec_takes_the_fp8_option():
    from chunkllama.eval.method_specs import parse_method
    from chunkllama.eval.methods import apply_method

    spec = parse_method("dca:kv_cache_dtype=fp8")
    assert spec.option("kv_cache_dtype") == "fp8"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        parse_method("dca:kv_cache_dtype=int4")
    model = make_model("llama")
    applied = apply_method(model, spec, 64, pretraining_length=PRETRAINING_LENGTH)
    assert applied.record["kv_cache_dtype"] == "fp8" and get_kv_cache_dtype(model) == "fp8"
    applied.restore()
    assert get_kv_cache_dtype(model) is None
