"""Offline fixtures for the evaluation tests: a tiny BPE tokenizer and a tiny random Llama.

The tokenizer is a byte-level BPE trained in-process (deterministic) on the texts the tasks use
(passkey filler, needle, digits, a few essay-like sentences), so prompts are short and every
string is encodable. The model: Llama, 2 layers, hidden 32, 4 query / 2 key-value heads,
``max_position_embeddings = 64`` (its "pretraining window"), so lengths of 128-512 tokens
exercise rope scaling and DCA (chunk_size 48, local_window 8).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_bpe import train_bpe_tokenizer

WINDOW = 64
SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

_TRAINING_TEXT = [
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.",
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "The pass key is 12345. Remember it. 12345 is the pass key. What is the pass key? The pass key is",
    "0 1 2 3 4 5 6 7 8 9 10 42 99 100 2024 31337 10000 99999",
    "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
    "What is the best thing to do in San Francisco? Don't give information outside the document.",
    "Startups are hard. Most founders work on ideas they think are good. Question: Answer: A B C D AB",
    "You are a helpful AI bot that answers questions for a user. Keep your response short and direct",
    "Document is as follows. Instruction: Answer this question with words. True False [fact: True]",
]


def make_tokenizer():
    return train_bpe_tokenizer(_TRAINING_TEXT, vocab_size=400, bos="<s>", eos="</s>")


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def make_model(vocab_size: int, seed: int = 0):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=WINDOW,
        rope_theta=10000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_chat_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return make_model(len(tiny_tokenizer))


@pytest.fixture()
def tiny_data(tmp_path):
    """A miniature data root in the layout of ../shared/data (pg19, essays, leval)."""
    import json

    root = tmp_path / "data"
    (root / "pg19").mkdir(parents=True)
    sentences = " ".join(f"Chapter {i}. The sky is blue and the grass is green." for i in range(60))
    (root / "pg19" / "1_a.txt").write_text(sentences, encoding="utf-8")
    (root / "pg19" / "2_b.txt").write_text(sentences[::-1], encoding="utf-8")
    (root / "pg19" / "1_pg19_exact.txt").write_text("must be skipped", encoding="utf-8")
    (root / "paul_graham_essays").mkdir()
    (root / "paul_graham_essays" / "b.txt").write_text("Startups are hard. " * 40, encoding="utf-8")
    (root / "paul_graham_essays" / "a.txt").write_text("Most founders work on ideas. " * 40, encoding="utf-8")
    (root / "leval" / "closed").mkdir(parents=True)
    (root / "leval" / "open").mkdir(parents=True)
    doc = "The grass is green. " * 30
    closed = {"input": doc, "instructions": ["Question 1. What colour?\nA. green\nB. blue", "Question 2?\nA. x\nB. y"],
              "outputs": ["A", "AB"], "source": "x", "evaluation": "exam"}
    (root / "leval" / "closed" / "coursera.jsonl").write_text(json.dumps(closed) + "\n", encoding="utf-8")
    opened = {"input": doc, "instructions": ["What colour is the grass?"], "outputs": ["green"], "evaluation": "f1"}
    (root / "leval" / "open" / "scientific_qa.jsonl").write_text(json.dumps(opened) + "\n", encoding="utf-8")
    return root


@pytest.fixture()
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared evaluation data not found at {SHARED_DATA} (expected ../shared/data next to the repo)")
    return SHARED_DATA
