"""Per-instance patching of whole models: DCA logits equal the oracle model's, and patching is exact.

The oracle model is the same random model with every attention module's ``forward``
monkeypatched to :func:`oracle.oracle_attention_forward` (q/k/v from the module's own weights,
Qwen3's q/k norms, the model's own rotary ``inv_freq``; full T×T scores; fp64 softmax).
"""

from __future__ import annotations

import copy

import pytest
import torch

import chunkllama
from chunkllama import DCAConfig, apply_dca, get_dca_config, is_dca_applied, remove_dca
from tiny_models import (
    BOUNDARY_LENGTHS,
    CHUNK_LEN,
    CHUNK_SIZE,
    FAMILIES,
    PRETRAINING_LENGTH,
    attention_modules,
    make_model,
    random_ids,
)
from oracle import install_oracle, oracle_attention_forward

TOL = 1e-5


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def _oracle_model(family, monkeypatch, chunk_len=CHUNK_LEN, chunk_size=CHUNK_SIZE, **overrides):
    model = make_model(family, **overrides)
    install_oracle(model, monkeypatch, chunk_len, chunk_size)
    return model


# ----------------------------------------------------------------------------- the oracle, model level
@pytest.mark.parametrize("family", FAMILIES)
def test_model_matches_oracle_at_every_chunk_boundary(family, monkeypatch):
    dca = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH)
    oracle = _oracle_model(family, monkeypatch)
    plain = make_model(family)
    ids = random_ids(1, max(BOUNDARY_LENGTHS), seed=7)
    for length in BOUNDARY_LENGTHS:
        got = _logits(dca, ids[:, :length])
        expected = _logits(oracle, ids[:, :length])
        err = (got - expected).abs().max().item()
        assert err <= TOL, f"{family} T={length}: max abs logit diff {err:.3g}"
    # The test can fail: beyond one chunk, plain RoPE attention is far from DCA.
    assert (_logits(plain, ids) - expected).abs().max() > 100 * TOL


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dca_kwargs", [dict(chunk_size=30, local_window=13), dict(local_window=0), dict(chunk_size=10, local_window=3)])
def test_model_matches_oracle_other_geometries(family, dca_kwargs, monkeypatch):
    cfg = DCAConfig(PRETRAINING_LENGTH, **dca_kwargs)
    dca = apply_dca(make_model(family), cfg)
    oracle = _oracle_model(family, monkeypatch, cfg.chunk_len, cfg.chunk_size)
    ids = random_ids(1, 90, seed=3)
    assert (_logits(dca, ids) - _logits(oracle, ids)).abs().max() <= TOL


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", dict(num_key_value_heads=4)),  # MHA
        ("llama", dict(num_key_value_heads=1)),  # MQA
        ("qwen3", dict(head_dim=24)),  # head_dim != hidden / heads
        ("mistral", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8)),  # GQA 4
    ],
)
def test_model_matches_oracle_head_layouts(family, overrides, monkeypatch):
    dca = apply_dca(make_model(family, **overrides), pretraining_length=PRETRAINING_LENGTH)
    oracle = _oracle_model(family, monkeypatch, **overrides)
    ids = random_ids(2, 83, seed=16)
    assert (_logits(dca, ids) - _logits(oracle, ids)).abs().max() <= TOL


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
def test_model_matches_oracle_left_padded_batch(family, monkeypatch):
    """HF-style left padding: attention_mask zeros and position ids counting from the first real token."""
    pads = [0, 5, 21]
    length = 85
    ids = random_ids(3, length, seed=11)
    mask = torch.ones(3, length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    hf_positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what generate() passes
    oracle_positions = torch.stack([torch.arange(length) - pad for pad in pads])  # padding negative
    dca = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH)
    oracle = _oracle_model(family, monkeypatch)
    got = _logits(dca, ids, attention_mask=mask, position_ids=hf_positions)
    expected = _logits(oracle, ids, position_ids=oracle_positions)
    for row, pad in enumerate(pads):
        err = (got[row, pad:] - expected[row, pad:]).abs().max().item()
        assert err <= TOL, f"row {row}: {err:.3g}"
        alone = _logits(dca, ids[row : row + 1, pad:])  # and equal to the row run alone
        assert (got[row, pad:] - alone[0]).abs().max().item() <= TOL


