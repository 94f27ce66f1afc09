"""The seed's one-liners: ``replace_with_chunk*`` patches every model of a family built afterwards,
``.undo()`` stops that, and nothing leaks into other families or other tests."""

from __future__ import annotations

import pytest
import torch
import transformers

from chunkllama import (
    DCAConfig,
    FamilyPatch,
    apply_dca,
    get_dca_config,
    is_dca_applied,
    remove_dca,
    replace_with_chunkllama,
    replace_with_chunkmistral,
    replace_with_chunkmixtral,
    replace_with_chunkqwen,
)
from tiny_models import PRETRAINING_LENGTH, make_config, make_model, random_ids

REPLACERS = {
    "llama": (replace_with_chunkllama, ["llama"]),
    "mistral": (replace_with_chunkmistral, ["mistral"]),
    "mixtral": (replace_with_chunkmixtral, ["mixtral"]),
    "qwen": (replace_with_chunkqwen, ["qwen2", "qwen3"]),
}
ALL = ["llama", "mistral", "mixtral", "qwen2", "qwen3"]
BASE_CLASSES = [
    transformers.LlamaModel, transformers.MistralModel, transformers.MixtralModel, transformers.Qwen2Model, transformers.Qwen3Model,
]


@pytest.fixture(autouse=True)
def _classes_restored():
    """Every test must leave the transformers classes exactly as it found them."""
    before = {cls: cls.__dict__.get("__init__") for cls in BASE_CLASSES}
    yield
    after = {cls: cls.__dict__.get("__init__") for cls in BASE_CLASSES}
    assert after == before, "a replace_with_* patch leaked out of the test"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("name", list(REPLACERS))
def test_models_built_afterwards_are_patched_until_undo(name):
    replace, families = REPLACERS[name]
    patch = replace(pretraining_length=PRETRAINING_LENGTH)
    try:
        assert isinstance(patch, FamilyPatch)
        patched = {family: make_model(family) for family in ALL}
    finally:
        patch.undo()
    for family, model in patched.items():
        if family in families:
            assert get_dca_config(model) == DCAConfig(PRETRAINING_LENGTH), family
        else:
            assert not is_dca_applied(model), f"{name} patched a {family} model"
    for family in families:
        assert not is_dca_applied(make_model(family)), "still patched after undo()"
        assert is_dca_applied(patched[family])  # built before undo: keeps DCA until remove_dca
        # the one-liner gives the same model as apply_dca
        ids = random_ids(1, 70, seed=41)
        expected = apply_dca(make_model(family), pretraining_length=PRETRAINING_LENGTH)
        assert torch.equal(_logits(patched[family], ids), _logits(expected, ids))
        remove_dca(patched[family])
        assert torch.equal(_logits(patched[family], ids), _logits(make_model(family), ids))


def test_local_window_size_and_seed_only_arguments():
    with replace_with_chunkllama(pretraining_length=64, local_window_size=3, max_prompt_length=1000) as patch:
        model = make_model("llama")
    assert patch.config == DCAConfig(64, local_window=3)
    assert get_dca_config(model) == DCAConfig(64, local_window=3)
    assert not is_dca_applied(make_model("llama"))


def test_defaults_are_the_seed_windows():
    for replace, length in [
        (replace_with_chunkllama, 4096), (replace_with_chunkmistral, 32768),
        (replace_with_chunkmixtral, 32768), (replace_with_chunkqwen, 32768),
    ]:
        with replace() as patch:
            assert patch.config == DCAConfig(length)


def test_calling_again_replaces_and_one_undo_restores():
    first = replace_with_chunkllama(pretraining_length=PRETRAINING_LENGTH)
    second = replace_with_chunkllama(pretraining_length=64)
    try:
        assert get_dca_config(make_model("llama")) == DCAConfig(64)
    finally:
        second.undo()
        first.undo()  # harmless: already replaced
    assert not is_dca_applied(make_model("llama"))


def test_bad_arguments_fail_before_patching():
    init = transformers.LlamaModel.__dict__["__init__"]
    with pytest.raises(ValueError):
        replace_with_chunkllama(pretraining_length=32, local_window_size=24)
    with pytest.raises(ValueError):
        replace_with_chunkllama(pretraining_length=0)
    with pytest.raises(ValueError, match="backend"):
        replace_with_chunkllama(pretraining_length=32, backend="flash")
    assert transformers.LlamaModel.__dict__["__init__"] is init


def test_from_pretrained_after_replace(tmp_path):
    make_model("qwen3").save_pretrained(tmp_path)
    with replace_with_chunkqwen(pretraining_length=PRETRAINING_LENGTH):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert get_dca_config(loaded) == DCAConfig(PRETRAINING_LENGTH)
    expected = apply_dca(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval(), pretraining_length=PRETRAINING_LENGTH)
    ids = random_ids(1, 90, seed=42)
    assert torch.equal(_logits(loaded, ids), _logits(expected, ids))


def test_config_objects_are_not_shared_between_models():
    """No module-level state: two models built under one patch each carry their own patch."""
    with replace_with_chunkmistral(pretraining_length=PRETRAINING_LENGTH):
        a = transformers.MistralForCausalLM(make_config("mistral"))
        b = transformers.MistralForCausalLM(make_config("mistral"))
    apply_dca(a, pretraining_length=64)
    assert get_dca_config(a) == DCAConfig(64)
    assert get_dca_config(b) == DCAConfig(PRETRAINING_LENGTH)
