"""JSONL chat readers (OpenAI ``messages`` and ShareGPT ``conversations``), errors, assistant-only labels."""

from __future__ import annotations

import json

import pytest

from chunkllama.training.data import IGNORE_INDEX, ChatDataError, pad_left, read_chats, tokenize_chat, tokenize_chats
from tiny_chat import tiny_tokenizer

OPENAI = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}


def _write(tmp_path, lines):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_reads_both_formats_into_messages(tmp_path):
    chats = read_chats(_write(tmp_path, [OPENAI, "", SHAREGPT]))
    assert chats[0] == OPENAI["messages"]
    assert chats[1] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "must be a JSON object"),
        ({"text": "hi"}, "exactly one of 'messages'"),
        ({**OPENAI, **SHAREGPT}, "exactly one of 'messages'"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with 'role' and 'content'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
        ({"messages": [{"role": "assistant", "content": 3}]}, "content must be a string"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "from='robot'"),
        ({"conversations": [{"from": "human", "value": "only a question"}]}, "no assistant turn"),
    ],
)
def test_malformed_rows_name_the_line_and_the_problem(tmp_path, bad, expected):
    path = _write(tmp_path, [OPENAI, bad if isinstance(bad, str) else json.dumps(bad)])
    with pytest.raises(ChatDataError, match=expected) as info:
        read_chats(path)
    assert f"{path}:2:" in str(info.value)


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(ChatDataError, match="no chats"):
        read_chats(_write(tmp_path, [""]))


def test_labels_cover_exactly_the_assistant_turns():
    tokenizer = tiny_tokenizer()
    chat = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q one"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "q two"},
        {"role": "assistant", "content": "A2"},
    ]
    example = tokenize_chat(chat, tokenizer)
    assert len(example["input_ids"]) == len(example["labels"])
    learned = tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX])
    assert learned.replace(" ", "") == "A1<|end|>A2<|end|>"
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(example["input_ids"], example["labels"]))


def test_long_chats_are_dropped_and_counted_and_batches_pad_left():
    tokenizer = tiny_tokenizer()
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    long = [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "yo"}]
    examples, dropped = tokenize_chats([short, long], tokenizer, max_length=20)
    assert dropped == 1 and len(examples) == 1
    batch = pad_left([examples[0], tokenize_chat(long, tokenizer)], tokenizer.pad_token_id)
    n = len(examples[0]["input_ids"])
    width = batch["input_ids"].shape[1]
    assert batch["attention_mask"][0].tolist() == [0] * (width - n) + [1] * n
    assert batch["labels"][0, : width - n].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][0, width - n :].tolist() == examples[0]["input_ids"]
