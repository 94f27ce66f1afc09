"""The ``chunkllama finetune`` command: a plain typed function (the CLI builds its options from the signature)."""

from __future__ import annotations

import os
import statistics


def finetune(
    *,
    data: str,
    output: str,
    model: str | None = None,
    pretraining_length: int | None = None,
    chunk_size: int | None = None,
    local_window: int | None = None,
    lora: bool = True,
    lora_rank: int = 16,
    lora_alpha: int = 32,
    steps: int = 30,
    learning_rate: float = 2e-4,
    batch_size: int = 1,
    grad_accum: int = 1,
    max_length: int = 32768,
    gradient_checkpointing: bool = True,
    device: str | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> int:
    """Fine-tune a model on long chats with Dual Chunk Attention on (LoRA or all weights).

    Reads a JSONL file of chats (OpenAI "messages" or ShareGPT "conversations" rows), trains with
    the loss on assistant turns only, and saves the adapter (or the model) with the tokenizer, its
    DCA settings (dual_chunk_attention_config) and training_log.json into --output. Runs in fp32
    on CPU (PyTorch attention) and in bf16 autocast on CUDA (the fused Triton kernels, forward and
    backward); for several GPUs run it under `accelerate launch --config_file
    configs/accelerate_fsdp.yaml -m chunkllama.cli finetune ...`. `chunkllama chat --model OUTPUT`,
    `chunkllama serve --model OUTPUT` and chunkllama.load_model(OUTPUT) load the result with DCA
    on as trained.

    Args:
        data: JSONL training file.
        output: directory to write the adapter or model into.
        model: hub id, model directory or .gguf file; default: SmolLM2-135M-Instruct.
        pretraining_length: the model's pretraining window for DCA; default: its
            dual_chunk_attention_config, else max_position_embeddings.
        chunk_size: DCA chunk size; default 3/4 of the pretraining length.
        local_window: DCA local window; default 1/8 of the pretraining length.
        lora: train LoRA adapters on every linear layer but the output head (--no-lora: all weights).
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha.
        steps: optimizer steps.
        learning_rate: peak learning rate (linear decay).
        batch_size: chats per device per micro-batch (left-padded).
        grad_accum: micro-batches per optimizer step.
        max_length: chats longer than this many tokens are skipped (and counted).
        gradient_checkpointing: recompute activations in the backward to save memory.
        device: cpu or cuda; default: cuda when available.
        seed: random seed.
        threads: CPU threads for torch (default: torch's choice). On a CPU shared with other jobs
            use 1: threads that wait for a busy core make each step many times slower.
    """
    import torch

    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be at least 1; got {threads}.")
        torch.set_num_threads(threads)

    from ..models import load_model
    from ..patching import apply_dca, get_dca_config
    from .data import read_chats, tokenize_chats
    from .sft import SFTSettings, require_peft, train_sft

    settings = SFTSettings(
        steps=steps, learning_rate=learning_rate, batch_size=batch_size, grad_accum=grad_accum, lora=lora,
        lora_rank=lora_rank, lora_alpha=lora_alpha, gradient_checkpointing=gradient_checkpointing, seed=seed,
    )
    if lora:
        require_peft()  # fail before the slow part
    chats = read_chats(data)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # LoRA: frozen base in bf16 on CUDA (adapters stay fp32); full fine-tuning: fp32 master weights.
    dtype = torch.bfloat16 if target.type == "cuda" and lora else torch.float32
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under accelerate launch / torchrun
    # Distributed: every process loads on the CPU; its Trainer moves (FSDP: shards) the model to its GPU.
    net, tokenizer = load_model(model, dtype=dtype, device="cpu" if distributed else target, dca=False,
                                tensor_parallel=False)  # data parallel: every process holds the whole model
    dca = get_dca_config(apply_dca(net, pretraining_length, chunk_size, local_window))
    assert dca is not None
    examples, dropped = tokenize_chats(chats, tokenizer, max_length)
    if not examples:
        raise SystemExit(f"All {len(chats)} chats are longer than --max-length {max_length} tokens; raise it.")
    lengths = [len(e["input_ids"]) for e in examples]
    print(
        f"{len(examples)} chats ({dropped} skipped as longer than {max_length} tokens), tokens per chat "
        f"min {min(lengths)} / median {int(statistics.median(lengths))} / max {max(lengths)}; DCA {dca.to_dict()} "
        f"(chunk_len {dca.chunk_len}); {'LoRA r=%d' % lora_rank if lora else 'full fine-tuning'} on {target}, {dtype}"
        f"{', %d CPU threads' % torch.get_num_threads() if target.type == 'cpu' else ''}",
        flush=True,
    )
    log = train_sft(net, tokenizer, examples, output, dca, settings, use_cpu=target.type == "cpu")
    seconds = log["seconds_per_step"]
    print(f"loss by step: " + ", ".join(f"{s}:{l:.4f}" for s, l in zip(log["logged_steps"], log["loss"])))
    if seconds:
        print(f"{len(seconds)} steps, median {statistics.median(seconds):.2f} s/step; saved to {output}")
    return 0
