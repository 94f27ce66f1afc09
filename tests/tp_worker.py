"""Run under ``torchrun``: load saved tiny models with ``tp_plan="auto"`` (through
:func:`chunkllama.distributed.from_pretrained_kwargs`), patch each with DCA, and save the last-token
logits of a padded forward and the greedy tokens of ``generate`` with one-shot and chunked prefill
(rank 0 writes).

``python -m torch.distributed.run --nproc-per-node 2 tests/tp_worker.py OUT_DIR MODEL_DIR...``
(CPU: transformers picks the gloo backend). Not a test module: ``test_distributed.py`` launches it
and compares with :func:`run` in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import chunkllama
from chunkllama.distributed import from_pretrained_kwargs, is_main_process

PRETRAINING_LENGTH, PROMPT, PAD, NEW, PIECE = 32, 70, 9, 12, 13


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def run(model: torch.nn.Module) -> dict:
    """Patch ``model`` with DCA and run the probe: logits, greedy tokens, and the widths each rank saw."""
    chunkllama.apply_dca(model, pretraining_length=PRETRAINING_LENGTH)
    attention = model.model.layers[0].self_attn
    widths: list[int] = []
    attention.q_proj.register_forward_hook(lambda module, args, out: widths.append(_local(out).shape[-1]))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, PROMPT), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :PAD], mask[1, :PAD] = 0, 0  # left padding
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, -1]
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        chunked = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                 prefill_chunk_size=PIECE)
    return {"logits": _local(logits), "tokens": tokens, "tokens_chunked_prefill": chunked, "q_width": widths[0],
            "q_weight": type(attention.q_proj.weight).__name__}


def main(out_dir: str, *model_dirs: str) -> None:
    torch.set_num_threads(1)
    for model_dir in model_dirs:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **from_pretrained_kwargs())
        result = run(model.eval())
        result["world"] = dist.get_world_size() if dist.is_initialized() else 1
        if is_main_process():
            torch.save(result, Path(out_dir) / f"{Path(model_dir).name}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
