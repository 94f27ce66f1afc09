"""The memory planner: parameter counts equal the model's, predicted peaks match measured ones.

Measured = the peak bytes of tensors allocated during ``generate`` (prefill + one token) on the CPU,
seen by :class:`memtrack.PeakLiveBytes` at the dispatcher; predicted = the planner's KV cache plus
prefill peak for the same shape, fp32. Small models so the whole file takes seconds.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from chunkllama import DCAConfig, apply_dca
from chunkllama.planner import (
    GIB,
    SHAPES,
    Shape,
    kv_cache_bytes,
    load_shape,
    make_plan,
    parse_size,
    plan,
    prefill_activation_peak,
)
from memtrack import PeakLiveBytes
from tiny_models import FAMILIES, make_config, make_model, random_ids

MEASURE_TOL = 0.15
SMALL = dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             vocab_size=256, max_position_embeddings=4096)
WINDOW = 256  # DCA pretraining_length of the measured models: chunk_len 160


@pytest.mark.parametrize("family", FAMILIES)
def test_params_equal_the_models_own_count(family):
    config = make_config(family, **SMALL)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert Shape.from_config(config).params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_builtin_shapes_count_like_their_models(name):
    fields = dict(SHAPES[name])
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert Shape.from_config(config).params() == sum(p.numel() for p in model.parameters())


def test_llama_3_8b_numbers():
    shape = load_shape("llama-3-8b")
    assert round(shape.params() / 1e9, 2) == 8.03
    assert kv_cache_bytes(shape, 2**20) == 128 * GIB  # 128 KiB per token in bf16
    assert kv_cache_bytes(shape, 2**20, kv_dtype="fp8") == 66 * GIB  # + fp32 scale per token and head


def _measure(family, length, piece, *, batch=1, pad=0, attn="sdpa", **overrides):
    model = make_model(family, **{**SMALL, **overrides})
    model.set_attn_implementation(attn)
    apply_dca(model, pretraining_length=WINDOW)
    ids = random_ids(batch, length, seed=7)
    mask = torch.ones_like(ids)
    mask[1:, :pad] = 0
    with torch.no_grad(), PeakLiveBytes() as tracker:
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0, prefill_chunk_size=piece)
    shape = Shape.from_config(model.config)
    predicted = kv_cache_bytes(shape, length, batch=batch, kv_dtype="fp32") + prefill_activation_peak(
        shape, length=length, piece=piece or length, batch=batch, act_bytes=4, cache_bytes=4,
        chunk_len=DCAConfig(WINDOW).chunk_len, attn_implementation=attn, padded=pad > 0, backend="reference",
    )
    return predicted, tracker.peak


@pytest.mark.parametrize(
    "family, length, piece, extra",
    [
        ("llama", 1536, None, {}),  # one shot: the MLP of the whole prompt dominates
        ("llama", 1536, 128, {}),  # chunked: MLP of a piece + the sdpa mask of piece x length
        # a 24-token final piece (1024 = 10 x 100 + 24): the reference path's static scores (3 rotations)
        ("qwen2", 1024, 100, dict(attn="eager")),
        ("llama", 1024, 200, {}),
        ("qwen3", 1024, 64, {}),
        ("mistral", 1024, 96, dict(batch=2, pad=37)),  # left padding
        ("mixtral", 1024, 128, {}),  # grouped experts
        ("llama", 1536, 96, dict(intermediate_size=64, num_key_value_heads=4)),  # the dynamic cache's growth copy
    ],
)
def test_predicted_peak_matches_measured(family, length, piece, extra):
    predicted, measured = _measure(family, length, piece, **extra)
    print(f"{family} T={length} P={piece} {extra}: predicted {predicted / 2**20:.2f} MiB, measured "
          f"{measured / 2**20:.2f} MiB, ratio {predicted / measured:.3f}")  # shown with pytest -s
    assert abs(predicted / measured - 1) <= MEASURE_TOL, f"predicted {predicted / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB"


def test_chunking_bounds_the_prefill_peak():
    shape = load_shape("llama-3-8b")
    common = dict(length=2**20, act_bytes=2, cache_bytes=2, chunk_len=5120, attn_implementation="flash")
    one_shot = prefill_activation_peak(shape, piece=2**20, **common)
    chunked = prefill_activation_peak(shape, piece=5120, **common)
    assert one_shot > 100 * GIB and chunked < 3 * GIB


def test_static_rows_limit_matches_the_reference_path():
    from chunkllama.attention import reference
    from chunkllama.planner import STATIC_MAX_ROWS

    assert STATIC_MAX_ROWS == reference.STATIC_MAX_ROWS


def test_plan_fits_decisions():
    shape = load_shape("llama-3-8b")
    bf16 = make_plan(shape, length=2**20)
    fp8 = make_plan(shape, length=2**20, kv_dtype="fp8")
    assert bf16.prefill_chunk == 10240  # two chunk strides, as the patched generate prefills
    assert not bf16.fits(chunked=False) and not bf16.fits() and fp8.fits() and not fp8.fits(chunked=False)
    tp = make_plan(load_shape("llama-3-70b"), length=2**17, gpus=8)
    assert tp.kv_cache == kv_cache_bytes(load_shape("llama-3-70b"), 2**17 + 16) // 8
    with pytest.raises(ValueError, match="cannot split 32 query / 8 key-value heads"):
        make_plan(shape, length=1024, gpus=3)
    with pytest.raises(ValueError, match="Unknown kv_dtype 'int4'"):
        make_plan(shape, length=1024, kv_dtype="int4")
    with pytest.raises(ValueError, match="Unknown cache 'paged'"):
        make_plan(shape, length=1024, cache="paged")
    with pytest.raises(ValueError, match="Unknown attn_implementation"):
        make_plan(shape, length=1024, attn_implementation="flex")


@pytest.mark.parametrize(
    "text, value",
    [("1M", 2**20), ("128k", 131072), ("128K", 131072), ("65536", 65536), ("1.5M", 1572864), ("141GiB", 141 * GIB),
     ("80GB", 80 * 10**9), ("512 MiB", 512 * 2**20), ("2T", 2 * 2**40), (4096, 4096)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "1 parsec", "-3", "1e6", "12GiBs"])
def test_parse_size_rejects_with_a_hint(text):
    with pytest.raises(ValueError, match="e.g. 1M, 128k"):
        parse_size(text)


def test_load_shape_from_file_dir_and_unknown(tmp_path):
    config = make_config("qwen2", **SMALL)
    config.save_pretrained(tmp_path)
    from_dir, from_file = load_shape(str(tmp_path)), load_shape(str(tmp_path / "config.json"))
    assert from_dir == from_file and from_dir.qkv_bias and from_dir.hidden == 128
    (tmp_path / "bad.json").write_text(json.dumps({"model_type": "x"}))
    with pytest.raises(ValueError, match="lacks hidden_size"):
        load_shape(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="never downloads"):
        load_shape("no-such-org/no-such-model")


def test_plan_command_prints_and_returns_fit(capsys):
    assert plan(model="llama-3-8b", length="1M", kv_dtype="fp8") == 0
    out = capsys.readouterr().out
    assert "KV cache" in out and "66.00 GiB" in out and "fits in 139.00 GiB" in out
    assert plan(model="llama-3-8b", length="1M") == 1
    assert "does NOT fit" in capsys.readouterr().out
