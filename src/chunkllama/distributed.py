"""Running under ``torchrun``: tensor parallelism through transformers, no communication code of ours.

A DCA-patched model works with transformers' tensor parallelism as it is: ``tp_plan="auto"``
shards ``q/k/v_proj`` by columns (whole heads) and ``o_proj`` by rows, so each rank's attention
modules see only their local heads — DCA needs nothing but the heads it is given — and the
row-parallel ``o_proj`` all-reduces the result (DTensor). transformers starts the process group
(NCCL on GPUs, gloo on the CPU) from the environment ``torchrun`` sets.

Run any entry point under ``torchrun`` to use it, e.g.::

    torchrun --nproc-per-node 2 -m chunkllama.cli eval ppl --model meta-llama/Meta-Llama-3-70B

with model loading going through :func:`from_pretrained_kwargs` (every rank loads its shard).
Heads must divide evenly by the number of processes (see ``chunkllama plan --gpus``).
"""

from __future__ import annotations

import os
from typing import Any


def world_size() -> int:
    """Processes ``torchrun`` started (1 when not under ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0, and when not under ``torchrun``: the process that prints and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


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
