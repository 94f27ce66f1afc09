"""Per-instance DCA patching of Hugging Face attention modules.

``apply_dca(model)`` replaces the ``forward`` of every supported attention module of *that*
model instance (other instances and the class are untouched) with :func:`dca_attention_forward`,
which projects q/k/v exactly like the original, rotates keys at their chunk-relative position
before they enter the KV cache, and calls :func:`chunkllama.attention.dca_attention`.
``remove_dca(model)`` puts everything back as it was.

Family differences are data (:data:`FAMILIES`), not copies of the forward.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
from typing import Any, Mapping

import torch
from torch import nn

from .attention import LoadedBackend, dca_attention, load_backend, quantize_keys_values, rotate_keys
from .attention.autograd import needs_grad
from .attention.fp8 import check_kv_cache_dtype
from .compat import cached_length, pick_cache, stored_dtype, update_cache
from .config import DCAConfig
from .prefill import disable_chunked_prefill, enable_chunked_prefill, resolve_prefill_chunk_size
from .positions import step_positions
from .rope import RotaryParams


@dataclasses.dataclass(frozen=True)
class Family:
    """What differs between supported model families' attention modules."""

    name: str
    model_types: tuple[str, ...]
    qk_norm: bool = False  # Qwen3 normalises q and k per head before RoPE


FAMILIES: dict[str, Family] = {
    "LlamaAttention": Family("Llama 2/3/3.1", ("llama",)),
    "MistralAttention": Family("Mistral", ("mistral",)),
    "MixtralAttention": Family("Mixtral", ("mixtral",)),
    "Qwen2Attention": Family("Qwen2 / Qwen2.5", ("qwen2",)),
    "Qwen3Attention": Family("Qwen3", ("qwen3",), qk_norm=True),
}
SUPPORTED_MODELS = ", ".join(f.name for f in FAMILIES.values())

_LAYER_STATE = "_chunkllama_dca"
_MODEL_STATE = "_chunkllama_dca_model"
#: keyword argument through which the base model's pre-hook hands every layer this forward's positions
STEP_KWARG = "dca_step_positions"


@dataclasses.dataclass(frozen=True)
class _AttentionPatch:
    """What a patched attention module needs at call time (kept on the module itself)."""

    config: DCAConfig
    family: Family
    rotary: nn.Module
    backend: LoadedBackend
    original_forward: Any  # the instance-level forward that was there before (usually none)
    kv_cache_dtype: str = "auto"  # "fp8": keys/values stored and read as packed e4m3 rows (attention.fp8)
    logit_scale: float = 1.0  # multiplies the attention logits (the softmax scale) of every relation
    logn: tuple[float, int] | None = None  # (coef, base) of the per-query log-n temperature, None = off
    # this layer's chunk_len differs from the model's (``layer_windows``): it rotates its keys itself
    own_rotation: bool = False


@dataclasses.dataclass(frozen=True)
class _ModelPatch:
    """Model-level changes, so that :func:`remove_dca` can undo them exactly."""

    config: DCAConfig
    backend: str
    kv_cache_dtype: str = "auto"
    # (module, attribute, original value): config objects swapped for this instance's own copies
    config_swaps: tuple[tuple[nn.Module, str, Any], ...] = ()
    # (name, original instance attribute or _MISSING) of the model's methods replaced per instance
    method_swaps: tuple[tuple[str, Any], ...] = ()
    hook: tuple[nn.Module, int] | None = None  # (base model, hook id) of _prepare_forward
    logit_scale: float = 1.0
    logn: tuple[float, int] | None = None
    layer_windows: tuple[tuple[int, int], ...] = ()  # (layer index, its pretraining_length), sorted


class _Missing:
    """Marks "there was no instance attribute"; one object, also across copy.deepcopy and pickle."""

    def __deepcopy__(self, memo: dict) -> "_Missing":
        return self

    def __copy__(self) -> "_Missing":
        return self

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING = _Missing()
_INPUT_ARGS = ("input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds")

ATTENTION_MAPS_ERROR = (
    "output_attentions=True is not available with Dual Chunk Attention: DCA never forms the attention "
    "matrix (it attends chunk by chunk and merges partial softmax results), so there are no attention "
    "weights to return. Call without output_attentions, or remove_dca(model) first to get the plain "
    "model's attention maps (exact only within the pretraining window)."
)


