"""The generation engine on tiny random models: cache reuse across turns, chunked prefill, stopping,
the context limit and interruptions, each checked against a from-scratch forward pass."""

from __future__ import annotations

import pytest
import torch

import chunkllama
from chunkllama.serving.engine import ContextLimitError, Engine
from chunkllama.serving.sampling import SamplingParams
from tiny_models import CHUNK_LEN, FAMILIES, PRETRAINING_LENGTH, make_model

# ~150 tokens with this tokenizer: 7+ DCA chunks of 20 tokens.
DOCUMENT = " ".join(f"Chapter {i}. The sky is blue and the grass is green; the pass key is {1000 + i}." for i in range(12))
Q1, Q2 = "What is the pass key?", "And what colour is the sky?"


def dca_model(tokenizer, family="llama", seed=0):
    model = make_model(family, seed=seed, vocab_size=len(tokenizer))
    chunkllama.apply_dca(model, PRETRAINING_LENGTH)
    return model


@pytest.fixture()
def engine(tokenizer):
    return Engine(dca_model(tokenizer), tokenizer, prefill_chunk=16)


def fresh_logits(model, ids):
    """Next-token logits after ``ids``, one forward pass without any cache."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


def test_engine_knows_the_dca_window(engine):
    assert engine.window == PRETRAINING_LENGTH and engine.max_context == 16 * PRETRAINING_LENGTH
    assert engine.dca_config.chunk_len == CHUNK_LEN
    assert engine.tokenizer.convert_tokens_to_ids("<|im_end|>") in engine.eos_token_ids


def test_prompt_uses_the_chat_template_with_document_and_system(engine):
    conv = engine.conversation(system="Be brief.", document="DOC TEXT")
    text = engine.tokenizer.decode(conv.prompt_ids("Q?"))
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nDOC TEXT\n\nAnswer the question " \
        "using the document above.\n\nQ?<|im_end|>\n<|im_start|>assistant\n"


def test_streamed_text_equals_the_whole_answer_and_greedy_generate(engine):
    conv = engine.conversation(document=DOCUMENT)
    deltas = list(conv.stream(Q1, SamplingParams(max_new_tokens=12)))
    streamed = conv.last
    other = engine.conversation(document=DOCUMENT).ask(Q1, SamplingParams(max_new_tokens=12))
    assert "".join(deltas) == streamed.text == other.text == engine.tokenizer.decode(other.token_ids, skip_special_tokens=True)
    assert streamed.token_ids == other.token_ids and streamed.finish_reason == "length" and streamed.new_tokens == 12
    prompt = torch.tensor([engine.conversation(document=DOCUMENT).prompt_ids(Q1)])
    with torch.inference_mode():
        reference = engine.model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert reference[0, prompt.shape[1]:].tolist() == other.token_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_turn_two_reuses_the_cache_and_matches_recomputing_everything(tokenizer, family):
    model = dca_model(tokenizer, family)
    engine = Engine(model, tokenizer, prefill_chunk=32)
    conv = engine.conversation(system="Be brief.", document=DOCUMENT)
    doc_tokens = conv.prefill()
    assert doc_tokens > 5 * CHUNK_LEN
    first = conv.ask(Q1, SamplingParams(max_new_tokens=6))
    assert first.reused_tokens >= doc_tokens - 2 and first.prefilled_tokens < 30
    calls = []
    logits = conv.next_token_logits(Q2, progress=lambda done, total: calls.append((done, total)))
    ids = conv.prompt_ids(Q2)
    assert calls[-1][1] < 40, calls  # only the new turn's tokens were prefilled
    torch.testing.assert_close(logits, fresh_logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("piece", [1, 3, 7, CHUNK_LEN - 1, CHUNK_LEN, CHUNK_LEN + 1, 2 * CHUNK_LEN + 3, 64, 10_000])
def test_chunked_prefill_equals_one_shot_prefill(tokenizer, piece):
    model = dca_model(tokenizer)
    conv = Engine(model, tokenizer, prefill_chunk=piece).conversation(document=DOCUMENT)
    calls = []
    logits = conv.next_token_logits(Q1, progress=lambda done, total: calls.append((done, total)))
    ids = conv.prompt_ids(Q1)
    torch.testing.assert_close(logits, fresh_logits(model, ids), rtol=1e-4, atol=1e-4)
    assert calls[0] == (0, len(ids)) and calls[-1] == (len(ids), len(ids))
    assert len(calls) == 1 + -(-len(ids) // piece)


def test_eos_and_stop_strings_end_the_answer(tokenizer):
    model = dca_model(tokenizer)
    free = Engine(model, tokenizer).conversation().ask(Q1, SamplingParams(max_new_tokens=10))
    assert free.finish_reason == "length" and len(free.token_ids) == 10

    engine = Engine(model, tokenizer)
    engine.eos_token_ids = frozenset({free.token_ids[4]}) - set(free.token_ids[:4])
    assert engine.eos_token_ids, "pick another model seed: token 4 repeats an earlier one"
    stopped = engine.conversation().ask(Q1, SamplingParams(max_new_tokens=10))
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:4] and stopped.new_tokens == 5
    assert stopped.text == tokenizer.decode(free.token_ids[:4], skip_special_tokens=True)

    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = Engine(model, tokenizer).conversation().ask(Q1, SamplingParams(max_new_tokens=10, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]


def test_context_limit_fires_before_any_prefill(tokenizer):
    engine = Engine(dca_model(tokenizer), tokenizer, max_context=60)
    calls = []
    real_forward = engine.forward
    engine.forward = lambda ids, cache: calls.append(len(ids)) or real_forward(ids, cache)
    conv = engine.conversation(document=DOCUMENT)
    with pytest.raises(ContextLimitError, match=r"needs \d+ prompt tokens \(the document alone is \d+ tokens\), but the maximum context is 60") as info:
        conv.prefill()
    assert info.value.prompt_tokens > 60 and info.value.max_context == 60
    with pytest.raises(ContextLimitError):
        list(conv.stream(Q1))
    assert calls == [] and conv.cached_tokens == 0 and conv.history == []


def test_generation_stops_at_the_context_limit(tokenizer):
    engine = Engine(dca_model(tokenizer), tokenizer)
    n_prompt = len(engine.conversation().prompt_ids(Q1))
    engine.max_context = n_prompt + 5
    result = engine.conversation().ask(Q1, SamplingParams(max_new_tokens=50))
    assert result.finish_reason == "length" and result.new_tokens == 5


def test_interrupted_answer_keeps_the_conversation_consistent(tokenizer):
    model = dca_model(tokenizer)
    engine = Engine(model, tokenizer, prefill_chunk=32)
    conv = engine.conversation(document=DOCUMENT)
    conv.prefill()
    real_forward = engine.forward
    count = [0]

    def flaky_forward(ids, cache):
        out = real_forward(ids, cache)  # the cache already holds the token ...
        count[0] += 1
        if count[0] == 4:
            raise KeyboardInterrupt  # ... but Ctrl-C arrives before the engine accepted it
        return out

    engine.forward = flaky_forward
    deltas = list(conv.stream(Q1, SamplingParams(max_new_tokens=20)))
    engine.forward = real_forward
    result = conv.last
    assert result.finish_reason == "abort" and "".join(deltas) == result.text
    assert conv._cache.get_seq_length() == conv.cached_tokens
    assert conv.history[-1] == {"role": "assistant", "content": result.text}
    logits = conv.next_token_logits(Q2)
    torch.testing.assert_close(logits, fresh_logits(model, conv.prompt_ids(Q2)), rtol=1e-4, atol=1e-4)


def test_closing_the_stream_early_aborts_cleanly(tokenizer):
    model = dca_model(tokenizer)
    conv = Engine(model, tokenizer).conversation(document=DOCUMENT)
    stream = conv.stream(Q1, SamplingParams(max_new_tokens=30))
    next(stream)
    stream.close()
    assert conv.last.finish_reason == "abort"
    assert conv._cache.get_seq_length() == conv.cached_tokens
    torch.testing.assert_close(conv.next_token_logits(Q2), fresh_logits(model, conv.prompt_ids(Q2)), rtol=1e-4, atol=1e-4)


def test_reset_forgets_the_history_but_keeps_the_document_cached(tokenizer):
    engine = Engine(dca_model(tokenizer), tokenizer)
    conv = engine.conversation(document=DOCUMENT)
    doc_tokens = conv.prefill()
    conv.ask(Q1, SamplingParams(max_new_tokens=4))
    conv.reset()
    assert conv.history == []
    again = conv.ask(Q2, SamplingParams(max_new_tokens=4))
    assert again.reused_tokens >= doc_tokens - 2
    assert again.prompt_tokens == len(engine.conversation(document=DOCUMENT).prompt_ids(Q2))


def test_seeded_sampling_is_reproducible(tokenizer):
    engine = Engine(dca_model(tokenizer), tokenizer)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    a = engine.conversation().ask(Q1, params)
    b = engine.conversation().ask(Q1, params)
    c = engine.conversation().ask(Q1, SamplingParams(max_new_tokens=8, temperature=1.0, seed=4))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_bad_engine_arguments(tokenizer):
    model = dca_model(tokenizer)
    with pytest.raises(ValueError, match="prefill_chunk must be an integer >= 1"):
        Engine(model, tokenizer, prefill_chunk=0)
    with pytest.raises(ValueError, match="max_context must be an integer >= 2"):
        Engine(model, tokenizer, max_context=1)


def test_answer_prefix_starts_the_answer_and_the_model_continues_it(tokenizer):
    model = dca_model(tokenizer)
    conv = Engine(model, tokenizer).conversation(document=DOCUMENT)
    prefix = "The pass key is"
    ids = conv.prompt_ids(Q1, prefix)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\nThe pass key is")
    deltas = list(conv.stream(Q1, SamplingParams(max_new_tokens=5), answer_prefix=prefix))
    result = conv.last
    assert deltas[0] == prefix and "".join(deltas) == result.text
    assert result.text == prefix + tokenizer.decode(result.token_ids, skip_special_tokens=True)
    with torch.inference_mode():
        first = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
    assert result.token_ids[0] == first and result.prompt_tokens == len(ids)
    assert conv.history[-1] == {"role": "assistant", "content": result.text}