def _padded(lengths, total, seed=12):
    ids = random_ids(len(lengths), total, seed=seed)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
        ids[row, : total - n] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_padded_forward_without_position_ids(family):
    """``model(input_ids, attention_mask=mask)`` with left padding and no position ids (a plain
    batched forward, as ``model(**tokenizer(texts, padding=True))`` does): pads are not tokens."""
    plain = make_model(family)
    dca = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH)
    # within one chunk: identical to the unpatched model, which masks the pads
    ids, mask = _padded([CHUNK_LEN, 9, 15], CHUNK_LEN)
    expected = _logits(plain, ids, attention_mask=mask)
    for got in (_logits(dca, ids, attention_mask=mask), _logits(dca, ids, attention_mask=mask.bool())):
        assert ((got - expected).abs() * mask[..., None]).max() <= TOL
    # across chunks: every row equals the row alone, as with explicit (generate-style) position ids
    lengths = [83, 61, 40]
    ids, mask = _padded(lengths, 83)
    got = _logits(dca, ids, attention_mask=mask)
    hf_positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    assert torch.equal(got, _logits(dca, ids, attention_mask=mask, position_ids=hf_positions))
    for row, n in enumerate(lengths):
        alone = _logits(dca, ids[row : row + 1, 83 - n :])
        assert (got[row, 83 - n :] - alone[0]).abs().max() <= TOL, f"row {row}"
    with torch.no_grad():  # the base model called with positional arguments; inputs_embeds
        hidden = dca.model(ids, mask).last_hidden_state
        assert (dca.lm_head(hidden) - got).abs().max() <= TOL
        embeds = dca.model.embed_tokens(ids)
        assert (dca(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits - got).abs().max() <= TOL


def test_right_padded_forward_real_tokens_equal_rows_alone():
    dca = apply_dca(make_model("llama"), pretraining_length=PRETRAINING_LENGTH)
    ids = random_ids(2, 70, seed=13)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, 45:] = 0
    got = _logits(dca, ids, attention_mask=mask)
    assert (got[1, :45] - _logits(dca, ids[1:, :45])[0]).abs().max() <= TOL
    assert (got[0] - _logits(dca, ids[:1])[0]).abs().max() <= TOL


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_is_replaced_by_dca(family, monkeypatch):
    """A model configured with a sliding window still gets full DCA (and gets its window back on removal)."""
    overrides = dict(sliding_window=16)
    if family == "qwen2":
        overrides.update(use_sliding_window=True, max_window_layers=0)
    model = make_model(family, **overrides)
    before = model.config.to_dict()
    apply_dca(model, pretraining_length=PRETRAINING_LENGTH)
    oracle = _oracle_model(family, monkeypatch, **overrides)
    ids = random_ids(1, 70, seed=2)
    assert (_logits(model, ids) - _logits(oracle, ids)).abs().max() <= TOL
    remove_dca(model)
    assert model.config.to_dict() == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_low_precision_model_error_within_twice_plain(family, dtype):
    """Whole model in bf16/fp16: the DCA model's error against its fp32 self (== the oracle, above)
    is at most twice the error the unpatched model makes in that dtype against its fp32 self."""
    ids = random_ids(2, 101, seed=14)
    dca_error = (
        _logits(apply_dca(make_model(family, dtype=dtype), pretraining_length=PRETRAINING_LENGTH), ids).float()
        - _logits(apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH), ids)
    ).abs().max().item()
    plain_error = (_logits(make_model(family, dtype=dtype), ids).float() - _logits(make_model(family), ids)).abs().max().item()
    assert 0 < dca_error <= 2 * plain_error, f"{dca_error:.3g} vs plain {plain_error:.3g}"


