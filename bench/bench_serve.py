"""Serving long documents with DCA: ``chunkllama serve`` with several clients, each asking about its
own long document, then follow-up questions (prefix cache). For the GPU; runs on a CPU at small sizes.

Phases (greedy, streaming, official ``openai`` client, loopback):
1. one client alone, a cold document: time-to-first-token (TTFT) and its decode tokens/s;
2. ``--clients`` concurrent clients, each with its own cold document: TTFTs and aggregate decode
   tokens/s (all completion tokens over the span from the first first-token to the last token);
3. follow-ups: each client asks a second question after its first answer; the document's KV comes
   from the prefix cache (``cached_tokens`` in ``usage``): TTFT with the prefix cache;
4. the same follow-ups on a server started with the prefix cache off: TTFT without it.

    python bench/bench_serve.py --model PATH.gguf --data ../shared/data --out bench/results   # GPU: 8 x 32k
    python bench/bench_serve.py --data ../shared/data --clients 2 --doc-tokens 2048 --max-tokens 8 --device cpu --threads 1 --out /tmp/serve
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_client import environment, running_server, server_metrics, stream_chat, write_results  # noqa: E402

QUESTIONS = ("In two sentences, what happens in this text?", "Which people are named in this text?")


def documents(model: str | None, data: Path, count: int, tokens: int) -> tuple[list[str], object]:
    """``count`` consecutive ``tokens``-token slices of the PG19 books, as text."""
    from transformers import AutoTokenizer

    from chunkllama.eval.data import pg19_texts
    from chunkllama.models import converted_gguf_dir, resolve_model_source

    kind, path = resolve_model_source(model)
    source = str(converted_gguf_dir(path)) if kind == "gguf" else (str(path) if path else model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids: list[int] = []
    for _, text in pg19_texts(data):
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= count * tokens:
            break
    if len(ids) < count * tokens:
        raise SystemExit(f"PG19 under {data} has {len(ids)} tokens; {count} x {tokens} needed")
    return [tokenizer.decode(ids[i * tokens:(i + 1) * tokens]) for i in range(count)], tokenizer


def first_turn(doc: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Read this text.\n\n{doc}\n\nQuestion: {QUESTIONS[0]}"}]


def concurrently(client, model, conversations, max_tokens) -> list[dict]:
    results: list[dict] = [{}] * len(conversations)
    barrier = threading.Barrier(len(conversations))

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = stream_chat(client, model, conversations[i], max_tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(conversations))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def decode_rate(result: dict) -> float | None:
    if not result.get("first") or not result.get("completion_tokens") or result["completion_tokens"] < 2:
        return None
    return (result["completion_tokens"] - 1) / (result["end"] - result["first"])


def aggregate_rate(results: list[dict]) -> float:
    firsts = [r["first"] for r in results if r.get("first")]
    tokens = sum(r["completion_tokens"] or 0 for r in results)
    return tokens / (max(r["end"] for r in results) - min(firsts))


def overlap_rate(results: list[dict]) -> float | None:
    """Streamed chunks per second while every client was decoding (from the last first token to the
    first end); None when that window is under 0.2 s. A chunk is about one token."""
    lo = max(r["first"] for r in results if r.get("first"))
    hi = min(r["end"] for r in results)
    if hi - lo < 0.2:
        return None
    return round(sum(lo <= t <= hi for r in results for t in r["arrivals"]) / (hi - lo), 2)


def clean(results: list[dict]) -> list[dict]:
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
             if k not in ("start", "first", "end", "arrivals")} for r in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file / model dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder holding pg19/")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--doc-tokens", type=int, default=32768)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--prefix-cache-gb", type=float, default=24.0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in the server")
    parser.add_argument("--logs", type=Path, default=None,
                        help="folder for the servers' logs (default: a temporary folder; give one on a GPU run so "
                             "they come back with the results)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds a client waits for one request")
    args = parser.parse_args(argv)
    import openai

    docs, _ = documents(args.model, args.data, args.clients + 1, args.doc_tokens)
    base_args = ["--max-batch", str(args.clients), "--max-queue", str(args.clients),
                 "--max-context", str(args.doc_tokens + 1024)]
    if args.model:
        base_args += ["--model", args.model]
    if args.device:
        base_args += ["--device", args.device]
    if args.threads:
        base_args += ["--threads", str(args.threads)]
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    began = time.monotonic()

    def progress(what: str) -> None:
        print(f"[bench_serve {time.monotonic() - began:6.1f}s] {what}", flush=True)

    def client_for(base):
        return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=args.request_timeout)

    progress(f"{len(docs)} documents of {args.doc_tokens} tokens; starting the server (log: {logs / 'server.log'})")
    with running_server(base_args + ["--prefix-cache-gb", str(args.prefix_cache_gb)], logs / "server.log") as base:
        client = client_for(base)
        model = client.models.list().data[0].id
        progress(f"server up at {base}; warm-up request")
        stream_chat(client, model, [{"role": "user", "content": "Hi"}], 2)  # warm-up (kernels, allocator)
        progress("phase 1: one client, cold document")
        single = stream_chat(client, model, first_turn(docs[-1]), args.max_tokens)
        progress(f"phase 2: {args.clients} concurrent clients, cold documents")
        first = concurrently(client, model, [first_turn(d) for d in docs[:-1]], args.max_tokens)
        follow_convs = [first_turn(d) + [{"role": "assistant", "content": r["text"]},
                                         {"role": "user", "content": QUESTIONS[1]}] for d, r in zip(docs, first)]
        progress("phase 3: follow-ups, prefix cache on")
        follow = concurrently(client, model, follow_convs, args.max_tokens)
        metrics_cached = server_metrics(base)
    progress("phase 4: follow-ups on a server without the prefix cache")
    with running_server(base_args + ["--prefix-cache-gb", "0"], logs / "server_nocache.log") as base:
        client = client_for(base)
        stream_chat(client, model, [{"role": "user", "content": "Hi"}], 2)
        follow_nocache = concurrently(client, model, follow_convs, args.max_tokens)
    progress("done")

    errors = [r["error"] for r in [single, *first, *follow, *follow_nocache] if r["error"]]
    if errors:  # no numbers from a run with failed requests: say what failed (the server logs say why)
        print(f"{len(errors)} requests failed; first: {errors[0]}\nserver logs: {logs}", file=sys.stderr)
        return 1

    def med(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 4) if values else None

    summary = {
        "clients": args.clients, "doc_tokens": args.doc_tokens, "max_tokens": args.max_tokens, "errors": errors,
        "single_client": {"ttft_s": round(single["ttft_s"], 4) if single["ttft_s"] else None,
                          "decode_tokens_per_s": round(decode_rate(single) or 0, 2),
                          "prompt_tokens": single["prompt_tokens"], "completion_tokens": single["completion_tokens"]},
        "concurrent_first_turn": {"ttft_median_s": med(r["ttft_s"] for r in first),
                                  "ttft_max_s": max((r["ttft_s"] or 0) for r in first),
                                  "aggregate_decode_tokens_per_s": round(aggregate_rate(first), 2),
                                  "all_decoding_tokens_per_s": overlap_rate(first),
                                  "completion_tokens": sum(r["completion_tokens"] or 0 for r in first)},
        "follow_up_with_prefix_cache": {"ttft_median_s": med(r["ttft_s"] for r in follow),
                                        "ttft_max_s": max((r["ttft_s"] or 0) for r in follow),
                                        "cached_tokens_median": med(r["cached_tokens"] for r in follow),
                                        "aggregate_decode_tokens_per_s": round(aggregate_rate(follow), 2),
                                        "all_decoding_tokens_per_s": overlap_rate(follow)},
        "follow_up_without_prefix_cache": {"ttft_median_s": med(r["ttft_s"] for r in follow_nocache),
                                           "ttft_max_s": max((r["ttft_s"] or 0) for r in follow_nocache)},
        "engine_mean_batch": metrics_cached["mean_batch"],
    }
    single_rate = max(1e-9, summary["single_client"]["decode_tokens_per_s"])
    summary["aggregate_vs_single_decode"] = round(
        summary["concurrent_first_turn"]["aggregate_decode_tokens_per_s"] / single_rate, 2)
    best = summary["follow_up_with_prefix_cache"]["all_decoding_tokens_per_s"]
    summary["all_decoding_vs_single_decode"] = round(best / single_rate, 2) if best else None
    command = "python bench/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = environment()
    results = {"summary": summary, "environment": env, "model": model, "command": command,
               "single": clean([single])[0], "first_turn": clean(first), "follow_up": clean(follow),
               "follow_up_nocache": clean(follow_nocache), "metrics": metrics_cached}
    s, c, f, n = (summary["single_client"], summary["concurrent_first_turn"], summary["follow_up_with_prefix_cache"],
                  summary["follow_up_without_prefix_cache"])
    markdown = f"""# `chunkllama serve`: {args.clients} clients, each with its own {args.doc_tokens}-token document ({model})

