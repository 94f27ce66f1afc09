"""The one place that absorbs differences between transformers 5.x releases.

- Up to 5.2x the attention module receives the KV cache as ``past_key_values=``; newer releases
  call it ``cache=`` (the old name is deprecated until 5.40).
- Before 5.4 the cache update is ``cache.update(k, v, layer_idx, cache_kwargs=None)`` and a static
  cache reads the write position from ``cache_kwargs["cache_position"]``; from 5.4 on it is
  ``cache.update(k, v, layer_idx, *args, **kwargs)`` and the models pass ``kwargs=`` (the forward's
  keyword arguments). Neither accepts the other's keyword: which one this release takes is read
  once, from the signature of ``Cache.update``, when this module is imported.
- ``generate``'s own chunked prefill (``prefill_chunk_size``) needs a caller-made cache before 5.17
  (:data:`GENERATE_CHUNKS_PREFILL`).
- Older releases pass ``cache_position`` (the cache slots of this step's tokens) in the forward's
  kwargs; newer ones do not, and a static cache counts its own length in a tensor.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import transformers
from transformers.cache_utils import Cache

#: True when ``generate(prefill_chunk_size=N)`` works on its own on this release. 5.0 refuses it unless
#: the caller passes a cache ("Cannot use prefill chunking without a cache"); 5.17 and 5.24 build the
#: cache themselves (tested). Releases in between are treated as old: no default piece size there.
GENERATE_CHUNKS_PREFILL = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 17)

#: True when this transformers release updates caches as ``update(k, v, layer_idx, cache_kwargs)``.
UPDATE_TAKES_CACHE_KWARGS = "cache_kwargs" in inspect.signature(Cache.update).parameters


def pick_cache(cache: Any, past_key_values: Any) -> Any:
    """The KV cache, under whichever name this transformers release passed it."""
    return cache if cache is not None else past_key_values


def cached_length(cache: Any, layer_idx: int, forward_kwargs: dict[str, Any] | None = None) -> int | torch.Tensor:
    """Tokens already in ``cache`` for ``layer_idx`` (0 without a cache), without a host sync.

    A Python int for dynamic caches; a 0-dim int64 tensor where the count lives on the device
    (static caches; ``cache_position[0]`` where the release passes ``cache_position``), so that
    decoding never waits for the device and stays traceable by ``torch.compile(fullgraph=True)``.
    """
    if cache is None:
        return 0
    cache_position = (forward_kwargs or {}).get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return cache_position[0]
    return cache.get_seq_length(layer_idx)


def update_cache(
    cache: Any, key: torch.Tensor, value: torch.Tensor, layer_idx: int, forward_kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``key``/``value`` ``(B, Hk, T, D)`` to the cache; returns all keys/values of the layer.

    For a static cache that is the whole preallocated buffer (slots not yet written hold zeros;
    their positions lie after every query's, so attention never sees them).
    """
    if UPDATE_TAKES_CACHE_KWARGS:
        return cache.update(key, value, layer_idx, {"cache_position": forward_kwargs.get("cache_position")})
    return cache.update(key, value, layer_idx, kwargs=forward_kwargs)


def stored_dtype(cache: Any, layer_idx: int) -> torch.dtype | None:
    """The dtype ``cache`` already holds for ``layer_idx`` (None when it holds nothing yet or cannot say).

    Caches lay out their layers in ``cache.layers`` (5.0 through 5.24); a static cache that
    ``generate`` initialised early holds zeros of the model's dtype before the first update.
    """
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    keys = getattr(layers[layer_idx], "keys", None)
    if not isinstance(keys, torch.Tensor) or keys.numel() == 0:
        return None
    return keys.dtype


def cache_keyword(module: Any) -> str:
    """The keyword a model's ``forward`` takes its KV cache under: ``cache`` (5.24+) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def new_dynamic_cache(model_config: Any) -> Any:
    """An empty ``DynamicCache`` for a model (older releases take no ``config``)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model_config)
    except TypeError:
        return DynamicCache()


def crop_cache(cache: Any, length: int) -> None:
    """Cut every layer of a ``DynamicCache`` back to its first ``length`` tokens.

    Layer by layer, so that a forward interrupted half-way (some layers one token longer than
    others) is undone too. ``crop(n)`` with ``n > 0`` means "keep n" up to 5.2x and is an error in
    5.24 (which takes "remove -n"); a negative count means "remove" in both.
    """
    for layer in cache.layers:
        excess = int(layer.get_seq_length()) - length
        if excess > 0:
            layer.crop(-excess)
