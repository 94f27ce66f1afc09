"""``load_model`` switches DCA on from recorded settings: a full model saved with DCA (its
``config.json``) and a LoRA adapter directory (``adapter_config.json``, as ``chunkllama finetune``
writes it); an explicit choice wins; ``chat`` and ``serve`` load through the same path.

The recorded settings (window 32, chunk 20, local 6: stride 14) differ from the defaults of a
32-token window (24 / 4), so a test can tell them apart.
"""

from __future__ import annotations

import json

import pytest
import torch

import chunkllama
from chunkllama import DCAConfig, apply_dca, get_dca_config, load_model
from chunkllama.config import HF_CONFIG_KEY
from tiny_bpe import train_bpe_tokenizer
from tiny_models import make_model

SAVED = DCAConfig(32, chunk_size=20, local_window=6)
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = "The grass is green. The sky is blue. The pass key is 12345. What is the pass key? " * 6


def _tokenizer():
    tokenizer = train_bpe_tokenizer([TEXT, "user assistant system document page"], vocab_size=200,
                                    bos="<|im_start|>", eos="<|im_end|>")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _ids(tokenizer):
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 3 * SAVED.chunk_len  # several chunks, so the DCA settings matter
    return ids


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``{"plain", "full", "adapter"}`` directories and the reference models they should load as."""
    root = tmp_path_factory.mktemp("auto-dca")
    tokenizer = _tokenizer()
    base = make_model("llama", vocab_size=len(tokenizer))
    base.save_pretrained(root / "plain")
    tokenizer.save_pretrained(root / "plain")

    full = make_model("llama", seed=3, vocab_size=len(tokenizer))
    apply_dca(full, SAVED)
    full.save_pretrained(root / "full")  # the patched save_pretrained records the settings
    tokenizer.save_pretrained(root / "full")

    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    adapted = peft.get_peft_model(make_model("llama", vocab_size=len(tokenizer)), lora)
    adapted.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    config_path = root / "adapter" / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = str(root / "plain")
    data[HF_CONFIG_KEY] = SAVED.to_hf_dict()  # what training.sft writes
    config_path.write_text(json.dumps(data))
    merged = adapted.merge_and_unload()
    apply_dca(merged, SAVED)
    return {"root": root, "tokenizer": tokenizer, "full": full, "merged": merged}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_full_model_loads_with_its_recorded_settings(saved, capsys):
    assert json.loads((saved["root"] / "full" / "config.json").read_text())[HF_CONFIG_KEY] == SAVED.to_hf_dict()
    model, tokenizer = load_model(saved["root"] / "full", device="cpu")
    assert get_dca_config(model) == SAVED
    notice = capsys.readouterr().err.strip().splitlines()
    assert [line for line in notice if line.startswith("chunkllama: DCA on")] == [
        f"chunkllama: DCA on with the settings recorded in {saved['root'] / 'full' / 'config.json'}: "
        "pretraining_length 32, chunk_size 20, local_window 6 (an explicit window overrides them)"
    ]
    ids = _ids(tokenizer)
    torch.testing.assert_close(_logits(model, ids), _logits(saved["full"], ids), rtol=1e-5, atol=1e-5)


def test_explicit_choice_wins(saved, capsys):
    model, _ = load_model(saved["root"] / "full", device="cpu", dca=False)
    assert get_dca_config(model) is None
    assert DCAConfig.from_model_config(model.config) == SAVED  # kept for a later apply_dca(model)
    assert get_dca_config(apply_dca(model)) == SAVED
    model, _ = load_model(saved["root"] / "full", device="cpu", dca=64)
    assert get_dca_config(model) == DCAConfig(64)
    model, _ = load_model(saved["root"] / "full", device="cpu", dca=DCAConfig(32))
    assert get_dca_config(model) == DCAConfig(32, chunk_size=24, local_window=4)
    assert "DCA on" not in capsys.readouterr().err
    with pytest.raises(TypeError, match="dca must be"):
        load_model(saved["root"] / "full", device="cpu", dca="yes")


def test_plain_model_stays_plain_unless_asked(saved, capsys):
    model, _ = load_model(saved["root"] / "plain", device="cpu")
    assert get_dca_config(model) is None and "DCA on" not in capsys.readouterr().err
    model, _ = load_model(saved["root"] / "plain", device="cpu", dca=True)
    assert get_dca_config(model) == DCAConfig(256)  # max_position_embeddings of the tiny model


def test_adapter_directory_loads_merged_with_its_recorded_settings(saved, capsys):
    model, tokenizer = load_model(saved["root"] / "adapter", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert get_dca_config(model) == SAVED
    assert f"recorded in {saved['root'] / 'adapter' / 'adapter_config.json'}" in capsys.readouterr().err
    ids = _ids(tokenizer)
    logits = _logits(model, ids)
    torch.testing.assert_close(logits, _logits(saved["merged"], ids), rtol=1e-5, atol=1e-5)
    plain, _ = load_model(saved["root"] / "plain", device="cpu", dca=SAVED)
    assert (logits - _logits(plain, ids)).abs().max() > 1e-2  # the adapter is in
    # the merged model's config now records the settings: saving it keeps them
    model.save_pretrained(saved["root"] / "merged")
    tokenizer.save_pretrained(saved["root"] / "merged")
    assert get_dca_config(load_model(saved["root"] / "merged", device="cpu")[0]) == SAVED


def test_adapter_without_a_base_is_a_clear_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(chunkllama.models.ModelSourceError, match="base_model_name_or_path"):
        load_model(tmp_path, device="cpu")


def test_chat_command_uses_the_recorded_settings(saved, capsys):
    from chunkllama import cli

    args = ["chat", "--model", str(saved["root"] / "adapter"), "--device", "cpu", "--question", "What is the pass key?",
            "--max-new-tokens", "3", "--json"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["window"] == 32 and report["dca"]["chunk_size"] == 20 and report["dca"]["local_window"] == 6
    assert "chunkllama: DCA on with the settings recorded in" in captured.err
    assert cli.main([*args, "--pretraining-length", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["window"] == 64 and report["dca"]["chunk_size"] == 48


def test_serve_uses_the_recorded_settings(saved, capsys, monkeypatch):
    uvicorn = pytest.importorskip("uvicorn")
    from chunkllama.serving.server import serve

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app))
    assert serve(model=str(saved["root"] / "full"), device="cpu", prefix_cache_gb=0) == 0
    out = capsys.readouterr().out
    assert "with DCA (window 32, chunk_len 14)" in out and "app" in served
