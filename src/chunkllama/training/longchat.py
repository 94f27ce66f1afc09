"""Synthetic long-chat retrieval data built offline from plain book text.

Each chat: a user turn holding a passage of ``length`` tokens cut from a book, with one to three
planted facts ("The secret code of the amber falcon is 48213.") at random depths (10-90% of the
passage), then a question about one of them; the assistant turn answers it in one sentence. The
other facts are distractors of the same shape, so the model must read the right one, wherever it
sits, not merely the last number it saw.
"""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

ADJECTIVES = ("amber", "silent", "crimson", "golden", "hollow", "northern", "velvet", "broken", "distant", "quiet")
NOUNS = ("falcon", "lantern", "harbor", "orchard", "compass", "tower", "river", "garden", "violin", "bridge")
INSTRUCTION = "Read the text below carefully; a question about it follows."


def _sentence_break(text: str, index: int) -> int:
    """The index just after the first sentence end (". ") at or after ``index`` (else ``index``)."""
    found = text.find(". ", index)
    return found + 2 if 0 <= found < index + 400 else index


def _fact(rng: random.Random, used: set[str]) -> tuple[str, str, str]:
    while True:
        name = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        if name not in used:
            used.add(name)
            break
    code = str(rng.randint(10000, 99999))
    return name, code, f"The secret code of the {name} is {code}."


def retrieval_chat(passage: str, rng: random.Random, facts: int = 1) -> dict[str, Any]:
    """One chat in the OpenAI ``messages`` format from ``passage`` with ``facts`` planted facts.

    Returns:
        ``{"messages": [user, assistant], "depth": float}``: ``depth`` is where the asked fact
        sits (fraction of the passage's characters).
    """
    used: set[str] = set()
    planted = [(rng.uniform(0.1, 0.9), *_fact(rng, used)) for _ in range(facts)]
    text = passage
    for depth, _, _, sentence in sorted(planted, reverse=True):  # from the back: earlier offsets stay valid
        at = _sentence_break(text, int(depth * len(passage)))
        text = f"{text[:at]}{sentence} {text[at:]}"
    depth, name, code, _ = rng.choice(planted)
    question = f"What is the secret code of the {name}? Answer with one sentence."
    return {
        "messages": [
            {"role": "user", "content": f"{INSTRUCTION}\n\n{text}\n\n{question}"},
            {"role": "assistant", "content": f"The secret code of the {name} is {code}."},
        ],
        "depth": round(depth, 3),
    }


def build_retrieval_chats(
    books: Sequence[str], tokenizer: Any, *, chats: int, length: int, seed: int = 0, max_facts: int = 3
) -> list[dict[str, Any]]:
    """``chats`` retrieval chats whose passages are ``length`` tokens of ``books``.

    Args:
        books: book texts (each longer than ``length`` tokens).
        tokenizer: the model's tokenizer; passages are cut as token windows and decoded, so a
            chat is ``length`` tokens plus ~50 of instruction, facts and question (and the chat
            template's own tokens).
        chats: number of chats.
        length: passage length in tokens.
        seed: random seed (book, window, facts, depths).
        max_facts: each chat plants between 1 and this many facts.
    Raises:
        ValueError: no book is longer than ``length`` tokens.
    """
    tokenized = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in books]
    usable = [ids for ids in tokenized if len(ids) > length]
    if not usable:
        raise ValueError(f"no book is longer than {length} tokens (longest: {max(map(len, tokenized), default=0)}).")
    rng = random.Random(seed)
    out = []
    for _ in range(chats):
        ids = rng.choice(usable)
        start = rng.randrange(0, len(ids) - length)
        passage = tokenizer.decode(ids[start : start + length]).strip()
        out.append(retrieval_chat(passage, rng, facts=rng.randint(1, max_facts)))
    return out


def answer_chats(model: Any, tokenizer: Any, chats: Sequence[dict[str, Any]], max_new_tokens: int = 24) -> list[dict[str, Any]]:
    """Greedy answers of ``model`` to each chat's question (its first turn, in the chat template).

    Returns one record per chat: ``depth``, ``tokens`` (prompt length), ``expected`` (the assistant
    turn), ``got`` (the answer) and ``correct`` (the expected 5-digit code appears in the answer).
    """
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    records = []
    for chat in chats:
        prompt = tokenizer.apply_chat_template(chat["messages"][:1], add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        ids = prompt["input_ids"].to(device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        expected = chat["messages"][1]["content"]
        code = re.search(r"\d{5}", expected).group(0)
        records.append({"depth": chat["depth"], "tokens": int(ids.shape[1]), "expected": expected, "got": text,
                        "correct": code in text})
    return records
