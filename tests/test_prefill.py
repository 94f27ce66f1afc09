"""Chunked prefill in ``generate``: a prompt fed in pieces equals the prompt fed at once, the default
applies per instance only, and every prefill piece computes the logits of one position.

The piece sizes cover 1 token, pieces that split a DCA chunk (chunk_len 20, chunk_size 24), a whole
chunk stride, and pieces longer than the prompt; the batches are left-padded (pads 0 and 23, so a
piece can hold only pads, pads and real tokens, or real tokens of one row and pads of the other).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from chunkllama import DCAConfig, apply_dca, remove_dca
from chunkllama.prefill import (
    default_prefill_chunk_size,
    disable_chunked_prefill,
    enable_chunked_prefill,
    get_prefill_chunk_size,
    resolve_prefill_chunk_size,
)
from tiny_models import CHUNK_LEN, FAMILIES, PRETRAINING_LENGTH, left_padded, make_model, random_ids

TOL = 1e-5  # fp32
NEW = 3
PIECES = (1, 7, 20, 24)  # one token, splitting a chunk, one chunk stride, chunk_size


def _generate(model, ids, mask=None, new=NEW, **kwargs):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True,
            output_logits=True, pad_token_id=0, **kwargs,
        )


def _max_logit_error(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))


class _PrefillPieces:
    """Counts the forwards of the base model during ``generate`` and the rows ``lm_head`` is asked for."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self.head_rows: list[int] = []
        self._handles = [
            model.model.register_forward_pre_hook(self._base, with_kwargs=True),
            model.lm_head.register_forward_pre_hook(self._head),
        ]

    def _base(self, module, args, kwargs):
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        self.lengths.append(tokens.shape[1])

    def _head(self, module, args):
        self.head_rows.append(args[0].shape[1])

    def remove(self):
        for handle in self._handles:
            handle.remove()


@pytest.fixture(scope="module")
def padded_prompt():
    rows = [random_ids(1, 73, seed=31)[0], random_ids(1, 50, seed=32)[0]]
    return left_padded(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_one_shot_for_every_piece_size(family, padded_prompt):
    ids, mask = padded_prompt
    model = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH)
    one_shot = _generate(model, ids, mask)
    for piece in PIECES:
        enable_chunked_prefill(model, piece)
        counter = _PrefillPieces(model)
        chunked = _generate(model, ids, mask)
        counter.remove()
        pieces = -(-ids.shape[1] // piece)
        assert counter.lengths[:pieces] == [min(piece, ids.shape[1] - i * piece) for i in range(pieces)]
        assert counter.lengths[pieces:] == [1] * (NEW - 1)
        assert counter.head_rows == [1] * (pieces + NEW - 1), "every forward must compute one position's logits"
        err = _max_logit_error(chunked, one_shot)
        assert err <= TOL, f"{family} pieces of {piece}: logits differ by {err:.3g}"
        assert torch.equal(chunked.sequences, one_shot.sequences), f"{family} pieces of {piece}"


def test_every_piece_size_from_1_to_the_prompt_length():
    """One family, no padding, every piece size: the last-position logits of each prefill equal one shot."""
    model = apply_dca(make_model("llama"), pretraining_length=PRETRAINING_LENGTH)
    prompt = random_ids(1, 41, seed=33)  # crosses the chunk boundaries at 20 and 40
    one_shot = _generate(model, prompt, new=1)
    for piece in range(1, prompt.shape[1] + 1):
        chunked = _generate(model, prompt, new=1, prefill_chunk_size=piece)
        assert _max_logit_error(chunked, one_shot) <= TOL, f"pieces of {piece}"


def test_default_is_two_chunks_and_plain_generate_uses_it(padded_prompt):
    ids, mask = padded_prompt
    config = DCAConfig(PRETRAINING_LENGTH)
    assert default_prefill_chunk_size(config) == 2 * CHUNK_LEN
    model = apply_dca(make_model("qwen2"), config)
    one_shot = _generate(model, ids, mask)
    enable_chunked_prefill(model, resolve_prefill_chunk_size(config, None))
    assert get_prefill_chunk_size(model) == 2 * CHUNK_LEN
    counter = _PrefillPieces(model)
    chunked = _generate(model, ids, mask)
    counter.remove()
    assert counter.lengths[:2] == [40, 33]
    assert torch.equal(chunked.sequences, one_shot.sequences)
    assert _max_logit_error(chunked, one_shot) <= TOL


@pytest.mark.parametrize(
    "call",
    [
        dict(prefill_chunk_size=None),  # explicit: one shot
        dict(prefill_chunk_size=32),  # explicit: the caller's size
        dict(generation_config=transformers.GenerationConfig(prefill_chunk_size=32, max_new_tokens=NEW, pad_token_id=0)),
        dict(use_cache=False),  # chunking needs a cache: one shot, no error
    ],
    ids=["explicit-none", "explicit-size", "generation-config", "no-cache"],
)
def test_the_callers_choice_wins(call, padded_prompt):
    ids, mask = padded_prompt
    model = enable_chunked_prefill(apply_dca(make_model("llama"), pretraining_length=PRETRAINING_LENGTH), 10)
    counter = _PrefillPieces(model)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **call)
    counter.remove()
    expected = {None: [73], 32: [32, 32, 9]}[call.get("prefill_chunk_size", 32 if "generation_config" in call else None)]
    if call.get("use_cache") is False:
        assert counter.lengths == [73 + i for i in range(NEW)]
    else:
        assert counter.lengths[: len(expected)] == expected


