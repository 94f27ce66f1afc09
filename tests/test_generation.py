"""Generation with the KV cache: cached decoding equals recomputation, left padding equals rows alone,
and the cache holds keys rotated at their chunk-relative position."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from chunkllama import apply_dca, remove_dca
from tiny_models import CHUNK_LEN, FAMILIES, PRETRAINING_LENGTH, attention_modules, left_padded, make_model, random_ids, rotary_of
from oracle import rope_cos_sin, rotate

TOL = 1e-5
PROMPT = 90  # 4.5 chunks; generation crosses the boundary at 100
NEW = 14


def _forward(model, ids, cache=None, **kwargs):
    # The cache goes in positionally: its keyword is `past_key_values` up to 5.2x and `cache` after.
    with torch.no_grad():
        return model(ids, kwargs.pop("attention_mask", None), kwargs.pop("position_ids", None), cache, use_cache=cache is not None, **kwargs)


def _generate(model, ids, new=NEW, **kwargs):
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True,
            output_logits=True, pad_token_id=0, **kwargs,
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_with_cache_equals_recomputation(family):
    model = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH)
    prompt = random_ids(1, PROMPT, seed=21)
    result = _generate(model, prompt)
    tokens = result.sequences
    assert tokens.shape == (1, PROMPT + NEW)
    # step by step without a cache: full forward on the growing sequence, argmax
    seq = prompt
    for step in range(NEW):
        logits = _forward(model, seq).logits[:, -1]
        err = (logits - result.logits[step]).abs().max().item()
        assert err <= TOL, f"{family} step {step}: cached vs recomputed logits differ by {err:.3g}"
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=-1)
    assert torch.equal(seq, tokens)


def _assert_padded_generation_equals_recomputation(model, rows):
    """Greedy ``generate`` on left-padded ``rows`` equals full forwards on the growing sequences."""
    ids, mask = left_padded(rows)
    result = _generate(model, ids, attention_mask=mask)
    seq, seq_mask = ids, mask
    for step in range(NEW):
        positions = (seq_mask.cumsum(-1) - 1).masked_fill(seq_mask == 0, 1)
        logits = _forward(model, seq, attention_mask=seq_mask, position_ids=positions).logits[:, -1]
        err = (logits - result.logits[step]).abs().max().item()
        assert err <= TOL, f"step {step}: {err:.3g}"
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=-1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=-1)
    assert torch.equal(seq, result.sequences)


def test_logn_temperature_is_causal_cached_generation_equals_recomputation():
    """The per-query temperature depends only on the query's own position, so cached decoding with left
    padding (shifted positions) gives what a full forward gives."""
    model = apply_dca(make_model("llama"), pretraining_length=PRETRAINING_LENGTH, logn_scale=0.4, logn_base=40)
    _assert_padded_generation_equals_recomputation(model, [random_ids(1, PROMPT, seed=23)[0], random_ids(1, PROMPT - 7, seed=24)[0]])


def test_layer_windows_cached_generation_equals_recomputation():
    """A layer with its own window keeps keys rotated at its own chunk_len in the shared cache."""
    model = apply_dca(make_model("qwen3"), pretraining_length=PRETRAINING_LENGTH, layer_windows={0: 16})
    _assert_padded_generation_equals_recomputation(model, [random_ids(1, PROMPT, seed=25)[0], random_ids(1, PROMPT - 5, seed=26)[0]])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefill_in_pieces_and_decoding_equal_one_full_prefill(family):
    """Decoding token t with the cache = row t of a full prefill; a prompt fed in pieces = fed at once."""
    model = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH)
    ids = random_ids(2, 104, seed=22)
    full = _forward(model, ids).logits
    cache = DynamicCache(config=model.config)
    pieces = [(0, 37), (37, 40), (40, 41), (41, 79), (79, 80), (80, 81), (81, 99)] + [(t, t + 1) for t in range(99, 104)]
    for start, end in pieces:
        out = _forward(model, ids[:, start:end], cache=cache).logits
        err = (out - full[:, start:end]).abs().max().item()
        assert err <= TOL, f"{family} tokens {start}..{end}: {err:.3g}"
    assert cache.get_seq_length() == 104


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_rows_alone(family):
    model = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH)
    rows = [random_ids(1, n, seed=n)[0] for n in (88, 61, 79)]  # pads 0, 27, 9: rows cross boundaries at different steps
    ids, mask = left_padded(rows)
    batch = _generate(model, ids, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = _generate(model, row[None])
        assert torch.equal(batch.sequences[i, ids.shape[1] :], alone.sequences[0, row.shape[-1] :]), f"row {i}"
        for step in range(NEW):
            err = (batch.logits[step][i] - alone.logits[step][0]).abs().max().item()
            assert err <= TOL, f"{family} row {i} step {step}: {err:.3g}"


@pytest.mark.parametrize("real", [1, 2, 3])
def test_left_padded_batch_with_very_short_prompts(real):
    """Rows with one or two real tokens: their pads tie with them at position 1."""
    model = apply_dca(make_model("qwen2"), pretraining_length=PRETRAINING_LENGTH)
    rows = [random_ids(1, 50, seed=1)[0], random_ids(1, real, seed=2)[0]]
    ids, mask = left_padded(rows)
    batch = _generate(model, ids, new=30, attention_mask=mask)
    alone = _generate(model, rows[1][None], new=30)
    assert torch.equal(batch.sequences[1, 50:], alone.sequences[0, real:])
    assert max((b[1] - a[0]).abs().max().item() for b, a in zip(batch.logits, alone.logits)) <= TOL


def test_sampling_with_fixed_seed_runs_and_repeats():
    model = apply_dca(make_model("qwen2"), pretraining_length=PRETRAINING_LENGTH)
    rows = [random_ids(1, n, seed=n)[0] for n in (70, 55)]
    ids, mask = left_padded(rows)

    def sample(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, do_sample=True, top_k=20, temperature=1.5, max_new_tokens=25, pad_token_id=0)

    first, again, other = sample(0), sample(0), sample(1)
    assert first.shape == (2, ids.shape[1] + 25)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert ((first >= 0) & (first < model.config.vocab_size)).all()


def test_short_generation_equals_unpatched_model():
    """Prompt + generation within one chunk: the same tokens and logits as the plain model."""
    plain = make_model("llama")
    dca = apply_dca(make_model("llama"), pretraining_length=PRETRAINING_LENGTH)
    prompt = random_ids(1, 12, seed=3)
    a, b = _generate(plain, prompt, new=CHUNK_LEN - 12), _generate(dca, prompt, new=CHUNK_LEN - 12)
    assert torch.equal(a.sequences, b.sequences)
    assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits)) <= TOL


def test_generate_after_remove_is_plain_again():
    model = make_model("mistral")
    prompt = random_ids(1, PROMPT, seed=4)
    before = _generate(model, prompt).sequences
    apply_dca(model, pretraining_length=PRETRAINING_LENGTH)
    remove_dca(model)
    assert torch.equal(_generate(model, prompt).sequences, before)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_cache_holds_keys_rotated_at_position_mod_chunk_len(family):
    overrides = dict(sliding_window=16) if family == "mistral" else {}  # DCA must keep the whole cache
    model = apply_dca(make_model(family, **overrides), pretraining_length=PRETRAINING_LENGTH)
    inputs: dict[int, torch.Tensor] = {}

    def capture(module, args, kwargs):
        inputs[module.layer_idx] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hooks = [module.register_forward_pre_hook(capture, with_kwargs=True) for module in attention_modules(model)]
    rows = [random_ids(1, n, seed=n)[0] for n in (83, 70)]
    ids, mask = left_padded(rows)
    pads = [0, 13]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = DynamicCache(config=model.config)
    _forward(model, ids, cache=cache, attention_mask=mask, position_ids=positions)
    for hook in hooks:
        hook.remove()
    rotary = rotary_of(model)
    assert cache.get_seq_length() == ids.shape[1]
    for module in attention_modules(model):
        hidden = inputs[module.layer_idx]
        k = module.k_proj(hidden).view(*hidden.shape[:2], -1, module.head_dim)
        if hasattr(module, "k_norm"):
            k = module.k_norm(k)
        k = k.transpose(1, 2)
        v = module.v_proj(hidden).view(*hidden.shape[:2], -1, module.head_dim).transpose(1, 2)
        layer = cache.layers[module.layer_idx]
        for row, pad in enumerate(pads):
            true_pos = torch.arange(ids.shape[1] - pad)
            cos, sin = rope_cos_sin(true_pos % CHUNK_LEN, rotary.inv_freq, rotary.attention_scaling)
            expected = rotate(k[row, :, pad:], cos, sin)
            torch.testing.assert_close(layer.keys[row, :, pad:], expected, rtol=0, atol=1e-6)
            torch.testing.assert_close(layer.values[row, :, pad:], v[row, :, pad:], rtol=0, atol=0)
            # and not at the true positions (beyond the first chunk they differ)
            cos_true, sin_true = rope_cos_sin(true_pos, rotary.inv_freq, rotary.attention_scaling)
            assert (layer.keys[row, :, pad + CHUNK_LEN :] - rotate(k[row, :, pad:], cos_true, sin_true)[:, CHUNK_LEN:]).abs().max() > 1e-3


def test_sliding_window_model_generates_like_recomputation():
    model = apply_dca(make_model("mistral", sliding_window=16), pretraining_length=PRETRAINING_LENGTH)
    prompt = random_ids(1, 60, seed=5)
    result = _generate(model, prompt, new=6)
    seq = prompt
    for step in range(6):
        logits = _forward(model, seq).logits[:, -1]
        assert (logits - result.logits[step]).abs().max().item() <= TOL
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=-1)


def test_static_cache_and_beam_search():
    """A StaticCache hands back all its slots (empty ones included): they lie in the future by
    position and must stay invisible. Beam search reorders the cache."""
    model = apply_dca(make_model("llama"), pretraining_length=PRETRAINING_LENGTH)
    prompt = random_ids(1, 70, seed=6)
    dynamic = _generate(model, prompt, new=10)
    static = _generate(model, prompt, new=10, cache_implementation="static")
    assert torch.equal(dynamic.sequences, static.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(dynamic.logits, static.logits)) <= TOL
    with torch.no_grad():
        beams = model.generate(prompt, max_new_tokens=8, num_beams=3, num_return_sequences=3, do_sample=False, pad_token_id=0)
    assert beams.shape == (3, 78)


def test_no_maximum_length_warning_with_dca_and_the_unpatched_model_still_warns(monkeypatch):
    """transformers warns ("friendly reminder ... exceeded the model's predefined maximum length")
    once generation passes ``max_position_embeddings``; with DCA that is the point, so no warning.
    Per instance: the unpatched twin still warns, and remove_dca brings the warning back."""
    from transformers.generation import stopping_criteria

    seen = []
    monkeypatch.setattr(stopping_criteria.logger, "warning_once", lambda message, *a, **k: seen.append(message))
    model = make_model("llama", max_position_embeddings=48)
    plain = make_model("llama", max_position_embeddings=48)
    prompt = random_ids(1, 50, seed=8)
    apply_dca(model, pretraining_length=PRETRAINING_LENGTH)
    _generate(model, prompt, new=3)
    assert seen == []
    _generate(plain, prompt, new=3)
    assert seen and all("maximum length (48)" in message for message in seen)
    warned = len(seen)
    remove_dca(model)
    _generate(model, prompt, new=3)
    assert len(seen) > warned
    assert "_get_stopping_criteria" not in vars(model)
