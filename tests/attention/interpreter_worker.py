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
