"""Per-instance DCA patching of Hugging Face attention modules.

``apply_dca(model)`` replaces the ``forward`` of every supported attention module of *that*
model instance (other instances and the class are untouched) with :func:`dca_attention_forward`,
which projects q/k/v exactly like the original, rotates keys at their chunk-relative position
before they enter the KV cache, and calls :func:`chunkllama.attention.dca_attention`.
``remove_dca(model)`` puts everything back as it was.

Family differences are data (:data:`FAMILIES`), not copies of the forward.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch
from torch import nn

from .attention import check_backend, dca_attention, rotate_keys
from .compat import cached_length, pick_cache, update_cache
from .config import DCAConfig
from .positions import key_rope_positions, positions_from_offsets, row_offsets
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


@dataclasses.dataclass(frozen=True)
class _AttentionPatch:
    """What a patched attention module needs at call time (kept on the module itself)."""

    config: DCAConfig
    family: Family
    rotary: nn.Module
    backend: str
    original_forward: Any  # the instance-level forward that was there before (usually none)


@dataclasses.dataclass(frozen=True)
class _ModelPatch:
    """Model-level changes, so that :func:`remove_dca` can undo them exactly."""

    config: DCAConfig
    backend: str
    saved_config_values: dict[str, Any]
    padding_hook: tuple[nn.Module, int] | None = None  # (base model, hook id) of _positions_from_padding


_MISSING = object()
_POSITION_ARGS = ("input_ids", "attention_mask", "position_ids")


def _positions_from_padding(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook on the patched base model: position ids for padded batches given without them.

    DCA reads padding and chunk positions from ``position_ids`` and never from the attention mask,
    but a plain call such as ``model(**tokenizer(texts, padding=True))`` passes a 2D mask and no
    position ids, so HF numbers the pad tokens too. Give such calls the position ids ``generate``
    would pass (counted from each row's first real token, pads at 1); calls that carry position ids
    or no padding are left alone.
    """
    given = dict(zip(_POSITION_ARGS, args))
    given.update({name: kwargs[name] for name in _POSITION_ARGS if name in kwargs})
    mask = given.get("attention_mask")
    if given.get("position_ids") is not None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    tokens = given.get("input_ids")
    tokens = tokens if tokens is not None else kwargs.get("inputs_embeds")
    if tokens is None or bool(mask.all()):
        return None
    mask = mask.to(torch.long)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -tokens.shape[1] :]
    if len(args) > 2:
        args = args[:2] + (positions,) + args[3:]
    else:
        kwargs["position_ids"] = positions
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
        kwargs: must carry ``position_ids`` ``(B, T)`` or ``(1, T)`` when positions are not simply
            ``past .. past+T-1``.
    Returns:
        ``(attn_output (B, T, hidden), None)``.
    """
    patch: _AttentionPatch = getattr(self, _LAYER_STATE)
    cache = pick_cache(cache, past_key_values)
    batch, q_len = hidden_states.shape[:2]
    head_shape = (batch, q_len, -1, self.head_dim)

    query = self.q_proj(hidden_states).view(head_shape)
    key = self.k_proj(hidden_states).view(head_shape)
    if patch.family.qk_norm:
        query, key = self.q_norm(query), self.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    value = self.v_proj(hidden_states).view(head_shape).transpose(1, 2)

    past = cached_length(cache, self.layer_idx)
    kv_len = past + q_len
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(past, kv_len, device=hidden_states.device).unsqueeze(0)
    offsets = row_offsets(position_ids.to(hidden_states.device), batch, q_len, kv_len)
    query_positions = positions_from_offsets(offsets, past, q_len)

    rope = _rotary_params(patch.rotary)
    key_rotation = key_rope_positions(query_positions.clamp(min=0), patch.config.chunk_len)
    key = rotate_keys(key, rope, key_rotation, patch.backend)
    if cache is not None:
        key, value = update_cache(cache, key, value, self.layer_idx, kwargs)
    key_positions = positions_from_offsets(offsets, 0, key.shape[2])

    out = dca_attention(
        query, key, value, query_positions, key_positions, rope, patch.config,
        scale=self.scaling, backend=patch.backend,
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


def _disable_sliding_window(model: nn.Module) -> dict[str, Any]:
    """DCA replaces windowed attention: keep the whole KV cache and build full causal masks.

    Returns the config values it changed, for :func:`remove_dca`.
    """
    config = _text_config(model)
    saved: dict[str, Any] = {}
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        if "sliding_attention" in layer_types:
            saved["layer_types"] = list(layer_types)
            config.layer_types = ["full_attention"] * len(layer_types)
    elif getattr(config, "sliding_window", None) is not None:
        saved["sliding_window"] = config.sliding_window
        config.sliding_window = None
    return saved


def apply_dca(
    model: nn.Module,
    pretraining_length: int | DCAConfig | None = None,
    chunk_size: int | None = None,
    local_window: int | None = None,
    *,
    backend: str = "auto",
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

    Calling it again replaces the previous DCA settings (applying the same settings twice is the
    same as once). The model's own rope scaling (linear, dynamic NTK, YaRN, llama3) is kept.
    """
    check_backend(backend)
    config = _resolve_config(model, pretraining_length, chunk_size, local_window)
    modules = _attention_modules(model)
    rotary = _find_rotary(model)
    remove_dca(model)
    saved = _disable_sliding_window(model)
    for module, family in modules:
        original = module.__dict__.get("forward", _MISSING)
        object.__setattr__(module, _LAYER_STATE, _AttentionPatch(config, family, rotary, backend, original))
        module.forward = types.MethodType(dca_attention_forward, module)
    padding_hook = None
    base = next((m for m in model.modules() if getattr(m, "rotary_emb", None) is rotary), None)
    if base is not None:
        handle = base.register_forward_pre_hook(_positions_from_padding, with_kwargs=True)
        padding_hook = (base, handle.id)
    object.__setattr__(model, _MODEL_STATE, _ModelPatch(config, backend, saved, padding_hook))
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
    if state.padding_hook is not None:
        # by id, not through the handle: a deep-copied model carries its own copy of the hook
        base, hook_id = state.padding_hook
        base._forward_pre_hooks.pop(hook_id, None)
        base._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    config = _text_config(holder)
    for name, value in state.saved_config_values.items():
        setattr(config, name, value)
    object.__delattr__(holder, _MODEL_STATE)
    return model


def get_dca_config(model: nn.Module) -> DCAConfig | None:
    """The DCA config this model instance runs with, read back from the patch (None if unpatched)."""
    found = _patched_holder(model)
    return found[1].config if found else None


def is_dca_applied(model: nn.Module) -> bool:
    return get_dca_config(model) is not None