`{command}` — {env.get('gpu', 'CPU')}, torch {env['torch']}, transformers {env['transformers']}. Documents: consecutive
{args.doc_tokens}-token slices of the PG19 test books; greedy answers of at most {args.max_tokens} tokens; streaming over loopback.

| | TTFT median (s) | TTFT max (s) | decode tokens/s |
|---|---|---|---|
| one client alone, cold document | {s['ttft_s']} | {s['ttft_s']} | {s['decode_tokens_per_s']} |
| {args.clients} concurrent clients, cold documents | {c['ttft_median_s']} | {round(c['ttft_max_s'], 4)} | {c['aggregate_decode_tokens_per_s']} (aggregate) |
| follow-ups, prefix cache on (median {f['cached_tokens_median']} cached tokens) | {f['ttft_median_s']} | {round(f['ttft_max_s'], 4)} | {f['aggregate_decode_tokens_per_s']} (aggregate); {f['all_decoding_tokens_per_s']} while all {args.clients} decode |
| follow-ups, prefix cache off | {n['ttft_median_s']} | {round(n['ttft_max_s'], 4)} | |

- Decode throughput while all {args.clients} clients decode (follow-ups): **{summary['all_decoding_vs_single_decode']}x** one
  client's; over the whole first turn, prefills of the other documents included: {summary['aggregate_vs_single_decode']}x
  (engine mean batch {summary['engine_mean_batch']}). "Aggregate": all completion tokens over the span from the first
  first-token to the last token.
- Errors: {len(errors)}. The engine prefills one document at a time (in {1024}-token pieces, interleaved with the
  running streams' decode steps), so the last of {args.clients} cold documents waits for the others' prefill.
"""
    write_results(args.out, "serve", results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
