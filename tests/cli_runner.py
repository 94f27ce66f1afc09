"""Run the ``chunkllama`` command in a fresh interpreter and check its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time

_CLI_DRIVER = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("\\nHEAVY-IMPORTS=" + ",".join(
    m for m in ("torch", "transformers") if m in sys.modules) + "\\n"))
from chunkllama.cli import main
sys.exit(main(sys.argv[1:]))
"""


class CliResult:
    """What one ``chunkllama ...`` run gave: exit code, stdout, stderr (without the driver's line),
    the heavy modules it imported, and its wall time in seconds (interpreter start included)."""

    def __init__(self, returncode: int, stdout: str, stderr: str, seconds: float):
        text, found, heavy = stderr.rpartition("\nHEAVY-IMPORTS=")
        if not found:  # the interpreter died before its exit hooks ran
            text, heavy = stderr, ""
        self.returncode, self.stdout, self.seconds = returncode, stdout, seconds
        self.stderr = text.strip("\n")
        self.heavy = [m for m in heavy.strip().split(",") if m]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
    """Run ``chunkllama ARGS`` in a fresh interpreter, with this checkout's src/ first on the path."""
    full_env = {**os.environ, **(env or {})}
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    full_env["PYTHONPATH"] = os.pathsep.join([src, full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    tick = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CLI_DRIVER, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    return CliResult(done.returncode, done.stdout, done.stderr, time.perf_counter() - tick)


def assert_usage_error(result: CliResult, prog: str, *fragments: str, max_seconds: float = 10.0) -> None:
    """One line ``PROG: error: ...`` holding every fragment, exit code 2, no traceback, no torch, fast."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.stderr
    assert result.heavy == [], f"imported {result.heavy} before reporting a bad argument"
    assert result.seconds < max_seconds, result.seconds
