"""LoRA fine-tuning of the default model with DCA on, end to end: data → finetune → reload → generate.

    python bench/bench_finetune_cpu.py --length 12000 --steps 30                   # the issue's run
    python bench/bench_finetune_cpu.py --length 600 --chats 48 --heldout 8 --steps 40 --pretraining-length 256 \
        --learning-rate 0.001 --threads 1   # ~10 min on the shared 2-core CPU (bench/results/finetune_cpu.md)

Builds retrieval chats from ../shared/data/pg19 (:mod:`chunkllama.training.longchat`), runs the
``finetune`` command on them (LoRA, DCA on), reloads the adapter with
:func:`chunkllama.training.load_finetuned` (DCA switched on from the saved config) and answers
held-out chats greedily. ``--pretraining-length`` below the model's 8192 makes DCA span several
chunks at lengths a CPU can train on (same code path, smaller scale). The same held-out chats are
answered first by the untrained model with the same DCA settings, for comparison. Writes
``bench/results/finetune_cpu.json`` and ``.md``.

``--threads 1`` on a CPU shared with other jobs: with 2 threads and one core busy elsewhere, a step
of ~500-token chats measured 88 s instead of 4 s (each op's threads wait for the descheduled one).
"""

from __future__ import annotations

import argparse
import json
import platform
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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared CPU)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune_cpu"))
    args = parser.parse_args()

    import transformers

    from chunkllama import DCAConfig, apply_dca, get_dca_config
    from chunkllama.models import converted_gguf_dir, default_gguf_path
    from chunkllama.training import load_finetuned
    from chunkllama.training.command import finetune
    from chunkllama.training.longchat import answer_chats, build_retrieval_chats

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(converted_gguf_dir(default_gguf_path())))
    books = [p.read_text(encoding="utf-8") for p in sorted((Path(args.data) / "pg19").glob("*.txt")) if "_pg19_exact" not in p.name]
    chats = build_retrieval_chats(books, tokenizer, chats=args.chats + args.heldout, length=args.length, seed=0)
    train, heldout = chats[: args.chats], chats[args.chats :]
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in train))

    if args.threads:
        torch.set_num_threads(args.threads)
    from chunkllama.models import load_model

    base, _ = load_model(None, device="cpu", dca=False)
    apply_dca(base, args.pretraining_length)
    base_dca = get_dca_config(base)
    untrained = answer_chats(base, tokenizer, heldout)
    del base

    start = time.perf_counter()
    finetune(data=str(data), output=str(work / "adapter"), pretraining_length=args.pretraining_length,
             steps=args.steps, learning_rate=args.learning_rate, device="cpu", max_length=10 * args.length,
             threads=args.threads)
    train_s = time.perf_counter() - start
    log = json.loads((work / "adapter" / "training_log.json").read_text())
    assert DCAConfig.from_hf_dict(log["dual_chunk_attention_config"]) == base_dca

    model, tok = load_finetuned(work / "adapter", device="cpu")
    answers = answer_chats(model, tok, heldout)

    result = {
        "command": "python bench/bench_finetune_cpu.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k in ("length", "chats", "heldout", "steps", "learning_rate", "pretraining_length", "threads") and v is not None
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
        "heldout_answers_untrained": untrained,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)


def markdown(result: dict) -> str:
    """The ``.md`` report of a result (also: ``python -c "...markdown(json.load(...))"`` to redo it)."""
    losses, answers, untrained = result["loss"], result["heldout_answers"], result["heldout_answers_untrained"]

    def cell(text: str) -> str:
        return " ".join(text.replace("|", "\\|").split())

    md = [
        "# LoRA fine-tuning with DCA on the CPU: SmolLM2-135M-Instruct\n",
        f"`{result['command']}` — {result['machine']}, torch {result['versions']['torch']}, "
        f"transformers {result['versions']['transformers']}\n",
        f"- DCA {result['dca']} (reloaded: {result['reloaded_dca']})",
        f"- {result['steps']} steps on chats of median {result['tokens_per_chat_median']} tokens, "
        f"median {result['seconds_per_step_median']:.1f} s/step, {result['train_wall_s']:.0f} s in all",
        f"- loss: first {losses[0]:.3f}, last {losses[-1]:.3f}; mean of first 5 {statistics.mean(losses[:5]):.3f}, "
        f"last 5 {statistics.mean(losses[-5:]):.3f}",
        f"- held-out answers correct (code found in the answer): after fine-tuning "
        f"{sum(a['correct'] for a in answers)}/{len(answers)}, untrained model with the same DCA settings "
        f"{sum(a['correct'] for a in untrained)}/{len(untrained)}\n",
        "| step | loss |", "|---|---|", *[f"| {i + 1} | {loss:.4f} |" for i, loss in enumerate(losses)],
        "", "| depth | expected | fine-tuned | untrained |", "|---|---|---|---|",
        *[f"| {a['depth']} | {a['expected']} | {cell(a['got'])} | {cell(u['got'])} |" for a, u in zip(answers, untrained)],
    ]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