# ----------------------------------------------------------------------------- one chunk == the plain model
@pytest.mark.parametrize("family", FAMILIES)
def test_short_inputs_equal_the_unpatched_model(family):
    plain = make_model(family)
    dca = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH)
    ids = random_ids(2, CHUNK_SIZE + 2, seed=1)
    for length in (1, 2, 7, CHUNK_LEN - 1, CHUNK_LEN):
        err = (_logits(dca, ids[:, :length]) - _logits(plain, ids[:, :length])).abs().max().item()
        assert err <= TOL, f"T={length}: {err:.3g}"
    # Sharper: the local window keeps true distances for successive-chunk keys, so DCA equals plain
    # RoPE up to position chunk_size (every distance <= chunk_size) and differs from the next one on.
    dca_logits, plain_logits = _logits(dca, ids), _logits(plain, ids)
    assert (dca_logits[:, : CHUNK_SIZE + 1] - plain_logits[:, : CHUNK_SIZE + 1]).abs().max() <= TOL
    assert (dca_logits[:, CHUNK_SIZE + 1] - plain_logits[:, CHUNK_SIZE + 1]).abs().max() > 100 * TOL


def test_short_inputs_equal_the_unpatched_model_with_sdpa():
    plain = make_model("llama")
    plain.config._attn_implementation = "sdpa"
    dca = apply_dca(make_model("llama"), pretraining_length=PRETRAINING_LENGTH)
    ids = random_ids(1, CHUNK_LEN, seed=4)
    assert (_logits(dca, ids) - _logits(plain, ids)).abs().max() <= TOL


