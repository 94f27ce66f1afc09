"""Issue 11's stretch run: does a short LoRA fine-tune with DCA on 16k-token retrieval chats lift retrieval at 32k-64k?

Usage (CUDA; model and data as ../shared/DEVICE.md stages them):
    python bench/bench_finetune_stretch.py --model /root/m/SmolLM2-135M-Instruct.Q4_1.gguf --data .device/data \\
        [--length 16000] [--chats 64] [--steps 80] [--learning-rate 1e-3] [--eval-lengths 32768 65536] \\
        [--trials 20] [--heldout 10] [--out bench/results/finetune_stretch]
    python bench/bench_finetune_stretch.py --smoke       # the CPU: tiny lengths, DCA for a 256-token window

1. Training data: ``--chats`` retrieval chats (:mod:`chunkllama.training.longchat`) of ``--length``
   passage tokens from the PG19 books, one to three planted codes each, the question about one of them.
2. Before: the model with DCA for its own window (``--pretraining-length``, default its config) —
   passkey accuracy (the DEVICE.md protocol, teacher forcing, ``--trials`` prompts over 5 depths) and
   held-out retrieval chats (``--heldout`` per length, passages of the eval length minus 200 tokens,
   other windows and codes than the training chats) answered greedily, at each ``--eval-lengths``.
3. ``chunkllama finetune`` (LoRA r 16 on every linear layer, loss on the answer, gradient checkpointing,
   bf16 autocast and the Triton forward/backward kernels on CUDA) for ``--steps`` steps.
4. After: the adapter reloaded with :func:`chunkllama.training.load_finetuned` (DCA on from the saved
   config), the same evaluations.

Writes ``OUT.json`` and ``OUT.md``: the loss curve, before/after per length, the commands' settings,
device and versions, and the wall time of each phase.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from run_info import apply_smoke

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {"length": 600, "chats": 8, "steps": 4, "eval_lengths": [1024, 2048], "trials": 5, "heldout": 2,
         "pretraining_length": 256}


def passkey_accuracy(model, tokenizer, length: int, trials: int) -> dict:
    """Teacher-forced passkey accuracy at ``length``: ``trials`` prompts over 5 depths."""
    from chunkllama.eval import passkey as pk
    from chunkllama.eval.passkey_task import sweep_prompts

    results = [pk.score_teacher_forcing(model, p) for p in sweep_prompts(tokenizer, length, 5, max(1, trials // 5))]
    return {"correct": sum(r.correct for r in results), "n": len(results)}


def evaluate(model, tokenizer, held_out: dict[int, list], trials: int) -> dict:
    """Passkey and held-out chat retrieval at every length of ``held_out``."""
    from chunkllama.training.longchat import answer_chats

    out = {}
    for length, chats in held_out.items():
        answers = answer_chats(model, tokenizer, chats)
        out[str(length)] = {"passkey": passkey_accuracy(model, tokenizer, length, trials),
                            "chats": {"correct": sum(a["correct"] for a in answers), "n": len(answers)},
                            "answers": answers}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=".gguf file or model directory (default: the bundled SmolLM2)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="data root holding pg19/")
    parser.add_argument("--length", type=int, default=16000, help="passage tokens per training chat")
    parser.add_argument("--chats", type=int, default=64, help="training chats")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="the CPU run (finetune_cpu.md) learnt the task at 1e-3")
    parser.add_argument("--eval-lengths", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--trials", type=int, default=20, help="passkey prompts per length (5 depths)")
    parser.add_argument("--heldout", type=int, default=10, help="held-out retrieval chats per length")
    parser.add_argument("--pretraining-length", type=int, default=None, help="DCA window (default: the model's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/chunkllama_finetune_stretch"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "finetune_stretch")
    parser.add_argument("--smoke", action="store_true", help="check the script on the CPU at tiny lengths: " +
                        ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    args = parser.parse_args()
    apply_smoke(parser, args, SMOKE, args.work / "finetune_stretch_smoke")
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_finetune_stretch.py needs CUDA (or --smoke).")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16

    import transformers

    from chunkllama import apply_dca, get_dca_config, load_model
    from chunkllama.training import load_finetuned
    from chunkllama.training.command import finetune
    from chunkllama.training.longchat import build_retrieval_chats

    phases: dict[str, float] = {}
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype, device=device, dca=False)
    books = [p.read_text(encoding="utf-8") for p in sorted((args.data / "pg19").glob("*.txt")) if "_pg19_exact" not in p.name]
    train = build_retrieval_chats(books, tokenizer, chats=args.chats, length=args.length, seed=0)
    held_out = {n: build_retrieval_chats(books, tokenizer, chats=args.heldout, length=n - 200, seed=1000 + n)
                for n in args.eval_lengths}
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in train))
    phases["data_s"] = time.perf_counter() - start

    start = time.perf_counter()
    apply_dca(model, args.pretraining_length)
    dca = get_dca_config(model).to_dict()
    before = evaluate(model, tokenizer, held_out, args.trials)
    del model
    phases["eval_before_s"] = time.perf_counter() - start

    start = time.perf_counter()
    adapter = args.work / "adapter"
    finetune(data=str(data), output=str(adapter), model=args.model, pretraining_length=args.pretraining_length,
             steps=args.steps, learning_rate=args.learning_rate, device=device, max_length=args.length + 1000,
             threads=1 if args.smoke else None)
    log = json.loads((adapter / "training_log.json").read_text())
    phases["train_s"] = time.perf_counter() - start

    start = time.perf_counter()
    model, tokenizer = load_finetuned(adapter, dtype=dtype, device=device)
    reloaded = get_dca_config(model).to_dict()
    after = evaluate(model, tokenizer, held_out, args.trials)
    phases["eval_after_s"] = time.perf_counter() - start

    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU (smoke)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "dca": dca, "reloaded_dca": reloaded,
        "tokens_per_chat_median": int(statistics.median(log["tokens_per_example"])),
        "seconds_per_step_median": statistics.median(log["seconds_per_step"]),
        "loss": log["loss"], "before": before, "after": after, "phases": phases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)


def markdown(result: dict) -> str:
    """The ``.md`` report of a result."""
    s, losses = result["settings"], result["loss"]
    lines = [
        "# Fine-tuning SmolLM2 with DCA on retrieval chats: retrieval before and after (issue 11, stretch)",
        "",
        f"{result['device']}, torch {result['versions']['torch']}, transformers {result['versions']['transformers']}. "
        f"LoRA r 16, {len(losses)} steps at learning rate {s['learning_rate']} on {s['chats']} chats of "
        f"{s['length']} passage tokens (median {result['tokens_per_chat_median']} tokens with the template), "
        f"{result['seconds_per_step_median']:.2f} s per step; DCA {result['dca']} (reloaded: {result['reloaded_dca']}).",
        f"Loss: mean of the first 5 steps {statistics.mean(losses[:5]):.3f}, of the last 5 {statistics.mean(losses[-5:]):.3f}. "
        "Phases: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in result["phases"].items()) + ".",
        "",
        "| length | passkey before | passkey after | held-out chats before | held-out chats after |",
        "|---|---|---|---|---|",
    ]
    for length in result["before"]:
        b, a = result["before"][length], result["after"][length]
        lines.append(f"| {length} | {b['passkey']['correct']}/{b['passkey']['n']} | {a['passkey']['correct']}/{a['passkey']['n']} | "
                     f"{b['chats']['correct']}/{b['chats']['n']} | {a['chats']['correct']}/{a['chats']['n']} |")
    lines += ["", "Passkey: the DEVICE.md protocol (repeated filler, teacher forcing). Held-out chats: PG19 passages "
              "with one to three planted codes, answered greedily; correct when the asked code is in the answer.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
