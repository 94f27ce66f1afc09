"""Supervised fine-tuning on long chats with DCA on: data formats, trainer wiring, the command.

Uses the public API (``apply_dca``, ``load_model``) and ``transformers.Trainer`` + ``peft``; the
core never imports this package. ``peft`` is an optional extra: ``pip install 'chunkllama[train]'``.
"""

from .data import ChatDataError, parse_chat, read_chats, tokenize_chat, tokenize_chats
from .sft import SFTSettings, load_finetuned, train_sft

__all__ = [
    "ChatDataError",
    "SFTSettings",
    "load_finetuned",
    "parse_chat",
    "read_chats",
    "tokenize_chat",
    "tokenize_chats",
    "train_sft",
]
