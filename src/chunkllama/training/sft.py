"""Supervised fine-tuning on long chats with DCA on, through ``transformers.Trainer`` (+ ``peft`` LoRA).

The model is patched with :func:`chunkllama.apply_dca` on the ``"auto"`` backend: on CUDA in
bf16/fp16 (head_dim 64/128) the fused Triton kernels with their backward
(:mod:`chunkllama.attention.triton_prefill_backward`), elsewhere (fp32 on the CPU) the PyTorch
reference path, whose backward is exact too. So chats longer than the pretraining window train
with the same attention the model later runs with. Loss is on assistant tokens only
(:func:`chunkllama.training.data.tokenize_chat`); batches are left-padded, as DCA expects.

The saved directory records the DCA settings as ``dual_chunk_attention_config`` in
``config.json`` (full fine-tuning) or ``adapter_config.json`` (LoRA); :func:`load_finetuned`
(and :func:`chunkllama.load_model`, hence ``chunkllama chat`` / ``serve``) reads them back and
switches DCA on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import HF_CONFIG_KEY, DCAConfig
from ..patching import apply_dca, remove_dca
from .data import IGNORE_INDEX, pad_left

LORA_TARGETS = "all-linear"  # every linear layer but the output head (peft)
LOG_FILE = "training_log.json"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"


def require_peft() -> Any:
    """The ``peft`` module, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError:
        raise ImportError(
            "LoRA fine-tuning needs the 'peft' package: pip install 'chunkllama[train]' "
            "(or pip install peft), or fine-tune all weights with lora=False / --no-lora."
        ) from None
    return peft


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    """Training hyper-parameters.

    Attributes:
        steps: optimizer steps.
        learning_rate: peak learning rate (linear decay to 0 after ``warmup_steps``).
        batch_size: chats per device per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lora: True → LoRA adapters on every linear layer but the output head; False → all weights.
        lora_rank / lora_alpha / lora_dropout: LoRA shape.
        gradient_checkpointing: recompute each layer's activations in the backward.
        warmup_steps: linear warm-up steps.
        seed: data order and initialisation of the adapters.
        logging_steps: log the loss every this many steps.
    """

    steps: int = 30
    learning_rate: float = 2e-4
    batch_size: int = 1
    grad_accum: int = 1
    lora: bool = True
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    gradient_checkpointing: bool = True
    warmup_steps: int = 0
    seed: int = 0
    logging_steps: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "lora_rank", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive; got {self.learning_rate}.")


class _ChatDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """A left-padded batch that asks the model for logits only where a label follows.

    The output head then runs on the ``K`` positions whose next token is an assistant token instead
    of all ``T`` (at 12k tokens and a 49k vocabulary, full fp32 logits alone are 2.4 GB per chat).

    Returns:
        ``input_ids``/``attention_mask`` ``(B, T)``; ``logits_to_keep`` int64 ``(K,)``, positions
        ``j`` with a label at ``j + 1`` in some row; ``labels`` ``(B, K)``: those labels (``-100``
        where a row has none), aligned with the kept logits. ``labels`` is not the model's
        ``labels`` argument: :func:`assistant_loss` reads it.
    """
    batch = pad_left(examples, pad_id)
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
    batch["logits_to_keep"] = keep
    batch["labels"] = targets[:, keep]
    return batch


