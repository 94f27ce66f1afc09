"""Small helpers the quality benches share: the checkout's commit and a file-name slug of the device."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """Short hash of this checkout's HEAD, or None outside a git checkout (e.g. a copied tree)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def slug(text: str) -> str:
    """``text`` as a lower-case file-name part: runs of other characters become ``-``, at most 40 long."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def copy_to_out(paths) -> None:
    """Copy result files into ``$OUT`` when set (the GPU machine's folder that comes back)."""
    if os.environ.get("OUT"):
        for p in paths:
            shutil.copy(p, Path(os.environ["OUT"]) / Path(p).name)
