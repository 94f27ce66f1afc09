"""Running under ``torchrun``: tensor parallelism through transformers, no communication code of ours.

A DCA-patched model works with transformers' tensor parallelism as it is: ``tp_plan="auto"``
shards ``q/k/v_proj`` by columns (whole heads) and ``o_proj`` by rows, so each rank's attention
modules see only their local heads — DCA needs nothing but the heads it is given — and the
row-parallel ``o_proj`` all-reduces the result (DTensor). transformers starts the process group
(NCCL on GPUs, gloo on the CPU) from the environment ``torchrun`` sets.

Every ``chunkllama`` command runs under ``torchrun`` as it is, e.g.::

    torchrun --nproc-per-node 2 -m chunkllama eval ppl --model meta-llama/Meta-Llama-3-70B

:func:`chunkllama.load_model` then loads with :func:`from_pretrained_kwargs` (every rank loads its
shard, on ``cuda:LOCAL_RANK`` or the CPU), every rank runs the same forward passes, and only rank 0
prints and writes files (:func:`quiet_unless_main`, :func:`is_main_process`). Heads must divide
evenly by the number of processes (see ``chunkllama plan --gpus``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator


def world_size() -> int:
    """Processes ``torchrun`` started (1 when not under ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank under ``torchrun`` (0 when not under ``torchrun``)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0, and when not under ``torchrun``: the process that prints and writes files."""
    return rank() == 0


def from_pretrained_kwargs() -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments: tensor parallelism over all ranks under ``torchrun``, else none.

    ``distributed_config=DistributedConfig(tp_plan="auto")`` (transformers 5.17 and 5.24; passing
    ``tp_plan=`` directly is deprecated there), ``tp_plan="auto"`` where ``DistributedConfig`` does
    not exist. Do not also pass ``device_map``: each rank places its shard on its own device.
    """
    if world_size() <= 1:
        return {}
    try:
        from transformers import DistributedConfig
    except ImportError:  # releases before DistributedConfig
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto")}


def shard_device_type() -> str:
    """Where transformers puts this rank's shard: ``"cuda"`` (``cuda:LOCAL_RANK``) when CUDA is there, else ``"cpu"``.

    (transformers asks for the current accelerator; on the machines we target that is CUDA or none.)
    """
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_heads_split(config: Any, processes: int) -> None:
    """Raise ``ValueError`` unless ``processes`` divides the query and key-value heads of ``config``.

    ``config`` is a transformers config (its text config is read for multimodal ones).
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    q_heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or q_heads
    if q_heads is None:
        return
    if q_heads % processes or kv_heads % processes:
        raise ValueError(
            f"tensor parallelism over {processes} processes cannot split {q_heads} query / {kv_heads} key-value "
            f"heads evenly; run torchrun with --nproc-per-node dividing both (see `chunkllama plan --gpus`)"
        )


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[None]:
    """Inside, a rank other than 0 prints nothing: ``sys.stdout``/``sys.stderr`` go nowhere (progress bars too).

    Rank 0 and a process outside ``torchrun`` are untouched. The streams are restored on the way
    out, before an exception leaves the block, so a failing rank still reports its error.
    """
    if is_main_process():
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        yield


def end_process_group() -> None:
    """Destroy the default process group if one was started (transformers starts it for tensor parallelism).

    Nothing happens when ``torch.distributed`` was never imported or initialized, so a command that
    never loaded torch stays torch-free.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
