"""Evaluation data: PG19 books, Paul Graham essays, L-Eval JSONL — from disk or the HF hub.

Local layout (see ``../shared/data/README.md`` of the project): ``<root>/pg19/*.txt``,
``<root>/paul_graham_essays/*.txt``, ``<root>/leval/{closed,open}/<task>.jsonl``. Every loader
takes either that root, the sub-folder itself, or (for L-Eval) a single ``.jsonl`` file.
``hf://owner/name`` sources (or the defaults below when no local copy exists) are read with the
``datasets`` package, which only users with a connection need.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

DATA_ENV = "CHUNKLLAMA_DATA"
PG19_EXCLUDE = ("_pg19_exact.txt",)  # the byte-exact duplicate of book 22424
HF_PG19 = "hf://emozilla/pg19-test"
HF_LEVAL = "hf://L4NLP/LEval"


def default_data_root() -> Path | None:
    """``$CHUNKLLAMA_DATA``, else ``../shared/data`` or ``./shared/data`` when present."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    for candidate in (Path("../shared/data"), Path("shared/data"), Path(".device/data")):
        if candidate.is_dir():
            return candidate
    return None


def _subdir(root: str | os.PathLike[str] | None, name: str) -> Path:
    base = Path(root).expanduser() if root is not None else default_data_root()
    if base is None:
        raise FileNotFoundError(
            f"No data found for {name!r}: pass --data PATH (a folder holding {name}/), set "
            f"${DATA_ENV}, or run from the project root with ../shared/data present."
        )
    if (base / name).is_dir():
        return base / name
    if base.is_dir() and base.name == name:
        return base
    if base.is_dir() and any(base.glob("*.txt")) and name != "leval":
        return base
    if base.is_dir() and name == "leval" and (any(base.glob("*.jsonl")) or (base / "closed").is_dir()):
        return base
    raise FileNotFoundError(f"{base} holds no {name}/ folder (looked for {base / name}).")


def _hf_dataset(spec: str, name: str | None = None, split: str = "test") -> Any:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the user's environment
        raise ImportError("Reading from the Hugging Face hub needs `pip install datasets`.") from exc
    return datasets.load_dataset(spec.removeprefix("hf://"), name, split=split)


def pg19_texts(source: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """PG19 books as ``(name, text)``, sorted by file name, without ``*_pg19_exact.txt``."""
    if isinstance(source, str) and source.startswith("hf://"):
        ds = _hf_dataset(source)
        return [(str(row.get("short_book_title", i)), row["text"]) for i, row in enumerate(ds)]
    folder = _subdir(source, "pg19")
    files = sorted(p for p in folder.glob("*.txt") if not p.name.endswith(PG19_EXCLUDE))
    if not files:
        raise FileNotFoundError(f"No .txt books in {folder}.")
    return [(p.name, p.read_text(encoding="utf-8")) for p in files]


def pg19_corpus(source: str | os.PathLike[str] | None = None) -> str:
    """The PG19 protocol's corpus: the books, sorted by name, joined with a blank line."""
    return "\n\n".join(text for _, text in pg19_texts(source))


def essays_text(source: str | os.PathLike[str] | None = None) -> str:
    """The needle haystack: Paul Graham essays in sorted file order, concatenated."""
    folder = _subdir(source, "paul_graham_essays")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"No essays (.txt) in {folder}.")
    return "".join(p.read_text(encoding="utf-8") for p in files)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def leval_task_files(source: str | os.PathLike[str] | None = None, tasks: Iterable[str] | None = None) -> dict[str, Path]:
    """Map task name -> JSONL file, from a file, a folder of JSONL files, or an L-Eval root."""
    if source is not None and Path(source).is_file():
        path = Path(source)
        return {path.stem: path}
    folder = _subdir(source, "leval")
    files = sorted(folder.rglob("*.jsonl"))
    found = {p.stem: p for p in files}
    if tasks:
        wanted = list(tasks)
        missing = [t for t in wanted if t not in found]
        if missing:
            raise FileNotFoundError(f"L-Eval tasks {missing} not in {folder} (have: {sorted(found)}).")
        return {t: found[t] for t in wanted}
    return found


def leval_task(source: str | os.PathLike[str] | None, task: str) -> list[dict[str, Any]]:
    """The documents of one L-Eval task (``hf://L4NLP/LEval`` reads it from the hub)."""
    if isinstance(source, str) and source.startswith("hf://"):
        return [dict(row) for row in _hf_dataset(source, task)]
    return read_jsonl(leval_task_files(source, [task])[task])