def assistant_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Token-mean cross-entropy of the kept logits (``Trainer``'s ``compute_loss_func``).

    Args:
        outputs: the model output; ``outputs.logits`` ``(B, K, V)`` from :func:`collate`'s positions.
        labels: ``(B, K)`` from :func:`collate`.
        num_items_in_batch: labelled tokens over the whole accumulated batch (from ``Trainer``);
            default: those of this batch.
    Returns:
        A scalar fp32 loss.
    """
    logits = outputs.logits.float()
    labels = labels.to(logits.device)
    total = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE_INDEX).sum()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


def _step_timer() -> Any:
    """A ``TrainerCallback`` recording the wall time of each optimizer step (seconds)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    """``TrainingArguments`` keywords for activation checkpointing: transformers renamed
    ``gradient_checkpointing`` to ``activation_checkpointing`` (deprecated alias from ~5.2x; 5.17 has
    only the old name)."""
    from transformers import TrainingArguments

    prefix = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def _record_dca(directory: Path, dca: DCAConfig) -> None:
    """Write ``dual_chunk_attention_config`` into the saved adapter or model config."""
    name = ADAPTER_CONFIG if (directory / ADAPTER_CONFIG).is_file() else MODEL_CONFIG
    path = directory / name
    data = json.loads(path.read_text())
    data[HF_CONFIG_KEY] = dca.to_hf_dict()
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def train_sft(
    model: Any,
    tokenizer: Any,
    examples: list[dict[str, list[int]]],
    output_dir: str | os.PathLike[str],
    dca: DCAConfig,
    settings: SFTSettings = SFTSettings(),
    use_cpu: bool | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """Fine-tune ``model`` on tokenized chats with DCA on, save it, and return the training log.

    Args:
        model: a supported HF causal LM (fp32 on CPU; on CUDA the step runs in bf16 autocast).
        tokenizer: its tokenizer (saved next to the weights; its pad id pads the batches).
        examples: ``{"input_ids", "labels"}`` lists from :func:`chunkllama.training.data.tokenize_chats`.
        output_dir: where the adapter (LoRA) or the whole model is saved, with the tokenizer and
            ``training_log.json``.
        dca: the DCA settings to train and save with.
        settings: hyper-parameters.
        use_cpu: train on the CPU (fp32); default: when the model's weights are on the CPU. Under
            ``accelerate launch`` pass False with the model on the CPU: each process's Trainer
            moves (or FSDP shards) it onto its own GPU.
        backend: DCA backend; ``"auto"``: Triton (forward and fused backward) for bf16/fp16 on
            CUDA, the reference path otherwise.
    Returns:
        The log: ``{"loss": [...], "logged_steps": [...], "seconds_per_step": [...], ...}``, also
        written to ``output_dir/training_log.json``.
    """
    from transformers import Trainer, TrainingArguments

    if not examples:
        raise ValueError("no training examples (all chats were dropped or the file is empty).")
    output = Path(output_dir)
    apply_dca(model, dca, backend=backend)
    model.train()
    if settings.lora:
        peft = require_peft()
        lora = peft.LoraConfig(
            r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
            target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
        )
        trained = peft.get_peft_model(model, lora)
    else:
        trained = model
    if use_cpu is None:
        use_cpu = next(model.parameters()).device.type == "cpu"
    args = TrainingArguments(
        output_dir=str(output),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        logging_steps=settings.logging_steps,
        **_checkpointing_args(settings.gradient_checkpointing),
        bf16=not use_cpu,
        use_cpu=use_cpu,
        seed=settings.seed,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    timer = _step_timer()
    trainer = Trainer(
        model=trained, args=args, train_dataset=_ChatDataset(examples),
        data_collator=lambda batch: collate(batch, pad_id), compute_loss_func=assistant_loss, callbacks=[timer],
    )
    result = trainer.train()
    trained.eval()
    remove_dca(model)  # save the model's own config (DCA switches off sliding windows while on)
    trainer.save_model(str(output))
    apply_dca(model, dca, backend=backend)
    log = {
        "logged_steps": [e["step"] for e in trainer.state.log_history if "loss" in e],
        "loss": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "seconds_per_step": timer.seconds,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "tokens_per_example": [len(e["input_ids"]) for e in examples],
        "settings": dataclasses.asdict(settings),
        HF_CONFIG_KEY: dca.to_hf_dict(),
    }
    if trainer.is_world_process_zero():
        _record_dca(output, dca)
        tokenizer.save_pretrained(str(output))
        (output / LOG_FILE).write_text(json.dumps(log, indent=2) + "\n")
    return log


def load_finetuned(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    merge: bool = True,
    backend: str = "auto",
) -> tuple[Any, Any]:
    """Load what :func:`train_sft` saved, with DCA on as recorded (with ``merge=True``, the same as
    :func:`chunkllama.load_model`).

    Args:
        path: a LoRA adapter directory (``adapter_config.json``; its base model is loaded from
            ``base_model_name_or_path``) or a full model directory (``config.json``).
        dtype, device: as :func:`chunkllama.load_model`.
        merge: merge LoRA weights into the base model (a plain HF model comes back); False keeps
            the ``PeftModel``.
        backend: DCA backend.
    Returns:
        ``(model, tokenizer)`` in eval mode, DCA applied with the saved settings (when the saved
        config records none, the model is returned unpatched).
    """
    from ..models import load_model

    directory = Path(path)
    adapter = directory / ADAPTER_CONFIG
    if merge or not adapter.is_file():  # load_model merges adapters and switches the recorded DCA on
        return load_model(str(directory), dtype=dtype, device=device, backend=backend)
    data = json.loads(adapter.read_text())
    base, _ = load_model(data["base_model_name_or_path"], dtype=dtype, device=device, dca=False, tensor_parallel=False)
    peft = require_peft()
    with warnings.catch_warnings():  # peft warns about the one key it does not know: ours
        warnings.filterwarnings("ignore", message=f".*{HF_CONFIG_KEY}.*")
        model = peft.PeftModel.from_pretrained(base, str(directory))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    dca_data = data.get(HF_CONFIG_KEY)
    if dca_data:
        apply_dca(model.get_base_model(), DCAConfig.from_hf_dict(dca_data), backend=backend)
    model.eval()
    return model, tokenizer


__all__ = ["LORA_TARGETS", "SFTSettings", "assistant_loss", "collate", "load_finetuned", "require_peft", "train_sft"]
