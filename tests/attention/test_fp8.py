"""FP8 KV cache: packed rows (:mod:`chunkllama.attention.fp8`) and the Triton kernels that read them.

Two rules, on the same inputs (random unit-normal q/k/v, keys rotated as cached):

- **tight**: the kernels on packed FP8 keys/values (decode: read directly; prefill: dequantized by a
  kernel, then the prefill kernel) against the fp32 reference on the *dequantized*
  keys/values (the oracle of what the FP8 cache holds): error ≤ 2× the reference path's own error in
  the kernel's dtype + the dtype's tolerance — flash-attention's rule, as ``test_triton.py``. The
  kernels add nothing beyond reading the cache exactly.
- **documented tolerance** (README, "FP8 KV cache"): against the fp32 reference on the unrounded
  (bf16/fp16) keys/values, the output's relative RMS error is at most :data:`FP8_REL_RMS`
  (measured 0.02-0.03 here; e4m3 keeps 3 mantissa bits, ~2⁻⁵ relative rounding error per element).

On the CPU the kernels run under ``TRITON_INTERPRET=1`` in one subprocess (see
``interpreter_worker.py``), in fp16 (the interpreter's bf16 ``tl.dot`` is wrong on CPU, triton 3.9).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from chunkllama.attention.fp8 import (
    FP8_MAX, dequantize_kv, is_packed, packed_width, quantize_kv, scales,
)
from interpreter_worker import run_worker, worker_main

#: Documented tolerance: relative RMS error of the attention output, FP8 cache vs the unrounded cache.
FP8_REL_RMS = 0.05
ATOL = {torch.float16: 1e-3, torch.bfloat16: 4e-3}

# (name, kernel, B, Hq, Hk, Tq, Tk, D, pretraining_length, left-pad offsets per row), as test_triton.py
CPU_CASES = [
    ("gqa4_odd97", "prefill", 1, 4, 1, 97, 97, 64, 32, (0,)),
    ("aligned_gqa4_161", "prefill", 1, 4, 1, 161, 161, 64, 128, (0,)),
    ("chunked_pad", "prefill", 2, 4, 1, 45, 70, 64, 32, (0, 5)),
    ("aligned_chunked_pad", "prefill", 2, 2, 1, 100, 181, 64, 128, (3, 40)),
    ("tiny_chunks_pad", "prefill", 2, 4, 2, 50, 77, 64, 16, (0, 7)),
    ("d128", "prefill", 1, 2, 1, 60, 60, 128, 32, (0,)),
    ("decode_pad", "decode", 2, 4, 1, 1, 70, 64, 32, (0, 5)),
    ("decode_gqa1_d128", "decode", 2, 2, 2, 1, 100, 128, 32, (0, 3)),
    ("decode_20_splits", "decode20", 2, 4, 1, 2, 400, 64, 128, (0, 9)),
    ("dispatch_auto", "auto", 2, 4, 2, 33, 64, 64, 32, (0, 7)),
    ("dispatch_auto_decode", "auto", 2, 4, 2, 1, 64, 64, 32, (0, 7)),
    ("cache_slice", "slice", 2, 4, 1, 1, 70, 64, 32, (0, 5)),  # keys a view of a longer cache
    ("decode_tiles64", "decode_tiles64", 2, 4, 1, 1, 150, 64, 32, (0, 5)),  # the GPU's 64-key tiles
]


# --- packed rows (no Triton) -----------------------------------------------------------------------


def test_packed_layout_and_round_trip():
    x = torch.randn(2, 3, 7, 64) * torch.logspace(-3, 3, 7)[None, None, :, None]  # row scales over 6 decades
    x[0, 0, 0] = 0.0
    x[1, 2, 3, 5] = 1e4  # an outlier owns its row's scale only
    packed = quantize_kv(x)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 7, packed_width(64)) and is_packed(packed)
    back = dequantize_kv(packed)
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.equal(scales(packed), (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny).squeeze(-1))
    # e4m3: relative error <= 2^-4 for normal values; absolute <= 2^-10 * scale (half the subnormal step) below
    bound = torch.maximum(x.abs() * 2.0**-4, amax / FP8_MAX * 2.0**-10)
    assert ((back - x).abs() <= bound + 1e-30).all()
    assert (back[0, 0, 0] == 0).all()  # an all-zero row stays zero
    assert back[1, 2, 3, 5] == 1e4 and (back[1, 2, 3] - x[1, 2, 3]).abs().max() <= 1e4 * 2.0**-4
    # the largest element of each row maps to ±448 exactly: back to within the rounding of s = max/448
    torch.testing.assert_close(back.abs().amax(-1), amax.squeeze(-1), rtol=2e-7, atol=0)


def test_packed_rows_survive_cache_operations():
    """Append, crop, batch select, left padding: the scale travels with its row (what the caches and the
    serving engine do to the tensors)."""
    x = torch.randn(3, 2, 10, 16)
    whole = quantize_kv(x)
    parts = torch.cat([quantize_kv(x[:, :, :4]), quantize_kv(x[:, :, 4:])], dim=-2)
    assert torch.equal(parts, whole)
    assert torch.equal(dequantize_kv(whole[1:, :, 2:7]), dequantize_kv(whole)[1:, :, 2:7])
    padded = torch.nn.functional.pad(whole, (0, 0, 3, 0))
    assert (dequantize_kv(padded)[:, :, :3] == 0).all()
    assert torch.equal(dequantize_kv(padded)[:, :, 3:], dequantize_kv(whole))


def test_memory_is_about_half_of_bf16():
    x = torch.randn(1, 8, 1000, 128, dtype=torch.bfloat16)
    packed = quantize_kv(x)
    ratio = packed.numel() * packed.element_size() / (x.numel() * x.element_size())
    assert ratio == pytest.approx((128 + 4) / 256)  # 0.516


def test_quantize_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        quantize_kv(torch.randn(1, 1, 2, 18))


def test_reference_path_reads_packed_rows_as_dequantized():
    """dca_attention on packed keys/values (CPU: the reference path) equals it on the dequantized tensors."""
    from chunkllama.attention import dca_attention

    q, k, v, qpos, kpos, rope, config = make_inputs(("ref", "", 2, 4, 2, 30, 50, 16, 32, (0, 4)), torch.float32, "cpu")
    kp, vp = quantize_kv(k), quantize_kv(v)
    packed = dca_attention(q, kp, vp, qpos, kpos, rope, config, backend="reference")
    plain = dca_attention(q, dequantize_kv(kp), dequantize_kv(vp), qpos, kpos, rope, config, backend="reference")
    assert torch.equal(packed, plain)
    with pytest.raises(ValueError, match="both be packed"):
        dca_attention(q, kp, v, qpos, kpos, rope, config)


# --- kernels under the interpreter ------------------------------------------------------------------


def make_inputs(case, dtype, device, seed=0):
    from test_triton import make_inputs as make

    return make(case, dtype, device, seed)


def run_case(case, dtype, device):
    """Errors of the kernels on packed FP8 keys/values: against the dequantized oracle (tight) and against
    the unrounded one (documented tolerance)."""
    from chunkllama.attention import dca_attention, resolve_backend
    from chunkllama.attention.reference import reference_dca_attention
    from chunkllama.attention.triton_decode import dca_decode

    kind = case[1]
    q, k, v, qpos, kpos, rope, config = make_inputs(case, dtype, device)
    scale = q.shape[-1] ** -0.5
    kp, vp = quantize_kv(k), quantize_kv(v)
    if kind == "slice":  # the keys of a longer cache, cut back (a view: batch/head strides of the longer tensor)
        longer_k = torch.cat([kp, quantize_kv(torch.randn_like(k[:, :, :9]))], dim=2)
        longer_v = torch.cat([vp, quantize_kv(torch.randn_like(v[:, :, :9]))], dim=2)
        kp, vp = longer_k[:, :, : k.shape[2]], longer_v[:, :, : v.shape[2]]
    oracle = reference_dca_attention(q.float(), dequantize_kv(kp), dequantize_kv(vp), qpos, kpos, rope, config, scale)
    lowp = reference_dca_attention(q, dequantize_kv(kp, dtype), dequantize_kv(vp, dtype), qpos, kpos, rope, config, scale)
    unrounded = reference_dca_attention(q.float(), k.float(), v.float(), qpos, kpos, rope, config, scale)
    args = (q, kp, vp, qpos, kpos, rope.inv_freq, rope.attention_scaling, config.chunk_len, config.chunk_size, scale)
    if kind == "decode":
        out = dca_decode(*args)
    elif kind == "decode20":
        out = dca_decode(*args, splits=20)
    elif kind == "decode_tiles64":
        os.environ["CHUNKLLAMA_DECODE_CONFIG"] = "64,1,1,2"
        try:
            out = dca_decode(*args)
        finally:
            del os.environ["CHUNKLLAMA_DECODE_CONFIG"]
    else:  # prefill: through the dispatch, which dequantizes packed rows for the prefill kernel
        assert resolve_backend("auto", q, kp, vp) == "triton"
        out = dca_attention(q, kp, vp, qpos, kpos, rope, config, scale, backend="auto")
    valid = (qpos >= 0)[:, None, :, None].expand_as(out)
    diff = (out.float() - unrounded)[valid]
    return {
        "err": (out.float() - oracle).abs().max().item(),
        "ref_err": (lowp.float() - oracle).abs().max().item(),
        "rel_rms_vs_unrounded": (diff.norm() / unrounded[valid].norm()).item(),
        "max_abs_vs_unrounded": diff.abs().max().item(),
        "finite": bool(torch.isfinite(out).all()),
        "padding_zero": bool((out.float().permute(0, 2, 1, 3)[qpos < 0] == 0).all()),
        "shape_ok": tuple(out.shape) == tuple(q.shape) and out.dtype == q.dtype,
    }


def run_model_case() -> dict:
    """A tiny fp16 Llama (head_dim 64) with kv_cache_dtype='fp8', left-padded batch, prefill in pieces:
    greedy generation through the Triton kernels vs the reference backend, and vs the fp16 cache."""
    import transformers

    import chunkllama

    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=256, rope_theta=10000.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    ids = torch.randint(3, 96, (2, 45), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0  # left padding
    runs = {}
    for backend, kv in (("reference", "fp8"), ("triton", "fp8"), ("triton", "auto")):
        chunkllama.apply_dca(model, 32, backend=backend, kv_cache_dtype=kv)
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
            return_dict_in_generate=True, eos_token_id=None, prefill_chunk_size=16,
        )
        runs[backend, kv] = (out.sequences, torch.stack(out.logits).float(), out.past_key_values.layers[0].keys.dtype)
    chunkllama.remove_dca(model)
    ref, tri, plain = runs["reference", "fp8"], runs["triton", "fp8"], runs["triton", "auto"]
    return {
        "same_tokens": bool(torch.equal(ref[0], tri[0])),
        "logits_max_diff": (ref[1] - tri[1]).abs().max().item(),
        "logits_scale": ref[1].abs().max().item(),
        "fp8_vs_fp16_cache_logits": (tri[1] - plain[1]).abs().max().item(),
        "cache_dtypes": [str(tri[2]), str(plain[2])],
    }


def run_conversion_case() -> dict:
    """The quantize kernel (keys + values in one launch) and the dequantize kernel against the PyTorch versions."""
    from chunkllama.attention.triton_fp8 import dequantize, quantize_pair

    gen = torch.Generator().manual_seed(11)
    results = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in (64, 128):
            key = (torch.randn(2, 3, 41, head_dim, generator=gen) * torch.logspace(-5, 3, 41)[None, None, :, None]).to(dtype)
            key[0, 0, 0] = 0
            value = torch.randn(2, 41, 3, head_dim, generator=gen).to(dtype).transpose(1, 2)  # as v_proj gives it
            kp, vp = quantize_pair(key, value)
            name = f"{str(dtype).removeprefix('torch.')}_d{head_dim}"
            results[name] = {
                "quantize_equal": torch.equal(kp, quantize_kv(key)) and torch.equal(vp, quantize_kv(value)),
                "dequantize_equal": torch.equal(dequantize(kp[:, 1:, 3:], torch.float16),
                                                dequantize_kv(kp[:, 1:, 3:], torch.float16)),
            }
    return results


def _worker_results() -> dict:
    results = {case[0]: run_case(case, torch.float16, "cpu") for case in CPU_CASES}
    results["conversions"] = run_conversion_case()
    results["model_generate"] = run_model_case()
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    return run_worker(__file__)


def _check(result, dtype, ratio=2.0):
    assert result["shape_ok"] and result["finite"] and result["padding_zero"], result
    assert result["err"] <= ratio * result["ref_err"] + ATOL[dtype], result
    assert result["rel_rms_vs_unrounded"] <= FP8_REL_RMS, result


@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_interpreter_fp8_matches_reference(case, interpreter_results):
    _check(interpreter_results[case[0]], torch.float16)


def test_interpreter_model_generates_with_fp8_cache(interpreter_results):
    result = interpreter_results["model_generate"]
    assert result["cache_dtypes"] == ["torch.uint8", "torch.float16"], result
    assert result["same_tokens"], result
    assert result["logits_max_diff"] <= 2e-2 * max(1.0, result["logits_scale"]), result
    assert result["fp8_vs_fp16_cache_logits"] <= 0.05 * max(1.0, result["logits_scale"]), result


def test_interpreter_conversion_kernels_are_bit_exact(interpreter_results):
    for name, result in interpreter_results["conversions"].items():
        assert result["quantize_equal"] and result["dequantize_equal"], (name, result)


def test_unsupported_reasons_for_packed_rows():
    pytest.importorskip("triton")
    from chunkllama.attention.triton_dispatch import unsupported_reason

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (on the CPU every tensor is refused for its device first)")
    q = torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16, device="cuda")
    packed = quantize_kv(q[:, :1])
    assert unsupported_reason(q, packed, packed) is None
    assert "dtype" in unsupported_reason(q, packed, q[:, :1])
    assert "head_dim" in unsupported_reason(q, packed[..., :-4], packed[..., :-4])


# --- GPU (real shapes; triton 3.6 reads float8e4nv natively) ----------------------------------------

GPU_CASES = [
    ("gpu_prefill_16k_gqa4", "prefill", 1, 32, 8, 16384, 16384, 128, 8192, (0,)),
    ("gpu_prefill_odd_gqa8_pad", "prefill", 2, 32, 4, 11001, 11001, 128, 8192, (0, 1234)),
    ("gpu_prefill_chunked_gqa1", "prefill", 1, 8, 8, 3000, 13313, 64, 8192, (0,)),
    ("gpu_decode_32k", "decode", 1, 32, 8, 1, 32768, 128, 8192, (0,)),
    ("gpu_decode_pad_gqa8", "decode", 2, 32, 4, 1, 20481, 128, 8192, (0, 777)),
    ("gpu_decode_4tok_d64", "decode", 1, 9, 3, 4, 15361, 64, 8192, (0,)),
    ("gpu_auto_small", "auto", 2, 8, 2, 513, 1030, 128, 512, (0, 5)),
    ("gpu_prefill_tiny_chunks", "prefill", 2, 8, 2, 700, 900, 128, 64, (0, 33)),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_fp8_matches_reference(case, dtype):
    result = run_case(case, dtype, "cuda")
    print(case[0], dtype, result)
    _check(result, dtype)


if __name__ == "__main__" and "--worker" in sys.argv:
    worker_main(_worker_results)
