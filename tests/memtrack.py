"""Peak bytes of tensors allocated inside a block, on the CPU, measured at the dispatcher.

torch has no allocator statistics for the CPU, and ``torch.distributed._tools.mem_tracker.MemTracker``
refuses a module called more than once in its block (which every ``generate`` does). So: a
``TorchDispatchMode`` that sees every aten op's outputs, counts each new storage once (outputs that
share a storage with an input are views or in-place results, not allocations) and subtracts it when
the storage is freed (a weakref callback on the storage, which PyTorch keeps unique per storage).
Memory that an op allocates and frees inside itself (kernel workspaces) is not seen.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakLiveBytes(TorchDispatchMode):
    """``with PeakLiveBytes() as m: ...`` then ``m.peak`` / ``m.live`` (bytes allocated in the block)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, size: int) -> None:
        self.live -= size
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key in inputs or key in self._refs or size == 0:
                continue
            self.live += size
            self._refs[key] = weakref.ref(storage, lambda _, key=key, size=size: self._freed(key, size))
            self.peak = max(self.peak, self.live)
        return out
