"""Shared pytest setup for the core tests (the model factories live in :mod:`tiny_models`)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# tests/ on sys.path so that test modules in subfolders can `from oracle import ...`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The tensors here are tiny: intra-op threads only add synchronisation, and on a busy 2-core
# machine they make a 10 ms forward pass take a second. One thread keeps the suite fast.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
