"""Memory planner: will a long prompt fit? Pure arithmetic on a model config (no weights, no network).

For a decoder of ``N`` layers, hidden size ``H``, MLP width ``I``, ``Hq`` query / ``Hk`` key-value
heads of ``D`` dims, vocabulary ``V``, a batch of ``B`` prompts of ``T`` tokens prefilled in pieces
of ``P`` tokens (``P = T``: one shot) on ``G`` GPUs (tensor parallel: heads and MLP columns split
``G`` ways), with ``b`` bytes per activation element (2 for bf16) and ``c`` bytes per cached
element, the planner predicts, per GPU:

- **weights** = params x bytes; params counted from the config (embedding ``V·H``; per layer
  ``H·D·(2·Hq + 2·Hk)`` attention projections (+ biases for Qwen2), ``3·H·I`` MLP (x ``E`` experts
  + an ``H·E`` router for Mixtral), norms; untied ``lm_head`` ``V·H``). Under TP each layer's
  projections are split ``G`` ways; embedding and ``lm_head`` are counted whole (an upper bound).
- **KV cache** = ``2·N·B·(T + new)·(Hk/G)·D·c`` (+ ``2·N·B·(T + new)·(Hk/G)·4`` of fp32 per-token,
  per-head scales for an fp8 cache: ``apply_dca(model, kv_cache_dtype="fp8")`` stores rows of
  ``D + 4`` bytes, :mod:`chunkllama.attention.fp8`).
- **prefill peak**: the most memory the forward of the *last* piece holds at once on top of weights
  and cache (the last piece sees the longest cache), the larger of two moments in a layer:

  * MLP: ``3·B·P·I/G·b`` (``act(gate)``, ``up``, their product) + ``4·B·P·H·b`` (embedding output,
    layer input, residual, normed input); for a mixture of experts run as transformers' grouped
    experts (``S = B·P·k`` token-expert rows, top-``k``): ``(4·S·I/G + S·H)·b + 4·B·P·H·b`` (the
    gathered inputs, ``gate_up``, ``act(gate)``, the product) — an upper bound of the per-expert loop;
  * attention: ``3·B·P·H·b`` + ``B·P·(Hq + 2·Hk)/G·D·b`` (q, rotated k, v) + the larger of the
    dynamic cache's growth copy ``B·(Hk/G)·D·(T - P)·c`` (``c = 1 + 4/D`` for fp8; ``torch.cat`` holds the old keys and the
    new ones of one layer at once; 0 for a static cache) and DCA's workspace ``B·(Hq/G)·(P·(D·b + 4)
    + 7·min(P, chunk_len)·(D + 1)·4)`` (output, its log-sum-exp, fp32 partial results of one chunk),
    with an fp8 cache plus ``2·B·(Hk/G)·T·D·b``: a prefill piece reads the layer's keys and values
    dequantized to the activation dtype (:func:`chunkllama.attention.triton_dispatch.launch`);

  * with the PyTorch reference backend (``backend="reference"``), when the prompt's final piece has
    ``r`` tokens with ``(Hq/Hk)·r <= 64`` query rows per KV head: its static path scores every pair
    three ways at once, ``4·B·(Hq/G)·r·T·4`` (fp32 scores of the three rotations and the picked ones)
    besides the piece's ``3·B·r·H·b`` and q, k, v (the Triton kernels keep no such matrix);

  plus, for the whole forward, rotary tables ``2·B·P·D·b``. No attention mask: the patched base model
  hands its layers a ``(B, 1, P, 1)`` placeholder (they read positions), so transformers builds none
  (it used to build ``B·P·T`` bools per piece: 5 GiB per piece at a 1M-token cache).
- **decode** adds little: logits of one position ``2·B·V·4``.

Not modelled: the CUDA context and allocator slack (``reserve``, 1 GiB by default), fragmentation,
and kernels' private workspaces. Checked against measured peaks on small CPU models in
``tests/test_planner.py`` (within 15%).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from .config import DCAConfig, default_prefill_chunk_size

GIB = 1024**3

#: Built-in shapes by name (enough of each config to plan with), so no download is needed.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, tie_word_embeddings=False),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                        max_position_embeddings=8192, tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, tie_word_embeddings=False),
}

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1}
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str | int, *, what: str = "size") -> int:
    """``"1M"`` → 1048576, ``"128k"`` → 131072, ``"80GB"`` → 80·10⁹, ``"141GiB"`` → 141·2³⁰, ``"3.5G"``.

    A bare ``k``/``M``/``G``/``T`` suffix is binary (as token counts are written: 16k = 16384);
    ``kB``/``MB``/``GB``/``TB`` are decimal, ``KiB``/``MiB``/``GiB``/``TiB`` binary. Case-insensitive.

    Raises:
        ValueError: naming the text and the accepted forms.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{what} must be >= 0, got {text}")
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"Cannot read {what} {text!r}: write a number with an optional unit, e.g. 1M, 128k, 65536 "
            "(tokens; k/M/G are powers of 1024) or 141GiB, 80GB, 512MiB (bytes)."
        )
    return int(round(float(match.group(1)) * _UNITS[unit]))


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the planner reads from a model config."""

    layers: int
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    experts: int = 1  # MoE: all experts' weights are resident
    experts_per_token: int = 1
    pretraining_length: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> "Shape":
        """From an HF config object or a plain dict of its fields."""
        get = config.get if isinstance(config, dict) else (lambda name, default=None: getattr(config, name, default))
        text = get("text_config")
        if text is not None:
            return cls.from_config(text)
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if get(k) is None]
        if missing:
            raise ValueError(f"The model config lacks {', '.join(missing)}: the planner needs a decoder LM config.")
        q_heads = int(get("num_attention_heads"))
        model_type = get("model_type", "")
        return cls(
            layers=int(get("num_hidden_layers")),
            hidden=int(get("hidden_size")),
            intermediate=int(get("intermediate_size") or 4 * get("hidden_size")),
            q_heads=q_heads,
            kv_heads=int(get("num_key_value_heads") or q_heads),
            head_dim=int(get("head_dim") or get("hidden_size") // q_heads),
            vocab=int(get("vocab_size")),
            tied_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            experts=int(get("num_local_experts") or 1),
            experts_per_token=int(get("num_experts_per_tok") or 1) if get("num_local_experts") else 1,
            pretraining_length=get("max_position_embeddings"),
        )

    def params(self) -> int:
        """Parameter count (see the module docstring)."""
        h, d = self.hidden, self.head_dim
        attn = h * d * (2 * self.q_heads + 2 * self.kv_heads)
        if self.qkv_bias:
            attn += d * (self.q_heads + 2 * self.kv_heads)
        if self.qk_norm:
            attn += 2 * d
        mlp = self.experts * 3 * h * self.intermediate + (h * self.experts if self.experts > 1 else 0)
        per_layer = attn + mlp + 2 * h
        embeddings = self.vocab * h * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embeddings + h

    def layer_params(self) -> int:
        return (self.params() - self.vocab * self.hidden * (1 if self.tied_embeddings else 2) - self.hidden) // self.layers


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per GPU of each part, and the settings they were computed for."""

    weights: int
    kv_cache: int
    prefill_peak_one_shot: int  # activations on top of weights + cache, prompt at once
    prefill_peak_chunked: int  # same with pieces of ``prefill_chunk`` tokens
    prefill_chunk: int
    reserve: int
    gpu_memory: int

    def total(self, chunked: bool = True) -> int:
        peak = self.prefill_peak_chunked if chunked else self.prefill_peak_one_shot
        return self.weights + self.kv_cache + peak + self.reserve

    def fits(self, chunked: bool = True) -> bool:
        return self.total(chunked) <= self.gpu_memory


