"""Serving: generation on a DCA model with a cached conversation, documents, and front ends.

- :mod:`.sampling`: sampling parameters, next-token choice, streamed detokenisation.
- :mod:`.engine`: one model + tokenizer running conversations whose KV cache is kept between turns.
- :mod:`.batching`: many requests decoded together, with a prefix cache.
- :mod:`.documents`: PDF / text / folder loading with page markers.
- :mod:`.chat` and :mod:`.server`: the ``chunkllama chat`` and ``chunkllama serve`` commands, thin
  shells over the engines.

The names below are imported on first use, so ``chunkllama <command> --help`` never imports torch.
"""

_LAZY = {"FINISH_REASONS": "sampling", "SamplingParams": "sampling", "TextStream": "sampling", "next_tokens": "sampling"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
