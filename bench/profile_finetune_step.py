"""Time one LoRA training step of the default model (SmolLM2-135M) on a retrieval chat, piece by piece.

    OMP_NUM_THREADS=1 python bench/profile_finetune_step.py --threads 1                 # DCA, checkpointing
    OMP_NUM_THREADS=1 python bench/profile_finetune_step.py --threads 1 --no-dca --no-checkpointing
    python bench/profile_finetune_step.py --threads 1 --cprofile 40                    # + top 40 functions

The same step as ``chunkllama finetune`` (peft LoRA on every linear layer, logits only where an
assistant token follows, the assistant-only loss) without the Trainer around it; prints forward and
backward seconds for ``--repeat`` steps (the first includes warm-up). What it showed on the 2-core
CPU (README, "Fine-tuning"): a ~500-token step is ~4-6 s; the 147 s/step once recorded came from
2 torch threads on a CPU where another job kept one core busy (88 s/step reproduced that way), not
from the attention or checkpointing.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--length", type=int, default=400, help="passage tokens (the chat is ~100 more)")
    parser.add_argument("--pretraining-length", type=int, default=256, help="DCA window (256: ~3 chunks at 500 tokens)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-dca", action="store_true")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--cprofile", type=int, default=0, help="profile one more step; print this many functions")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import peft

    from chunkllama import apply_dca
    from chunkllama.models import load_model
    from chunkllama.training.data import tokenize_chats
    from chunkllama.training.longchat import build_retrieval_chats
    from chunkllama.training.sft import LORA_TARGETS, assistant_loss, collate

    model, tokenizer = load_model(None, device="cpu", dca=False)
    books = [p.read_text(encoding="utf-8") for p in sorted((Path(args.data) / "pg19").glob("*.txt")) if "_pg19_exact" not in p.name]
    chat = build_retrieval_chats(books, tokenizer, chats=1, length=args.length, seed=0)[0]
    examples, _ = tokenize_chats([chat["messages"]], tokenizer, 10 * args.length)
    if not args.no_dca:
        apply_dca(model, args.pretraining_length)
    model.train()
    trained = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    if not args.no_checkpointing:
        trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trained.enable_input_require_grads()
    batch = collate(examples, tokenizer.pad_token_id)
    labels = batch.pop("labels")
    print(f"{batch['input_ids'].shape[1]} tokens, {labels.numel()} labelled; DCA {'off' if args.no_dca else args.pretraining_length}, "
          f"checkpointing {'off' if args.no_checkpointing else 'on'}, {torch.get_num_threads()} threads", flush=True)

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        loss = assistant_loss(trained(**batch), labels)
        middle = time.perf_counter()
        loss.backward()
        return middle - start, time.perf_counter() - middle

    for i in range(args.repeat):
        forward, backward = step()
        print(f"step {i}: forward {forward:.2f} s, backward {backward:.2f} s, total {forward + backward:.2f} s", flush=True)
    if args.cprofile:
        profile = cProfile.Profile()
        profile.runcall(step)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.cprofile)


if __name__ == "__main__":
    main()
