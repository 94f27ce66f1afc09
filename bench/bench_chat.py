"""Chat with a long document through the serving engine: time to first token, decode speed, memory.

SmolLM2-135M-Instruct with DCA reads a ``--tokens``-long document (PG19 books, sorted by name and
joined, cut to the length; one clearly labelled "secret word" note planted in the middle as in
``examples/make_example_pdf.py``) in a :class:`chunkllama.serving.engine.Conversation`, then:

- turn 1: "What is the secret word?" (prompt = document + question; everything is prefilled):
  time to first token, decode tokens/s, the answer;
- turn 2: a follow-up question on the same conversation (only its own tokens are prefilled):
  time to first token;
- peak memory of reading the document with chunked prefill (``--prefill-chunk``) vs one-shot
  prefill (the whole prompt in one forward pass). Each mode runs in its own process, so peak
  memory is per mode: ``torch.cuda.max_memory_allocated`` on CUDA, peak RSS (``ru_maxrss``) on CPU.

Writes ``chat.json`` and ``chat.md`` (device name, torch / transformers / triton versions) in ``--out``.

    python bench/bench_chat.py --model /root/m/SmolLM2-135M-Instruct.Q4_1.gguf --data .device/data --out bench/results
    python bench/bench_chat.py --data ../shared/data --tokens 4096 --out /tmp/chat-bench   # CPU, small
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "What is the secret word?"
FOLLOW_UP = "Thank you. What was the secret word again?"
ANSWER_PREFIX = "The secret word is"
NOTE = "NOTE: the secret word is marmalade. Remember it. marmalade is the secret word. The secret word is marmalade."


def make_document(tokenizer, data: Path, tokens: int) -> str:
    """``tokens`` tokens of PG19 text with the note at the paragraph break nearest the middle."""
    books = sorted(p for p in (data / "pg19").glob("*.txt") if not p.name.endswith("_pg19_exact.txt"))
    if not books:
        raise SystemExit(f"error: no PG19 books in {data / 'pg19'}; pass --data DIR holding pg19/")
    ids: list[int] = []
    for book in books:
        ids += tokenizer(book.read_text(encoding="utf-8") + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            break
    text = tokenizer.decode(ids[:tokens])
    middle = text.find("\n\n", len(text) // 2)
    middle = middle if middle >= 0 else len(text) // 2
    return text[:middle] + "\n\n" + NOTE + text[middle:]


def run_mode(args: argparse.Namespace) -> dict:
    """One process: load, read the document (chunked or one-shot), answer; returns the measurements."""
    import resource

    import torch

    import chunkllama
    from chunkllama.serving.engine import Engine
    from chunkllama.serving.sampling import SamplingParams

    model, tokenizer = chunkllama.load_model(args.model, device=args.device)
    chunkllama.apply_dca(model, args.pretraining_length)
    device = next(model.parameters()).device
    document = make_document(tokenizer, args.data, args.tokens)
    chunk = args.prefill_chunk if args.mode == "chunked" else 1 << 30
    engine = Engine(model, tokenizer, max_context=max(args.tokens * 2, 4096), prefill_chunk=chunk)
    conversation = engine.conversation(document=document)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    first = conversation.ask(QUESTION, params, answer_prefix=ANSWER_PREFIX)
    row = dict(mode=args.mode, prefill_chunk=chunk if args.mode == "chunked" else None,
               prompt_tokens=first.prompt_tokens, ttft_turn1_s=first.time_to_first_token,
               decode_tokens_per_s=first.decode_tokens_per_second, new_tokens=first.new_tokens,
               answer=first.text, correct="marmalade" in first.text.lower(), weights_bytes=weights)
    if device.type == "cuda":
        torch.cuda.synchronize()
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
        row["peak_kind"] = "torch.cuda.max_memory_allocated"
    else:
        row["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row["peak_kind"] = "peak RSS of the process"
    if args.mode == "chunked":
        second = conversation.ask(FOLLOW_UP, params, answer_prefix=ANSWER_PREFIX)
        row.update(ttft_turn2_s=second.time_to_first_token, turn2_prefilled_tokens=second.prefilled_tokens,
                   answer_turn2=second.text, ttft_ratio=second.time_to_first_token / first.time_to_first_token)
    return row


def environment(device: str | None) -> dict:
    import importlib.metadata as md

    import torch

    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    name = torch.cuda.get_device_name() if use_cuda else f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    versions = {}
    for package in ("torch", "transformers", "triton", "chunkllama"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return dict(device=name, versions=versions, python=platform.python_version())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file / model dir / hub id; default: the bundled SmolLM2")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder holding pg19/")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tokens", type=int, default=65536, help="document length in tokens")
    parser.add_argument("--pretraining-length", type=int, default=8192)
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--mode", choices=("chunked", "oneshot"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:  # child process: one mode, JSON on the last stdout line
        print(json.dumps(run_mode(args)))
        return
    rows = []
    for mode in ("chunked", "oneshot"):
        command = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["wall_s"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = dict(environment(args.device), tokens=args.tokens, pretraining_length=args.pretraining_length,
                  command="python bench/bench_chat.py " + " ".join(sys.argv[1:]), rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chat.json").write_text(json.dumps(result, indent=1) + "\n")
    chunked, oneshot = rows
    mib = 1 << 20
    lines = [
        f"# Chat with a {args.tokens:,}-token document (SmolLM2-135M-Instruct + DCA, window {args.pretraining_length})",
        "", f"{result['device']}; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"`{result['command']}`", "",
        "| | chunked prefill | one-shot prefill |", "|---|---|---|",
        f"| prefill piece | {chunked['prefill_chunk']:,} tokens | whole prompt |",
        f"| prompt tokens (turn 1) | {chunked['prompt_tokens']:,} | {oneshot['prompt_tokens']:,} |",
        f"| time to first token, turn 1 | {chunked['ttft_turn1_s']:.2f} s | {oneshot['ttft_turn1_s']:.2f} s |",
        f"| time to first token, turn 2 | {chunked['ttft_turn2_s']:.3f} s ({chunked['ttft_ratio']:.1%} of turn 1; "
        f"{chunked['turn2_prefilled_tokens']} tokens prefilled) | - |",
        f"| decode tokens/s (turn 1) | {chunked['decode_tokens_per_s'] or 0:.1f} | {oneshot['decode_tokens_per_s'] or 0:.1f} |",
        f"| peak memory ({chunked['peak_kind']}) | {chunked['peak_bytes'] / mib:,.0f} MiB | {oneshot['peak_bytes'] / mib:,.0f} MiB |",
        f"| answer | {chunked['answer']!r} | {oneshot['answer']!r} |",
        "", f"Model weights: {chunked['weights_bytes'] / mib:,.0f} MiB. Turn 2: {FOLLOW_UP!r} -> {chunked['answer_turn2']!r}.",
    ]
    (args.out / "chat.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
