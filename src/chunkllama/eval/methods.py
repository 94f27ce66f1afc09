"""Long-context methods applied to a loaded model, reversibly: none, pi, ntk, yarn, dca.

- ``none``: plain RoPE, the model as loaded.
- ``pi`` / ``ntk`` / ``yarn``: transformers' own rope scaling (``rope_type`` ``linear`` /
  ``dynamic`` / ``yarn``) with ``factor = target_len / pretraining_length`` and
  ``original_max_position_embeddings = pretraining_length``, written into the model config's
  ``rope_parameters``; the rotary embedding module is rebuilt from that config. When
  ``target_len <= pretraining_length`` the factor would be <= 1, so nothing is changed (the
  method is then plain RoPE, and the record says so).
- ``dca``: :func:`chunkllama.apply_dca` with its options (``chunk_size``, ``local_window``,
  ``backend``, ``kv_cache_dtype``: ``dca:kv_cache_dtype=fp8`` evaluates with the FP8 KV cache;
  ``logit_scale``: an attention temperature, ``dca:pretraining_length=4096,logit_scale=1.2``;
  ``logn_scale`` / ``logn_base``: a per-query temperature growing with the log of the position,
  ``dca:pretraining_length=4096,logn_scale=0.1,logn_base=8192``; ``layer_window`` with
  ``layer_window_layers``: DCA for another window in some layers, ``dca:layer_window=2048,layer_window_layers=16-29``).
  Without any length given, a model whose config records ``dual_chunk_attention_config`` (saved
  by ``chunkllama finetune``) is evaluated with those settings.

Every application returns a record of the configuration *as read back from the model*
(``rope_parameters`` of its config, the rotary module's class and attention scaling, the DCA
config from :func:`chunkllama.get_dca_config`), which goes into every result file.

Method specs are strings: ``"yarn"``, ``"dca"``, ``"dca:chunk_size=4096,local_window=512"``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Iterator

from torch import nn

from ..config import DCAConfig
from ..patching import (apply_dca, get_dca_config, get_kv_cache_dtype, get_layer_windows, get_logit_scale,
                        get_logn_scaling, remove_dca)
from .method_specs import METHOD_NAMES, MethodSpec, layers_of, parse_method, parse_methods  # noqa: F401 (re-exported)

ROPE_TYPES = {"pi": "linear", "ntk": "dynamic", "yarn": "yarn"}


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def pretraining_length_of(model: nn.Module) -> int:
    """The window the model was trained on: ``original_max_position_embeddings`` of an existing
    rope scaling, else ``max_position_embeddings``."""
    config = _text_config(model)
    rope = getattr(config, "rope_parameters", None) or {}
    original = rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None
    return int(original or config.max_position_embeddings)


def _find_rotary(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """(parent module, attribute name, rotary module) of the model's single rotary embedding."""
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "inv_freq"):
                found.append((parent, attr, child))
    if len(found) != 1:
        raise ValueError(f"Expected exactly one rotary embedding module, found {len(found)}.")
    return found[0]


def read_back(model: nn.Module) -> dict[str, Any]:
    """The long-context configuration the model runs with now, read from the model itself."""
    config = _text_config(model)
    _, _, rotary = _find_rotary(model)
    dca = get_dca_config(model)
    rope = getattr(config, "rope_parameters", None)
    return {
        "rope_parameters": copy.deepcopy(dict(rope)) if isinstance(rope, dict) else rope,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "rotary": {
            "class": type(rotary).__name__,
            "rope_type": getattr(rotary, "rope_type", None),
            "attention_scaling": float(getattr(rotary, "attention_scaling", 1.0)),
        },
        "dca": dca.to_dict() if dca is not None else None,
        **({"kv_cache_dtype": get_kv_cache_dtype(model), "logit_scale": get_logit_scale(model),
            "logn": get_logn_scaling(model), "layer_windows": get_layer_windows(model)} if dca is not None else {}),
    }


@dataclasses.dataclass
class AppliedMethod:
    """A method applied to a model; :meth:`restore` undoes it exactly."""

    spec: MethodSpec
    target_len: int
    model: nn.Module
    record: dict[str, Any]
    _saved_rope: Any = None
    _saved_rotary: tuple[nn.Module, str, nn.Module] | None = None
    _restored: bool = False

    def restore(self) -> None:
        if self._restored:
            return
        remove_dca(self.model)
        if self._saved_rotary is not None:
            parent, attr, rotary = self._saved_rotary
            _text_config(self.model).rope_parameters = self._saved_rope
            setattr(parent, attr, rotary)
        self._restored = True