STATIC_MAX_ROWS = 64  # attention.reference.STATIC_MAX_ROWS (not imported: the planner needs no torch)


def _mask_bytes(batch: int, piece: int) -> int:
    """The placeholder mask a patched model passes instead of a ``(B, 1, P, T)`` one (one bool per query)."""
    return batch * piece


def prefill_activation_peak(
    shape: Shape,
    *,
    length: int,
    piece: int,
    batch: int = 1,
    act_bytes: int = 2,
    cache_bytes: float = 2,
    gpus: int = 1,
    chunk_len: int | None = None,
    attn_implementation: str = "sdpa",
    cache: str = "dynamic",
    padded: bool = False,
    dequantized_cache: bool = False,
    backend: str = "triton",
) -> int:
    """Peak bytes of the last prefill piece's forward on top of weights and KV cache (module docstring).

    ``dequantized_cache``: the cache is fp8 and the piece reads it dequantized (bf16 keys and values of one layer).
    ``backend="reference"`` (the PyTorch path, e.g. on a CPU) adds its static path's fp32 scores when the
    prompt's final piece has few rows (module docstring)."""
    if backend not in ("triton", "reference"):
        raise ValueError(f"Unknown backend {backend!r}; use triton or reference.")
    piece = min(piece, length)
    h, d, g, b = shape.hidden, shape.head_dim, gpus, act_bytes
    q_heads, kv_heads = shape.q_heads / g, shape.kv_heads / g
    c = min(piece, chunk_len or piece)
    if shape.experts > 1:  # grouped experts: all P·k (token, expert) rows at once
        rows = batch * piece * shape.experts_per_token
        mlp = (4 * rows * shape.intermediate / g + rows * h) * b + 4 * batch * piece * h * b
    else:
        mlp = 3 * batch * piece * shape.intermediate / g * b + 4 * batch * piece * h * b
    growth = batch * kv_heads * d * (length - piece) * cache_bytes if cache == "dynamic" else 0
    workspace = batch * q_heads * (piece * (d * b + 4) + 7 * c * (d + 1) * 4)
    if dequantized_cache:
        workspace += 2 * batch * kv_heads * length * d * b
    attention = 3 * batch * piece * h * b + batch * piece * (q_heads + 2 * kv_heads) * d * b + max(growth, workspace)
    always = _mask_bytes(batch, piece) + 2 * batch * piece * d * b
    last = length - (length - 1) // piece * piece  # tokens of the final piece
    static = 0
    if backend == "reference" and shape.q_heads // shape.kv_heads * last <= STATIC_MAX_ROWS:
        # reference.static_dca_attention: the scores of all three rotations and the picked ones, fp32
        static = 3 * batch * last * h * b + batch * last * (q_heads + 2 * kv_heads) * d * b \
            + 4 * batch * q_heads * last * length * 4
    return int(max(mlp, attention, static) + always + 2 * batch * shape.vocab * 4)


