"""Gradients of the reference DCA path against the float64 dense oracle's autograd gradients.

The op gets unrotated keys rotated inside the graph (``apply_rope`` at ``p % chunk_len``, as the
patched model caches them), so ``dK`` includes the key rotation; the oracle rotates its own copy
in float64. Loss: ``sum(out * G)`` with a fixed random ``G``.
"""

from __future__ import annotations

import pytest
import torch

from chunkllama import DCAConfig, dca_attention
from chunkllama.attention import fused_parts
from chunkllama.attention.autograd import attention_backward, needs_grad
from chunkllama.attention.reference import blocked_dca_attention
from chunkllama.rope import RotaryParams, apply_rope
from oracle import oracle_attention
from tiny_models import CHUNK_LEN, CHUNK_SIZE, PRETRAINING_LENGTH

CFG = DCAConfig(PRETRAINING_LENGTH)
TOL = 1e-5
# Every chunk boundary of a 3-chunk sequence ±1, and one length inside the first chunk.
LENGTHS = (7, 19, 20, 21, 39, 40, 41, 59, 60, 61)


def _inv_freq(head_dim: int) -> torch.Tensor:
    return 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _case(batch, q_heads, kv_heads, length, seed, pads=None, q_len=None):
    gen = torch.Generator().manual_seed(seed)
    q_len = q_len or length
    q = torch.randn(batch, q_heads, q_len, 16, generator=gen)
    k = torch.randn(batch, kv_heads, length, 16, generator=gen)
    v = torch.randn(batch, kv_heads, length, 16, generator=gen)
    g = torch.randn(batch, q_heads, q_len, 16, generator=gen)
    pads = pads or [0] * batch
    k_pos = torch.stack([torch.arange(length) - p for p in pads])
    return q, k, v, g, k_pos[:, length - q_len :].clone(), k_pos


def _grads(fn, q, k, v, g):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    (out.to(g.dtype) * g).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _oracle_grads(q, k, v, g, q_pos, k_pos):
    inv_freq = _inv_freq(q.shape[-1])

    def fn(q_, k_, v_):
        return oracle_attention(q_, k_, v_, q_pos, k_pos, inv_freq, CHUNK_LEN, CHUNK_SIZE)

    return _grads(fn, q.double(), k.double(), v.double(), g.double())


def _dca_grads(q, k, v, g, q_pos, k_pos, op="dca_attention"):
    rope = RotaryParams(_inv_freq(q.shape[-1]))
    key_rotation = torch.remainder(k_pos.clamp(min=0), CHUNK_LEN)

    def fn(q_, k_, v_):
        k_rot = apply_rope(k_, rope, key_rotation)
        if op == "blocked":
            return blocked_dca_attention(q_, k_rot, v_, q_pos, k_pos, rope, CFG, 0.25, block_q=8, block_k=8)
        return dca_attention(q_, k_rot, v_, q_pos, k_pos, rope, CFG, scale=0.25, backend="reference")

    return _grads(fn, q, k, v, g)


def _assert_close(q, k, v, g, q_pos, k_pos, op="dca_attention"):
    want_out, want = _oracle_grads(q, k, v, g, q_pos, k_pos)
    got_out, got = _dca_grads(q, k, v, g, q_pos, k_pos, op)
    assert (got_out.double() - want_out).abs().max().item() <= TOL
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        err = (a.double() - b).abs().max().item()
        assert err <= TOL, f"d{name}: max abs err {err:.3g} (max |grad| {b.abs().max().item():.3g})"
        assert b.abs().max().item() > 1e-2  # the comparison is not vacuous


@pytest.mark.parametrize("length", LENGTHS)
def test_gradients_match_oracle_at_chunk_boundaries(length):
    assert CFG.chunk_len == CHUNK_LEN
    q, k, v, g, q_pos, k_pos = _case(2, 4, 2, length, seed=length)
    _assert_close(q, k, v, g, q_pos, k_pos)


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_gradients_match_oracle_gqa_ratios(kv_heads):
    q, k, v, g, q_pos, k_pos = _case(1, 4, kv_heads, 45, seed=kv_heads)
    _assert_close(q, k, v, g, q_pos, k_pos)


