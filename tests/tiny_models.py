"""Tiny random models of every supported family, and the DCA geometry the tests use.

(A uniquely named module rather than ``conftest``: other test folders have their own
``conftest.py``, and ``from conftest import ...`` would pick whichever was imported first.)

Geometry: ``pretraining_length = 32`` gives ``chunk_size = 24``, ``local_window = 4`` and a chunk
stride ``chunk_len = 20``, so ~100 tokens span 5+ chunks and a forward pass takes milliseconds.
Models: 2 layers, hidden 64, 4 query heads / 2 key-value heads (GQA), head_dim 16, fp32, vocab 96.
"""

from __future__ import annotations

import torch

PRETRAINING_LENGTH = 32
CHUNK_SIZE = 24
LOCAL_WINDOW = 4
CHUNK_LEN = 20
VOCAB = 96

#: Every chunk boundary of a 5-chunk sequence and one token either side (plus a one-chunk length).
BOUNDARY_LENGTHS = (19, 20, 21, 39, 40, 41, 59, 60, 61, 79, 80, 81, 99, 100, 101)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral")


def _common(**overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=10000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,  # no early stop: generate() runs max_new_tokens, argmax of raw logits is the token
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return kwargs


def make_config(family: str, **overrides):
    """A tiny config of ``family``; ``overrides`` replace any field (e.g. ``rope_parameters``)."""
    import transformers

    kwargs = _common(**overrides)
    if family == "llama":
        return transformers.LlamaConfig(**kwargs)
    if family == "mistral":
        kwargs.setdefault("sliding_window", None)
        return transformers.MistralConfig(**kwargs)
    if family == "qwen2":
        return transformers.Qwen2Config(**kwargs)
    if family == "qwen3":
        return transformers.Qwen3Config(**kwargs)
    if family == "mixtral":
        kwargs.setdefault("num_local_experts", 3)
        kwargs.setdefault("num_experts_per_tok", 2)
        kwargs.setdefault("sliding_window", None)
        return transformers.MixtralConfig(**kwargs)
    raise KeyError(family)


def make_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised ``*ForCausalLM`` of ``family`` in eval mode, eager attention."""
    import transformers

    config = make_config(family, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init is tiny (std 0.02); widen it so attention patterns are far from uniform and a
    # wrong position actually changes the output.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(dtype) * 0.25)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.copy_((1.0 + 0.5 * torch.rand(param.shape, generator=gen)).to(dtype))
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenizer-free left padding of 1D id rows: ``(ids (B, T), attention_mask (B, T))``, pad id 0, mask 0 on pads."""
    length = max(r.shape[-1] for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - row.shape[-1] :] = row
        mask[i, length - row.shape[-1] :] = 1
    return ids, mask


def rotary_of(model) -> torch.nn.Module:
    """The model's single rotary-embedding module."""
    found = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    assert len(found) == 1, found
    return found[0]


def attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "q_proj")]