# ----------------------------------------------------------------------------- exact, per instance, idempotent
def _instance_state(model):
    """Everything per-instance patching could touch: instance dicts of all modules and the config."""
    return (
        {name: sorted(k for k in vars(m) if not k.startswith("_modules")) for name, m in model.named_modules()},
        {name: vars(m).get("forward") for name, m in model.named_modules()},
        {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()},
        model.config.to_dict(),
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_bit_identical_logits_and_state(family):
    model = make_model(family)
    ids = random_ids(2, 70, seed=5)
    before_logits = _logits(model, ids)
    before_state = _instance_state(model)
    apply_dca(model, pretraining_length=PRETRAINING_LENGTH)
    assert is_dca_applied(model)
    assert not torch.equal(_logits(model, ids), before_logits)
    assert remove_dca(model) is model
    assert torch.equal(_logits(model, ids), before_logits)
    assert _instance_state(model) == before_state
    assert not any("chunkllama" in k for m in model.modules() for k in vars(m))
    assert not is_dca_applied(model) and get_dca_config(model) is None
    remove_dca(model)  # no-op on an unpatched model
    assert torch.equal(_logits(model, ids), before_logits)


def test_remove_restores_a_pre_existing_instance_forward():
    model = make_model("llama")
    module = attention_modules(model)[0]
    original = module.forward

    def custom_forward(*args, **kwargs):
        return original(*args, **kwargs)

    module.forward = custom_forward
    apply_dca(model, pretraining_length=PRETRAINING_LENGTH)
    assert module.forward is not custom_forward
    remove_dca(model)
    assert module.forward is custom_forward


def test_apply_twice_equals_once_and_reapply_replaces():
    ids = random_ids(1, 90, seed=6)
    once = apply_dca(make_model("qwen3"), pretraining_length=PRETRAINING_LENGTH)
    twice = apply_dca(apply_dca(make_model("qwen3"), pretraining_length=PRETRAINING_LENGTH), pretraining_length=PRETRAINING_LENGTH)
    assert torch.equal(_logits(once, ids), _logits(twice, ids))
    assert get_dca_config(twice) == DCAConfig(PRETRAINING_LENGTH)

    other = DCAConfig(40, chunk_size=30, local_window=5)
    replaced = apply_dca(make_model("qwen3"), pretraining_length=PRETRAINING_LENGTH)
    apply_dca(replaced, other)
    fresh = apply_dca(make_model("qwen3"), other)
    assert get_dca_config(replaced) == other
    assert torch.equal(_logits(replaced, ids), _logits(fresh, ids))
    plain_logits = _logits(make_model("qwen3"), ids)
    remove_dca(replaced)  # one removal undoes the whole stack
    assert torch.equal(_logits(replaced, ids), plain_logits)


def test_other_instances_and_the_class_are_untouched():
    patched, untouched = make_model("llama"), make_model("llama")
    ids = random_ids(1, 60, seed=8)
    expected = _logits(untouched, ids)
    class_forward = type(attention_modules(patched)[0]).forward
    apply_dca(patched, pretraining_length=PRETRAINING_LENGTH)
    assert torch.equal(_logits(untouched, ids), expected)
    assert type(attention_modules(patched)[0]).forward is class_forward
    assert not is_dca_applied(untouched)
    assert torch.equal(_logits(make_model("llama"), ids), expected)  # new instances too
    clone = copy.deepcopy(patched)  # a deep copy carries its own, independent patch
    remove_dca(patched)
    assert is_dca_applied(clone)
    assert torch.equal(_logits(patched, ids), expected)
    remove_dca(clone)  # and removing it restores the clone exactly too
    assert not any(name in vars(m) for m in clone.modules() for name in ("forward", "save_pretrained", "_get_stopping_criteria"))
    assert torch.equal(_logits(clone, ids), expected)


def test_get_dca_config_reads_back_and_returns_model():
    model = make_model("mistral")
    assert get_dca_config(model) is None
    assert apply_dca(model, pretraining_length=64, chunk_size=40, local_window=6) is model
    assert get_dca_config(model) == DCAConfig(64, 40, 6)
    assert get_dca_config(model).to_dict() == {"pretraining_length": 64, "chunk_size": 40, "local_window": 6, "chunk_len": 34}


def test_apply_to_base_model():
    model = make_model("llama")
    apply_dca(model.model, pretraining_length=PRETRAINING_LENGTH)
    assert get_dca_config(model) == DCAConfig(PRETRAINING_LENGTH)  # found from the wrapper too
    reference = apply_dca(make_model("llama"), pretraining_length=PRETRAINING_LENGTH)
    ids = random_ids(1, 50, seed=9)
    assert torch.equal(_logits(model, ids), _logits(reference, ids))
    remove_dca(model)
    assert not is_dca_applied(model)


def test_default_length_is_max_position_embeddings():
    model = make_model("llama", max_position_embeddings=PRETRAINING_LENGTH)
    apply_dca(model)
    assert get_dca_config(model) == DCAConfig(PRETRAINING_LENGTH)


def test_dual_chunk_attention_config_is_picked_up(monkeypatch):
    data = {"chunk_size": 30, "local_size": 13, "original_max_position_embeddings": 40}
    model = make_model("qwen2", dual_chunk_attention_config=data)
    apply_dca(model)
    assert get_dca_config(model) == DCAConfig(40, 30, 13)
    oracle = _oracle_model("qwen2", monkeypatch, chunk_len=17, chunk_size=30)
    ids = random_ids(1, 75, seed=10)
    assert (_logits(model, ids) - _logits(oracle, ids)).abs().max() <= TOL
    # explicit arguments win over the config's
    apply_dca(model, pretraining_length=PRETRAINING_LENGTH)
    assert get_dca_config(model) == DCAConfig(PRETRAINING_LENGTH)
    apply_dca(model, local_window=2)  # the config's window length with a new local window
    assert get_dca_config(model) == DCAConfig(40, local_window=2)


def test_written_config_round_trips_through_save_pretrained(tmp_path):
    import transformers

    model = make_model("qwen2")
    cfg = DCAConfig(PRETRAINING_LENGTH, chunk_size=20, local_window=2)
    cfg.write_to_model_config(model.config)
    model.save_pretrained(tmp_path)
    reloaded = apply_dca(transformers.AutoModelForCausalLM.from_pretrained(tmp_path))
    assert get_dca_config(reloaded) == cfg


# ----------------------------------------------------------------------------- the config is per instance
def _twin(model):
    """A second model built from the very same config object (as transformers shares it), same weights."""
    import transformers

    twin = transformers.AutoModelForCausalLM.from_config(model.config)
    twin.load_state_dict(model.state_dict())
    assert twin.config is model.config
    return twin.eval()


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("mistral", dict(sliding_window=16)),  # sliding_window
        ("qwen2", dict(sliding_window=16, use_sliding_window=True, max_window_layers=0)),  # layer_types
    ],
)
def test_patching_one_of_two_models_sharing_a_config_leaves_the_other_bit_identical(family, overrides):
    patched = make_model(family, **overrides)
    other = _twin(patched)
    shared = patched.config
    before = shared.to_dict()
    ids = random_ids(1, 40, seed=21)
    with torch.no_grad():  # with the cache: the other model keeps its sliding-window cache and mask
        expected = other.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    apply_dca(patched, pretraining_length=PRETRAINING_LENGTH)
    assert shared.to_dict() == before and other.config is shared
    assert patched.config is not shared and patched.model.config is patched.config
    assert all(m.config is patched.config for m in attention_modules(patched))
    with torch.no_grad():
        got = other.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits))
    assert not torch.equal(_logits(patched, ids), _logits(other, ids))  # the patched one does run DCA
    remove_dca(patched)
    assert patched.config is shared and patched.model.config is shared
    assert all(m.config is shared for m in patched.modules() if "config" in vars(m))
    assert torch.equal(_logits(patched, ids), _logits(other, ids))