def test_model_generation_config_setting_wins(padded_prompt):
    ids, mask = padded_prompt
    model = enable_chunked_prefill(apply_dca(make_model("llama"), pretraining_length=PRETRAINING_LENGTH), 10)
    model.generation_config.prefill_chunk_size = 40
    counter = _PrefillPieces(model)
    _generate(model, ids, mask, new=2)
    counter.remove()
    assert counter.lengths == [40, 33, 1]


@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
def test_restarting_from_a_filled_cache_prefills_the_rest_in_one_shot():
    """A second turn on a cache that already holds tokens: the default stays out (5.17 would re-feed it)."""
    model = enable_chunked_prefill(apply_dca(make_model("mistral"), pretraining_length=PRETRAINING_LENGTH), 10)
    prompt = random_ids(1, 45, seed=34)
    first = _generate(model, prompt, new=3)
    cache = first.past_key_values
    cached = cache.get_seq_length()
    follow = torch.cat([first.sequences, random_ids(1, 30, seed=35)], dim=-1)
    counter = _PrefillPieces(model)
    second = _generate(model, follow, past_key_values=cache, new=3)
    counter.remove()
    assert counter.lengths[0] == follow.shape[1] - cached == 31
    plain = _generate(disable_chunked_prefill(model), follow, new=3)
    assert torch.equal(second.sequences, plain.sequences)
    assert _max_logit_error(second, plain) <= TOL


def test_beam_search_and_sampling_with_chunked_prefill(padded_prompt):
    ids, mask = padded_prompt
    model = apply_dca(make_model("qwen3"), pretraining_length=PRETRAINING_LENGTH)
    with torch.no_grad():
        beams = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
        torch.manual_seed(0)
        sampled = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=10, pad_token_id=0)
        enable_chunked_prefill(model, 7)
        chunked_beams = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
        torch.manual_seed(0)
        chunked_sampled = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=10, pad_token_id=0)
    assert torch.equal(beams, chunked_beams)
    assert torch.equal(sampled, chunked_sampled)


