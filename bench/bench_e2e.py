"""End to end: a Llama-2-7B-shaped model (random bf16 weights) prefilling long prompts with DCA.

Usage (CUDA, one 80 GB card):
    python bench/bench_e2e.py [--throughput-length 32768] [--longest 204800 262144] [--budget-s 240]
        [--profile] [--out bench/results]

1. Prefill tokens/s at ``--throughput-length``: one forward of ``input_ids (1, T)`` with
   ``use_cache=False, logits_to_keep=1``, unpatched (``attn_implementation="sdpa"``; SDPA's own
   backend choice, cuDNN on an H100 with torch 2.11, and again with the flash backend forced) vs
   ``apply_dca(model, 4096, backend="triton")``; median of CUDA-event timings after a warm-up.
2. Longest prefill with DCA: the same forward at each ``--longest`` length (ascending) until one runs
   out of memory or the time budget is spent; peak memory recorded. Without a KV cache: a bf16 cache
   of this model costs 0.5 MiB per token (32 layers x K,V x 4096), so 200k tokens of cache alone would
   be 100 GiB; with ``--with-cache`` the forward also builds a DynamicCache.
Writes ``e2e.json`` and ``e2e.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

import chunkllama

LLAMA2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    rope_theta=10000.0, rms_norm_eps=1e-5,
)


def build_model() -> torch.nn.Module:
    config = transformers.LlamaConfig(**LLAMA2_7B)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def forward(model, ids, use_cache: bool) -> None:
    with torch.no_grad():
        model(ids, use_cache=use_cache, logits_to_keep=1)


def time_forward(model, ids, reps: int, use_cache: bool = False) -> float:
    forward(model, ids, use_cache)  # warm-up (compiles the kernels on first use)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward(model, ids, use_cache)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def profile_table(model, ids, label: str, rows: int = 15) -> str:
    """Top GPU kernels of one forward (torch.profiler), as markdown lines."""
    from torch.profiler import ProfilerActivity, profile

    forward(model, ids, False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward(model, ids, False)
        torch.cuda.synchronize()
    # kernels are the events whose own (self) time is on the device; CPU ops only launch them
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0 and "CUDA" in str(e.device_type)]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events)
    lines = [f"### {label}: {total / 1e3:.1f} ms of GPU kernels", "", "| kernel | calls | GPU ms | share |",
             "|---|---|---|---|"]
    for e in events[:rows]:
        lines.append(f"| `{e.key[:90]}` | {e.count} | {e.self_device_time_total / 1e3:.2f} | "
                     f"{e.self_device_time_total / total:.1%} |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--throughput-length", type=int, default=32768)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--longest", type=int, nargs="*", default=[204800, 262144])
    parser.add_argument("--with-cache", action="store_true")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop the longest-prefill ladder after this")
    parser.add_argument("--profile", action="store_true",
                        help="also write e2e_profile.md: top GPU kernels of one forward, unpatched and DCA")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    import triton

    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "model": "Llama-2-7B shapes, random bf16 weights"}
    t0 = time.time()
    model = build_model()
    weights_gib = torch.cuda.memory_allocated() / 2**30
    print(f"model built in {time.time() - t0:.0f}s, weights {weights_gib:.1f} GiB", flush=True)
    rows = []
    T = args.throughput_length
    ids = torch.randint(0, LLAMA2_7B["vocab_size"], (1, T), device="cuda")
    sdpa_ms = time_forward(model, ids, args.reps)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the backend bench_attention.py's kernel targets use
        flash_ms = time_forward(model, ids, args.reps)
    profiles = [profile_table(model, ids, f"unpatched SDPA, T={T}")] if args.profile else []
    chunkllama.apply_dca(model, 4096, backend="triton")
    dca_ms = time_forward(model, ids, args.reps)
    if args.profile:
        profiles.append(profile_table(model, ids, f"DCA (Triton), T={T}"))
        args.out.mkdir(parents=True, exist_ok=True)
        text = f"# GPU kernels of one Llama-2-7B-shaped forward\n\n{info['device']}, torch {info['torch']}, " \
               f"triton {info['triton']}, transformers {info['transformers']}.\n\n" + "\n".join(profiles)
        (args.out / "e2e_profile.md").write_text(text)
        print(text, flush=True)
    row = {
        "bench": "e2e_prefill", "T": T, "dca_ms": round(dca_ms, 1), "sdpa_ms": round(sdpa_ms, 1),
        "dca_tokens_per_s": round(T / dca_ms * 1e3), "sdpa_tokens_per_s": round(T / sdpa_ms * 1e3),
        "dca_over_sdpa_throughput": round(sdpa_ms / dca_ms, 3), "use_cache": False,
        "sdpa_flash_ms": round(flash_ms, 1), "sdpa_flash_tokens_per_s": round(T / flash_ms * 1e3),
        "dca_over_sdpa_flash_throughput": round(flash_ms / dca_ms, 3),
        "dca_config": chunkllama.get_dca_config(model).to_dict(), **info,
    }
    rows.append(row)
    print(json.dumps(row), flush=True)

    start = time.time()
    for length in sorted(args.longest):
        if time.time() - start > args.budget_s:
            print(f"budget spent; not trying {length}", flush=True)
            break
        ids = torch.randint(0, LLAMA2_7B["vocab_size"], (1, length), device="cuda")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t = time.time()
        try:
            forward(model, ids, args.with_cache)
            torch.cuda.synchronize()
            ok, err = True, None
        except torch.OutOfMemoryError as exc:
            ok, err = False, str(exc)[:200]
        row = {
            "bench": "e2e_longest", "T": length, "ok": ok, "seconds": round(time.time() - t, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1), "weights_gib": round(weights_gib, 1),
            "use_cache": args.with_cache, "error": err, **info,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ids
        if not ok:
            break
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# End to end: Llama-2-7B shapes (random bf16), one forward of the prompt, logits of the last token only",
        "",
        f"{info['device']}, torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}.",
        "",
        "| bench | T | DCA (Triton) | unpatched | DCA throughput / unpatched |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["bench"] == "e2e_prefill":
            lines.append(f"| prefill tokens/s (no cache), unpatched SDPA default backend | {r['T']} | "
                         f"{r['dca_tokens_per_s']} ({r['dca_ms']} ms) | "
                         f"{r['sdpa_tokens_per_s']} ({r['sdpa_ms']} ms) | {r['dca_over_sdpa_throughput']} |")
            lines.append(f"| prefill tokens/s (no cache), unpatched SDPA flash backend | {r['T']} | "
                         f"{r['dca_tokens_per_s']} ({r['dca_ms']} ms) | "
                         f"{r['sdpa_flash_tokens_per_s']} ({r['sdpa_flash_ms']} ms) | "
                         f"{r['dca_over_sdpa_flash_throughput']} |")
        else:
            status = "ok" if r["ok"] else "out of memory"
            lines.append(f"| longest prefill with DCA (cache: {r['use_cache']}) | {r['T']} | {status}, "
                         f"{r['seconds']} s, peak {r['peak_gib']} GiB (weights {r['weights_gib']}) | — | — |")
    lines.append("")
    (args.out / "e2e.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
