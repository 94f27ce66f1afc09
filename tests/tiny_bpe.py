"""A tiny byte-level BPE tokenizer trained in-process (deterministic, offline) for tests.

Every string is encodable (byte-level alphabet); characters outside the training text become
several byte tokens.
"""

from __future__ import annotations

from typing import Sequence


def train_bpe_tokenizer(texts: Sequence[str], *, vocab_size: int, bos: str, eos: str, pad: str = "<pad>"):
    """A ``PreTrainedTokenizerFast`` trained on ``texts`` (three passes) with special tokens ``pad, bos, eos``
    (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[pad, bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
