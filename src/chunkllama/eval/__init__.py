"""Evaluation of long-context behaviour (passkey retrieval so far).

Submodules are imported explicitly, e.g. ``from chunkllama.eval import passkey``.
"""

# Python API of `chunkllama eval ...` (commands.py), imported on first use:
#   run_ppl, run_passkey, run_needle, run_longqa; and the method helpers in methods.py.
_LAZY = {
    "run_ppl": "commands",
    "run_passkey": "commands",
    "run_needle": "commands",
    "run_longqa": "commands",
    "method_applied": "methods",
    "parse_methods": "methods",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