@pytest.mark.parametrize("pads", [[0, 3], [21, 5], [40, 0]])
def test_gradients_match_oracle_with_left_padding(pads):
    q, k, v, g, q_pos, k_pos = _case(2, 4, 2, 61, seed=sum(pads), pads=pads)
    _assert_close(q, k, v, g, q_pos, k_pos)


def test_gradients_match_oracle_queries_after_a_cached_prefix():
    """Chunked prefill: 25 new queries over 62 keys (the first 37 already cached), padded row."""
    q, k, v, g, q_pos, k_pos = _case(2, 4, 2, 62, seed=7, pads=[0, 4], q_len=25)
    _assert_close(q, k, v, g, q_pos, k_pos)


def test_blocked_path_gradients_match_oracle():
    q, k, v, g, q_pos, k_pos = _case(2, 4, 2, 50, seed=3, pads=[0, 6])
    _assert_close(q, k, v, g, q_pos, k_pos, op="blocked")


def test_forward_is_the_same_with_and_without_grad():
    q, k, v, _, q_pos, k_pos = _case(2, 4, 2, 61, seed=11, pads=[0, 9])
    rope = RotaryParams(_inv_freq(16))
    k_rot = apply_rope(k, rope, torch.remainder(k_pos.clamp(min=0), CHUNK_LEN))
    plain = dca_attention(q, k_rot, v, q_pos, k_pos, rope, CFG, backend="reference")
    traced = dca_attention(q.requires_grad_(True), k_rot, v, q_pos, k_pos, rope, CFG, backend="reference")
    assert traced.requires_grad
    torch.testing.assert_close(traced.detach(), plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_piece_backward_includes_the_lse_gradient(causal):
    """One fused piece with a loss on both outputs: its gradients equal plain autograd's."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    g_out, g_lse = torch.randn(1, 2, 33, 16, generator=gen), torch.randn(1, 2, 33, generator=gen)

    def dense(q_, k_, v_):
        scores = q_ @ k_.transpose(-1, -2) * 0.3
        if causal:
            scores = scores.masked_fill(torch.ones(33, 33, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(scores, -1) @ v_, torch.logsumexp(scores, -1)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = dense(*leaves)
    ((out * g_out).sum() + (lse * g_lse).sum()).backward()
    got = attention_backward(q, k, v, out.detach().float(), lse.detach().float(), g_out, g_lse, 0.3, causal)
    for a, b in zip(got, leaves):
        torch.testing.assert_close(a, b.grad, rtol=0, atol=1e-5)

    fused = [t.float().requires_grad_(True) for t in (q, k, v)]
    out32, lse32 = fused_parts.attend(*fused, 0.3, causal=causal)
    ((out32 * g_out).sum() + (lse32 * g_lse).sum()).backward()
    for a, b in zip(fused, leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=1e-5)


def test_needs_grad():
    x = torch.zeros(1, requires_grad=True)
    assert needs_grad(x) and needs_grad(x.detach(), x)
    assert not needs_grad(x.detach())
    with torch.no_grad():
        assert not needs_grad(x)


def test_memory_saved_for_backward_is_linear_in_length():
    """What autograd keeps for the backward (unique storages) grows linearly: no T×T tensor is saved."""

    def saved_bytes(length):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        q, k, v, _, q_pos, k_pos = _case(1, 4, 2, length, seed=1)
        rope = RotaryParams(_inv_freq(16))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            dca_attention(q.requires_grad_(True), k, v, q_pos, k_pos, rope, CFG, backend="reference")
        return sum(storages.values())

    small, large = saved_bytes(400), saved_bytes(1600)  # measured: 1.09 MB and 4.56 MB
    score_matrix = 4 * 1600 * 1600 * 4  # one fp32 (Hq, T, T) score matrix at T = 1600: 41 MB
    assert large < score_matrix / 5, (large, score_matrix)
    assert large < 4.5 * small  # 4x the length: about 4x the memory, not 16x
