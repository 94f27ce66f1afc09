"""Synthetic long retrieval chats: the asked fact is in the passage, at its depth, and parses as training data."""

from __future__ import annotations

import re

import pytest

from chunkllama.training.data import parse_chat
from chunkllama.training.longchat import build_retrieval_chats
from tiny_chat import tiny_tokenizer

BOOK = " ".join(f"sentence {i % 10} of the book goes on." for i in range(400))


def test_chats_plant_the_asked_fact_at_its_depth():
    chats = build_retrieval_chats([BOOK, "too short."], tiny_tokenizer(), chats=12, length=2000, seed=3)
    assert len(chats) == 12
    for chat in chats:
        user, answer = (m["content"] for m in parse_chat(chat))
        name, code = re.fullmatch(r"The secret code of the (.+) is (\d{5})\.", answer).groups()
        assert f"What is the secret code of the {name}?" in user
        facts = re.findall(r"The secret code of the (.+?) is (\d{5})\.", user)
        assert 1 <= len(facts) <= 3 and (name, code) in facts and len({n for n, _ in facts}) == len(facts)
        where = user.index(f"The secret code of the {name} is {code}.") / len(user)
        assert abs(where - chat["depth"]) < 0.05 and 0.1 <= chat["depth"] <= 0.9
        assert 1950 <= len(user) <= 2300  # one token per character here: the passage is ~length tokens


def test_books_shorter_than_the_passage_are_an_error():
    with pytest.raises(ValueError, match="no book is longer than 5000 tokens"):
        build_retrieval_chats(["short"], tiny_tokenizer(), chats=1, length=5000)