def test_enable_is_per_instance_and_disable_restores_exactly(tmp_path):
    model, other = make_model("mistral", sliding_window=16), make_model("mistral", sliding_window=16)
    before_generation = model.generation_config.to_dict()
    before_config = model.config.to_dict()
    enable_chunked_prefill(model, 12)
    enable_chunked_prefill(model, 12)  # idempotent
    assert get_prefill_chunk_size(model) == 12 and get_prefill_chunk_size(other) is None
    assert "generate" in model.__dict__ and "generate" not in other.__dict__
    assert type(model).generate is transformers.MistralForCausalLM.generate
    assert model.generation_config.to_dict() == before_generation and model.config.to_dict() == before_config
    model.save_pretrained(tmp_path)
    saved = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert saved.prefill_chunk_size is None
    enable_chunked_prefill(model, 30)  # replaces
    assert get_prefill_chunk_size(model) == 30
    disable_chunked_prefill(model)
    assert "generate" not in model.__dict__ and get_prefill_chunk_size(model) is None
    disable_chunked_prefill(model)  # no-op


def test_an_instance_level_generate_is_kept_and_restored():
    model = make_model("llama")
    calls = []

    def custom(*args, **kwargs):
        calls.append(kwargs.get("prefill_chunk_size"))
        return "custom"

    model.generate = custom
    enable_chunked_prefill(model, 9)
    assert model.generate(random_ids(1, 30)) == "custom" and calls == [9]
    disable_chunked_prefill(model)
    assert model.generate is custom


def test_survives_deepcopy_and_remove_dca():
    import copy

    model = enable_chunked_prefill(apply_dca(make_model("llama"), pretraining_length=PRETRAINING_LENGTH), 8)
    twin = copy.deepcopy(model)
    assert twin.generate.__self__ is twin and get_prefill_chunk_size(twin) == 8
    remove_dca(model)
    disable_chunked_prefill(model)
    assert get_prefill_chunk_size(model) is None and get_prefill_chunk_size(twin) == 8


def test_base_model_without_generate_is_left_alone():
    base = make_model("llama").model
    assert enable_chunked_prefill(base, 8) is base and get_prefill_chunk_size(base) is None


@pytest.mark.parametrize("bad", [0, -4, 2.5, "512", True])
def test_bad_sizes_raise_clear_errors(bad):
    with pytest.raises(ValueError, match="prefill_chunk_size must be a whole number"):
        enable_chunked_prefill(make_model("llama"), bad)


def test_resolve():
    config = DCAConfig(8192)
    assert resolve_prefill_chunk_size(config, None) == 10240
    assert resolve_prefill_chunk_size(config, 0) is None
    assert resolve_prefill_chunk_size(config, 4096) == 4096
    with pytest.raises(ValueError, match="or 0 to switch the default off"):
        resolve_prefill_chunk_size(config, -1)


@pytest.mark.parametrize("piece", [1, 7, 20])
def test_chunked_prefill_into_a_static_cache(piece, padded_prompt):
    """A StaticCache hands back all its slots (empty future ones included) to every piece."""
    ids, mask = padded_prompt
    model = apply_dca(make_model("llama"), pretraining_length=PRETRAINING_LENGTH)
    one_shot = _generate(model, ids, mask)
    chunked = _generate(model, ids, mask, cache_implementation="static", prefill_chunk_size=piece)
    assert torch.equal(chunked.sequences, one_shot.sequences)
    assert _max_logit_error(chunked, one_shot) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_no_query_by_key_mask_is_built_for_the_pieces(family, padded_prompt):
    """The patched layers read positions, never the mask: the base model must not materialise a
    (B, 1, Tq, Tk) mask per piece (5 GiB per piece at a 1M-token cache). Every layer gets the
    (B, 1, Tq, 1) placeholder, and the result still equals one-shot prefill (padding included)."""
    ids, mask = padded_prompt
    model = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH)
    one_shot = _generate(model, ids, mask)
    seen = []
    handles = [layer.self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["attention_mask"].shape)), with_kwargs=True)
        for layer in model.model.layers]
    chunked = _generate(model, ids, mask, prefill_chunk_size=16)
    for handle in handles:
        handle.remove()
    assert seen and all(shape[-1] == 1 and shape[1] == 1 for shape in seen), sorted(set(seen))
    assert _max_logit_error(chunked, one_shot) <= TOL
    assert torch.equal(chunked.sequences, one_shot.sequences)
