"""The OpenAI request/response models: what is accepted, what is refused with which message, and
the JSON shapes the official ``openai`` client parses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from chunkllama.serving.protocol import (
    APIError, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatChoice, AssistantMessage,
    ChatChunkChoice, CompletionRequest, Delta, Usage, validation_message,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_defaults_and_conversation():
    req = ChatCompletionRequest(**CHAT, stop="END", max_completion_tokens=7,
                                messages_extra_field_is_ignored=True)
    assert (req.temperature, req.top_p, req.n, req.stream) == (1.0, 1.0, 1, False)
    assert req.stop_strings() == ("END",) and req.token_limit() == 7
    multi = ChatCompletionRequest(model="m", messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert multi.conversation() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


@pytest.mark.parametrize(("change", "fragment"), [
    ({"n": 2}, "n=2 is not supported"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ({"stop": [""]}, "empty"),
    ({"messages": []}, "messages"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
])
def test_chat_refusals_name_the_problem(change, fragment):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(**{**CHAT, **change})
    message, param = validation_message(info.value.errors())
    assert fragment in message, message


def test_completion_prompt_forms():
    assert CompletionRequest(model="m", prompt="x").prompt_text_or_ids() == "x"
    assert CompletionRequest(model="m", prompt=["x"]).prompt_text_or_ids() == "x"
    assert CompletionRequest(model="m", prompt=[5, 6]).prompt_text_or_ids() == [5, 6]
    assert CompletionRequest(model="m", prompt="x").max_tokens == 16  # OpenAI's default
    for bad in (["a", "b"], [], {"p": 1}):
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt=bad)
    with pytest.raises(ValidationError, match="echo"):
        CompletionRequest(model="m", prompt="x", echo=True)


def test_error_body_is_openais_shape():
    err = APIError(400, "too long", param="messages", code="context_length_exceeded")
    assert err.body() == {"error": {"message": "too long", "type": "invalid_request_error",
                                    "param": "messages", "code": "context_length_exceeded"}}


def test_responses_parse_with_the_openai_client_types():
    types = pytest.importorskip("openai.types.chat")
    usage = Usage.of(10, 3, cached=8)
    assert (usage.total_tokens, usage.prompt_tokens_details) == (13, {"cached_tokens": 8})
    whole = ChatCompletionResponse(id="chatcmpl-1", created=1, model="m", usage=usage,
                                   choices=[ChatChoice(message=AssistantMessage(content="ok"), finish_reason="stop")])
    parsed = types.ChatCompletion.model_validate(whole.model_dump())
    assert parsed.choices[0].message.content == "ok" and parsed.usage.prompt_tokens_details.cached_tokens == 8
    chunk = ChatCompletionChunk(id="chatcmpl-1", created=1, model="m",
                                choices=[ChatChunkChoice(delta=Delta(content="o"))])
    parsed_chunk = types.ChatCompletionChunk.model_validate_json(chunk.model_dump_json(exclude_none=True))
    assert parsed_chunk.choices[0].delta.content == "o"
