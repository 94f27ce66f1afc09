"""The fused key rotation equals :func:`chunkllama.rope.apply_rope` bit for bit.

``rotate`` takes cos/sin as :func:`chunkllama.rope.rope_cos_sin` made them; ``rotate_at`` computes them
from the positions inside the kernel (libdevice ``cosf``/``sinf`` on the GPU, as PyTorch's CUDA ops).

On the CPU the kernel runs under ``TRITON_INTERPRET=1`` in a subprocess (as in test_triton.py).
"""

from __future__ import annotations

import sys

import pytest
import torch

from interpreter_worker import run_worker, worker_main

# (B, H, T, D, dtype name, layout) ; "bthd" = HF projection views (B, T, H, D) transposed
CASES = [
    (1, 2, 37, 64, "float16", "bhtd"),
    (2, 3, 19, 128, "float16", "bthd"),
    (2, 1, 5, 64, "float32", "bthd"),
]


def run_case(case, device, at_positions=False) -> dict:
    from chunkllama.attention import triton_rope
    from chunkllama.rope import RotaryParams, apply_rope, rope_cos_sin

    batch, heads, length, head_dim, dtype_name, layout = case
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(length)
    if layout == "bthd":
        x = torch.randn(batch, length, heads, head_dim, generator=gen).to(device, dtype).transpose(1, 2)
    else:
        x = torch.randn(batch, heads, length, head_dim, generator=gen).to(device, dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    rope = RotaryParams(inv_freq.to(device), 0.9)
    positions = torch.randint(0, 5000, (batch, length), generator=gen).to(device)
    if at_positions:
        out = triton_rope.rotate_at(x, positions, rope.inv_freq, rope.attention_scaling)
    else:
        cos, sin = rope_cos_sin(rope, positions, dtype)
        out = triton_rope.rotate(x, cos, sin)
    want = apply_rope(x, rope, positions)
    # layout kept: same strides wherever they matter (a dimension of size 1 may carry any stride)
    kept = all(a == b for a, b, n in zip(out.stride(), x.stride(), x.shape) if n > 1)
    differ = out != want
    where = differ.nonzero()[:3].tolist()
    return {"equal": bool(torch.equal(out, want)), "strides_kept": kept,
            "max_diff": (out.float() - want.float()).abs().max().item(), "n_differ": int(differ.sum()),
            "examples": [(out[tuple(i)].item(), want[tuple(i)].item(), x[tuple(i)].item()) for i in where]}


def _worker_results() -> dict:
    results = {str(i): run_case(case, "cpu") for i, case in enumerate(CASES)}
    results.update({f"at{i}": run_case(case, "cpu", at_positions=True) for i, case in enumerate(CASES)})
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    return run_worker(__file__)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_interpreter_rotation_is_bit_identical(interpreter_results, index):
    result = interpreter_results[str(index)]
    assert result["equal"], result
    assert result["strides_kept"]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_interpreter_rotation_at_positions(interpreter_results, index):
    """Under the interpreter cos/sin come from numpy, not PyTorch: equal up to one rounding step."""
    result = interpreter_results[f"at{index}"]
    assert result["strides_kept"]
    assert result["max_diff"] <= 2e-3, result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("at_positions", [False, True], ids=["cos_sin", "positions"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_rotation_is_bit_identical(dtype, at_positions):
    for case in [(1, 32, 32768, 128, dtype, "bthd"), (3, 8, 1001, 64, dtype, "bhtd"), (2, 4, 1, 128, dtype, "bthd")]:
        result = run_case(case, "cuda", at_positions)
        assert result["equal"] and result["strides_kept"], (case, result)


def test_rotate_rejects_what_it_cannot_take():
    pytest.importorskip("triton")
    from chunkllama.attention import triton_rope

    x = torch.zeros(1, 1, 4, 96)
    with pytest.raises(ValueError, match="head_dim"):
        triton_rope.rotate(x, x[:, :1], x[:, :1])
    with pytest.raises(ValueError, match="head_dim"):
        triton_rope.rotate_at(x, torch.zeros(1, 4, dtype=torch.int64), torch.ones(48))
    with pytest.raises(ValueError, match="positions"):
        triton_rope.rotate_at(torch.zeros(1, 1, 4, 64), torch.zeros(1, 5, dtype=torch.int64), torch.ones(32))


if __name__ == "__main__" and "--worker" in sys.argv:
    worker_main(_worker_results)