def kv_element_bytes(shape: Shape, kv_dtype: str) -> float:
    """Bytes per cached key/value element: the dtype's, plus the fp32 scale of each fp8 row shared by ``D`` elements."""
    return DTYPE_BYTES[kv_dtype] + (4 / shape.head_dim if kv_dtype == "fp8" else 0)


def kv_cache_bytes(shape: Shape, tokens: int, *, batch: int = 1, kv_dtype: str = "bf16", gpus: int = 1) -> int:
    """``2·N·B·tokens·(Hk/G)·D·c`` (+ fp32 scales per token and head for fp8)."""
    per_element = kv_element_bytes(shape, kv_dtype)
    return int(2 * shape.layers * batch * tokens * shape.kv_heads / gpus * shape.head_dim * per_element)


def make_plan(
    shape: Shape,
    *,
    length: int,
    new_tokens: int = 16,
    batch: int = 1,
    dtype: str = "bf16",
    kv_dtype: str = "bf16",
    gpus: int = 1,
    prefill_chunk: int | None = None,
    dca: DCAConfig | None = None,
    attn_implementation: str = "sdpa",
    cache: str = "dynamic",
    padded: bool = False,
    reserve: int = GIB,
    gpu_memory: int = 139 * GIB,
    backend: str = "triton",
) -> Plan:
    """Every number of a :class:`Plan`; ``prefill_chunk`` defaults to the patched ``generate``'s piece
    (:func:`chunkllama.config.default_prefill_chunk_size`)."""
    for name, value in (("dtype", dtype), ("kv_dtype", kv_dtype)):
        if value not in DTYPE_BYTES:
            raise ValueError(f"Unknown {name} {value!r}; use one of {', '.join(DTYPE_BYTES)}.")
    if attn_implementation not in ("sdpa", "eager", "flash"):
        raise ValueError(f"Unknown attn_implementation {attn_implementation!r}; use sdpa, eager or flash.")
    if cache not in ("dynamic", "static"):
        raise ValueError(f"Unknown cache {cache!r}; use dynamic or static.")
    if gpus < 1 or shape.kv_heads % gpus or shape.q_heads % gpus:
        raise ValueError(
            f"{gpus} GPUs cannot split {shape.q_heads} query / {shape.kv_heads} key-value heads evenly "
            "(tensor parallelism splits heads); pick a GPU count that divides both."
        )
    if dca is None:
        dca = DCAConfig(shape.pretraining_length or 4096)
    piece = prefill_chunk or default_prefill_chunk_size(dca)
    b = DTYPE_BYTES[dtype]
    weights = (shape.layers * shape.layer_params() / gpus + shape.params() - shape.layers * shape.layer_params()) * b
    common = dict(length=length, batch=batch, act_bytes=b, gpus=gpus, chunk_len=dca.chunk_len,
                  cache_bytes=kv_element_bytes(shape, kv_dtype), dequantized_cache=kv_dtype == "fp8", attn_implementation=attn_implementation, cache=cache, padded=padded, backend=backend)
    return Plan(
        weights=int(weights),
        kv_cache=kv_cache_bytes(shape, length + new_tokens, batch=batch, kv_dtype=kv_dtype, gpus=gpus),
        prefill_peak_one_shot=prefill_activation_peak(shape, piece=length, **common),
        prefill_peak_chunked=prefill_activation_peak(shape, piece=piece, **common),
        prefill_chunk=piece,
        reserve=reserve,
        gpu_memory=gpu_memory,
    )


