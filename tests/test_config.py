"""DCAConfig: defaults, validation, and the Qwen2.5-1M ``dual_chunk_attention_config`` round trip."""

from __future__ import annotations

import dataclasses

import pytest

from chunkllama import DCAConfig
from tiny_models import make_config


def test_paper_defaults():
    cfg = DCAConfig(32)
    assert (cfg.chunk_size, cfg.local_window, cfg.chunk_len) == (24, 4, 20)
    cfg = DCAConfig(4096)
    assert (cfg.chunk_size, cfg.local_window, cfg.chunk_len) == (3072, 512, 2560)
    cfg = DCAConfig(8192, chunk_size=6000, local_window=100)
    assert (cfg.chunk_size, cfg.local_window, cfg.chunk_len) == (6000, 100, 5900)
    assert DCAConfig(32, local_window=0).chunk_len == 24


def test_frozen_and_hashable():
    cfg = DCAConfig(32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.chunk_size = 3  # type: ignore[misc]
    assert cfg == DCAConfig(32, 24, 4) and hash(cfg) == hash(DCAConfig(32, 24, 4))


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(pretraining_length=0), "pretraining_length"),
        (dict(pretraining_length=-8), "pretraining_length"),
        (dict(pretraining_length=32, chunk_size=0), "chunk_size"),
        (dict(pretraining_length=32, chunk_size=-1), "chunk_size"),
        (dict(pretraining_length=32, local_window=-1), "local_window"),
        (dict(pretraining_length=32, local_window=24), "local_window"),  # local == chunk
        (dict(pretraining_length=32, chunk_size=10, local_window=12), "local_window"),  # local > chunk
        (dict(pretraining_length=32, chunk_size=33), "chunk_size"),  # chunk > pretraining
        (dict(pretraining_length=1), "chunk_size"),  # defaults collapse: 3*1//4 == 0
    ],
)
def test_bad_lengths_raise_value_error(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        DCAConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(pretraining_length=32.0), dict(pretraining_length=32, chunk_size="24"), dict(pretraining_length=True)])
def test_non_int_lengths_raise(kwargs):
    with pytest.raises(TypeError):
        DCAConfig(**kwargs)


def test_hf_dict_round_trip():
    cfg = DCAConfig(32, chunk_size=20, local_window=3)
    data = cfg.to_hf_dict()
    assert data == {"chunk_size": 20, "local_size": 3, "original_max_position_embeddings": 32}
    assert DCAConfig.from_hf_dict(data) == cfg
    assert cfg.to_dict() == {"pretraining_length": 32, "chunk_size": 20, "local_window": 3, "chunk_len": 17}


def test_from_hf_dict_defaults_and_missing_key():
    assert DCAConfig.from_hf_dict({"original_max_position_embeddings": 32}) == DCAConfig(32)
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        DCAConfig.from_hf_dict({"chunk_size": 24, "local_size": 4})
    with pytest.raises(ValueError, match="local_window"):
        DCAConfig.from_hf_dict({"chunk_size": 24, "local_size": 24, "original_max_position_embeddings": 32})


def test_model_config_round_trip(tmp_path):
    import transformers

    config = make_config("qwen2")
    assert DCAConfig.from_model_config(config) is None
    cfg = DCAConfig(32, chunk_size=20, local_window=3)
    cfg.write_to_model_config(config)
    assert config.dual_chunk_attention_config == cfg.to_hf_dict()
    config.save_pretrained(tmp_path)
    reloaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert DCAConfig.from_model_config(reloaded) == cfg


def test_qwen_1m_style_config_is_read():
    # Qwen2.5-1M ships extra keys (sparse attention settings) next to the three lengths.
    data = {
        "chunk_size": 24, "local_size": 4, "original_max_position_embeddings": 32,
        "sparse_attention_enabled": True, "sparse_attention_threshold": 64,
    }
    config = make_config("qwen2", dual_chunk_attention_config=data)
    assert DCAConfig.from_model_config(config) == DCAConfig(32)
    assert DCAConfig.from_hf_dict({"chunk_size": 32, "local_size": 8, "original_max_position_embeddings": 32}).chunk_len == 24