def _rebuild_rotary(model: nn.Module, rope_parameters: dict[str, Any]) -> tuple[Any, tuple[nn.Module, str, nn.Module]]:
    config = _text_config(model)
    parent, attr, old = _find_rotary(model)
    saved_rope = copy.deepcopy(config.rope_parameters)
    config.rope_parameters = rope_parameters
    try:
        new = type(old)(config=config)
    except Exception:
        config.rope_parameters = saved_rope
        raise
    new = new.to(old.inv_freq.device)
    setattr(parent, attr, new)
    return saved_rope, (parent, attr, old)


def apply_method(
    model: nn.Module, spec: MethodSpec | str, target_len: int, pretraining_length: int | None = None
) -> AppliedMethod:
    """Apply ``spec`` to ``model`` for sequences of ``target_len`` tokens (in place).

    Args:
        pretraining_length: the model's original window; defaults to :func:`pretraining_length_of`.
    Returns:
        An :class:`AppliedMethod`; its ``record`` holds the configuration read back from the model.
    """
    if isinstance(spec, str):
        spec = parse_method(spec)
    if get_dca_config(model) is not None:
        raise RuntimeError("The model already has DCA applied; remove_dca(model) before applying a method.")
    window = int(spec.option("pretraining_length") or pretraining_length or pretraining_length_of(model))
    applied = AppliedMethod(spec, target_len, model, {})
    note = None
    if spec.name in ROPE_TYPES:
        factor = float(spec.option("factor") or target_len / window)
        if factor <= 1.0:
            note = f"factor {factor:g} <= 1: rope left unscaled"
        else:
            config = _text_config(model)
            rope = copy.deepcopy(dict(config.rope_parameters))
            rope.update(
                rope_type=ROPE_TYPES[spec.name], factor=factor, original_max_position_embeddings=window
            )
            applied._saved_rope, applied._saved_rotary = _rebuild_rotary(model, rope)
    elif spec.name == "dca":
        # a model whose config records DCA settings (fine-tuned with them) is evaluated with them
        # unless the caller or the method spec gives any length
        lengths = ("pretraining_length", "chunk_size", "local_window")
        explicit = pretraining_length or any(spec.option(k) for k in lengths)
        recorded = None if explicit else DCAConfig.from_model_config(_text_config(model))
        window = recorded.pretraining_length if recorded is not None else window
        apply_dca(
            model,
            recorded or window,
            chunk_size=spec.option("chunk_size"),
            local_window=spec.option("local_window"),
            backend=spec.option("backend", "auto"),
            kv_cache_dtype=spec.option("kv_cache_dtype", "auto"),
            logit_scale=spec.option("logit_scale", 1.0),
            logn_scale=spec.option("logn_scale", 0.0),
            logn_base=spec.option("logn_base"),
            layer_windows=_layer_windows(spec),
        )
    applied.record = {
        "method": spec.name,
        "label": spec.label,
        "options": dict(spec.options),
        "target_len": target_len,
        "pretraining_length": window,
        **({"note": note} if note else {}),
        **read_back(model),
    }
    return applied


@contextlib.contextmanager
def method_applied(
    model: nn.Module, spec: MethodSpec | str, target_len: int, pretraining_length: int | None = None
) -> Iterator[dict[str, Any]]:
    """Context manager: apply ``spec``, yield its read-back record, restore the model on exit."""
    applied = apply_method(model, spec, target_len, pretraining_length)
    try:
        yield applied.record
    finally:
        applied.restore()


def _layer_windows(spec: MethodSpec) -> dict[int, int] | None:
    """``layer_window`` / ``layer_window_layers`` of a dca spec as ``apply_dca``'s ``layer_windows``."""
    window, layers = spec.option("layer_window"), spec.option("layer_window_layers")
    if (window is None) != (layers is None):
        raise ValueError(f"{spec.label}: give layer_window and layer_window_layers together "
                         "(e.g. dca:layer_window=2048,layer_window_layers=16-29).")
    return None if window is None else {layer: window for layer in layers_of(layers)}
