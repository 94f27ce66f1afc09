"""Launching an already-compiled Triton kernel without Triton's per-call argument binding.

Eager decoding launches three kernels per layer and token (key rotation, split pass, merge), and on
an H200 host an 8B model's eager decode step is bound by host time, not by the GPU. Triton's
``JITFunction.run`` re-binds and re-specializes every argument, builds its cache key and reads its
settings on each call; published measurements put that at ~9-12 µs per launch for ~20 arguments
against ~3-4 µs for the compiled kernel's own launcher (triton-lang/triton#3648, vLLM's
``CachedKernel``). Our kernels take ~30 arguments.

:class:`CachedLaunch` keeps, per specialization key, the ``CompiledKernel`` that the first
``kernel[grid](...)`` call returned and launches it directly afterwards — the same launcher call that
``JITFunction.run`` itself ends with. The key refines Triton's own specialization (two calls with
one key always compile to the same kernel):

- a tensor argument: its dtype, and whether its data pointer is 16-byte aligned;
- an int: whether it is 1, whether it is divisible by 16, and its integer width class;
- a float, bool or None: its type;
- every keyword argument (the constexprs, ``num_warps``, ``num_stages``): its value.

Falls back to the plain launch under the interpreter, when Triton's launch hooks are set (profilers),
for Triton releases whose launcher this was not checked against, and when
``CHUNKLLAMA_FAST_LAUNCH=0``. The memo of compiled kernels lives on the :class:`CachedLaunch`
object, like Triton's own cache lives on the ``JITFunction``: it changes no result, only host time.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton

# CompiledKernel.run(grid0, grid1, grid2, stream, function, packed_metadata, launch_metadata,
# enter_hook, exit_hook, *all_arguments) is the launcher call of JITFunction.run in these releases
# (read in their sources: triton/runtime/jit.py and triton/compiler/compiler.py).
CHECKED_RELEASES = ((3, 4), (3, 5), (3, 6), (3, 7), (3, 8), (3, 9))

_I32 = 1 << 31
_U64 = 1 << 63


@functools.lru_cache(maxsize=None)
def triton_release() -> tuple[int, int]:
    """(major, minor) of the installed Triton."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def fast_launch_enabled() -> bool:
    """Whether :class:`CachedLaunch` may bypass ``JITFunction.run`` in this process."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or os.environ.get("CHUNKLLAMA_FAST_LAUNCH", "1") == "0":
        return False
    return triton_release() in CHECKED_RELEASES


def _hook_set(hook: Any) -> bool:
    """Whether a launch hook does anything: None, or a ``HookChain`` without calls, does not."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_set() -> bool:
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        return True  # a release without knobs: do not guess where its hooks live
    return _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)


def _int_class(a: int) -> int:
    """An int's specialization class: 1; divisible by 16 or not; within int32, int64 or uint64."""
    if -_I32 <= a < _I32:
        return 0 if a == 1 else 1 if a & 15 == 0 else 2
    return (3 if a < _U64 else 5) + (a & 15 == 0)


def _tensor_class(a: torch.Tensor) -> tuple:
    return a.dtype, a.data_ptr() & 15 == 0


_CLASS_OF = {int: _int_class, torch.Tensor: _tensor_class, float: type, bool: type, type(None): type}


def argument_key(args: tuple) -> tuple:
    """The specialization-relevant part of positional kernel arguments (see the module docstring).

    Built once per launch, so by exact type first (a dict lookup; about half the host time of a chain of
    ``isinstance`` tests for ~30 arguments); subclasses (``nn.Parameter``) by ``isinstance``."""
    key = []
    for a in args:
        of = _CLASS_OF.get(type(a))
        if of is not None:
            key.append(of(a))
        elif isinstance(a, torch.Tensor):
            key.append(_tensor_class(a))
        elif isinstance(a, bool):
            key.append(bool)
        elif isinstance(a, int):
            key.append(_int_class(a))
        else:
            key.append(a)  # anything else (e.g. a dtype): by value
    return tuple(key)


class CachedLaunch:
    """A ``@triton.jit`` kernel whose repeat launches skip ``JITFunction.run``.

    Call as ``launcher.launch(grid, *args, **constexprs_and_options)``: positional arguments are the
    kernel's runtime parameters in order, keywords its trailing constexpr parameters and launch options.
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._compiled: dict[tuple, Any] = {}
        self._enabled: bool | None = None

    def launch(self, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
        if self._enabled is None:
            self._enabled = fast_launch_enabled()
        if not self._enabled or _hooks_set():
            self.kernel[grid](*args, **meta)
            return
        key = (tuple(meta.items()), argument_key(args))
        found = self._compiled.get(key)
        if found is None:
            compiled = self.kernel[grid](*args, **meta)
            tail = self._tail(len(args), meta)
            if compiled is None or tail is None or not hasattr(compiled, "packed_metadata"):
                return  # an unexpected shape of call or release: stay on the plain path for this key
            self._compiled[key] = (compiled, tail)
            return
        compiled, tail = found
        full = args + tuple(meta[name] for name in tail)
        stream = torch._C._cuda_getCurrentRawStream(args[0].get_device())  # what Triton's driver asks too
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                     compiled.function, compiled.packed_metadata, None, None, None, *full)

    def _tail(self, positional: int, meta: dict) -> tuple[str, ...] | None:
        """Names of the parameters after the positional ones, in order, when all are constexprs given in
        ``meta`` (then positional + those values are exactly the launcher's arguments); else None."""
        params = getattr(self.kernel, "params", None)
        if params is None or len(params) < positional:
            return None
        rest = params[positional:]
        if any(not p.is_constexpr or p.name not in meta for p in rest):
            return None
        return tuple(p.name for p in rest)


__all__ = ["CHECKED_RELEASES", "CachedLaunch", "argument_key", "fast_launch_enabled", "triton_release"]
