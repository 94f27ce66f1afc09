"""Passkey prompts (the DEVICE.md protocol) and their scoring, offline on tiny models."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import transformers

from chunkllama import apply_dca
from chunkllama.eval import passkey as pk


# --- prompts ------------------------------------------------------------------------------------


def test_keys_and_depths_follow_the_protocol():
    assert [pk.trial_passkey(t) for t in range(5)] == [random.Random(t).randint(10000, 99999) for t in range(5)]
    assert len({pk.trial_passkey(t) for t in range(5)}) == 5
    assert [pk.trial_depth(t, 5) for t in range(5)] == [0.1, 0.3, 0.5, 0.7, 0.9]
    with pytest.raises(ValueError):
        pk.trial_depth(5, 5)


def test_prompt_is_deterministic(tiny_tokenizer):
    a = pk.make_passkey_prompt(tiny_tokenizer, 400, trial=3, n_trials=5)
    b = pk.make_passkey_prompt(tiny_tokenizer, 400, trial=3, n_trials=5)
    assert a == b
    assert a.passkey == random.Random(3).randint(10000, 99999)
    assert a.depth == 0.7
    assert pk.passkey_prompts(tiny_tokenizer, 400, 5)[3] == a
    assert pk.make_passkey_prompt(tiny_tokenizer, 400, trial=2, n_trials=5).passkey != a.passkey


def test_prompt_text_layout(tiny_tokenizer):
    p = pk.make_passkey_prompt(tiny_tokenizer, 500, trial=0, n_trials=1)
    per_unit = len(tiny_tokenizer(pk.FILLER + " ", add_special_tokens=False)["input_ids"])
    assert p.n_filler == (500 - 80) // per_unit
    before = " ".join([pk.FILLER] * p.n_before)
    after = " ".join([pk.FILLER] * (p.n_filler - p.n_before))
    key_line = f"\nThe pass key is {p.passkey}. Remember it. {p.passkey} is the pass key.\n"
    assert p.text == pk.TASK_DESCRIPTION + "\n" + before + key_line + after + "\nWhat is the pass key? The pass key is"
    assert p.key_line == key_line
    assert p.answer_ids == tuple(tiny_tokenizer(" " + str(p.passkey), add_special_tokens=False)["input_ids"])
    assert p.input_ids == tuple(tiny_tokenizer(p.text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_key_placed_at_depth(tiny_tokenizer, depth):
    p = pk.make_passkey_prompt(tiny_tokenizer, 600, depth=depth)
    assert p.n_before == int(depth * p.n_filler)
    head, tail = p.text.split(p.key_line)
    assert head.count(pk.FILLER) == p.n_before
    assert tail.count(pk.FILLER) == p.n_filler - p.n_before


@pytest.mark.parametrize("length", [200, 333, 512, 1024, 2048])
def test_token_count_within_length(tiny_tokenizer, length):
    for p in pk.passkey_prompts(tiny_tokenizer, length, 3):
        assert len(p.input_ids) <= length
        assert len(p.input_ids) > length - 80 - 2 * len(tiny_tokenizer(pk.FILLER + " ")["input_ids"])


def test_bad_arguments(tiny_tokenizer):
    with pytest.raises(ValueError, match="too short"):
        pk.make_passkey_prompt(tiny_tokenizer, 80)
    with pytest.raises(ValueError, match="depth"):
        pk.make_passkey_prompt(tiny_tokenizer, 400, depth=1.5)
    with pytest.raises(ValueError, match="n_before"):
        pk.passkey_text(12345, 3, 4)


# --- scoring on a hand-made model ---------------------------------------------------------------


class _NextTokenBase(torch.nn.Module):
    """Hidden state of token i = one-hot of ``table[i]``, so with an identity LM head the model
    predicts ``table[i]`` after token i. Counts the positions it is run on."""

    def __init__(self, table: list[int]):
        super().__init__()
        self.register_buffer("table", torch.tensor(table))
        self.seen = 0

    def forward(self, input_ids, use_cache=False, cache=None, **kwargs):
        self.seen += input_ids.shape[1]
        vocab = self.table.numel()
        return SimpleNamespace(last_hidden_state=torch.nn.functional.one_hot(self.table[input_ids], vocab).float())


class _NextTokenLM(torch.nn.Module):
    def __init__(self, table: list[int]):
        super().__init__()
        self.config = transformers.LlamaConfig(
            vocab_size=len(table), hidden_size=8, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1
        )
        self.model = _NextTokenBase(table)
        self.lm_head = torch.nn.Linear(len(table), len(table), bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(len(table)))
        self.head_rows = 0
        self.lm_head.register_forward_hook(lambda m, i, o: setattr(self, "head_rows", self.head_rows + o.shape[0] * (o.dim() - 1)))

    @property
    def base_model(self):
        return self.model

    def get_output_embeddings(self):
        return self.lm_head


def _prompt(input_ids, answer_ids) -> pk.PasskeyPrompt:
    return pk.PasskeyPrompt(tuple(input_ids), tuple(answer_ids), 0, 0.5, len(input_ids), 1, 0, "")


# Token i is followed by i + 1, except 4 -> 9 (a "wrong" digit).
_TABLE = [1, 2, 3, 4, 9, 6, 7, 8, 9, 0]


def test_teacher_forcing_scores_every_answer_position():
    model = _NextTokenLM(_TABLE)
    right = pk.score_teacher_forcing(model, _prompt([0, 1], [2, 3, 4]))
    assert right.correct and right.predicted_ids == (2, 3, 4)
    # 4 is followed by 9, not 5: the last position is wrong, so the answer is wrong.
    wrong = pk.score_teacher_forcing(model, _prompt([0, 1], [2, 3, 4, 5]))
    assert not wrong.correct and wrong.predicted_ids == (2, 3, 4, 9)
    # Teacher forcing feeds the answer, not the predictions: a wrong first token does not
    # change what is predicted after the (given) second one.
    first_wrong = pk.score_teacher_forcing(model, _prompt([0, 1], [5, 6, 7]))
    assert first_wrong.predicted_ids == (2, 6, 7) and not first_wrong.correct


def test_lm_head_runs_on_answer_positions_only():
    model = _NextTokenLM(_TABLE)
    pk.score_teacher_forcing(model, _prompt([0] * 50 + [1], [2, 3, 4]))
    assert model.model.seen == 53
    assert model.head_rows == 3


def test_greedy_scoring():
    model = _NextTokenLM(_TABLE)
    assert pk.greedy_generate(model, [0], 5) == [1, 2, 3, 4, 9]
    ok = pk.score_greedy(model, _prompt([0, 1], [2, 3]))
    assert ok.correct and ok.predicted_ids == (2, 3)
    bad = pk.score_greedy(model, _prompt([2, 3], [4, 5]), max_new_tokens=4)
    assert not bad.correct and bad.predicted_ids == (4, 9, 0, 1)


# --- on a tiny random Llama ---------------------------------------------------------------------


def test_answer_logits_match_full_forward(tiny_model):
    ids = torch.randint(3, tiny_model.config.vocab_size, (40,))
    positions = [5, 17, 39]
    with torch.no_grad():
        full = tiny_model(ids[None]).logits[0, positions]
    torch.testing.assert_close(pk.answer_logits(tiny_model, ids, positions), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dca", [False, True])
def test_greedy_matches_generate_and_teacher_forcing(tiny_model, tiny_tokenizer, dca):
    if dca:
        apply_dca(tiny_model, 64)
    prompt = pk.make_passkey_prompt(tiny_tokenizer, 200)
    new = pk.greedy_generate(tiny_model, prompt.input_ids, 4)
    assert new == pk.greedy_generate(tiny_model, prompt.input_ids, 4, prefill_chunk=37)
    with torch.no_grad():
        ref = tiny_model.generate(
            torch.tensor([prompt.input_ids]), max_new_tokens=4, do_sample=False, min_new_tokens=4,
            pad_token_id=0,
        )[0, len(prompt.input_ids):].tolist()
    assert new == ref
    # Teacher forcing on the model's own greedy continuation must call it correct.
    own = pk.PasskeyPrompt(prompt.input_ids, tuple(new), 0, 0.5, 200, 1, 0, "")
    assert pk.score_teacher_forcing(tiny_model, own).correct
    assert pk.score_greedy(tiny_model, own).correct


def test_dca_continues_from_a_plain_prefix_cache(tiny_model, tiny_tokenizer):
    """Positions below chunk_len are identical with and without DCA (keys rotated at p % chunk_len = p),
    so a cache of the first chunk_len tokens filled without DCA serves DCA too (what the demo shares)."""
    import copy

    from chunkllama import get_dca_config, remove_dca

    prompt = pk.make_passkey_prompt(tiny_tokenizer, 300)
    apply_dca(tiny_model, 64)
    chunk_len = get_dca_config(tiny_model).chunk_len
    base, head = pk._split_model(tiny_model)
    with torch.no_grad():
        scratch = head(base(input_ids=torch.tensor([prompt.input_ids])).last_hidden_state[0, -1])
    from_scratch = pk.greedy_generate(tiny_model, prompt.input_ids, 4)
    remove_dca(tiny_model)
    _, shared = pk.prefill(tiny_model, prompt.input_ids[:chunk_len])
    assert shared.get_seq_length() == chunk_len
    plain_cache = copy.deepcopy(shared)
    apply_dca(tiny_model, 64)
    hidden, cache = pk.prefill(tiny_model, prompt.input_ids, cache=shared)
    with torch.no_grad():
        torch.testing.assert_close(head(hidden[0]), scratch, rtol=1e-4, atol=1e-4)
    remove_dca(tiny_model)
    apply_dca(tiny_model, 64)
    assert pk.greedy_generate(tiny_model, prompt.input_ids, 4, cache=copy.deepcopy(plain_cache)) == from_scratch
    with pytest.raises(ValueError, match="more than"):
        pk.prefill(tiny_model, prompt.input_ids[:10], cache=plain_cache)


@pytest.mark.parametrize("length", [600, 1000])
def test_exact_prompts_have_the_asked_length(tiny_tokenizer, length):
    plain = pk.make_passkey_prompt(tiny_tokenizer, length)
    exact = pk.make_passkey_prompt(tiny_tokenizer, length, exact=True)
    assert len(plain.input_ids) < length and len(exact.input_ids) == length
    assert exact.input_ids[: len(plain.input_ids) - len(pk._encode(tiny_tokenizer, pk.QUESTION))] == \
        plain.input_ids[: len(plain.input_ids) - len(pk._encode(tiny_tokenizer, pk.QUESTION))]
    assert exact.text.endswith(pk.QUESTION) and exact.key_line in exact.text
    assert exact.answer_ids == plain.answer_ids
