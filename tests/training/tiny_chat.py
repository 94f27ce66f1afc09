"""A character-level tokenizer with a chat template, small enough for the tiny random models (vocab 96)."""

from __future__ import annotations

import string

SPECIALS = ["<pad>", "<unk>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = string.ascii_lowercase + string.digits + " .,?!:'-\n" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast``: one token per character, ids < 96, ChatML-like template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    assert len(vocab) <= 96
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # decode without spaces between characters
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
        additional_special_tokens=SPECIALS[3:],
    )
    tokenizer.chat_template = TEMPLATE
    return tokenizer
