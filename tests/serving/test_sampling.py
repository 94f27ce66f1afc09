"""Sampling parameters, next-token choice, and streamed detokenisation with stop strings."""

from __future__ import annotations

import pytest
import torch

from chunkllama.serving.sampling import SamplingParams, TextStream, next_tokens


# --- SamplingParams --------------------------------------------------------------------------


def test_defaults_are_greedy():
    params = SamplingParams()
    assert params.greedy and params.max_new_tokens == 256 and params.top_p == 1.0 and params.stop == ()
    assert params.make_generator() is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
        (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
        (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(temperature="hot"), "temperature must be a number"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(seed=-1), "seed must be None or an integer >= 0"),
        (dict(seed=1.0), "seed must be None or an integer >= 0"),
        (dict(stop=("ok", "")), "every stop string must be a non-empty string"),
        (dict(stop=("ok", 3)), "every stop string must be a non-empty string"),
        (dict(stop=5), "stop must be a string or a sequence of strings"),
    ],
)
def test_invalid_params_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_stop_accepts_a_string_or_a_list_and_is_frozen():
    assert SamplingParams(stop="END").stop == ("END",)
    params = SamplingParams(stop=["a", "b"])
    assert params.stop == ("a", "b")
    with pytest.raises(AttributeError):
        params.temperature = 1.0  # type: ignore[misc]


# --- next_tokens -----------------------------------------------------------------------------


def test_greedy_is_argmax_in_any_dtype():
    logits = torch.randn(5, 50)
    expected = logits.argmax(-1)
    assert torch.equal(next_tokens(logits, SamplingParams()), expected)
    assert torch.equal(next_tokens(logits.to(torch.bfloat16), SamplingParams()), logits.to(torch.bfloat16).float().argmax(-1))
    assert next_tokens(logits, SamplingParams()).dtype == torch.int64


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 30)
    params = SamplingParams(temperature=1.0, seed=7)
    a = [next_tokens(logits, params, g) for g in [params.make_generator()] for _ in range(5)]
    b = [next_tokens(logits, params, g) for g in [params.make_generator()] for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_sampling_follows_the_softmax_of_logits_over_temperature():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    temperature = 2.0
    logits = (probs.log() * temperature).expand(4000, 4)  # softmax(logits / T) == probs
    params = SamplingParams(temperature=temperature, seed=0)
    counts = torch.bincount(next_tokens(logits, params, params.make_generator()), minlength=4).float() / 4000
    assert torch.allclose(counts, probs, atol=0.03), counts  # ~4 standard errors


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    params = SamplingParams(temperature=1.0, top_p=0.7, seed=0)  # 0.5 + 0.3 reaches 0.7: tokens 0 and 1
    counts = torch.bincount(next_tokens(logits, params, params.make_generator()), minlength=4).float() / 4000
    assert counts[2:].sum() == 0
    assert abs(counts[0].item() - 0.5 / 0.8) < 0.03
    tiny = SamplingParams(temperature=5.0, top_p=1e-6, seed=0)  # only the top token survives
    assert torch.equal(next_tokens(logits[:10], tiny, tiny.make_generator()), torch.zeros(10, dtype=torch.int64))


def test_next_tokens_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(batch, vocab\)"):
        next_tokens(torch.randn(2, 3, 4), SamplingParams())


# --- TextStream ------------------------------------------------------------------------------


def stream_all(tokenizer, ids, **kwargs):
    stream = TextStream(tokenizer, **kwargs)
    deltas = []
    for token in ids:
        deltas.append(stream.push(token))
        if stream.finished:
            break
    if not stream.finished:
        deltas.append(stream.finish("length"))
    return stream, deltas


@pytest.mark.parametrize("text", ["The sky is blue. Here we go.", "Héllo wörld 🙂 naïve — ok ✓", "数字 12345 🙂🙂"])
def test_streamed_deltas_equal_the_decoded_text_and_never_split_a_character(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream, deltas = stream_all(tokenizer, ids)
    assert "".join(deltas) == stream.text == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    assert stream.finish_reason == "length" and stream.token_ids == ids


def test_multibyte_characters_arrive_whole(tokenizer):
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # the emoji is split into byte tokens by this tokenizer
    stream = TextStream(tokenizer)
    assert [stream.push(t) for t in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_eos_stops_and_is_not_text(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("The sky is blue.", add_special_tokens=False) + [eos] + tokenizer.encode(" more")
    stream, deltas = stream_all(tokenizer, ids, eos_token_ids={eos})
    assert stream.finished and stream.finish_reason == "stop"
    assert "".join(deltas) == stream.text == "The sky is blue."
    with pytest.raises(RuntimeError, match="already finished"):
        stream.push(5)


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("The sky is blue. The sun is yellow.", ("sun",), "The sky is blue. The "),
        ("The sky is blue. The sun is yellow.", ("is b", "yellow"), "The sky "),
        ("aaab and more", ("aab",), "a"),  # the stop string overlaps its own prefix
        ("The grass is green.", (".",), "The grass is green"),
        ("Answer: 12345\nQuestion: next", ("\nQuestion:",), "Answer: 12345"),
        ("The sky is blue.", ("never",), "The sky is blue."),
    ],
)
def test_stop_strings_end_the_text_and_are_never_streamed(tokenizer, text, stop, expected):
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream, deltas = stream_all(tokenizer, ids, stop=stop)
    assert "".join(deltas) == stream.text == expected
    assert stream.finish_reason == ("stop" if expected != text else "length")


def test_possible_stop_prefix_is_held_back_then_released(tokenizer):
    stream = TextStream(tokenizer, stop=("blue sky",))
    out = "".join(stream.push(t) for t in tokenizer.encode("The blue", add_special_tokens=False))
    assert out == "The "  # "blue" could still become "blue sky"
    assert stream.text == "The blue"
    out += stream.finish("length")
    assert out == "The blue" and stream.finish_reason == "length"
    assert stream.finish("stop") == ""  # already finished: no-op


def test_finish_reason_is_checked(tokenizer):
    with pytest.raises(ValueError, match="finish reason must be one of"):
        TextStream(tokenizer).finish("done")  # type: ignore[arg-type]
