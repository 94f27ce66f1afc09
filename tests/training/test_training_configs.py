"""The shipped ``accelerate`` configs parse with accelerate's own reader and ask for what the docs say."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name, kind", [("accelerate_fsdp.yaml", "FSDP"), ("accelerate_ddp.yaml", "MULTI_GPU")])
def test_accelerate_config_parses(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(CONFIGS / name))
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_use_orig_params"] is True  # LoRA: frozen and trainable params mixed
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
