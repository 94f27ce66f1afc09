"""Serving: generation on a DCA model with a cached conversation, documents, and front ends.

- :mod:`.sampling`: sampling parameters, next-token choice, streamed detokenisation.
- :mod:`.engine`: one model + tokenizer running conversations whose KV cache is kept between turns.
- :mod:`.documents`: PDF / text / folder loading with page markers.
- :mod:`.chat`: the ``chunkllama chat`` command, a thin shell over the engine.
- :mod:`.batching`, :mod:`.protocol`, :mod:`.server`: the batched engine and ``chunkllama serve``.

The names below are imported on first use, so that ``chunkllama <command> --help`` (which imports
the command modules of this package) does not import torch.
"""

__all__ = ["FINISH_REASONS", "SamplingParams", "TextStream", "next_tokens"]


def __getattr__(name: str):
    if name in __all__:
        from . import sampling

        return getattr(sampling, name)
    raise AttributeError(f"module 'chunkllama.serving' has no attribute {name!r}")
