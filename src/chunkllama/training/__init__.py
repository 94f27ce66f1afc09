"""Supervised fine-tuning on long chats with DCA on: data formats, trainer wiring, the command.

Uses the public API (``apply_dca``, ``load_model``) and ``transformers.Trainer`` + ``peft``; the
core never imports this package. ``peft`` is an optional extra: ``pip install 'chunkllama[train]'``.
The names below are imported on first use (``chunkllama finetune --help`` imports no torch).
"""

_LAZY = {
    "ChatDataError": "data",
    "parse_chat": "data",
    "read_chats": "data",
    "tokenize_chat": "data",
    "tokenize_chats": "data",
    "SFTSettings": "sft",
    "load_finetuned": "sft",
    "train_sft": "sft",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
