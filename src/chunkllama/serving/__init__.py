"""Serving: generation on a DCA model with a cached conversation, documents, and front ends.

- :mod:`.sampling`: sampling parameters, next-token choice, streamed detokenisation.
- :mod:`.engine`: one model + tokenizer running conversations whose KV cache is kept between turns.
- :mod:`.documents`: PDF / text / folder loading with page markers.
- :mod:`.chat`: the ``chunkllama chat`` command, a thin shell over the engine.
"""

from .sampling import FINISH_REASONS, SamplingParams, TextStream, next_tokens

__all__ = ["FINISH_REASONS", "SamplingParams", "TextStream", "next_tokens"]
