"""Small helpers the benches share: the checkout's commit, a file-name slug of the device, merging rows
across runs, and the ``--smoke`` settings of the scripts that have a CPU check."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping

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


def merge_rows(old: Iterable[dict], new: Iterable[dict], key: Callable[[dict], Hashable]) -> list[dict]:
    """``old`` rows that ``new`` does not measure again (the same ``key``), then ``new``."""
    new = list(new)
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


def apply_smoke(parser, args, settings: Mapping[str, Any], out: Path) -> None:
    """With ``--smoke``: ``settings`` replace those arguments, and an ``--out`` left at its default becomes
    ``out`` (a smoke run never overwrites the committed results)."""
    if not args.smoke:
        return
    for name, value in settings.items():
        setattr(args, name, value)
    if args.out == parser.get_default("out"):
        args.out = out