@pytest.mark.parametrize("family,overrides", [("mistral", dict(sliding_window=16)), ("llama", {})])
def test_save_pretrained_of_a_patched_model_writes_its_original_config_plus_dca(family, overrides, tmp_path):
    import json

    import transformers

    model = make_model(family, **overrides)
    ids = random_ids(1, 70, seed=22)
    plain_logits = _logits(model, ids)
    cfg = DCAConfig(PRETRAINING_LENGTH, chunk_size=20, local_window=2)
    apply_dca(model, cfg)
    dca_logits = _logits(model, ids)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written.get("sliding_window") == overrides.get("sliding_window")
    assert written["dual_chunk_attention_config"] == cfg.to_hf_dict()
    assert "dual_chunk_attention_config" not in model.config.to_dict()  # nothing left behind
    assert is_dca_applied(model)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(_logits(reloaded, ids), plain_logits)  # a plain load is the original model
    apply_dca(reloaded)  # and apply_dca picks the saved settings up
    assert get_dca_config(reloaded) == cfg
    assert torch.equal(_logits(reloaded, ids), dca_logits)


# ----------------------------------------------------------------------------- transformers features DCA cannot give
def test_output_attentions_is_a_clear_error_never_an_empty_tuple():
    model = apply_dca(make_model("llama"), pretraining_length=PRETRAINING_LENGTH)
    ids = random_ids(1, 30, seed=23)
    with pytest.raises(ValueError, match="never forms the attention matrix"):
        model(ids, output_attentions=True)
    with pytest.raises(ValueError, match="never forms the attention matrix"):
        model.generate(ids, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True, pad_token_id=0)
    model.config.output_attentions = True  # asked for through the config
    with pytest.raises(ValueError, match="never forms the attention matrix"):
        model(ids)
    model.config.output_attentions = False
    assert model(ids).logits.shape == (1, 30, 96)
    remove_dca(model)  # the plain model gives its maps again
    assert len(model(ids, output_attentions=True).attentions) == 2


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_sequences_are_a_clear_error(family):
    """Position ids restarting inside a row (padding-free packing) are refused, not silently wrong;
    the same sequences in rows of their own (left padded) work."""
    model = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH)
    ids = random_ids(1, 70, seed=24)
    packed = torch.cat([torch.arange(45), torch.arange(25)])[None]
    with pytest.raises(ValueError, match="packed sequences"):
        _logits(model, ids, position_ids=packed)
    mask = torch.ones(2, 45, dtype=torch.long)
    mask[1, :20] = 0
    rows = torch.zeros(2, 45, dtype=torch.long)
    rows[0], rows[1, 20:] = ids[0, :45], ids[0, 45:]
    got = _logits(model, rows, attention_mask=mask)
    assert (got[1, 20:] - _logits(model, ids[:, 45:])[0]).abs().max() <= TOL


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(pretraining_length=0), "pretraining_length"),
        (dict(pretraining_length=-32), "pretraining_length"),
        (dict(pretraining_length=32, local_window=24), "local_window"),
        (dict(pretraining_length=32, chunk_size=16, local_window=20), "local_window"),
        (dict(pretraining_length=32, chunk_size=48), "chunk_size"),
        (dict(pretraining_length=32, chunk_size=0), "chunk_size"),
        (dict(pretraining_length=32, local_window=-1), "local_window"),
    ],
)
def test_bad_lengths_fail_at_apply(kwargs, needle):
    model = make_model("llama")
    with pytest.raises(ValueError, match=needle):
        apply_dca(model, **kwargs)
    assert not is_dca_applied(model)


