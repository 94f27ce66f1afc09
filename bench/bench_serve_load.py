"""Load test of ``chunkllama serve`` on this machine (loopback only, bounded in count and time).

16 concurrent streaming clients (official ``openai`` client, greedy) against the default model
(SmolLM2-135M-Instruct with DCA) on the CPU, then the same 16 requests one at a time on the same
server. Checks: no errors, every concurrent answer equals the same request served alone, and
reports throughput (completion tokens per wall-clock second) of both, time-to-first-token, and
the mean batch the engine ran. The prefix cache is off so the two runs do the same work.

    python bench/bench_serve_load.py --out bench/results   # -> serve_load.json + serve_load.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_client import environment, running_server, server_metrics, stream_chat, write_results  # noqa: E402

TOPICS = ["the moon", "bread", "rivers", "chess", "bees", "volcanoes", "libraries", "trains", "tea", "glaciers",
          "violins", "owls", "deserts", "bridges", "coral reefs", "clocks"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model for the server (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server (default: torch's)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout (s)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)

    import openai

    server_args = ["--device", args.device, "--max-batch", str(args.clients), "--max-queue", str(args.clients),
                   "--max-context", "4096", "--prefix-cache-gb", "0"]
    if args.model:
        server_args += ["--model", args.model]
    if args.threads:
        server_args += ["--threads", str(args.threads)]
    with running_server(server_args, Path(tempfile.mkdtemp(prefix="bench-serve-load-")) / "server.log") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=args.timeout)
        model = client.models.list().data[0].id
        requests = [[{"role": "user", "content": f"Write two sentences about {topic}."}] for topic in TOPICS[: args.clients]]
        stream_chat(client, model, [{"role": "user", "content": "Hi"}], 2)  # warm-up

        results: list[dict] = [{}] * len(requests)
        barrier = threading.Barrier(len(requests))

        def worker(i: int) -> None:
            barrier.wait()
            results[i] = stream_chat(client, model, requests[i], args.max_tokens)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent_wall = max(r["end"] for r in results) - min(r["start"] for r in results)
        mean_batch = server_metrics(base)["mean_batch"]

        alone = [stream_chat(client, model, messages, args.max_tokens) for messages in requests]
        sequential_wall = sum(r["total_s"] for r in alone)

    errors = [r["error"] for r in results + alone if r["error"]]
    equal = [a["text"] == b["text"] for a, b in zip(results, alone)]
    tokens = sum(r["completion_tokens"] or 0 for r in results)
    tokens_alone = sum(r["completion_tokens"] or 0 for r in alone)
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    ttft_alone = [r["ttft_s"] for r in alone if r["ttft_s"] is not None]
    summary = {
        "clients": len(requests), "max_tokens": args.max_tokens, "errors": errors,
        "answers_equal_to_alone": sum(equal), "mismatches": [i for i, e in enumerate(equal) if not e],
        "concurrent": {"wall_s": round(concurrent_wall, 3), "completion_tokens": tokens,
                       "tokens_per_s": round(tokens / concurrent_wall, 2),
                       "ttft_median_s": round(statistics.median(ttft), 3) if ttft else None,
                       "ttft_max_s": round(max(ttft), 3) if ttft else None, "engine_mean_batch": mean_batch},
        "one_at_a_time": {"wall_s": round(sequential_wall, 3), "completion_tokens": tokens_alone,
                          "tokens_per_s": round(tokens_alone / sequential_wall, 2),
                          "ttft_median_s": round(statistics.median(ttft_alone), 3) if ttft_alone else None},
    }
    summary["speedup"] = round(summary["concurrent"]["tokens_per_s"] / summary["one_at_a_time"]["tokens_per_s"], 2)
    results_json = {"summary": summary, "environment": environment(), "model": model,
                    "command": "python bench/bench_serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "requests": [{"messages": m, "concurrent": {k: v for k, v in r.items() if k not in ("start", "first", "end", "arrivals")},
                                  "alone": {k: v for k, v in a.items() if k not in ("start", "first", "end", "arrivals")}}
                                 for m, r, a in zip(requests, results, alone)]}
    c, s = summary["concurrent"], summary["one_at_a_time"]
    markdown = f"""# `chunkllama serve` under load ({model}, {args.device})

`{results_json['command']}` — {len(requests)} streaming clients (official `openai` client, greedy,
{args.max_tokens} tokens each) on 127.0.0.1, then the same requests one at a time on the same server
(prefix cache off). {results_json['environment'].get('cpu_count')} CPU cores, torch {results_json['environment']['torch']},
transformers {results_json['environment']['transformers']}.

| | wall (s) | completion tokens | tokens/s | TTFT median (s) |
|---|---|---|---|---|
| {len(requests)} concurrent clients (engine mean batch {c['engine_mean_batch']}) | {c['wall_s']} | {c['completion_tokens']} | {c['tokens_per_s']} | {c['ttft_median_s']} |
| one at a time | {s['wall_s']} | {s['completion_tokens']} | {s['tokens_per_s']} | {s['ttft_median_s']} |

- Batching throughput gain: **{summary['speedup']}x**.
- Errors: {len(errors)}. Answers equal to the same request served alone: {sum(equal)}/{len(equal)}{' (mismatches: ' + str(summary['mismatches']) + ')' if summary['mismatches'] else ''}.
"""
    write_results(args.out, "serve_load", results_json, markdown)
    return 0 if not errors and all(equal) else 1


if __name__ == "__main__":
    sys.exit(main())
