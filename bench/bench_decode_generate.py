"""Decode speed inside ``model.generate``: DCA vs the unpatched model, Llama-3-8B shapes (random bf16 weights).

Usage (CUDA):
    python bench/bench_decode_generate.py --label after [--lengths 16384 32768 65536 131072] [--new-tokens 64]
        [--modes eager compiled] [--profile-length 32768] [--out bench/results]
    python bench/bench_decode_generate.py --combine before after --out bench/results   # writes the report

Model: ``LlamaConfig`` with 32 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocab
128256, rope theta 5e5, ``max_position_embeddings`` 8192, built on the GPU in bf16 from a fixed seed;
the prompt is random token ids. ``model.generate`` runs greedy (``min_new_tokens = max_new_tokens``)
for each prompt length, unpatched (SDPA) and with ``apply_dca(model)`` (backend "auto" = Triton).

Decode time is taken apart from prefill inside the same ``generate`` call: a logits processor records
a CUDA event at every step (step 0 is the prefill's), without synchronising; decode tokens/s =
``(N - 1 - 3) / elapsed(event 3, event N-1)``: the first three decode steps are left out (in compiled
mode they compile, warm up and record the CUDA graph). The events sit in the stream order, so a
host-bound step shows as the GPU waiting. Each model first generates from a short prompt (kernels
compiled before anything is timed).

Modes: ``eager`` (default dynamic cache) and ``compiled`` (``cache_implementation="static"``, which
makes ``generate`` compile the decode step with ``torch.compile``, mode "reduce-overhead", i.e.
CUDA graphs; prefill stays eager). Graph breaks counted by dynamo are reported.

``--profile-length``: a ``torch.profiler`` trace of the decode steps only (started by the logits
processor after the prefill) of each model in eager mode, written as ``decode_generate_profile_<label>.md``:
top operators by host (CPU) time and top CUDA kernels by device time, per decode step.
Each run writes ``decode_generate_<label>.json``; ``--combine`` merges labels into
``decode_generate.json`` and ``decode_generate.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import torch._dynamo

SKIP_STEPS = 3  # decode steps left out of the timing (compile, warm-up and graph recording when compiled)


def build_model(device: str, tiny: bool):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128256 if not tiny else 512, hidden_size=4096 if not tiny else 128,
        intermediate_size=14336 if not tiny else 256, num_hidden_layers=32 if not tiny else 2,
        num_attention_heads=32 if not tiny else 4, num_key_value_heads=8 if not tiny else 2, head_dim=128 if not tiny else 64,
        max_position_embeddings=8192 if not tiny else 256, rope_theta=500000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    return model.eval()


class StepEvents:
    """Logits processor that records one CUDA event per generation step (no sync); optionally starts a
    profiler after the first (prefill) step."""

    def __init__(self, profiler=None):
        self.events: list[torch.cuda.Event] = []
        self.profiler = profiler

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        if self.profiler is not None and len(self.events) == 1:
            self.profiler.start()
        return scores

    def median_step_ms(self, skip: int) -> float:
        """Median of the per-step intervals from event ``skip`` on: robust to a few slow steps (host hiccups)."""
        torch.cuda.synchronize()
        steps = sorted(a.elapsed_time(b) for a, b in zip(self.events[skip:], self.events[skip + 1:]))
        mid = len(steps) // 2
        return steps[mid] if len(steps) % 2 else (steps[mid - 1] + steps[mid]) / 2

    def decode_seconds(self, skip: int) -> tuple[float, int]:
        """Seconds and steps from event ``skip`` to the last (event 0 follows the prefill)."""
        torch.cuda.synchronize()
        return self.events[skip].elapsed_time(self.events[-1]) / 1000.0, len(self.events) - 1 - skip


def generate(model, ids: torch.Tensor, new_tokens: int, mode: str, profiler=None, cache=None) -> dict:
    """``model.generate`` timed step by step; ``cache``: a prefilled cache of all but the last prompt token."""
    from transformers import LogitsProcessorList

    timer = StepEvents(profiler)
    kwargs = {"cache_implementation": "static"} if mode == "compiled" else {}
    if cache is not None:
        kwargs["past_key_values"] = cache
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, logits_processor=LogitsProcessorList([timer]), pad_token_id=0, **kwargs,
        )
    if profiler is not None:
        torch.cuda.synchronize()
        profiler.stop()
    total = time.perf_counter() - start
    if not timer.events:  # CPU smoke run
        return {"total_s": total, "decode_tok_s": None, "tokens": out[0, ids.shape[1]:].tolist()}
    seconds, steps = timer.decode_seconds(SKIP_STEPS)
    return {"total_s": total, "decode_s": seconds, "decode_steps": steps, "decode_tok_s": steps / seconds,
            "ms_per_token": 1000 * seconds / steps, "median_step_ms": timer.median_step_ms(SKIP_STEPS),
            "tokens": out[0, ids.shape[1]:].tolist()}


def profile_table(profiler, steps: int, layers: int) -> list[str]:
    averages = profiler.key_averages()
    host = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    device = sorted((e for e in averages if getattr(e, "self_device_time_total", 0) > 0),
                    key=lambda e: e.self_device_time_total, reverse=True)[:15]
    lines = ["| operator (host) | calls / step | host self µs / step | host self µs / layer |", "|---|---|---|---|"]
    lines += [f"| `{e.key[:70]}` | {e.count / steps:.1f} | {e.self_cpu_time_total / steps:.0f} | "
              f"{e.self_cpu_time_total / steps / layers:.1f} |" for e in host]
    total_host = sum(e.self_cpu_time_total for e in averages) / steps
    total_dev = sum(getattr(e, "self_device_time_total", 0) for e in averages) / steps
    lines += ["", f"Host self time, all operators: {total_host / 1000:.2f} ms per decode step "
              f"({total_host / layers:.0f} µs per layer); device time, all kernels: {total_dev / 1000:.2f} ms per step.", "",
              "| kernel (device) | calls / step | device µs / step | device µs / layer |", "|---|---|---|---|"]
    lines += [f"| `{e.key[:70]}` | {e.count / steps:.1f} | {e.self_device_time_total / steps:.0f} | "
              f"{e.self_device_time_total / steps / layers:.1f} |" for e in device]
    return lines


def prefilled_cache(model, ids: torch.Tensor, patched: bool):
    """The dynamic cache of ``ids[:, :-1]``, prefilled by this model (with DCA when ``patched``)."""
    import chunkllama

    if patched:
        chunkllama.apply_dca(model)
    try:
        with torch.no_grad():
            out = model.generate(ids[:, :-1], attention_mask=torch.ones_like(ids[:, :-1]), max_new_tokens=1,
                                 do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    finally:
        if patched:
            chunkllama.remove_dca(model)
    return out.past_key_values


def sync_count(model, ids: torch.Tensor, new_tokens: int, patched: bool) -> dict:
    """Host-device synchronisations per ``generate`` call (``torch.cuda.set_sync_debug_mode``), and per
    generated token: each one stalls the host until the GPU drains."""
    import warnings

    import chunkllama

    if patched:
        chunkllama.apply_dca(model)
    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generate(model, ids, new_tokens, "eager")
    finally:
        torch.cuda.set_sync_debug_mode(0)
        if patched:
            chunkllama.remove_dca(model)
    messages = [str(w.message).splitlines()[0][:120] for w in caught if "synchroniz" in str(w.message).lower()]
    where: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            key = f"{Path(w.filename).name}:{w.lineno}"
            where[key] = where.get(key, 0) + 1
    return {"bench": "sync_count", "model": "DCA" if patched else "unpatched", "new_tokens": new_tokens,
            "syncs": len(messages), "syncs_per_token": len(messages) / new_tokens,
            "sites": dict(sorted(where.items(), key=lambda kv: -kv[1])[:8])}


def run_one(model, ids: torch.Tensor, args, mode: str, patched: bool, device: str, cache=None) -> dict:
    """One timed ``generate`` call, with DCA applied for its duration when ``patched``; ``cache``
    (shared-prefill mode): decode from a copy of this prefilled cache."""
    import copy

    import chunkllama

    if patched:
        chunkllama.apply_dca(model)
    try:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        torch._dynamo.utils.counters.clear()
        try:
            result = generate(model, ids, args.new_tokens, mode, cache=None if cache is None else copy.deepcopy(cache))
        except Exception as exc:  # noqa: BLE001 (a mode that fails is reported, the rest still runs)
            result = {"error": f"{type(exc).__name__}: {str(exc)[:400]}", "decode_tok_s": None}
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    finally:
        if patched:
            chunkllama.remove_dca(model)
    row = {"label": args.label, "mode": mode, "model": "DCA" if patched else "unpatched",
           "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens, "graph_breaks": breaks,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
           **{k: v for k, v in result.items() if k != "tokens"}}
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def measure(args) -> None:
    import transformers

    import chunkllama

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    model = build_model(device, args.tiny)
    layers = model.config.num_hidden_layers
    gen = torch.Generator(device="cpu").manual_seed(1)
    rows, profiles = [], {}
    torch._dynamo.config.cache_size_limit = 64  # one decode graph per prompt length and model
    warm = torch.randint(3, model.config.vocab_size, (1, 256), generator=gen).to(device)
    for patched in (False, True):
        if patched:
            chunkllama.apply_dca(model)
        generate(model, warm, SKIP_STEPS + 2, "eager")
        chunkllama.remove_dca(model)
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f"decode_generate_{args.label}.jsonl"
    partial.write_text("")
    for mode in args.modes:
        for length in args.lengths:
            ids = torch.randint(3, model.config.vocab_size, (1, length), generator=gen).to(device)
            caches = {}
            if args.shared_prefill and mode == "eager":
                caches = {patched: prefilled_cache(model, ids, patched) for patched in (False, True)}
                for patched in (False, True):  # untimed: first decode at this length (allocator growth)
                    run_one(model, ids, args, mode, patched, device, caches[patched])
            for round_index in range(args.rounds):
                # alternate which model goes first, so drift in the machine's speed hits both alike
                order = (False, True) if round_index % 2 == 0 else (True, False)
                for patched in order:
                    row = run_one(model, ids, args, mode, patched, device, caches.get(patched))
                    row["round"] = round_index
                    row["shared_prefill"] = bool(caches)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    with partial.open("a") as f:
                        f.write(json.dumps(row) + "\n")
            caches.clear()
            if device == "cuda":
                torch.cuda.empty_cache()
    if args.sync_check and device == "cuda":
        ids = torch.randint(3, model.config.vocab_size, (1, args.sync_check), generator=gen).to(device)
        for patched in (False, True):
            row = sync_count(model, ids, args.new_tokens, patched)
            row.update(label=args.label, prompt_tokens=args.sync_check)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.profile_length and device == "cuda":
        ids = torch.randint(3, model.config.vocab_size, (1, args.profile_length), generator=gen).to(device)
        for patched in (False, True):
            if patched:
                chunkllama.apply_dca(model)
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
            try:
                result = generate(model, ids, args.profile_steps + 1, "eager", profiler)
            finally:
                if patched:
                    chunkllama.remove_dca(model)
            profiles["DCA" if patched else "unpatched"] = (result, profile_table(profiler, args.profile_steps, layers))
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "label": args.label}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"decode_generate_{args.label}.json").write_text(json.dumps({"rows": rows, **info}, indent=1))
    if profiles:
        lines = [f"# Decode-step profile ({args.label}): Llama-3-8B shapes, {args.profile_length}-token prompt, "
                 f"eager, default cache", "",
                 f"{info['device']}, torch {info['torch']}, triton {info['triton']}, transformers "
                 f"{info['transformers']}. torch.profiler over {args.profile_steps} decode steps (prefill excluded); "
                 f"per-layer columns divide by {layers} layers (the lm head and sampling are included in the totals).", ""]
        for name, (result, table) in profiles.items():
            lines += [f"## {name} ({result['ms_per_token']:.2f} ms per token while profiled)", ""] + table + [""]
        (args.out / f"decode_generate_profile_{args.label}.md").write_text("\n".join(lines))
        print("\n".join(lines))


def _median_tok_s(runs: list[dict]) -> float | None:
    values = sorted(r["decode_tok_s"] for r in runs if r.get("decode_tok_s"))
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _median_step_ms(runs: list[dict]) -> float | None:
    values = [r["median_step_ms"] for r in runs if r.get("median_step_ms")]
    return statistics.median(values) if values else None


def _round_ratios(runs: list[dict], base_runs: list[dict]) -> list[float]:
    base = {r.get("round", 0): r["decode_tok_s"] for r in base_runs if r.get("decode_tok_s")}
    return [r["decode_tok_s"] / base[r.get("round", 0)] for r in runs
            if r.get("decode_tok_s") and r.get("round", 0) in base]


def combine(args) -> None:
    data = []
    for label in args.combine:
        path = args.out / f"decode_generate_{label}.json"
        if path.exists():
            data.append(json.loads(path.read_text()))
        else:  # a run cut short: the rows it streamed to .jsonl (no device info of its own)
            partial = args.out / f"decode_generate_{label}.jsonl"
            data.append({"rows": [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]})
    rows = [row for d in data for row in d["rows"]]
    info = {k: v for k, v in next(d for d in reversed(data) if "device" in d).items() if k not in ("rows", "label")}
    (args.out / "decode_generate.json").write_text(json.dumps({"rows": rows, **info}, indent=1))
    lines = [
        "# Decode speed in `model.generate`: DCA vs unpatched, Llama-3-8B shapes (random bf16)",
        "",
        f"{info['device']}, torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}. "
        "Greedy, batch 1; decode tokens/s from CUDA events at each step (prefill excluded). "
        "`eager`: default dynamic cache; `compiled`: `cache_implementation=\"static\"`, which makes `generate` "
        "compile the decode step (torch.compile, mode reduce-overhead). Labels: code version "
        "(`before` = main before this branch, `after` = this branch).",
        "",
        "Each cell is the median over rounds (one `generate` call per model per round, the two models in "
        "alternating order within one process); the spread column gives the lowest and highest per-round ratio. "
        "`by median step`: unpatched / DCA of the median per-step interval (each call's median step, then the "
        "median over rounds) — the same runs, less sensitive to a few slow steps of the host.",
        "",
        "| label | mode | prompt tokens | unpatched tok/s | DCA tok/s | DCA / unpatched | per-round ratios | "
        "unpatched ms/token | DCA ms/token | by median step | graph breaks (DCA) | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("bench") != "sync_count":
            groups.setdefault((r["label"], r["mode"], r["prompt_tokens"], r["model"]), []).append(r)
    for (label, mode, length, name), runs in groups.items():
        if name != "DCA" or (label, mode, length, "unpatched") not in groups:
            continue
        base_runs = groups[(label, mode, length, "unpatched")]
        dca, base = _median_tok_s(runs), _median_tok_s(base_runs)
        breaks = max(r["graph_breaks"] for r in runs)
        if dca is None or base is None:
            errors = [r.get("error") for r in runs + base_runs if r.get("error")]
            lines.append(f"| {label} | {mode} | {length} | {base} | {dca} | — | — | — | — | — | {breaks} | {errors[:1]} |")
            continue
        ratios = _round_ratios(runs, base_runs)
        spread = f"{min(ratios):.3f}–{max(ratios):.3f}" if len(ratios) > 1 else "—"
        step_dca, step_base = _median_step_ms(runs), _median_step_ms(base_runs)
        by_step = f"{step_base / step_dca:.3f}" if step_dca and step_base else "—"
        lines.append(f"| {label} | {mode} | {length} | {base:.1f} | {dca:.1f} | {dca / base:.3f} | {spread} | "
                     f"{1000 / base:.2f} | {1000 / dca:.2f} | {by_step} | {breaks} | {len(runs)} |")
    syncs = [r for r in rows if r.get("bench") == "sync_count"]
    if syncs:
        lines += ["", "Host-device synchronisations in one eager `generate` call (`torch.cuda.set_sync_debug_mode`):", "",
                  "| label | model | prompt tokens | new tokens | syncs | per token | where (file:line, count) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['model']} | {r['prompt_tokens']} | {r['new_tokens']} | {r['syncs']} | "
                  f"{r['syncs_per_token']:.2f} | {', '.join(f'{k} ({v})' for k, v in r['sites'].items())} |" for r in syncs]
    (args.out / "decode_generate.md").write_text("\n".join(lines + [""]))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="after", help="name of the code version measured (file suffix)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed calls per model, length and mode; the order of the two models alternates")
    parser.add_argument("--shared-prefill", action="store_true",
                        help="eager mode: prefill each prompt once per model, then time every round's decode from a "
                             "copy of that cache (more rounds for the same device time; an untimed decode first)")
    parser.add_argument("--profile-length", type=int, default=0)
    parser.add_argument("--sync-check", type=int, default=0, metavar="TOKENS",
                        help="count host-device syncs per generated token for each model at this prompt length")
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--combine", nargs="+", help="labels to merge into decode_generate.json/.md")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the script only")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if args.combine:
        combine(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