def load_shape(model: str) -> Shape:
    """A :class:`Shape` from a built-in name (:data:`SHAPES`), a config.json, a model directory, or a
    hub id already in the local Hugging Face cache (never downloads)."""
    if model.lower() in SHAPES:
        return Shape.from_config(SHAPES[model.lower()])
    path = Path(model)
    if path.is_file():
        return Shape.from_config(json.loads(path.read_text()))
    if path.is_dir() and (path / "config.json").is_file():
        return Shape.from_config(json.loads((path / "config.json").read_text()))
    try:
        from transformers import AutoConfig

        return Shape.from_config(AutoConfig.from_pretrained(model, local_files_only=True))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"No config for {model!r}: not a built-in shape ({', '.join(SHAPES)}), not a config.json or "
            "model directory, and not in the local Hugging Face cache (the planner never downloads). "
            f"({error.__class__.__name__})"
        ) from None


def _gib(value: int) -> str:
    return f"{value / GIB:8.2f} GiB"


def plan(
    *,
    model: str,
    length: str = "128k",
    new_tokens: int = 16,
    batch: int = 1,
    gpus: int = 1,
    dtype: str = "bf16",
    kv_dtype: str = "bf16",
    prefill_chunk: int | None = None,
    pretraining_length: int | None = None,
    attn_implementation: str = "sdpa",
    cache: str = "dynamic",
    padded: bool = False,
    gpu_memory: str = "139GiB",
    reserve: str = "1GiB",
) -> int:
    """Predict the GPU memory of a long prompt with DCA from the model's config alone: weights, KV cache, prefill peak.

    Prints each part per GPU, the prefill peak one-shot and in pieces, and whether each fits.
    Returns 0 when the chunked plan fits, 1 when it does not. Formulas: chunkllama.planner.

    Args:
        model: built-in shape (llama-3-8b, llama-2-7b, llama-3-70b, smollm2-135m, qwen2.5-7b), a
            config.json, a model directory, or a hub id already in the local HF cache.
        length: prompt tokens, e.g. 1M, 128k, 65536 (k/M are powers of 1024).
        new_tokens: tokens generated after the prompt (their cache counts too).
        batch: prompts prefilled together.
        gpus: tensor-parallel GPUs (heads and MLP columns split evenly).
        dtype: weights and activations: bf16, fp16 or fp32.
        kv_dtype: KV cache elements: bf16, fp16, fp32 or fp8 (apply_dca(..., kv_cache_dtype="fp8"): e4m3 + a scale per token and head).
        prefill_chunk: tokens per prefill piece; default: the patched generate's, two DCA chunk_len strides.
        pretraining_length: the model's window for DCA; default: max_position_embeddings.
        attn_implementation: the model's attention setting (sdpa, eager or flash); checked, and no longer changes
            the estimate since the patched model builds no mask.
        cache: dynamic (grows by copying) or static (preallocated).
        padded: whether the batch has left padding (kept for callers; no effect on the estimate: no mask is built).
        gpu_memory: memory of one GPU, e.g. 139GiB (what an H200 leaves to PyTorch, about), 80GB.
        reserve: CUDA context and allocator slack added to every total.
    """
    shape = load_shape(model)
    tokens = parse_size(length, what="length")
    dca = DCAConfig(pretraining_length or shape.pretraining_length or 4096)
    result = make_plan(
        shape, length=tokens, new_tokens=new_tokens, batch=batch, dtype=dtype, kv_dtype=kv_dtype, gpus=gpus,
        prefill_chunk=prefill_chunk, dca=dca, attn_implementation=attn_implementation, cache=cache, padded=padded,
        reserve=parse_size(reserve, what="reserve"), gpu_memory=parse_size(gpu_memory, what="GPU memory"),
    )
    print(f"{model}: {shape.params() / 1e9:.2f}B params, {shape.layers} layers, {shape.kv_heads} KV heads x {shape.head_dim}")
    print(f"prompt {tokens:,} + {new_tokens} tokens, batch {batch}, {gpus} GPU(s), {dtype} weights, {kv_dtype} cache, "
          f"DCA chunk_len {dca.chunk_len}")
    print(f"weights            {_gib(result.weights)}")
    print(f"KV cache           {_gib(result.kv_cache)}")
    memory = _gib(result.gpu_memory).strip()
    print(f"prefill, one shot  {_gib(result.prefill_peak_one_shot)}   total {_gib(result.total(False))}   "
          f"{'fits' if result.fits(False) else 'does NOT fit'} in {memory}")
    print(f"prefill, pieces of {result.prefill_chunk:,} tokens {_gib(result.prefill_peak_chunked)}   "
          f"total {_gib(result.total(True))}   {'fits' if result.fits(True) else 'does NOT fit'} in {memory}")
    return 0 if result.fits(True) else 1
