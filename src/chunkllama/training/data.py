"""Chat data for fine-tuning: JSONL readers and assistant-only tokenization.

Two row formats, one JSON object per line (blank lines are skipped):

- OpenAI ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
- ShareGPT ``conversations``: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}``
  (``user``/``assistant`` are accepted as ``from`` values too).

Both become a list of ``{"role", "content"}`` messages. A malformed row raises
:class:`ChatDataError` naming the file, the line and what is wrong.

Tokenization renders the model's chat template and marks as labels exactly the tokens each
assistant turn adds (the turn's text and its end-of-turn tokens); every other token is ``-100``,
so the loss is on assistant turns only.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

Message = dict[str, str]


class ChatDataError(ValueError):
    """A training file or row that cannot be used; the message says where and why."""


def _messages_row(turns: Any, where: str) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise ChatDataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ChatDataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'; got {turn!r:.80}.")
        if turn["role"] not in ROLES:
            raise ChatDataError(f"{where}: messages[{i}] has role {turn['role']!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(turn["content"], str):
            raise ChatDataError(f"{where}: messages[{i}].content must be a string; got {type(turn['content']).__name__}.")
        out.append({"role": turn["role"], "content": turn["content"]})
    return out


def _sharegpt_row(turns: Any, where: str) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise ChatDataError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} objects.")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ChatDataError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'; got {turn!r:.80}.")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise ChatDataError(
                f"{where}: conversations[{i}] has from={turn['from']!r}; use one of {', '.join(SHAREGPT_ROLES)}."
            )
        if not isinstance(turn["value"], str):
            raise ChatDataError(f"{where}: conversations[{i}].value must be a string; got {type(turn['value']).__name__}.")
        out.append({"role": role, "content": turn["value"]})
    return out


def parse_chat(row: Any, where: str = "row") -> list[Message]:
    """One decoded JSON row as a list of ``{"role", "content"}`` messages.

    Args:
        row: the decoded JSON value of one line.
        where: prefix of error messages (e.g. ``"data.jsonl:12"``).
    Raises:
        ChatDataError: not an object, neither or both of ``messages``/``conversations``, a turn
            without its fields, an unknown role, or no assistant turn to learn from.
    """
    if not isinstance(row, dict):
        raise ChatDataError(f"{where}: each line must be a JSON object; got {type(row).__name__}.")
    keys = [k for k in ("messages", "conversations") if k in row]
    if len(keys) != 1:
        raise ChatDataError(
            f"{where}: a row needs exactly one of 'messages' (OpenAI format) or 'conversations' (ShareGPT "
            f"format); found keys {sorted(row)}."
        )
    messages = _messages_row(row["messages"], where) if keys == ["messages"] else _sharegpt_row(row["conversations"], where)
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatDataError(f"{where}: the chat has no assistant turn, so there is nothing to learn from it.")
    return messages


def read_chats(path: str | os.PathLike[str]) -> list[list[Message]]:
    """All chats of a JSONL file (both formats may be mixed).

    Raises:
        FileNotFoundError: no such file.
        ChatDataError: invalid JSON or a malformed row (file and 1-based line number in the
            message), or a file without any chat.
    """
    chats = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ChatDataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
            chats.append(parse_chat(row, where))
    if not chats:
        raise ChatDataError(f"{os.fspath(path)}: no chats found (expected one JSON object per line).")
    return chats


def _render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding on some releases
        ids = ids["input_ids"]
    return list(ids)


def tokenize_chat(messages: list[Message], tokenizer: Any) -> dict[str, list[int]]:
    """Token ids of a chat through the tokenizer's chat template, with assistant-only labels.

    Each assistant turn ``i`` is labelled with the tokens between the rendering of
    ``messages[:i]`` plus the generation prompt and the rendering of ``messages[:i+1]``.

    Returns:
        ``{"input_ids": [...], "labels": [...]}``, equal lengths; ``labels`` is ``-100`` outside
        assistant turns.
    Raises:
        ChatDataError: the template is not prefix-stable (rendering a shorter chat does not give
            a prefix of the longer one), so assistant tokens cannot be located.
    """
    input_ids = _render(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        upto = _render(tokenizer, messages[: i + 1])
        if input_ids[: len(upto)] != upto or start > len(upto):
            raise ChatDataError(
                "the tokenizer's chat template renders a chat's beginning differently from the whole chat, "
                "so assistant turns cannot be located; use a model whose template is prefix-stable."
            )
        labels[start : len(upto)] = input_ids[start : len(upto)]
    return {"input_ids": input_ids, "labels": labels}


def tokenize_chats(
    chats: Iterable[list[Message]], tokenizer: Any, max_length: int | None = None
) -> tuple[list[dict[str, list[int]]], int]:
    """:func:`tokenize_chat` for many chats, dropping those longer than ``max_length`` tokens.

    Returns:
        ``(examples, dropped)``: the kept examples and how many were too long.
    """
    kept, dropped = [], 0
    for chat in chats:
        example = tokenize_chat(chat, tokenizer)
        if max_length is not None and len(example["input_ids"]) > max_length:
            dropped += 1
            continue
        kept.append(example)
    return kept, dropped


def pad_left(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Left-pad a batch (DCA reads padding from the left) into int64 tensors.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``, each ``(B, T_max)`` int64; padding has
        mask 0 and label ``-100``.
    """
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, width - n :] = torch.tensor(e["input_ids"])
        mask[row, width - n :] = 1
        labels[row, width - n :] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
