"""Training speed with DCA on the GPU: attention forward+backward vs SDPA-flash, and a LoRA training step
of SmolLM2 at long lengths, DCA vs the unpatched model. Writes ``train.json`` and ``train.md``.

Usage (CUDA):
    python bench/bench_train.py --model /root/m/SmolLM2-135M-Instruct.Q4_1.gguf --data .device/data \
        [--attention-lengths 8192 16384 32768 65536] [--step-lengths 16384 32768] [--out bench/results]
    python bench/bench_train.py --data ../shared/data --attention-lengths --step-lengths 512 \
        --pretraining-length 256 --steps 1 --out /tmp/train      # CPU: checks the script only

1. Attention alone (``bench_backward.run_speed``): batch 1, 32 q / 8 kv heads x 128, bf16, pretraining
   8192 — DCA Triton forward+backward vs ``scaled_dot_product_attention`` flash causal on the same tensors
   in the same call (``do_bench`` medians). Goal: DCA / SDPA <= 1.0x at every length.
2. A training step of the model (default: the bundled SmolLM2-135M-Instruct), as ``chunkllama finetune``
   takes it: peft LoRA (r 16) on every linear layer, gradient checkpointing, bf16 weights; the input is
   ``T`` consecutive PG19 tokens and the loss is the causal LM loss over all of them. ``dca``: the model
   patched with ``apply_dca`` for its own window (backend auto = the fused Triton backward);
   ``unpatched``: the same model with transformers' SDPA attention. One warm-up step, then ``--steps``
   timed steps (forward + backward, CUDA-synchronised, median); tokens/s = T / median step; peak memory
   from ``torch.cuda.max_memory_allocated`` over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def corpus_ids(tokenizer, data: Path, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of the PG19 books under ``data`` (sorted by name), shape (1, tokens), int64."""
    from chunkllama.eval.data import pg19_texts

    ids: list[int] = []
    for _, text in pg19_texts(data):
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            return torch.tensor([ids[:tokens]])
    raise SystemExit(f"PG19 under {data} has {len(ids)} tokens; {tokens} needed")


def train_step_rows(args, info: dict) -> list[dict]:
    import peft

    from chunkllama import apply_dca, remove_dca
    from chunkllama.models import load_model
    from chunkllama.training.sft import LORA_TARGETS

    device = torch.device(args.device)
    model, tokenizer = load_model(args.model, device=str(device), dca=False)
    ids_all = corpus_ids(tokenizer, args.data, max(args.step_lengths)).to(device)
    model.train()
    trained = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS,
                                                         task_type="CAUSAL_LM"))
    trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained.enable_input_require_grads()
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def one_step(ids: torch.Tensor) -> float:
        sync()
        start = time.perf_counter()
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        sync()
        trained.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    rows = []
    for length in args.step_lengths:
        ids = ids_all[:, :length]
        for name in ("unpatched", "dca"):
            if name == "dca":
                apply_dca(model, args.pretraining_length)
            try:
                one_step(ids)  # warm-up: kernels compiled, allocator grown
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                seconds = [one_step(ids) for _ in range(args.steps)]
                row = {"bench": "train_step", "model_name": name, "T": length, "steps": args.steps,
                       "step_s": statistics.median(seconds), "step_s_all": seconds,
                       "tokens_per_s": length / statistics.median(seconds),
                       "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                       "pretraining_length": args.pretraining_length if name == "dca" else None,
                       "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), **info}
            except torch.OutOfMemoryError as exc:
                row = {"bench": "train_step", "model_name": name, "T": length, "error": f"OutOfMemoryError: {exc}"[:300],
                       **info}
            finally:
                if name == "dca":
                    remove_dca(model)
            print(json.dumps({k: v for k, v in row.items() if k not in info}), flush=True)
            rows.append(row)
            if cuda:
                torch.cuda.empty_cache()
    return rows


def write_md(rows: list[dict], path: Path, args) -> None:
    from bench_backward import HQ, HK, D, PRETRAINING

    info = rows[0] if rows else {}
    lines = ["# Training with DCA: attention forward+backward and a LoRA training step", "",
             f"{info.get('device')}, torch {info.get('torch')}, triton {info.get('triton')}, "
             f"transformers {info.get('transformers')}.", ""]
    attention = [r for r in rows if r["bench"] == "fwd_bwd"]
    if attention:
        lines += [f"Attention alone: batch 1, {HQ} q / {HK} kv heads x {D}, bf16, pretraining {PRETRAINING}; "
                  "`do_bench` medians, same tensors, same call. Goal: fwd+bwd DCA / SDPA <= 1.0x.", "",
                  "| T | DCA fwd ms | DCA fwd+bwd ms | SDPA flash fwd ms | SDPA flash fwd+bwd ms | fwd+bwd DCA/SDPA | "
                  "bwd DCA/SDPA | DCA peak GiB | SDPA peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in attention:
            lines.append(f"| {r['T']} | {r['dca_fwd_ms']:.2f} | {r['dca_fwd_bwd_ms']:.2f} | {r['sdpa_fwd_ms']:.2f} | "
                         f"{r['sdpa_fwd_bwd_ms']:.2f} | {r['fwd_bwd_dca_over_sdpa']:.3f}x | {r['bwd_dca_over_sdpa']:.3f}x | "
                         f"{r['dca_peak_gib']:.2f} | {r['sdpa_peak_gib']:.2f} |")
        lines.append("")
    steps = [r for r in rows if r["bench"] == "train_step"]
    if steps:
        lines += [f"Training step of `{args.model or 'the bundled SmolLM2-135M-Instruct'}` ({steps[0].get('dtype')}, LoRA r 16 on every "
                  "linear layer, gradient checkpointing, causal LM loss over PG19 text); median of the timed steps "
                  "after one warm-up. DCA for the model's own window.", "",
                  "| T | model | step s | tokens/s | peak GiB | DCA / unpatched tokens/s |", "|---|---|---|---|---|---|"]
        base = {r["T"]: r for r in steps if r["model_name"] == "unpatched" and "error" not in r}
        for r in steps:
            if "error" in r:
                lines.append(f"| {r['T']} | {r['model_name']} | — | — | — | {r['error'][:80]} |")
                continue
            ratio = (f"{r['tokens_per_s'] / base[r['T']]['tokens_per_s']:.3f}x"
                     if r["model_name"] == "dca" and r["T"] in base else "—")
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "—"
            lines.append(f"| {r['T']} | {r['model_name']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {peak} | {ratio} |")
    lines += ["", "Reproduce: `python bench/bench_train.py --model PATH.gguf --data DATA --out bench/results`."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model for the training step (default: the bundled SmolLM2)")
    parser.add_argument("--data", type=Path, required=True, help="folder holding pg19/")
    parser.add_argument("--attention-lengths", type=int, nargs="*", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--step-lengths", type=int, nargs="*", default=[16384, 32768])
    parser.add_argument("--pretraining-length", type=int, default=None,
                        help="DCA window for the training step (default: the model's own)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    import transformers

    info = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    rows: list[dict] = []
    if args.attention_lengths:
        from bench_backward import device_info, run_speed

        info = device_info()
        for length in args.attention_lengths:
            run_speed(length, rows, info)
    if args.step_lengths:
        rows += train_step_rows(args, info)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(json.dumps(rows, indent=1) + "\n")
    write_md(rows, args.out / "train.md", args)
    print((args.out / "train.md").read_text())


if __name__ == "__main__":
    main()
