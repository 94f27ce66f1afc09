"""Fine-tuning a tiny random Llama with DCA on, on chats longer than its pretraining window.

Geometry of :mod:`tiny_models`: pretraining length 32, chunk_len 20; the chats here are 70-110
tokens (4-6 chunks). A few LoRA steps must lower the loss, the adapter must save with its DCA
settings, reload with DCA on and generate; full fine-tuning saves them in ``config.json``.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from chunkllama import DCAConfig, get_dca_config, is_dca_applied
from chunkllama.training import SFTSettings, load_finetuned, tokenize_chats, train_sft
from tiny_chat import tiny_tokenizer
from tiny_models import PRETRAINING_LENGTH, make_model

pytest.importorskip("peft")
DCA = DCAConfig(PRETRAINING_LENGTH)


def _chats(count: int, seed: int = 0):
    rng = random.Random(seed)
    chats = []
    for _ in range(count):
        code = "".join(rng.choice("abcdef") for _ in range(4))
        filler = " ".join(rng.choice(["the sky", "is blue", "grass", "green"]) for _ in range(rng.randint(10, 16)))
        chats.append([
            {"role": "user", "content": f"code {code}. {filler} what code?"},
            {"role": "assistant", "content": f"code {code}"},
        ])
    return chats


@pytest.fixture()
def base_dir(tmp_path):
    model = make_model("llama", vocab_size=96)
    model.config.pad_token_id = 0
    with torch.no_grad():  # random init gives near-uniform logits that frozen-head LoRA cannot sharpen
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _load_base(base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(base_dir)


def test_lora_steps_lower_the_loss_and_the_adapter_reloads_with_dca(base_dir, tmp_path):
    model, tokenizer = _load_base(base_dir)
    examples, dropped = tokenize_chats(_chats(2), tokenizer)
    assert dropped == 0 and min(len(e["input_ids"]) for e in examples) > 3 * DCA.chunk_len
    settings = SFTSettings(steps=6, learning_rate=1e-2, batch_size=2, lora_rank=8, lora_alpha=16, seed=0)
    log = train_sft(model, tokenizer, examples, tmp_path / "adapter", DCA, settings)

    losses = log["loss"]
    assert len(losses) == 6 and len(log["seconds_per_step"]) == 6
    assert losses[-1] < 0.3 * losses[0] and losses[-1] == min(losses), losses  # 5.4 -> 0.5 measured
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert DCAConfig.from_hf_dict(saved["dual_chunk_attention_config"]) == DCA
    assert json.loads((tmp_path / "adapter" / "training_log.json").read_text())["loss"] == losses

    loaded, loaded_tokenizer = load_finetuned(tmp_path / "adapter")
    assert is_dca_applied(loaded) and get_dca_config(loaded) == DCA
    batch = loaded_tokenizer.apply_chat_template(
        [_chats(1, seed=9)[0][0]], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        generated = loaded.generate(**batch, max_new_tokens=5, do_sample=False)
        # the merged adapter changed the model: its logits differ from the untrained base with DCA
        base, _ = _load_base(base_dir)
        from chunkllama import apply_dca

        apply_dca(base, DCA)
        assert not torch.allclose(loaded(**batch).logits, base(**batch).logits, atol=1e-3)
    assert generated.shape == (1, batch["input_ids"].shape[1] + 5)


def test_full_finetuning_records_dca_in_config_json(base_dir, tmp_path):
    model, tokenizer = _load_base(base_dir)
    examples, _ = tokenize_chats(_chats(2), tokenizer)
    settings = SFTSettings(steps=2, learning_rate=1e-3, lora=False, gradient_checkpointing=False)
    train_sft(model, tokenizer, examples, tmp_path / "full", DCA, settings)
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert DCAConfig.from_hf_dict(config["dual_chunk_attention_config"]) == DCA
    loaded, _ = load_finetuned(tmp_path / "full")
    assert get_dca_config(loaded) == DCA
    for name, param in loaded.named_parameters():
        torch.testing.assert_close(param, dict(model.named_parameters())[name], rtol=0, atol=0)


def test_loss_on_kept_logits_equals_the_models_own_loss():
    """collate + assistant_loss (output head on labelled positions only) == HF's full-logits loss."""
    from chunkllama.training.sft import assistant_loss, collate

    model = make_model("llama")
    tokenizer = tiny_tokenizer()
    examples, _ = tokenize_chats(_chats(3, seed=4), tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    full = tokenize_chats(_chats(3, seed=4), tokenizer)[0]
    from chunkllama.training.data import pad_left

    padded = pad_left(full, tokenizer.pad_token_id)
    assert batch["logits_to_keep"].numel() < padded["input_ids"].shape[1] // 4
    with torch.no_grad():
        want = model(**padded).loss
        got = assistant_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   logits_to_keep=batch["logits_to_keep"]), batch["labels"])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
