"""LoRA fine-tuning of the default model with DCA on, end to end: data → finetune → reload → generate.

    python bench/bench_finetune_cpu.py --length 12000 --steps 30                   # the issue's run
    python bench/bench_finetune_cpu.py --length 1000 --pretraining-length 512 --steps 24   # a busy 2-core CPU

Builds retrieval chats from ../shared/data/pg19 (:mod:`chunkllama.training.longchat`), runs the
``finetune`` command on them (LoRA, DCA on), reloads the adapter with
:func:`chunkllama.training.load_finetuned` (DCA switched on from the saved config) and answers
held-out chats greedily. ``--pretraining-length`` below the model's 8192 makes DCA span several
chunks at lengths a CPU can train on (same code path, smaller scale). Writes
``bench/results/finetune_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--work", default="/tmp/chunkllama_finetune_cpu", help="data and adapter go here")
    parser.add_argument("--length", type=int, default=12000, help="passage tokens per chat")
    parser.add_argument("--chats", type=int, default=48)
    parser.add_argument("--heldout", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--pretraining-length", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune_cpu"))
    args = parser.parse_args()

    import transformers

    from chunkllama import get_dca_config
    from chunkllama.models import converted_gguf_dir, default_gguf_path
    from chunkllama.training import load_finetuned
    from chunkllama.training.command import finetune
    from chunkllama.training.longchat import build_retrieval_chats

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(converted_gguf_dir(default_gguf_path())))
    books = [p.read_text(encoding="utf-8") for p in sorted((Path(args.data) / "pg19").glob("*.txt")) if "_pg19_exact" not in p.name]
    chats = build_retrieval_chats(books, tokenizer, chats=args.chats + args.heldout, length=args.length, seed=0)
    train, heldout = chats[: args.chats], chats[args.chats :]
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in train))

    start = time.perf_counter()
    finetune(data=str(data), output=str(work / "adapter"), pretraining_length=args.pretraining_length,
             steps=args.steps, learning_rate=args.learning_rate, device="cpu", max_length=10 * args.length)
    train_s = time.perf_counter() - start
    log = json.loads((work / "adapter" / "training_log.json").read_text())

    model, tok = load_finetuned(work / "adapter", device="cpu")
    answers = []
    for chat in heldout:
        prompt = tok.apply_chat_template(chat["messages"][:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
        text = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        code = re.search(r"\d{5}", chat["messages"][1]["content"]).group(0)
        answers.append({"depth": chat["depth"], "expected": chat["messages"][1]["content"], "got": text, "correct": code in text})

    result = {
        "command": "python bench/bench_finetune_cpu.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in ("length", "chats", "steps", "learning_rate", "pretraining_length") and v is not None
        ),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads (shared)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "dca": log["dual_chunk_attention_config"],
        "reloaded_dca": get_dca_config(model).to_dict(),
        "tokens_per_chat_median": int(statistics.median(log["tokens_per_example"])),
        "steps": len(log["seconds_per_step"]),
        "seconds_per_step_median": statistics.median(log["seconds_per_step"]),
        "train_wall_s": train_s,
        "loss": log["loss"],
        "heldout_answers": answers,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    losses = log["loss"]
    md = [
        f"# LoRA fine-tuning with DCA on the CPU: SmolLM2-135M-Instruct\n",
        f"`{result['command']}` — {result['machine']}, torch {torch.__version__}, transformers {transformers.__version__}\n",
        f"- DCA {result['dca']} (reloaded: {result['reloaded_dca']})",
        f"- {result['steps']} steps on chats of median {result['tokens_per_chat_median']} tokens, "
        f"median {result['seconds_per_step_median']:.1f} s/step, {train_s:.0f} s in all",
        f"- loss: first {losses[0]:.3f}, last {losses[-1]:.3f}; mean of first 5 {statistics.mean(losses[:5]):.3f}, "
        f"last 5 {statistics.mean(losses[-5:]):.3f}",
        f"- held-out answers correct: {sum(a['correct'] for a in answers)}/{len(answers)}\n",
        "| step | loss |", "|---|---|", *[f"| {i + 1} | {l:.4f} |" for i, l in enumerate(losses)],
        "", "| depth | expected | generated |", "|---|---|---|",
        *[f"| {a['depth']} | {a['expected']} | {a['got']} |" for a in answers],
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
