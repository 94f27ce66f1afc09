"""Build RULER prompts into a cache folder ahead of a GPU run, and time building against loading.

    python bench/bench_ruler_prompts.py --lengths 64k --samples 10 --cache .device/ruler_cache
    # then on the GPU machine: bench_retrieval_study.py ... --ruler-sample-cache .device/ruler_cache

Builds every task's samples at each length with the default model's tokenizer (the same prompts
``chunkllama eval ruler`` and ``bench_retrieval_study.py`` build for SmolLM2 with these settings), saves them
through :mod:`chunkllama.eval.ruler_cache`, then loads them back and checks they are equal. Prints and
writes ``ruler_prompts.json`` / ``.md`` under ``--out``: build seconds, load seconds, the cache's size.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help=".gguf file of the model (default: the bundled SmolLM2)")
    parser.add_argument("--lengths", default="64k")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--cache", type=Path, required=True, help="the cache folder (created)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    import transformers

    from chunkllama.eval import ruler, ruler_cache
    from chunkllama.eval import ruler_tasks as rt
    from chunkllama.eval.commands import parse_lengths
    from chunkllama.eval.ruler_command import check_settings
    from chunkllama.models import converted_gguf_dir, default_gguf_path

    settings = check_settings("dca", args.tasks, args.lengths, args.samples, None, args.data, None, 1, None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(converted_gguf_dir(args.model or default_gguf_path())))
    words = rt.essay_words(settings.essay) if isinstance(settings.essay, str) else settings.essay
    fingerprint = ruler_cache.tokenizer_fingerprint(tokenizer)
    rows = []
    for length in parse_lengths(args.lengths):
        built_s = loaded_s = 0.0
        for task in settings.tasks:
            key = ruler_cache.samples_key(fingerprint, task, length, args.samples, seed=args.seed, depths=None,
                                          use_chat=None, words=words)
            t0 = time.perf_counter()
            samples = ruler.build_samples(tokenizer, task, length, args.samples, seed=args.seed, essay=words)
            built_s += time.perf_counter() - t0
            ruler_cache.save_samples(args.cache, task, length, key, samples)
            t0 = time.perf_counter()
            loaded = ruler_cache.load_samples(args.cache, task, length, key)
            loaded_s += time.perf_counter() - t0
            assert loaded == samples, task
        size = sum(p.stat().st_size for p in args.cache.glob(f"*-{length}-*.json.gz"))
        rows.append({"L": length, "tasks": len(settings.tasks), "samples": args.samples, "build_s": round(built_s, 1),
                     "load_s": round(loaded_s, 2), "cache_mib": round(size / 2**20, 1),
                     "machine": f"{platform.machine()} CPU", "transformers": transformers.__version__})
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ruler_prompts.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# RULER prompts: building vs loading them from the cache (`chunkllama.eval.ruler_cache`)", "",
             f"`python bench/bench_ruler_prompts.py --lengths {args.lengths} --samples {args.samples} --cache DIR`; "
             "SmolLM2's tokenizer, one process.", "",
             "| length | tasks | samples per task | build s | load s | cache MiB | machine |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['L']} | {r['tasks']} | {r['samples']} | {r['build_s']} | {r['load_s']} | {r['cache_mib']} | "
              f"{r['machine']} |" for r in rows]
    (args.out / "ruler_prompts.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
