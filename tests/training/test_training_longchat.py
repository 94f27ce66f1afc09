"""Synthetic long retrieval chats: the asked fact is in the passage, at its depth, and parses as training data."""

from __future__ import annotations

import re

import pytest
import torch

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


class _Retriever(torch.nn.Module):
    """Answers a retrieval chat by reading the asked fact out of its prompt (or, ``wrong``, another code)."""

    def __init__(self, tokenizer, wrong=False):
        super().__init__()
        self.tokenizer, self.wrong, self.weight = tokenizer, wrong, torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert input_ids.shape[0] == 1 and attention_mask.shape == input_ids.shape and not do_sample
        assert pad_token_id == self.tokenizer.pad_token_id == 0
        prompt = self.tokenizer.decode(input_ids[0])
        name = re.search(r"What is the secret code of the (.+?)\?", prompt).group(1)
        code = "00000" if self.wrong else re.search(rf"The secret code of the {name} is (\d{{5}})\.", prompt).group(1)
        answer = self.tokenizer(f"it is {code}.", add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([input_ids, answer[:, :max_new_tokens]], dim=1)


def test_answer_chats_scores_the_asked_code():
    from chunkllama.training.longchat import answer_chats

    tokenizer = tiny_tokenizer()
    chats = build_retrieval_chats([BOOK], tokenizer, chats=4, length=600, seed=5)
    right = answer_chats(_Retriever(tokenizer), tokenizer, chats)
    assert [r["correct"] for r in right] == [True] * 4
    assert [r["depth"] for r in right] == [c["depth"] for c in chats]
    assert all(r["got"].startswith("it is ") and r["tokens"] > 600 for r in right)
    assert [r["expected"] for r in right] == [c["messages"][1]["content"] for c in chats]
    assert not any(r["correct"] for r in answer_chats(_Retriever(tokenizer, wrong=True), tokenizer, chats))