def test_config_and_lengths_together_is_an_error():
    with pytest.raises(ValueError):
        apply_dca(make_model("llama"), DCAConfig(32), chunk_size=20)


def test_bad_backend_fails_at_apply():
    model = make_model("llama")
    with pytest.raises(ValueError, match="backend"):
        apply_dca(model, pretraining_length=PRETRAINING_LENGTH, backend="flash")
    assert not is_dca_applied(model)


def test_unsupported_model_names_class_and_supported_list():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError) as info:
        apply_dca(model, pretraining_length=32)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    for name in ("Llama", "Mistral", "Mixtral", "Qwen2", "Qwen3"):
        assert name in message
    assert chunkllama.SUPPORTED_MODELS in message
    assert not any("chunkllama" in k for m in model.modules() for k in vars(m))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral"])
def test_cuda_model_matches_oracle(family, backend, monkeypatch):
    dca = apply_dca(make_model(family).cuda(), pretraining_length=PRETRAINING_LENGTH, backend=backend)
    oracle = _oracle_model(family, monkeypatch)
    ids = random_ids(2, 101, seed=15)
    err = (_logits(dca, ids.cuda()).cpu() - _logits(oracle, ids)).abs().max().item()
    assert err <= TOL, f"{family}/{backend}: {err:.3g}"
    # and generation on the GPU equals recomputation
    with torch.no_grad():
        out = dca.generate(ids[:1].cuda(), max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq = ids[:1].cuda()
        for _ in range(6):
            seq = torch.cat([seq, dca(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
    assert torch.equal(out, seq)


# --------------------------------------------------------------------------- logit scale (issue 14 variant)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_logit_scale_matches_the_oracle_with_a_scaled_softmax(family, monkeypatch):
    """``logit_scale`` multiplies every attention logit: the oracle with each module's ``scaling`` times it."""
    dca = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH, logit_scale=1.5)
    oracle = _oracle_model(family, monkeypatch)
    for module in oracle.modules():
        if hasattr(module, "scaling") and hasattr(module, "q_proj"):
            module.scaling = module.scaling * 1.5
    ids = random_ids(1, max(BOUNDARY_LENGTHS), seed=11)
    got, expected = _logits(dca, ids), _logits(oracle, ids)
    assert (got - expected).abs().max().item() <= TOL
    # the scale changes the answer: the unscaled DCA model is far from it
    plain_dca = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH)
    assert (_logits(plain_dca, ids) - expected).abs().max() > 100 * TOL
    assert chunkllama.patching.get_logit_scale(dca) == 1.5
    chunkllama.remove_dca(dca)
    assert chunkllama.patching.get_logit_scale(dca) is None


# --------------------------------------------------------------------------- log-n temperature (issue 14 variant)
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logn_scale_matches_the_oracle_with_per_row_temperatures(family, monkeypatch):
    """``logn_scale``: query row ``p`` has its logits times ``max(1, 1 + c ln((p+1)/base))``."""
    logn = (0.5, 24)
    dca = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH, logn_scale=logn[0], logn_base=logn[1])
    oracle = make_model(family)
    install_oracle(oracle, monkeypatch, CHUNK_LEN, CHUNK_SIZE, logn=logn)
    ids = random_ids(2, max(BOUNDARY_LENGTHS), seed=12)
    expected = _logits(oracle, ids)
    assert (_logits(dca, ids) - expected).abs().max().item() <= TOL
    # positions below the base are untouched, later ones are not
    plain = _logits(apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH), ids)
    assert (plain[:, :23] - expected[:, :23]).abs().max().item() <= TOL
    assert (plain[:, 60:] - expected[:, 60:]).abs().max().item() > 100 * TOL
    assert chunkllama.patching.get_logn_scaling(dca) == logn
    remove_dca(dca)
    assert chunkllama.patching.get_logn_scaling(dca) is None


