"""Running Triton kernel tests on the CPU under ``TRITON_INTERPRET=1``.

Triton reads that variable when kernels are decorated, so a test file runs its cases in one
subprocess (the file itself with ``--worker``) that sets it before anything imports triton. The
worker prints ``SKIP <reason>`` or ``RESULTS <json>``; :func:`run_worker` turns that into a skip or
the results dict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def gpu_like_bf16() -> bool:
    """Make the interpreter treat bfloat16 as the GPU does; returns False where this triton lacks the hooks.

    triton 3.9's interpreter keeps bf16 values as their uint16 bits and then (1) multiplies those bits
    as integers in ``tl.dot`` and (2) truncates fp32 -> bf16 conversions, where the GPU multiplies the
    values and rounds to nearest even. Both are replaced here, for bf16 operands only, so that
    precision tests can run bf16 on the CPU. Call it in the worker process, before any kernel runs.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None or not hasattr(builder, "cast_impl") or not hasattr(builder, "create_dot"):
        return False
    cast_impl, create_dot = builder.cast_impl, builder.create_dot

    def bf16_to_f32(bits):
        return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)

    def f32_to_bf16(values):
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)

    def cast(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in (tl.float32, tl.float64):
            return handle(f32_to_bf16(src.data.astype(np.float32)), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a_data = bf16_to_f32(a.data) if a.dtype.scalar == tl.bfloat16 else a.data
            b_data = bf16_to_f32(b.data) if b.dtype.scalar == tl.bfloat16 else b.data
            return handle(np.matmul(a_data, b_data, dtype=d.data.dtype) + d.data, d.dtype.scalar)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.cast_impl, builder.create_dot = cast, dot
    return True


def worker_main(compute: Callable[[], dict[str, Any]]) -> None:
    """Body of ``--worker``: print SKIP when this triton's interpreter cannot run the kernels, else RESULTS."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from chunkllama.attention.triton_dispatch import unsupported_reason

    probe = torch.zeros(1, 1, 1, 64, dtype=torch.float16)
    reason = unsupported_reason(probe, probe, probe)
    if reason is not None:
        print("SKIP " + reason)
        return
    print("RESULTS " + json.dumps(compute()))


def run_worker(test_file: str) -> dict[str, Any]:
    """Run ``test_file --worker`` under the interpreter; skip the calling tests when it says SKIP."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(Path(test_file).resolve()), "--worker"], env=env,
                          capture_output=True, text=True, timeout=600)
    skip = [line for line in proc.stdout.splitlines() if line.startswith("SKIP ")]
    if proc.returncode == 0 and skip:
        pytest.skip(skip[-1][len("SKIP "):])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULTS "):])
