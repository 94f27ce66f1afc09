"""The cached Triton launcher (:mod:`chunkllama.attention.triton_launch`).

On the CPU a fake ``JITFunction`` stands in for a kernel: it records its launches and returns a fake
``CompiledKernel`` whose launcher records the direct launches, so these tests check which path each
call takes and that a direct launch passes exactly what ``JITFunction.run`` passes (every parameter in
order, constexprs included). The GPU test runs the real decode and rotation kernels through both paths.
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton")

from chunkllama.attention import triton_launch  # noqa: E402
from chunkllama.attention.triton_launch import CachedLaunch, argument_key  # noqa: E402


def _param(name: str, constexpr: bool) -> types.SimpleNamespace:
    return types.SimpleNamespace(name=name, is_constexpr=constexpr)


class FakeCompiled:
    def __init__(self) -> None:
        self.direct: list[tuple] = []
        self.function = "fn-handle"
        self.packed_metadata = "meta"

    def run(self, *launch):
        self.direct.append(launch)


class FakeKernel:
    """Parameters X (tensor), n (int), scale (float), then constexprs BLOCK, FLAG."""

    params = [_param("X", False), _param("n", False), _param("scale", False),
              _param("BLOCK", True), _param("FLAG", True)]

    def __init__(self) -> None:
        self.jit_calls: list[tuple] = []
        self.compiled: list[FakeCompiled] = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.jit_calls.append((grid, args, meta))
            self.compiled.append(FakeCompiled())
            return self.compiled[-1]
        return run


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("CHUNKLLAMA_FAST_LAUNCH", raising=False)
    monkeypatch.setattr(triton_launch, "triton_release", lambda: triton_launch.CHECKED_RELEASES[-1])
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    return monkeypatch


def test_repeat_launch_goes_direct_with_every_parameter_in_order(fast):
    kernel = FakeKernel()
    launcher = CachedLaunch(kernel)
    x = torch.zeros(64)
    launcher.launch((3, 2), x, 37, 0.5, BLOCK=16, FLAG=True, num_warps=4)
    assert len(kernel.jit_calls) == 1 and not kernel.compiled[0].direct
    launcher.launch((5, 1), x, 53, 0.25, BLOCK=16, FLAG=True, num_warps=4)  # 37 and 53: same class
    assert len(kernel.jit_calls) == 1
    (launch,) = kernel.compiled[0].direct
    assert launch[:4] == (5, 1, 1, 1234)  # grid padded to 3 dims, the current stream
    assert launch[4:9] == ("fn-handle", "meta", None, None, None)
    assert launch[9:] == (x, 53, 0.25, 16, True)  # runtime arguments, then the constexprs by position


@pytest.mark.parametrize("change", [
    dict(n=1), dict(n=48), dict(n=1 << 31), dict(BLOCK=32), dict(num_warps=8), dict(x_offset=1),
    dict(x_dtype=torch.float16),
])
def test_a_different_specialization_goes_through_triton(fast, change):
    kernel = FakeKernel()
    launcher = CachedLaunch(kernel)
    base = torch.zeros(64)
    launcher.launch((1,), base, 37, 0.5, BLOCK=16, FLAG=True, num_warps=4)
    x = base.to(change.get("x_dtype", base.dtype))[change.get("x_offset", 0):]
    meta = dict(BLOCK=change.get("BLOCK", 16), FLAG=True, num_warps=change.get("num_warps", 4))
    launcher.launch((1,), x, change.get("n", 37), 0.5, **meta)
    assert len(kernel.jit_calls) == 2, "a new specialization must be compiled (or looked up) by Triton"
    launcher.launch((1,), x, change.get("n", 37), 0.5, **meta)
    assert len(kernel.jit_calls) == 2 and len(kernel.compiled[1].direct) == 1


def test_argument_key_classes():
    assert argument_key((1,)) != argument_key((2,))
    assert argument_key((16,)) != argument_key((17,))
    assert argument_key((17,)) == argument_key((19,))
    assert argument_key((True,)) != argument_key((1,))
    assert argument_key((2.0,)) == argument_key((3.0,))
    assert argument_key((None,)) != argument_key((0,))
    assert argument_key((2**31 - 1,)) != argument_key((2**31 + 1,))  # int32 vs int64
    assert argument_key((2**40,)) != argument_key((2**40 + 1,)) != argument_key((2**63 + 1,))
    assert argument_key((-3,)) == argument_key((5,)) and argument_key((-16,)) == argument_key((32,))
    base = torch.zeros(8, dtype=torch.float16)
    assert argument_key((base,)) == argument_key((torch.nn.Parameter(base.clone()),))
    assert argument_key((base,)) != argument_key((base[1:],))  # 2-byte offset: not 16-byte aligned
    assert argument_key((base,)) != argument_key((base.float(),))


@pytest.mark.parametrize("env", [("CHUNKLLAMA_FAST_LAUNCH", "0"), ("TRITON_INTERPRET", "1")])
def test_switched_off_every_launch_goes_through_triton(fast, env):
    fast.setenv(*env)
    kernel = FakeKernel()
    launcher = CachedLaunch(kernel)
    for _ in range(3):
        launcher.launch((1,), torch.zeros(4), 5, 0.5, BLOCK=16, FLAG=False)
    assert len(kernel.jit_calls) == 3 and not any(c.direct for c in kernel.compiled)


def test_unchecked_release_and_set_hooks_go_through_triton(fast):
    fast.setattr(triton_launch, "triton_release", lambda: (2, 0))
    kernel = FakeKernel()
    launcher = CachedLaunch(kernel)
    for _ in range(2):
        launcher.launch((1,), torch.zeros(4), 5, 0.5, BLOCK=16, FLAG=False)
    assert len(kernel.jit_calls) == 2
    fast.setattr(triton_launch, "triton_release", lambda: triton_launch.CHECKED_RELEASES[-1])
    fast.setattr(triton_launch, "_hooks_set", lambda: True)  # a profiler's launch hook
    launcher = CachedLaunch(kernel)
    for _ in range(2):
        launcher.launch((1,), torch.zeros(4), 5, 0.5, BLOCK=16, FLAG=False)
    assert len(kernel.jit_calls) == 4


def test_keyword_runtime_arguments_stay_on_triton(fast):
    """A call that passes a runtime parameter by keyword cannot be replayed by position: Triton's path always."""
    kernel = FakeKernel()
    launcher = CachedLaunch(kernel)
    for _ in range(2):
        launcher.launch((1,), torch.zeros(4), 5, scale=0.5, BLOCK=16, FLAG=False)
    assert len(kernel.jit_calls) == 2


