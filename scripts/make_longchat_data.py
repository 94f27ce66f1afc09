"""Build a long-chat retrieval training set offline from the PG19 books in ../shared/data.

    python scripts/make_longchat_data.py --out /tmp/longchat_12k.jsonl --chats 64 --length 12000

Writes JSONL in the OpenAI ``messages`` format (plus a ``depth`` field), ready for
``chunkllama finetune --data``. The data file stays outside the repository; see
:mod:`chunkllama.training.longchat` for what a chat contains.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _tokenizer(model: str | None):
    from transformers import AutoTokenizer

    from chunkllama.models import converted_gguf_dir, resolve_model_source

    kind, path = resolve_model_source(model)
    source = str(converted_gguf_dir(path)) if kind == "gguf" else str(path) if path else model
    return AutoTokenizer.from_pretrained(source)


def main() -> None:
    from chunkllama.training.longchat import build_retrieval_chats

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSONL file to write (keep it out of the repository)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"),
                        help="the shared data folder (holds pg19/*.txt)")
    parser.add_argument("--chats", type=int, default=64, help="number of chats")
    parser.add_argument("--length", type=int, default=12000, help="passage length in tokens")
    parser.add_argument("--model", default=None, help="tokenizer source: hub id, model dir or .gguf; default SmolLM2")
    parser.add_argument("--exclude", default="_pg19_exact", help="comma-separated substrings of book file names to skip")
    parser.add_argument("--max-facts", type=int, default=3, help="planted facts per chat: 1 to this many")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    folder = Path(args.data) / "pg19"
    skip = [s for s in args.exclude.split(",") if s]
    files = sorted(p for p in folder.glob("*.txt") if not any(s in p.name for s in skip))
    if not files:
        raise SystemExit(f"no books found in {folder} (after excluding {skip}); pass --data.")
    books = [p.read_text(encoding="utf-8") for p in files]
    chats = build_retrieval_chats(books, _tokenizer(args.model), chats=args.chats, length=args.length,
                                  seed=args.seed, max_facts=args.max_facts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for chat in chats:
            handle.write(json.dumps(chat, ensure_ascii=False) + "\n")
    print(f"wrote {len(chats)} chats of ~{args.length} tokens from {len(files)} books to {out}")


if __name__ == "__main__":
    main()