FP8_GRAD_ERROR = (
    "kv_cache_dtype='fp8' is for inference: quantizing keys and values to FP8 has no gradient. Run under "
    "torch.no_grad() / torch.inference_mode(), or apply_dca(model, kv_cache_dtype='auto') to train."
)


FP8_CACHE_ERROR = (
    "kv_cache_dtype='fp8' stores keys/values as packed FP8 rows (uint8), but this {} already holds {} "
    "tensors: it was filled without the FP8 option, or preallocated in the model's dtype (a static cache with "
    "chunked prefill). Use a fresh DynamicCache (what generate builds by default), or prefill_chunk_size=None "
    "with cache_implementation='static'."
)


def _refuse_attention_maps(asked: Any) -> None:
    if asked:
        raise ValueError(ATTENTION_MAPS_ERROR)


def _prepare_forward(chunk_len: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook on the patched base model: this forward's positions, once for all layers.

    - Padded batches given without position ids: DCA reads padding and chunk positions from
      ``position_ids`` and never from the attention mask, but a plain call such as
      ``model(**tokenizer(texts, padding=True))`` passes a 2D mask and no position ids, so HF
      numbers the pad tokens too. Such calls get the position ids ``generate`` would pass (counted
      from each row's first real token, pads at 1) — computed from the mask without reading it on
      the host (a mask without padding gives the plain positions).
    - :class:`~chunkllama.positions.StepPositions` for this step, handed to every patched layer
      through ``kwargs[STEP_KWARG]`` (the base model passes its extra kwargs down to the layers).
    - ``output_attentions=True`` (argument or config) is refused with a clear error.
    """
    given = dict(zip(_INPUT_ARGS, args))
    given.update({name: kwargs[name] for name in _INPUT_ARGS if name in kwargs})
    _refuse_attention_maps(kwargs.get("output_attentions", getattr(getattr(module, "config", None), "output_attentions", False)))
    tokens = given.get("input_ids")
    tokens = tokens if tokens is not None else given.get("inputs_embeds")
    if tokens is None:
        return args, kwargs
    batch, q_len = tokens.shape[:2]
    positions = given.get("position_ids")
    mask = given.get("attention_mask")
    if positions is None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
        mask = mask.to(torch.long)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -q_len:]
        if len(args) > 2:
            args = args[:2] + (positions,) + args[3:]
        else:
            kwargs["position_ids"] = positions
    cache = pick_cache(given.get("cache"), kwargs.get("past_key_values"))
    kwargs[STEP_KWARG] = step_positions(
        positions, batch, q_len, cached_length(cache, 0, kwargs), chunk_len, tokens.device,
        check_rows=not torch.compiler.is_compiling(),
    )
    if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        args, kwargs = _without_mask_building(args, kwargs, batch, q_len, tokens.device)
    return args, kwargs


def _without_mask_building(args: tuple, kwargs: dict, batch: int, q_len: int, device: torch.device) -> tuple[tuple, dict]:
    """Hand the base model a placeholder 4D mask so that it builds none.

    The patched layers never read the mask (padding and causality come from the positions computed
    above), but the base model would still build one per forward: transformers returns a given 4D
    mask untouched, and otherwise materialises ``(B, 1, Tq, Tk)`` booleans whenever queries and keys
    differ in length — each piece of a chunked prefill, 5 GiB per piece at a 1M-token cache.
    The placeholder ``(B, 1, Tq, 1)`` is all True (it masks nothing, should anything read it).
    """
    placeholder = torch.ones(batch, 1, q_len, 1, dtype=torch.bool, device=device)
    if len(args) > 1:
        return args[:1] + (placeholder,) + args[2:], kwargs
    kwargs["attention_mask"] = placeholder
    return args, kwargs


def _rotary_params(rotary: nn.Module) -> RotaryParams:
    # Read at call time: dynamic-NTK rotaries change inv_freq with the sequence length.
    return RotaryParams(rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)))


def dca_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Drop-in ``forward`` for a patched attention module.

    Args:
        hidden_states: ``(B, T, hidden)``.
        position_embeddings: the model's ``(cos, sin)`` for the true positions; unused, since DCA
            rotates at chunk-relative positions from the rotary module's own frequencies.
        attention_mask: unused: padding is read from ``position_ids`` (see
            :func:`chunkllama.positions.row_offsets`), causality from positions.
        past_key_values / cache: the HF cache (name depends on the transformers release).
        kwargs: ``STEP_KWARG`` (this forward's positions, from the base model's pre-hook), else
            ``position_ids`` ``(B, T)`` or ``(1, T)`` when positions are not simply ``past .. past+T-1``.
    Returns:
        ``(attn_output (B, T, hidden), None)``.

    Nothing here reads a tensor on the host (no device sync per layer), so decoding runs ahead of
    the device and ``torch.compile(fullgraph=True)`` traces it.
    """
    patch: _AttentionPatch = getattr(self, _LAYER_STATE)
    _refuse_attention_maps(kwargs.get("output_attentions"))
    cache = pick_cache(cache, past_key_values)
    batch, q_len = hidden_states.shape[:2]
    head_shape = (batch, q_len, -1, self.head_dim)

    query = self.q_proj(hidden_states).view(head_shape)
    key = self.k_proj(hidden_states).view(head_shape)
    if patch.family.qk_norm:
        query, key = self.q_norm(query), self.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    value = self.v_proj(hidden_states).view(head_shape).transpose(1, 2)

    step = kwargs.pop(STEP_KWARG, None)
    if step is None:  # called without the patched base model around it
        step = step_positions(
            kwargs.get("position_ids"), batch, q_len, cached_length(cache, self.layer_idx, kwargs),
            patch.config.chunk_len, hidden_states.device, check_rows=not torch.compiler.is_compiling(),
        )
    rope = _rotary_params(patch.rotary)
    rotation = step.key_rotation_for(patch.config.chunk_len) if patch.own_rotation else step.key_rotation
    key = rotate_keys(key, rope, rotation, patch.backend)
    if patch.kv_cache_dtype == "fp8":
        # Quantized before the cache, with or without one: every forward reads exactly what a cache would
        # hold, so prefill in pieces, one-shot prefill and decode all see the same keys and values.
        if needs_grad(key, value):
            raise NotImplementedError(FP8_GRAD_ERROR)
        key, value = quantize_keys_values(key, value, patch.backend)
        if cache is not None and stored_dtype(cache, self.layer_idx) not in (None, torch.uint8):
            raise ValueError(FP8_CACHE_ERROR.format(type(cache).__name__, stored_dtype(cache, self.layer_idx)))
    if cache is not None:
        key, value = update_cache(cache, key, value, self.layer_idx, kwargs)
    if patch.logn is not None:
        # scaling a query row scales all its logits (every relation's rotation is linear in the query)
        factors = step.logn_factors(*patch.logn)[:, None, :, None]
        query = (query.float() * factors).to(query.dtype)

    out = dca_attention(
        query, key, value, step.query, step.keys(key.shape[2]), rope, patch.config,
        scale=self.scaling * patch.logit_scale, backend=patch.backend,
    )
    out = out.transpose(1, 2).reshape(batch, q_len, -1)
    return self.o_proj(out), None


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _find_rotary(model: nn.Module) -> nn.Module:
    candidates = [m for m in model.modules() if hasattr(m, "inv_freq") and type(m).__name__.endswith("RotaryEmbedding")]
    if len(candidates) != 1:
        raise ValueError(
            f"chunkllama needs exactly one rotary embedding module in {type(model).__name__}, found "
            f"{len(candidates)}. Supported models: {SUPPORTED_MODELS}."
        )
    return candidates[0]


def _attention_modules(model: nn.Module) -> list[tuple[nn.Module, Family]]:
    found = [(m, FAMILIES[type(m).__name__]) for m in model.modules() if type(m).__name__ in FAMILIES]
    if not found:
        raise ValueError(
            f"chunkllama does not support {type(model).__name__}: none of its modules is a supported "
            f"attention class ({', '.join(FAMILIES)}). Supported models: {SUPPORTED_MODELS}."
        )
    return found


def default_pretraining_length(model: nn.Module) -> int:
    """The window a model declares: ``max_position_embeddings`` of its (text) config."""
    config = _text_config(model)
    length = getattr(config, "max_position_embeddings", None)
    if not isinstance(length, int) or length <= 0:
        raise ValueError(
            f"Cannot infer the pretraining length of {type(model).__name__}; "
            "pass pretraining_length=... (e.g. 4096 for Llama-2, 8192 for Llama-3)."
        )
    return length


def _resolve_config(
    model: nn.Module,
    pretraining_length: int | DCAConfig | None,
    chunk_size: int | None,
    local_window: int | None,
) -> DCAConfig:
    if isinstance(pretraining_length, DCAConfig):
        if chunk_size is not None or local_window is not None:
            raise ValueError("Pass either a DCAConfig or chunk_size/local_window, not both.")
        return pretraining_length
    if pretraining_length is None:
        from_config = DCAConfig.from_model_config(_text_config(model))
        if from_config is not None and chunk_size is None and local_window is None:
            return from_config
        pretraining_length = from_config.pretraining_length if from_config else default_pretraining_length(model)
    return DCAConfig(pretraining_length, chunk_size=chunk_size, local_window=local_window)


def _window_changes(text_config: Any) -> dict[str, Any]:
    """Config values DCA needs changed: it replaces windowed attention, so the KV cache must keep
    every key (transformers sizes its caches and masks from ``layer_types`` / ``sliding_window``)."""
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        if "sliding_attention" in layer_types:
            return {"layer_types": ["full_attention"] * len(layer_types)}
        return {}
    if getattr(text_config, "sliding_window", None) is not None:
        return {"sliding_window": None}
    return {}


def _own_config(model: nn.Module) -> tuple[tuple[nn.Module, str, Any], ...]:
    """Give this instance its own copy of its config where DCA must change it; returns the swaps.

    transformers shares one config object between every model built from it, so DCA never edits
    that object: it deep-copies it, changes the copy, and points every module of this instance
    that held the shared object (or its text sub-config) at the copy. :func:`remove_dca` points
    them back.
    """
    top = getattr(model, "config", None)
    text = _text_config(model)
    changes = _window_changes(text)
    if not changes:
        return ()
    own_top = copy.deepcopy(top)
    own_text = own_top.get_text_config(decoder=True) if text is not top else own_top
    for name, value in changes.items():
        setattr(own_text, name, value)
    swaps = []
    for module in model.modules():
        for attr, value in list(vars(module).items()):
            if value is top or value is text:
                swaps.append((module, attr, value))
                setattr(module, attr, own_top if value is top else own_text)
    return tuple(swaps)


def _original_config(holder: nn.Module) -> Any:
    """The config object this instance had before :func:`apply_dca` (shared with other models)."""
    state: _ModelPatch = holder.__dict__[_MODEL_STATE]
    for module, attr, value in state.config_swaps:
        if module is holder and attr == "config":
            return value
    return holder.config


def _save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` of a patched model: writes the model's original config (its own sliding
    window and layer types) plus ``dual_chunk_attention_config``, so that a plain load gets the
    original model and ``apply_dca`` of the load gets these DCA settings."""
    state: _ModelPatch = self.__dict__[_MODEL_STATE]
    saved = copy.deepcopy(_original_config(self))
    state.config.write_to_model_config(saved.get_text_config(decoder=True) if hasattr(saved, "get_text_config") else saved)
    own = self.config
    self.config = saved
    try:
        return type(self).save_pretrained(self, *args, **kwargs)
    finally:
        self.config = own


def _get_stopping_criteria(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``generate``'s stopping criteria without the "exceeded the model's predefined maximum length"
    warning: with DCA the model reads past ``max_position_embeddings`` on purpose."""
    from transformers.generation.stopping_criteria import MaxLengthCriteria

    criteria = type(self)._get_stopping_criteria(self, *args, **kwargs)
    for criterion in criteria:
        if isinstance(criterion, MaxLengthCriteria):
            criterion.max_position_embeddings = None
    return criteria


_MODEL_METHODS = {"save_pretrained": _save_pretrained, "_get_stopping_criteria": _get_stopping_criteria}


def _replace_methods(model: nn.Module) -> tuple[tuple[str, Any], ...]:
    swaps = []
    for name, method in _MODEL_METHODS.items():
        if callable(getattr(type(model), name, None)):
            swaps.append((name, model.__dict__.get(name, _MISSING)))
            object.__setattr__(model, name, types.MethodType(method, model))
    return tuple(swaps)


def apply_dca(
    model: nn.Module,
    pretraining_length: int | DCAConfig | None = None,
    chunk_size: int | None = None,
    local_window: int | None = None,
    *,
    backend: str = "auto",
    prefill_chunk_size: int | None = None,
    kv_cache_dtype: str = "auto",
    logit_scale: float = 1.0,
    logn_scale: float = 0.0,
    logn_base: int | None = None,
    layer_windows: Mapping[int, int] | None = None,
) -> nn.Module:
    """Enable Dual Chunk Attention on this model instance, in place; returns the model.

    Args:
        model: a supported HF causal LM (or its base model): Llama 2/3/3.1, Mistral, Mixtral,
            Qwen2/2.5, Qwen3.
        pretraining_length: the window the model was pretrained on, or a :class:`DCAConfig`.
            Defaults to the model config's ``dual_chunk_attention_config`` when present, else
            its ``max_position_embeddings``.
        chunk_size: defaults to ``3 * pretraining_length // 4``.
        local_window: defaults to ``pretraining_length // 8``.
        backend: attention backend, "auto" | "reference" | "triton".
        prefill_chunk_size: tokens per prefill piece this instance's ``generate`` uses when the
            caller sets none (transformers' own chunked prefill, so activation memory is bounded by
            the piece, not the prompt); default: two DCA ``chunk_len`` strides; 0 = prefill in one shot.
        kv_cache_dtype: ``"auto"`` keeps keys/values in the model's dtype; ``"fp8"`` stores them as
            e4m3 with one fp32 scale per token and KV head (:mod:`chunkllama.attention.fp8`), about
            half the KV cache memory (``1 + 4/head_dim`` bytes per element), read directly by the
            Triton kernels. Every forward then attends to the quantized keys/values, with or without
            a cache (so perplexity measures it too). Inference only; works with the caches
            ``generate`` builds, no special cache needed.
        logit_scale: an attention temperature for retrieval studies (issue 14): every attention logit
            is multiplied by it (the softmax scale becomes ``logit_scale / sqrt(head_dim)``; > 1
            sharpens the attention over many chunks, as Qwen2.5-1M's length-dependent temperature
            does). Default 1.0, the paper's DCA. Not written by ``save_pretrained``.
        logn_scale: a per-query attention temperature for retrieval studies (issue 14): the logits of
            the query at position ``p`` are multiplied by ``max(1, 1 + logn_scale * ln((p + 1) /
            logn_base))`` (on top of ``logit_scale``), so tokens inside the first ``logn_base``
            positions are unchanged and later ones attend more sharply. Causal: cached generation
            gives what a full forward gives. Default 0.0 (off, the paper's DCA).
        logn_base: where the temperature starts; default the DCA ``pretraining_length``. Not
            written by ``save_pretrained`` (neither is ``logn_scale``).
        layer_windows: ``{layer index: pretraining_length}`` for layers that run DCA set up for
            another window than the rest (its default ``chunk_size`` / ``local_window``), e.g. a
            small window in the layers that retrieve and the model's own in the others (issue 14).
            Such a layer rotates its keys at its own ``position % chunk_len``. Not written by
            ``save_pretrained``; ``get_dca_config`` reports the other layers' config.

    Calling it again replaces the previous DCA settings (applying the same settings twice is the
    same as once). The model's own rope scaling (linear, dynamic NTK, YaRN, llama3) is kept.
    """
    loaded = load_backend(backend)
    check_kv_cache_dtype(kv_cache_dtype)
    logit_scale = _check_logit_scale(logit_scale)
    config = _resolve_config(model, pretraining_length, chunk_size, local_window)
    logn = _check_logn(logn_scale, logn_base, config.pretraining_length)
    prefill = resolve_prefill_chunk_size(config, prefill_chunk_size)
    modules = _attention_modules(model)
    layer_configs = _layer_configs(layer_windows, len(modules))
    rotary = _find_rotary(model)
    remove_dca(model)
    config_swaps = _own_config(model)
    for index, (module, family) in enumerate(modules):
        original = module.__dict__.get("forward", _MISSING)
        layer_config = layer_configs.get(getattr(module, "layer_idx", index), config)
        patch = _AttentionPatch(layer_config, family, rotary, loaded, original, kv_cache_dtype, logit_scale, logn,
                                own_rotation=layer_config.chunk_len != config.chunk_len)
        object.__setattr__(module, _LAYER_STATE, patch)
        module.forward = types.MethodType(dca_attention_forward, module)
    hook = None
    base = next((m for m in model.modules() if getattr(m, "rotary_emb", None) is rotary), None)
    if base is not None:
        handle = base.register_forward_pre_hook(functools.partial(_prepare_forward, config.chunk_len), with_kwargs=True)
        hook = (base, handle.id)
    method_swaps = _replace_methods(model)
    object.__setattr__(model, _MODEL_STATE,
                       _ModelPatch(config, backend, kv_cache_dtype, config_swaps, method_swaps, hook, logit_scale,
                                   logn, tuple(sorted((i, c.pretraining_length) for i, c in layer_configs.items()))))
    enable_chunked_prefill(model, prefill)
    return model


def _patched_holder(model: nn.Module) -> tuple[nn.Module, _ModelPatch] | None:
    """The module (the model itself or a submodule, e.g. its base model) that apply_dca patched."""
    for module in model.modules():
        state = module.__dict__.get(_MODEL_STATE)
        if state is not None:
            return module, state
    return None


def remove_dca(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_dca` on this instance exactly; a no-op on an unpatched model. Returns the model."""
    disable_chunked_prefill(model)
    found = _patched_holder(model)
    if found is None:
        return model
    holder, state = found
    for module in holder.modules():
        patch = module.__dict__.get(_LAYER_STATE)
        if patch is None:
            continue
        del module.forward
        if patch.original_forward is not _MISSING:
            module.forward = patch.original_forward
        object.__delattr__(module, _LAYER_STATE)
    if state.hook is not None:
        # by id, not through the handle: a deep-copied model carries its own copy of the hook
        base, hook_id = state.hook
        base._forward_pre_hooks.pop(hook_id, None)
        base._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    for module, attr, value in state.config_swaps:
        setattr(module, attr, value)
    for name, original in state.method_swaps:
        object.__delattr__(holder, name)
        if original is not _MISSING:
            object.__setattr__(holder, name, original)
    object.__delattr__(holder, _MODEL_STATE)
    return model


def get_dca_config(model: nn.Module) -> DCAConfig | None:
    """The DCA config this model instance runs with, read back from the patch (None if unpatched)."""
    found = _patched_holder(model)
    return found[1].config if found else None


def _check_logit_scale(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"logit_scale must be a positive finite number (1.0 = the paper's DCA), got {value!r}.")
    return float(value)


def _check_logn(coef: Any, base: Any, default_base: int) -> tuple[float, int] | None:
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
        raise ValueError(f"logn_scale must be a finite number >= 0 (0 = off, the paper's DCA), got {coef!r}.")
    if base is not None and (isinstance(base, bool) or not isinstance(base, int) or base < 1):
        raise ValueError(f"logn_base must be a positive number of tokens (default: pretraining_length), got {base!r}.")
    if coef == 0:
        return None
    return float(coef), int(base if base is not None else default_base)


def _layer_configs(layer_windows: Any, num_layers: int) -> dict[int, DCAConfig]:
    if layer_windows is None:
        return {}
    if not isinstance(layer_windows, Mapping):
        raise ValueError(f"layer_windows must map layer indices to window lengths, e.g. {{20: 2048}}; got {layer_windows!r}.")
    configs = {}
    for layer, window in layer_windows.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"layer_windows: layer {layer!r} is not a layer index of this model (0..{num_layers - 1}).")
        if isinstance(window, bool) or not isinstance(window, int):
            raise ValueError(f"layer_windows: the window of layer {layer} must be a number of tokens, got {window!r}.")
        configs[layer] = DCAConfig(window)
    return configs


def get_layer_windows(model: nn.Module) -> dict[int, int] | None:
    """``{layer index: pretraining_length}`` of the layers set up with their own window ({} if none); None if unpatched."""
    found = _patched_holder(model)
    return dict(found[1].layer_windows) if found else None


def get_logn_scaling(model: nn.Module) -> tuple[float, int] | None:
    """``(logn_scale, logn_base)`` of this patched instance, None when off or unpatched."""
    found = _patched_holder(model)
    return found[1].logn if found else None


def get_logit_scale(model: nn.Module) -> float | None:
    """The attention logit scale this patched instance runs with (1.0 by default); None if unpatched."""
    found = _patched_holder(model)
    return found[1].logit_scale if found else None


def get_kv_cache_dtype(model: nn.Module) -> str | None:
    """The KV cache dtype this patched instance stores ("auto" or "fp8"); None if unpatched."""
    found = _patched_holder(model)
    return found[1].kv_cache_dtype if found else None


def is_dca_applied(model: nn.Module) -> bool:
    return get_dca_config(model) is not None
