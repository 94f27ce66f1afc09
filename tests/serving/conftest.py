"""Offline fixtures for the serving tests: a tiny byte-level BPE tokenizer with a chat template.

The tokenizer is trained in-process (deterministic) on a few sentences; every string is
encodable (byte-level alphabet), and characters outside the training text (accents, emoji)
become several byte tokens, which is what the streaming tests need.
"""

from __future__ import annotations

import pytest

from tiny_bpe import train_bpe_tokenizer

_TRAINING_TEXT = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "The pass key is 12345. Remember it. What is the pass key? The pass key is",
    "You are a helpful assistant. Answer the question from the document. Question: Answer:",
    "user assistant system document page chapter the of and to in a is that it was",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    fast = train_bpe_tokenizer(_TRAINING_TEXT, vocab_size=400, bos="<|im_start|>", eos="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()