def test_hook_chains_without_calls_count_as_unset():
    assert not triton_launch._hook_set(None)
    assert not triton_launch._hook_set(types.SimpleNamespace(calls=[]))
    assert triton_launch._hook_set(types.SimpleNamespace(calls=[print]))
    assert triton_launch._hook_set(print)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_direct_launches_equal_triton_launches():
    """Decode (split + merge) and the key rotation: the second call of a shape (direct launch) gives the
    same bits as the first (through Triton), at lengths of every specialization class."""
    from chunkllama.attention.triton_decode import dca_decode
    from chunkllama.attention.triton_rope import rotate_at

    torch.manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    for kv_len in (1, 16, 77, 4096, 5000):
        q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, kv_len + 3, 128, device="cuda", dtype=torch.bfloat16)[:, :, 3:]  # offset view
        v = torch.randn(1, 8, kv_len, 128, device="cuda", dtype=torch.bfloat16)
        qpos = torch.full((1, 1), kv_len - 1, device="cuda")
        kpos = torch.arange(kv_len, device="cuda")[None]
        args = (q, k, v, qpos, kpos, inv_freq, 1.0, 1536, 1536, 128 ** -0.5)
        first = dca_decode(*args)
        assert torch.equal(dca_decode(*args), first)
        rotated = rotate_at(k, kpos, inv_freq)
        assert torch.equal(rotate_at(k, kpos, inv_freq), rotated)
