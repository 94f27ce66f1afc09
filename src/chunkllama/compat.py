"""The one place that absorbs differences between transformers 5.x releases.

- Up to 5.2x the attention module receives the KV cache as ``past_key_values=``; newer releases
  call it ``cache=`` (the old name is deprecated until 5.40).
- 5.24 passes the forward's kwargs on to ``cache.update(..., kwargs=kwargs)``; older releases
  take ``update(k, v, layer_idx)`` and ignore extra keyword arguments.
"""

from __future__ import annotations

from typing import Any

import torch


def pick_cache(cache: Any, past_key_values: Any) -> Any:
    """The KV cache, under whichever name this transformers release passed it."""
    return cache if cache is not None else past_key_values


def cached_length(cache: Any, layer_idx: int) -> int:
    """Tokens already in ``cache`` for ``layer_idx`` (0 without a cache)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length(layer_idx))


def update_cache(
    cache: Any, key: torch.Tensor, value: torch.Tensor, layer_idx: int, forward_kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``key``/``value`` ``(B, Hk, T, D)`` to the cache; returns all keys/values of the layer."""
    return cache.update(key, value, layer_idx, kwargs=forward_kwargs)


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