def test_logn_scale_defaults_to_the_dca_window_and_zero_is_off():
    model = apply_dca(make_model("llama"), pretraining_length=PRETRAINING_LENGTH, logn_scale=0.1)
    assert chunkllama.patching.get_logn_scaling(model) == (0.1, PRETRAINING_LENGTH)
    apply_dca(model, pretraining_length=PRETRAINING_LENGTH, logn_scale=0, logn_base=8)
    assert chunkllama.patching.get_logn_scaling(model) is None


# --------------------------------------------------------------------------- per-layer windows (issue 14 variant)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_layer_windows_match_the_oracle_with_each_layers_own_chunks(family, monkeypatch):
    """Layer 1 runs DCA for a 16-token window (chunk_len 10, chunk_size 12), layer 0 the model's 32."""
    dca = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH, layer_windows={1: 16})
    oracle = make_model(family)
    rotary = next(m for m in oracle.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    small = DCAConfig(16)
    for index, module in enumerate(attention_modules(oracle)):
        chunk_len, chunk_size = (small.chunk_len, small.chunk_size) if index == 1 else (CHUNK_LEN, CHUNK_SIZE)
        monkeypatch.setattr(module, "forward", oracle_attention_forward(module, rotary, chunk_len, chunk_size), raising=False)
    ids = random_ids(2, max(BOUNDARY_LENGTHS), seed=13)
    expected = _logits(oracle, ids)
    assert (_logits(dca, ids) - expected).abs().max().item() <= TOL
    plain = _logits(apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH), ids)
    assert (plain - expected).abs().max().item() > 100 * TOL
    assert chunkllama.patching.get_layer_windows(dca) == {1: 16}
    assert get_dca_config(dca) == DCAConfig(PRETRAINING_LENGTH)
    remove_dca(dca)
    assert chunkllama.patching.get_layer_windows(dca) is None


@pytest.mark.parametrize("windows, match", [
    ({5: 16}, "layer 5 is not a layer index of this model"),
    ({-1: 16}, "layer -1 is not a layer index"),
    ({0: "16"}, "the window of layer 0 must be a number of tokens"),
    ([16, 16], "layer_windows must map layer indices to window lengths"),
])
def test_layer_windows_are_checked(windows, match):
    model = make_model("llama")
    with pytest.raises(ValueError, match=match):
        apply_dca(model, pretraining_length=PRETRAINING_LENGTH, layer_windows=windows)
    assert not chunkllama.is_dca_applied(model)


@pytest.mark.parametrize("kwargs, match", [
    (dict(logn_scale=-0.1), "logn_scale must be a finite number >= 0"),
    (dict(logn_scale=float("nan")), "logn_scale must be a finite number >= 0"),
    (dict(logn_scale="0.1"), "logn_scale must be a finite number >= 0"),
    (dict(logn_scale=0.1, logn_base=0), "logn_base must be a positive number of tokens"),
    (dict(logn_scale=0.1, logn_base=8.5), "logn_base must be a positive number of tokens"),
])
def test_logn_options_are_checked(kwargs, match):
    model = make_model("llama")
    with pytest.raises(ValueError, match=match):
        apply_dca(model, pretraining_length=PRETRAINING_LENGTH, **kwargs)
    assert not chunkllama.is_dca_applied(model)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_logit_scale_must_be_a_positive_number(bad):
    model = make_model("llama")
    with pytest.raises(ValueError, match="logit_scale must be a positive finite number"):
        apply_dca(model, pretraining_length=PRETRAINING_LENGTH, logit_scale=bad)
    assert not chunkllama.is_dca_applied(model)
