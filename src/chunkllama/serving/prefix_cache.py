"""A cache of recently computed keys/values, reused for any prompt that shares a token prefix.

Used by the batched engine (:mod:`.batching`) so that a document sent again (a follow-up question,
or another client with the same file) is not prefilled again.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Sequence

import torch

# Per-layer key/value tensors of one sequence: [(k (1, Hk, L, D), v (1, Hk, L, D)), ...].
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class _PrefixEntry:
    tokens: torch.Tensor  # (L,) int64, on CPU
    kv: LayerKV
    nbytes: int


class PrefixCache:
    """KV of recently served token sequences, reused for any later prompt that shares a prefix.

    Entries are whole sequences (prompt + answer) whose keys/values were computed by the model;
    a lookup returns the longest common prefix with any entry (the KV of a prefix depends only on
    the prefix's tokens: causal attention, and DCA caches keys at chunk-relative positions, so a
    prefix's cache is valid as is). Bounded by ``budget_bytes`` with least-recently-used
    eviction; an entry that is a prefix of a newly stored one is dropped as redundant.

    Not thread-safe: used by the engine's worker thread only.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._entries: collections.OrderedDict[int, _PrefixEntry] = collections.OrderedDict()
        self._ids = itertools.count()
        self.nbytes = 0
        self.hits = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
        n = min(a.numel(), b.numel())
        if n == 0:
            return 0
        diff = (a[:n] != b[:n]).nonzero()
        return int(diff[0, 0]) if diff.numel() else n

    def lookup(self, tokens: Sequence[int], limit: int) -> tuple[int, LayerKV | None]:
        """Longest cached prefix of ``tokens``, at most ``limit`` tokens: ``(length, per-layer KV views)``."""
        query = torch.as_tensor(list(tokens), dtype=torch.int64)
        best_key, best_len = None, 0
        for key, entry in self._entries.items():
            length = min(self._common_prefix(query, entry.tokens), limit)
            if length > best_len:
                best_key, best_len = key, length
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.hit_tokens += best_len
        kv = [(k[:, :, :best_len], v[:, :, :best_len]) for k, v in self._entries[best_key].kv]
        return best_len, kv

    def store(self, tokens: Sequence[int], kv: LayerKV) -> None:
        """Keep ``kv`` (copied) for ``tokens``; evict least recently used entries beyond the budget."""
        if not tokens or self.budget_bytes <= 0:
            return
        kv = [(k.detach().clone(), v.detach().clone()) for k, v in kv]
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.budget_bytes:
            return
        new = torch.as_tensor(list(tokens), dtype=torch.int64)
        for key in [k for k, e in self._entries.items() if self._common_prefix(new, e.tokens) == e.tokens.numel()]:
            self._drop(key)  # a prefix of the new entry: the new one serves every lookup it would
        self._entries[next(self._ids)] = _PrefixEntry(new, kv, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
