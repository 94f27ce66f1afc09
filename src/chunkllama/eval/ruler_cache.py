"""RULER prompts kept on disk and reused by later runs.

Building a prompt fits its haystack to the length by tokenizing it several times: 11 tasks x 10
prompts of 64k took 71 s on this project's CPU (``bench/results/ruler_prompts.md``), and that much of
every run at 64k, on a GPU machine too. With a cache folder, each (task, length) is built once and later runs with the
same inputs load it (a gzip-compressed JSON file per task and length: 14 MiB for 11 tasks x 10 prompts of 64k,
small enough to carry to a GPU machine).

A file is found only by a key over everything the prompts depend on: the tokenizer (its definition,
chat template and special tokens), the task, length, number of samples, seed, depths,
chat setting, the essay words, and the source of :mod:`.ruler_tasks` itself (a changed generator
never meets prompts of the old one).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Sequence

from . import ruler_tasks as rt

FORMAT = 1  # of the files; part of every key


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of what a tokenizer turns text into: its whole definition for a fast tokenizer (vocabulary,
    merges, normalizer, pre-tokenizer: ``tokenizer.json``), else its class and vocabulary; with the chat
    template and special tokens. The class name of a fast tokenizer is left out: transformers releases name
    the same tokenizer differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())]
    return _digest([definition, getattr(tokenizer, "chat_template", None), getattr(tokenizer, "special_tokens_map", None)])


def samples_key(
    fingerprint: str, task: str, length: int, n_samples: int, *, seed: int, depths: Sequence[float] | None,
    use_chat: bool | None, words: Sequence[str] | None,
) -> str:
    """The cache key of one (task, length)'s samples; ``fingerprint`` from :func:`tokenizer_fingerprint`."""
    source = hashlib.sha256(inspect.getsource(rt).encode()).hexdigest()
    essay = hashlib.sha256(" ".join(words or ()).encode()).hexdigest()
    return _digest([FORMAT, source, fingerprint, task, length, n_samples, seed,
                    None if depths is None else list(depths), use_chat, essay])


def _path(directory: str | os.PathLike[str], task: str, length: int, key: str) -> Path:
    return Path(directory) / f"{task}-{length}-{key[:20]}.json.gz"


def _from_dict(data: dict[str, Any]) -> rt.RulerSample:
    fields = {f.name for f in dataclasses.fields(rt.RulerSample)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
    values["needles"] = tuple(rt.Needle(**n) for n in data.get("needles", ()))
    return rt.RulerSample(**values)


def load_samples(directory: str | os.PathLike[str], task: str, length: int, key: str) -> list[rt.RulerSample] | None:
    """The samples saved under ``key``, or None when there are none (or the file is unreadable)."""
    path = _path(directory, task, length, key)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
        if data.get("key") != key:
            return None
        return [_from_dict(s) for s in data["samples"]]
    except (OSError, EOFError, ValueError, KeyError, TypeError):
        return None


def save_samples(directory: str | os.PathLike[str], task: str, length: int, key: str,
                 samples: Sequence[rt.RulerSample]) -> Path:
    """Write ``samples`` under ``key`` (to a temporary file first, so a cut run leaves no half file)."""
    path = _path(directory, task, length, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=6) as f:
        json.dump({"key": key, "samples": [dataclasses.asdict(s) for s in samples]}, f)
    os.replace(tmp, path)
    return path


__all__ = ["FORMAT", "load_samples", "samples_key", "save_samples", "tokenizer_fingerprint"]
