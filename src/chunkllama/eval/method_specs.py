"""Method specs as typed on the command line — ``"yarn"``, ``"dca:chunk_size=4096,local_window=512"``
— parsed into :class:`MethodSpec` without importing torch (so ``--methods`` is checked before any
model loads). Applying a spec to a model is :mod:`chunkllama.eval.methods`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ..options import OptionError

METHOD_NAMES = ("none", "pi", "ntk", "yarn", "dca")
_ROPE_SCALED = ("pi", "ntk", "yarn")
def kv_cache_dtype(text: str) -> str:
    """``auto`` or ``fp8`` (see :func:`chunkllama.apply_dca`)."""
    if text not in ("auto", "fp8"):
        raise ValueError(text)
    return text


def layer_range(text: str) -> str:
    """Layers ``a-b`` (both included) or one layer ``a``, e.g. ``16-29``; returned as typed."""
    first, sep, last = text.partition("-")
    if not first.isdigit() or (sep and (not last.isdigit() or int(last) < int(first))):
        raise ValueError(text)
    return text


def layers_of(text: str) -> range:
    """The layer indices of a :func:`layer_range` string."""
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


_DCA_OPTIONS = {"chunk_size": int, "local_window": int, "backend": str, "pretraining_length": int,
                "kv_cache_dtype": kv_cache_dtype, "logit_scale": float, "logn_scale": float,
                "logn_base": int, "layer_window": int, "layer_window_layers": layer_range}
_ROPE_OPTIONS = {"factor": float}
ACCEPTED = ", ".join(METHOD_NAMES) + ", comma-separated; options like dca:chunk_size=4096,local_window=512"


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One method and its options, e.g. ``MethodSpec("dca", (("chunk_size", 4096),))``."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """Short name used in tables and plots: ``dca`` or ``dca(chunk_size=4096)``."""
        if not self.options:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={v}" for k, v in self.options) + ")"

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


def parse_method(text: str) -> MethodSpec:
    """Parse ``"name"`` or ``"name:key=value,key=value"``.

    Raises:
        OptionError (a ValueError): unknown method or option, or a malformed option value.
    """
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name not in METHOD_NAMES:
        raise OptionError(text.strip(), f"unknown method {name!r}", ACCEPTED)
    allowed = _DCA_OPTIONS if name == "dca" else (_ROPE_OPTIONS if name in _ROPE_SCALED else {})
    accepted = ", ".join(f"{k}=<{t.__name__}>" for k, t in allowed.items()) or f"no options for {name}"
    options: list[tuple[str, Any]] = []
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise OptionError(text.strip(), f"bad option {item!r} for method {name!r}", accepted)
        try:
            options.append((key, allowed[key](value.strip())))
        except ValueError:
            raise OptionError(text.strip(), f"{key}={value.strip()!r} is not {allowed[key].__name__}",
                              accepted) from None
    return MethodSpec(name, tuple(options))


def parse_methods(items: str | Sequence[str]) -> list[MethodSpec]:
    """Parse specs: ``["none,yarn", "dca:chunk_size=4096,local_window=512"]`` or all in one string,
    ``"none,yarn:factor=2,dca:chunk_size=4096,local_window=512"`` (a comma-separated piece holding
    ``=`` but no ``:`` continues the options of the method before it)."""
    if isinstance(items, str):
        items = [items]
    groups: list[str] = []
    for item in items:
        for piece in (p.strip() for p in item.split(",")):
            if not piece:
                continue
            if "=" in piece and ":" not in piece and groups and ":" in groups[-1]:
                groups[-1] += "," + piece
            else:
                groups.append(piece)
    specs = [parse_method(g) for g in groups]
    if not specs:
        raise OptionError(repr(",".join(items)), "no methods given", ACCEPTED)
    return specs


def methods(text: str) -> str:
    """Check a ``--methods`` value (see :func:`parse_methods`); returns it unchanged."""
    try:
        parse_methods(text)
    except OptionError as exc:
        raise OptionError(text, exc.problem, exc.accepted) from None  # name the whole value typed
    return text
