"""Shared by the serving benchmarks: start ``chunkllama serve`` as a subprocess on a free loopback
port, stream one chat request with the official ``openai`` client and time it, write results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: list[str], log_path: Path, timeout: float = 900.0) -> tuple[subprocess.Popen, str]:
    """Run ``chunkllama serve ARGS --port <free>`` (this checkout's src first); wait for /health."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "chunkllama.cli", "serve", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); log:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as response:
                if response.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start within {timeout:.0f}s; log:\n{log_path.read_text()[-3000:]}")


def dump_server_stacks(proc: subprocess.Popen) -> None:
    """Ask a running ``chunkllama serve`` to print its threads' stacks into its log (SIGUSR1)."""
    if proc.poll() is None and hasattr(signal, "SIGUSR1"):
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)


@contextlib.contextmanager
def running_server(args: list[str], log_path: Path) -> Iterator[str]:
    """:func:`start_server` for a ``with`` block, yielding the base URL; the server is stopped at the end,
    and when the block raises (a failed or interrupted run) it first writes its threads' stacks to its log."""
    proc, base = start_server(args, log_path)
    try:
        yield base
    except BaseException:
        dump_server_stacks(proc)
        raise
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def server_metrics(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        return json.loads(response.read())


def stream_chat(client: Any, model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One greedy streaming chat request; times in seconds from the request's start (wall clock)."""
    start = time.perf_counter()
    first = None
    arrivals: list[float] = []
    parts: list[str] = []
    usage = None
    try:
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    arrivals.append(time.perf_counter())
                    first = first if first is not None else arrivals[-1]
                    parts.append(choice.delta.content)
        error = None
    except Exception as exc:  # noqa: BLE001 - reported, counted as an error
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    cached = 0
    if usage is not None and usage.prompt_tokens_details is not None:
        cached = usage.prompt_tokens_details.cached_tokens or 0
    return {
        "text": "".join(parts), "error": error, "start": start, "first": first, "end": end, "arrivals": arrivals,
        "ttft_s": (first - start) if first else None, "total_s": end - start,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None, "cached_tokens": cached,
    }


def environment() -> dict[str, Any]:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(out_dir: Path, name: str, results: dict[str, Any], markdown: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)
    print(markdown)
