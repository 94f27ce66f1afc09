"""The DCA op (``dca_attention`` and both paths of ``reference_dca_attention``) against the dense oracle.

Inputs are random tensors in HF's ``(batch, heads, seq, head_dim)`` layout; keys are handed to the
op rotated at ``position % chunk_len`` (as the KV cache holds them), unrotated to the oracle.
Paths: the *static* path (no host reads: decode, ``torch.compile``) runs for few query rows; the
*chunked* path for longer queries when every row's positions are contiguous and no block size is
forced; the *blocked* path when ``block_q``/``block_k`` are given or positions have gaps. Each is
also called directly.
"""

from __future__ import annotations

import pytest
import torch

from chunkllama import DCAConfig, dca_attention
from chunkllama.attention import reference as reference_module
from chunkllama.attention.reference import reference_dca_attention
from chunkllama.rope import RotaryParams
from tiny_models import CHUNK_LEN, CHUNK_SIZE, PRETRAINING_LENGTH
from oracle import oracle_attention, rope_cos_sin, rotate

CFG = DCAConfig(PRETRAINING_LENGTH)
assert (CFG.chunk_len, CFG.chunk_size) == (CHUNK_LEN, CHUNK_SIZE)
FP32_TOL = 1e-5


def _inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim=16, dtype=torch.float32, seed=0, value_dim=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=gen) * 1.5
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen) * 1.5
    v = torch.randn(batch, kv_heads, kv_len, value_dim or head_dim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _positions(batch, q_len, kv_len, pads=None):
    """Contiguous positions per row (``index - pad``); the queries are the last ``q_len`` keys."""
    pads = pads or [0] * batch
    k_pos = torch.stack([torch.arange(kv_len) - p for p in pads])
    return k_pos[:, kv_len - q_len :].clone(), k_pos


def _rotate_keys(k, k_pos, inv_freq, cfg, attention_scaling=1.0):
    """Keys as the patched model caches them: rotated at p % chunk_len, in their own dtype."""
    cos, sin = rope_cos_sin(torch.remainder(k_pos.clamp(min=0), cfg.chunk_len), inv_freq, attention_scaling)
    return rotate(k, cos[:, None].to(k.dtype), sin[:, None].to(k.dtype))


def _run(path, q, k_rot, v, q_pos, k_pos, rope, cfg, scale=None, blocks=(None, None)):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if path == "dca_attention":
        return dca_attention(q, k_rot, v, q_pos, k_pos, rope, cfg, scale=scale, backend="reference")
    if path == "chunked":
        return reference_dca_attention(q, k_rot, v, q_pos, k_pos, rope, cfg, scale)
    if path == "blocked":
        return reference_module.blocked_dca_attention(q, k_rot, v, q_pos, k_pos, rope, cfg, scale, *blocks)
    if path == "static":
        return reference_module.static_dca_attention(q, k_rot, v, q_pos, k_pos, rope, cfg, scale, *blocks)
    raise KeyError(path)


def _check_fp32(q, k, v, q_pos, k_pos, cfg=CFG, paths=("dca_attention", "chunked", "blocked", "static"), blocks=(None, None), att=1.0, scale=None):
    inv_freq = _inv_freq(q.shape[-1])
    rope = RotaryParams(inv_freq, att)
    expected = oracle_attention(q, k, v, q_pos, k_pos, inv_freq, cfg.chunk_len, int(cfg.chunk_size), scale=scale, attention_scaling=att)
    k_rot = _rotate_keys(k, k_pos, inv_freq, cfg, att)
    for path in paths:
        got = _run(path, q, k_rot, v, q_pos, k_pos, rope, cfg, scale, blocks)
        assert got.shape == expected.shape and got.dtype == q.dtype
        err = (got - expected).abs().max().item()
        assert err <= FP32_TOL, f"{path}: max abs err {err:.3g}"


# ----------------------------------------------------------------------------- fp32, prefill
@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # GQA ratios 1, 2, 4
@pytest.mark.parametrize("length", [1, 19, 20, 21, 41, 97])
def test_prefill_matches_oracle(kv_heads, length):
    q, k, v = _inputs(2, 4, kv_heads, length, length, seed=length + kv_heads)
    q_pos, k_pos = _positions(2, length, length)
    _check_fp32(q, k, v, q_pos, k_pos)


@pytest.mark.parametrize("blocks", [(7, 5), (3, 64), (20, 20), (64, 9), (1, 13)])
def test_blocked_path_block_sizes(blocks):
    q, k, v = _inputs(2, 4, 2, 83, 83, seed=sum(blocks))
    q_pos, k_pos = _positions(2, 83, 83, pads=[0, 6])
    _check_fp32(q, k, v, q_pos, k_pos, paths=("blocked", "static"), blocks=blocks)


@pytest.mark.parametrize("cfg", [DCAConfig(32, local_window=0), DCAConfig(40, chunk_size=30, local_window=13), DCAConfig(8, 6, 1)])
def test_other_geometries(cfg):
    q, k, v = _inputs(1, 4, 2, 90, 90, seed=cfg.chunk_len)
    q_pos, k_pos = _positions(1, 90, 90)
    _check_fp32(q, k, v, q_pos, k_pos, cfg=cfg)
    _check_fp32(q, k, v, q_pos, k_pos, cfg=cfg, paths=("blocked",), blocks=(7, 11))


def test_odd_head_dim_value_dim_scale_and_attention_scaling():
    q, k, v = _inputs(1, 6, 3, 61, 61, head_dim=10, value_dim=7, seed=3)
    q_pos, k_pos = _positions(1, 61, 61)
    _check_fp32(q, k, v, q_pos, k_pos, att=1.17, scale=0.2)


# ----------------------------------------------------------------------------- decode / chunked prefill
@pytest.mark.parametrize("q_len,kv_len", [(q, k) for q in (1, 7, 21) for k in (20, 21, 61, 101) if q <= k])
def test_decode_shapes(q_len, kv_len):
    q, k, v = _inputs(2, 4, 2, q_len, kv_len, seed=q_len * 1000 + kv_len)
    q_pos, k_pos = _positions(2, q_len, kv_len)
    _check_fp32(q, k, v, q_pos, k_pos)
    _check_fp32(q, k, v, q_pos, k_pos, paths=("blocked",), blocks=(5, 8))


def test_decode_equals_rows_of_prefill():
    """The bottom-right alignment rule: decoding the last query against the cache = the last row of a prefill."""
    q, k, v = _inputs(1, 4, 2, 77, 77, seed=9)
    inv_freq = _inv_freq(16)
    rope = RotaryParams(inv_freq)
    q_pos, k_pos = _positions(1, 77, 77)
    k_rot = _rotate_keys(k, k_pos, inv_freq, CFG)
    full = dca_attention(q, k_rot, v, q_pos, k_pos, rope, CFG, backend="reference")
    for t in (19, 20, 21, 40, 60, 76):
        step = dca_attention(q[:, :, t : t + 1], k_rot[:, :, : t + 1], v[:, :, : t + 1], q_pos[:, t : t + 1], k_pos[:, : t + 1], rope, CFG, backend="reference")
        torch.testing.assert_close(step, full[:, :, t : t + 1], rtol=0, atol=FP32_TOL)


@pytest.mark.parametrize("q_len,kv_len,kv_heads", [(1, 101, 2), (3, 61, 1), (16, 16, 4)])
def test_decode_path_never_reads_positions_on_the_host(q_len, kv_len, kv_heads):
    """Few query rows take the static path: on the meta device (no data) any host read (``int``,
    ``bool``, ``.cpu()``, ``torch.equal``) would raise, so this proves decode never syncs."""
    q, k, v = (t.to("meta") for t in _inputs(2, 4, kv_heads, q_len, kv_len))
    q_pos, k_pos = (t.to("meta") for t in _positions(2, q_len, kv_len, pads=[0, 5]))
    out = dca_attention(q, k, v, q_pos, k_pos, RotaryParams(_inv_freq(16).to("meta")), CFG, backend="reference")
    assert out.device.type == "meta" and out.shape == (2, 4, q_len, 16)


# ----------------------------------------------------------------------------- padding / arbitrary positions
@pytest.mark.parametrize("q_len,kv_len", [(81, 81), (1, 81), (5, 81), (30, 61)])
def test_left_padding_per_row(q_len, kv_len):
    pads = [0, 3, 20, 41]
    q, k, v = _inputs(4, 4, 2, q_len, kv_len, seed=q_len + kv_len)
    q_pos, k_pos = _positions(4, q_len, kv_len, pads)
    _check_fp32(q, k, v, q_pos, k_pos)
    _check_fp32(q, k, v, q_pos, k_pos, paths=("blocked",), blocks=(6, 7))


def test_padding_marked_minus_one_takes_the_blocked_path_and_is_exact():
    """Padding need not be contiguous: all pads at -1 (positions no longer 'index - offset')."""
    q, k, v = _inputs(2, 4, 2, 70, 70, seed=5)
    q_pos, k_pos = _positions(2, 70, 70, pads=[0, 11])
    k_pos[1, :11] = -1
    q_pos[1, :11] = -1
    _check_fp32(q, k, v, q_pos, k_pos, paths=("dca_attention", "chunked"))


def test_padding_rows_are_zero_and_independent_of_their_content():
    q, k, v = _inputs(2, 4, 2, 50, 50, seed=8)
    inv_freq = _inv_freq(16)
    rope = RotaryParams(inv_freq)
    q_pos, k_pos = _positions(2, 50, 50, pads=[0, 12])
    k_rot = _rotate_keys(k, k_pos, inv_freq, CFG)
    out = dca_attention(q, k_rot, v, q_pos, k_pos, rope, CFG, backend="reference")
    assert out[1, :, :12].abs().max() == 0
    q2, k2, v2 = q.clone(), k_rot.clone(), v.clone()
    q2[1, :, :12] = 1e4
    k2[1, :, :12] = -1e4
    v2[1, :, :12] = float("nan")
    out2 = dca_attention(q2, k2, v2, q_pos, k_pos, rope, CFG, backend="reference")
    assert torch.equal(out2[:, :, 12:].isnan().any(), torch.tensor(False))
    torch.testing.assert_close(out2[1, :, 12:], out[1, :, 12:], rtol=0, atol=1e-6)


def test_fully_padded_decode_row():
    """A row whose current query is padding (positions all negative) gives 0, not NaN."""
    q, k, v = _inputs(2, 4, 2, 2, 30, seed=1)
    q_pos, k_pos = _positions(2, 2, 30, pads=[0, 30])
    _check_fp32(q, k, v, q_pos, k_pos)
    inv_freq = _inv_freq(16)
    out = dca_attention(q, _rotate_keys(k, k_pos, inv_freq, CFG), v, q_pos, k_pos, RotaryParams(inv_freq), CFG, backend="reference")
    assert out[1].abs().max() == 0


def test_positions_with_gaps():
    """Causal by position, not by index: sorted positions with gaps (e.g. tokens dropped)."""
    gen = torch.Generator().manual_seed(0)
    k_pos = torch.stack([torch.sort(torch.randperm(200, generator=gen)[:64]).values for _ in range(2)])
    q_pos = k_pos[:, -20:].clone()
    q, k, v = _inputs(2, 4, 2, 20, 64, seed=2)
    _check_fp32(q, k, v, q_pos, k_pos, paths=("dca_attention", "blocked", "static"))
    _check_fp32(q, k, v, q_pos, k_pos, paths=("blocked", "static"), blocks=(4, 9))


def test_return_lse_matches_oracle_on_both_paths():
    q, k, v = _inputs(2, 4, 2, 66, 66, seed=4)
    q_pos, k_pos = _positions(2, 66, 66, pads=[0, 5])
    inv_freq = _inv_freq(16)
    rope = RotaryParams(inv_freq)
    scale = 16**-0.5
    k_rot = _rotate_keys(k, k_pos, inv_freq, CFG)
    exp_out, exp_lse = oracle_attention(q, k, v, q_pos, k_pos, inv_freq, CHUNK_LEN, CHUNK_SIZE, return_lse=True)
    for function, blocks in [(reference_dca_attention, (None, None)), (reference_dca_attention, (7, 5)),
                             (reference_module.static_dca_attention, (None, None)), (reference_module.static_dca_attention, (9, 13))]:
        out, lse = function(q, k_rot, v, q_pos, k_pos, rope, CFG, scale, *blocks, return_lse=True)
        assert lse.dtype == torch.float32
        assert torch.isneginf(lse[1, :, :5]).all()
        torch.testing.assert_close(lse[1, :, 5:].double(), exp_lse[1, :, 5:], rtol=0, atol=1e-5)
        torch.testing.assert_close(lse[0].double(), exp_lse[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out, exp_out, rtol=0, atol=FP32_TOL)


# ----------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path,blocks", [("dca_attention", (None, None)), ("blocked", (16, 12))])
@pytest.mark.parametrize("kv_heads,pads", [(2, [0, 9]), (1, [0, 0]), (4, [3, 0])])
def test_low_precision_within_twice_plain_pytorch_error(dtype, path, blocks, kv_heads, pads):
    """flash-attention's rule: error vs the float64 oracle ≤ 2× the error of plain PyTorch
    attention (HF-eager style: rotation and matmuls in ``dtype``, softmax in fp32) on the same inputs."""
    q, k, v = _inputs(2, 4, kv_heads, 101, 101, dtype=dtype, seed=kv_heads + len(pads))
    q_pos, k_pos = _positions(2, 101, 101, pads)
    inv_freq = _inv_freq(16)
    reference = oracle_attention(q, k, v, q_pos, k_pos, inv_freq, CHUNK_LEN, CHUNK_SIZE, upcast=True)
    plain = oracle_attention(q, k, v, q_pos, k_pos, inv_freq, CHUNK_LEN, CHUNK_SIZE, upcast=False)
    k_rot = _rotate_keys(k, k_pos, inv_freq, CFG)
    got = _run(path, q, k_rot, v, q_pos, k_pos, RotaryParams(inv_freq), CFG, blocks=blocks)
    assert got.dtype == dtype
    ref = reference.double()
    err = (got.double() - ref).abs().max().item()
    err_plain = (plain.double() - ref).abs().max().item()
    assert err_plain > 0
    assert err <= 2 * err_plain, f"{dtype} {path}: err {err:.3g} > 2 x plain {err_plain:.3g}"


# ----------------------------------------------------------------------------- memory
def test_blocked_path_never_builds_a_long_score_matrix(monkeypatch):
    """The blocked path's largest matmul result is one block of scores, whatever the length."""
    largest = [0]
    real_matmul = torch.matmul

    def recording_matmul(a, b, *args, **kwargs):
        out = real_matmul(a, b, *args, **kwargs)
        largest[0] = max(largest[0], out.shape[-1] * out.shape[-2])
        return out

    monkeypatch.setattr(torch, "matmul", recording_matmul)
    q, k, v = _inputs(1, 4, 2, 600, 600, seed=17)
    q_pos, k_pos = _positions(1, 600, 600)
    reference_module.blocked_dca_attention(q, k, v, q_pos, k_pos, RotaryParams(_inv_freq(16)), CFG, 0.25)
    groups, block = 2, CHUNK_LEN  # default blocks align with chunk_len here
    assert 0 < largest[0] <= groups * block * block, largest[0]


# ----------------------------------------------------------------------------- argument checks
def test_bad_backend_and_shapes_raise():
    q, k, v = _inputs(1, 4, 2, 10, 10)
    q_pos, k_pos = _positions(1, 10, 10)
    rope = RotaryParams(_inv_freq(16))
    with pytest.raises(ValueError, match="backend"):
        dca_attention(q, k, v, q_pos, k_pos, rope, CFG, backend="flash")
    with pytest.raises(ValueError, match="multiple"):
        dca_attention(q[:, :3], k, v, q_pos, k_pos, rope, CFG)
    with pytest.raises(ValueError, match="positions"):
        dca_attention(q, k, v, q_pos[:, :5], k_pos, rope, CFG)
    with pytest.raises(ValueError):
        dca_attention(q[0], k[0], v[0], q_pos, k_pos, rope, CFG)
    with pytest.raises(ValueError):
        dca_attention(q, k, v[:, :, :5], q_pos, k_pos, rope, CFG)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_auto_backend_on_cpu_runs_reference_and_triton_is_refused():
    from chunkllama.attention import resolve_backend

    q, k, v = _inputs(1, 4, 2, 10, 10)
    assert resolve_backend("auto", q, k, v) == "reference"
    with pytest.raises(ValueError, match="triton"):
        resolve_backend("triton", q, k, v)


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@CUDA
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("q_len,kv_len,pads", [(101, 101, [0, 9]), (1, 101, [0, 30]), (21, 61, [3, 0]), (97, 97, [0, 0])])
def test_cuda_matches_oracle(backend, dtype, kv_heads, q_len, kv_len, pads):
    """The CUDA paths (PyTorch's fused kernels in the chunked path; Triton where ``auto`` picks it):
    fp32 within 1e-5 of the oracle; bf16/fp16 within 2x plain PyTorch's error in that dtype."""
    q, k, v = _inputs(2, 4, kv_heads, q_len, kv_len, dtype=dtype, seed=q_len + kv_heads)
    q_pos, k_pos = _positions(2, q_len, kv_len, pads)
    inv_freq = _inv_freq(16)
    reference = oracle_attention(q, k, v, q_pos, k_pos, inv_freq, CHUNK_LEN, CHUNK_SIZE).double()
    k_rot = _rotate_keys(k, k_pos, inv_freq, CFG)
    got = dca_attention(
        q.cuda(), k_rot.cuda(), v.cuda(), q_pos.cuda(), k_pos.cuda(), RotaryParams(inv_freq.cuda()), CFG, backend=backend,
    )
    assert got.dtype == dtype and got.is_cuda
    err = (got.cpu().double() - reference).abs().max().item()
    if dtype == torch.float32:
        assert err <= FP32_TOL, f"{backend}: {err:.3g}"
    else:
        plain = oracle_attention(q, k, v, q_pos, k_pos, inv_freq, CHUNK_LEN, CHUNK_SIZE, upcast=False).double()
        err_plain = (plain - reference).abs().max().item()
        assert err <= 2 * err_plain, f"{backend} {dtype}: {err:.3g} > 2 x {err_plain:.3g}"


@CUDA
@pytest.mark.parametrize("blocks", [(None, None), (16, 12)])
def test_cuda_blocked_path_with_gaps(blocks):
    gen = torch.Generator().manual_seed(1)
    k_pos = torch.stack([torch.sort(torch.randperm(200, generator=gen)[:64]).values for _ in range(2)])
    q_pos = k_pos[:, -20:].clone()
    q, k, v = _inputs(2, 4, 2, 20, 64, seed=2)
    inv_freq = _inv_freq(16)
    expected = oracle_attention(q, k, v, q_pos, k_pos, inv_freq, CHUNK_LEN, CHUNK_SIZE)
    k_rot = _rotate_keys(k, k_pos, inv_freq, CFG)
    got = reference_dca_attention(
        q.cuda(), k_rot.cuda(), v.cuda(), q_pos.cuda(), k_pos.cuda(), RotaryParams(inv_freq.cuda()), CFG, 0.25, *blocks
    )
    assert (got.cpu() - expected).abs().max().item() <= FP32_TOL
