"""Fused Triton DCA kernels against the fp32 reference (flash-attention's rule).

A kernel passes when ``max|out - oracle| <= 2 * max|ref_lowp - oracle| + atol``: ``oracle`` is
:func:`reference_dca_attention` on the same (low-precision) inputs upcast to fp32, ``ref_lowp`` the
reference path run in the kernel's dtype.

On the CPU the kernels run under ``TRITON_INTERPRET=1``. Triton reads that variable when the kernels
are decorated, so the cases run in one subprocess (this file with ``--worker``) that sets it before
anything imports triton; the tests then check its results case by case. The interpreter's bf16
``tl.dot`` is wrong on CPU (triton 3.9), so the CPU cases use fp16; bf16 runs in the GPU tests.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from interpreter_worker import run_worker, worker_main

ATOL = {torch.float16: 1e-3, torch.bfloat16: 4e-3}

# (name, kernel, B, Hq, Hk, Tq, Tk, D, pretraining_length, left-pad offsets per row)
# pretraining 32 -> chunk_size 24, chunk_len 20 (tiles of 16 do not divide it: general path);
# pretraining 128 -> chunk_size 96, chunk_len 80 (tiles divide it: the phased fast path).
CPU_CASES = [
    ("gqa1_odd37", "prefill", 1, 2, 2, 37, 37, 64, 32, (0,)),
    ("gqa4_odd97", "prefill", 1, 4, 1, 97, 97, 64, 32, (0,)),
    ("gqa8_len41", "prefill", 1, 8, 1, 41, 41, 64, 32, (0,)),
    ("len19", "prefill", 1, 2, 1, 19, 19, 64, 32, (0,)),
    ("len20", "prefill", 1, 2, 1, 20, 20, 64, 32, (0,)),
    ("len21", "prefill", 1, 2, 1, 21, 21, 64, 32, (0,)),
    ("len40", "prefill", 1, 2, 1, 40, 40, 64, 32, (0,)),
    ("aligned_200", "prefill", 1, 2, 2, 200, 200, 64, 128, (0,)),
    ("aligned_gqa4_161", "prefill", 1, 4, 1, 161, 161, 64, 128, (0,)),
    ("chunked_pad", "prefill", 2, 4, 1, 45, 70, 64, 32, (0, 5)),
    ("aligned_chunked_pad", "prefill", 2, 2, 1, 100, 181, 64, 128, (3, 40)),
    ("all_padding_row", "prefill", 2, 2, 1, 8, 40, 64, 32, (0, 45)),
    # pretraining 16 -> chunk_len 10: a block of 16 queries spans two or three chunks
    ("tiny_chunks_pad", "prefill", 2, 4, 2, 50, 77, 64, 16, (0, 7)),
    ("d128", "prefill", 1, 2, 1, 60, 60, 128, 32, (0,)),
    ("d128_aligned", "prefill", 1, 2, 2, 170, 170, 128, 128, (0,)),
    ("decode_pad", "decode", 2, 4, 1, 1, 70, 64, 32, (0, 5)),
    ("decode_gqa8_aligned", "decode", 1, 8, 1, 1, 161, 64, 128, (0,)),
    ("decode_gqa1_d128", "decode", 2, 2, 2, 1, 100, 128, 32, (0, 3)),
    ("decode_3tokens", "decode", 1, 4, 1, 3, 100, 64, 32, (0,)),
    ("decode_boundary", "decode", 1, 4, 1, 1, 81, 64, 128, (0,)),
    # a prefill piece of 20 tokens with 3 query heads per KV head: 60 packed rows (BLOCK_M 64), as the
    # serving engine's last piece of a 32k SmolLM2 prompt
    ("decode_rows64_gqa3", "decode", 1, 9, 3, 20, 300, 64, 32, (0,)),
    # 20 splits over 25 key tiles: the last 7 splits see no key, and the merge takes two blocks of 16
    ("decode_20_splits", "decode20", 2, 4, 1, 2, 400, 64, 128, (0, 9)),
    # the decode kernel with the query as one rounded tile (CHUNKLLAMA_DECODE_QSPLIT=0), and with the
    # softmax weights rounded once for P.V (CHUNKLLAMA_DECODE_PSPLIT=0)
    ("decode_single_tile", "decode_nosplit", 2, 4, 1, 1, 70, 64, 32, (0, 5)),
    ("decode_single_weights", "decode_p_rounded", 2, 4, 1, 1, 70, 64, 32, (0, 5)),
    # the GPU's 64-key tiles (partial last tile, padding, chunk edges inside a tile), not the interpreter's 16
    ("decode_tiles64_pad", "decode_tiles64", 2, 4, 1, 1, 150, 64, 32, (0, 5)),
    ("decode_tiles64_d128", "decode_tiles64", 1, 8, 2, 2, 301, 128, 128, (0,)),
    # the prefill kernel with the query as one rounded tile (the head_dim-128 default) and with the
    # split forced on (the head_dim-64 default)
    ("prefill_single_tile_pad", "prefill_nosplit", 2, 4, 2, 50, 77, 64, 16, (0, 7)),
    ("prefill_single_tile_aligned", "prefill_nosplit", 2, 2, 1, 100, 181, 64, 128, (3, 40)),
    ("prefill_split_d128_pad", "prefill_split", 2, 4, 2, 50, 77, 128, 16, (0, 7)),
    ("prefill_split_d128_aligned", "prefill_split", 1, 2, 2, 170, 170, 128, 128, (0,)),
    ("dispatch_auto", "auto", 2, 4, 2, 33, 64, 64, 32, (0, 7)),
    ("dispatch_auto_decode", "auto", 2, 4, 2, 1, 64, 64, 32, (0, 7)),
]


# kinds that run one kernel with one environment variable set (precision variants)
KIND_ENV = {
    "decode_nosplit": ("CHUNKLLAMA_DECODE_QSPLIT", "0"),
    "decode_p_rounded": ("CHUNKLLAMA_DECODE_PSPLIT", "0"),
    "prefill_nosplit": ("CHUNKLLAMA_PREFILL_QSPLIT", "0"),
    "prefill_split": ("CHUNKLLAMA_PREFILL_QSPLIT", "1"),
    "decode_tiles64": ("CHUNKLLAMA_DECODE_CONFIG", "64,1,1,2"),
}


def make_inputs(case, dtype, device, seed=0):
    """Random unrotated queries, keys rotated at ``p % chunk_len`` (as cached), contiguous positions."""
    from chunkllama.config import DCAConfig
    from chunkllama.positions import key_rope_positions
    from chunkllama.rope import RotaryParams, apply_rope

    _, _, batch, q_heads, kv_heads, q_len, kv_len, head_dim, length, pads = case
    config = DCAConfig(length)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    rope = RotaryParams(inv_freq.to(device), 1.0)
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    offsets = torch.tensor(list(pads)[:batch], dtype=torch.int64)
    key_positions = torch.arange(kv_len)[None, :] - offsets[:, None]
    query_positions = key_positions[:, kv_len - q_len:]
    k = apply_rope(k, RotaryParams(inv_freq, 1.0), key_rope_positions(key_positions.clamp(min=0), config.chunk_len))
    to = dict(device=device, dtype=dtype)
    return (q.to(**to), k.to(**to), v.to(**to), query_positions.to(device), key_positions.to(device), rope, config)


def run_case(case, dtype, device):
    """Errors of the kernel and of the low-precision reference path against the fp32 oracle."""
    from chunkllama.attention import dca_attention, resolve_backend
    from chunkllama.attention.reference import reference_dca_attention
    from chunkllama.attention.triton_decode import dca_decode
    from chunkllama.attention.triton_prefill import dca_prefill

    kind = case[1]
    q, k, v, qpos, kpos, rope, config = make_inputs(case, dtype, device)
    scale = q.shape[-1] ** -0.5
    oracle = reference_dca_attention(q.float(), k.float(), v.float(), qpos, kpos, rope, config, scale)
    lowp = reference_dca_attention(q, k, v, qpos, kpos, rope, config, scale)
    args = (q, k, v, qpos, kpos, rope.inv_freq, rope.attention_scaling, config.chunk_len, config.chunk_size, scale)
    if kind in KIND_ENV:
        name, value = KIND_ENV[kind]
        os.environ[name] = value
        try:
            out = (dca_prefill if kind.startswith("prefill") else dca_decode)(*args)
        finally:
            del os.environ[name]
    elif kind == "prefill":
        out = dca_prefill(*args)
    elif kind == "decode":
        out = dca_decode(*args)
    elif kind == "decode20":
        out = dca_decode(*args, splits=20)
    else:
        assert resolve_backend("auto", q, k, v) == "triton"
        out = dca_attention(q, k, v, qpos, kpos, rope, config, scale, backend="auto")
    padding_rows = qpos < 0
    return {
        "err": (out.float() - oracle).abs().max().item(),
        "ref_err": (lowp.float() - oracle).abs().max().item(),
        "finite": bool(torch.isfinite(out).all()),
        "padding_zero": bool((out.float().permute(0, 2, 1, 3)[padding_rows] == 0).all()),
        "shape_ok": tuple(out.shape) == tuple(q.shape) and out.dtype == q.dtype,
    }


def _worker_results() -> dict:
    results = {case[0]: run_case(case, torch.float16, "cpu") for case in CPU_CASES}
    results["model_generate"] = run_model_case()
    results["compiled"] = run_compile_case("cpu", backend="eager")
    return results


COMPILE_CASES = [  # decode: what a compiled generate step runs (the prefill op is registered the same way)
    ("compile_decode", "auto", 2, 4, 2, 1, 64, 64, 32, (0, 7)),
]
GPU_COMPILE_CASES = COMPILE_CASES + [("compile_prefill", "auto", 2, 4, 2, 33, 64, 64, 32, (0, 7))]


def run_compile_case(device, backend, dtype=torch.float16, cases=COMPILE_CASES) -> dict:
    """``torch.compile(fullgraph=True)`` over the Triton launch path (key rotation + attention): no graph
    break (the kernels are custom ops with fake implementations), same output as eager."""
    import torch._dynamo

    from chunkllama.attention import triton_dispatch, triton_rope

    results = {}
    for case in cases:
        q, k, v, qpos, kpos, rope, config = make_inputs(case, dtype, device)
        scale = q.shape[-1] ** -0.5

        def step(q, k, v, qpos, kpos):
            k = triton_rope.rotate_at(k, kpos.clamp(min=0) % config.chunk_len, rope.inv_freq, rope.attention_scaling)
            return triton_dispatch.launch(q, k, v, qpos, kpos, rope, config, scale)

        torch._dynamo.reset()
        eager = step(q, k, v, qpos, kpos)
        compiled = torch.compile(step, fullgraph=True, backend=backend)(q, k, v, qpos, kpos)
        results[case[0]] = {"equal": bool(torch.equal(eager, compiled)),
                            "max_diff": (eager.float() - compiled.float()).abs().max().item(),
                            "strides": [list(eager.stride()), list(compiled.stride())]}
    return results


def run_model_case() -> dict:
    """A tiny fp16 Llama (head_dim 64), left-padded batch: greedy generation through apply_dca with the
    Triton kernels (prefill, then decode against the cache) vs the reference backend."""
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
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(10.0)  # sharper attention, so a wrong position changes the tokens
    ids = torch.randint(3, 96, (2, 45), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0  # left padding
    runs = {}
    for backend in ("reference", "triton"):
        chunkllama.apply_dca(model, 32, backend=backend)
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
            return_dict_in_generate=True, eos_token_id=None,
        )
        runs[backend] = (out.sequences, torch.stack(out.logits).float())
    chunkllama.remove_dca(model)
    (seq_ref, logits_ref), (seq_tri, logits_tri) = runs["reference"], runs["triton"]
    return {
        "same_tokens": bool(torch.equal(seq_ref, seq_tri)),
        "logits_max_diff": (logits_ref - logits_tri).abs().max().item(),
        "logits_scale": logits_ref.abs().max().item(),
    }


@pytest.fixture(scope="module")
def interpreter_results():
    return run_worker(__file__)


def _check(result, dtype, ratio=2.0, atol=None):
    assert result["shape_ok"]
    assert result["finite"]
    assert result["padding_zero"]
    assert result["err"] <= ratio * result["ref_err"] + (ATOL[dtype] if atol is None else atol), result


@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_interpreter_matches_reference(case, interpreter_results):
    _check(interpreter_results[case[0]], torch.float16)


def test_interpreter_patched_model_generates_like_reference(interpreter_results):
    result = interpreter_results["model_generate"]
    assert result["same_tokens"], result
    assert result["logits_max_diff"] <= 2e-2 * max(1.0, result["logits_scale"]), result


def test_interpreter_compiles_without_graph_breaks(interpreter_results):
    for name, result in interpreter_results["compiled"].items():
        assert result["equal"], (name, result)


def test_ops_registered_with_fake_implementations():
    """The kernels are custom ops whose fake implementations give the real outputs' shapes and strides
    (what torch.compile traces with), without running anything."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from chunkllama.attention import triton_decode, triton_prefill, triton_rope  # noqa: F401 (registers the ops)

    with FakeTensorMode():
        q = torch.empty(2, 8, 5, 64, dtype=torch.bfloat16)
        k = torch.empty(2, 2, 9, 64, dtype=torch.bfloat16)
        qpos = torch.empty(2, 5, dtype=torch.int64)
        kpos = torch.empty(2, 9, dtype=torch.int64)
        inv_freq = torch.empty(32)
        args = (q, k, k, qpos, kpos, inv_freq, 1.0, 20, 24, 0.125)
        for op in (torch.ops.chunkllama.dca_prefill, torch.ops.chunkllama.dca_decode):
            out = op(*args)
            assert out.shape == q.shape and out.dtype == q.dtype
            assert out.stride() == (5 * 8 * 64, 64, 8 * 64, 1)  # (B, T, H, D) in memory
        rotated = torch.ops.chunkllama.rope_at(k, kpos, inv_freq, 1.0)
        assert rotated.shape == k.shape and rotated.stride() == k.stride()


def test_unsupported_reasons():
    pytest.importorskip("triton")
    from chunkllama.attention.triton_dispatch import unsupported_reason

    q = torch.zeros(1, 2, 4, 64, dtype=torch.float16)
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        assert "cpu" in unsupported_reason(q, q, q)
    if torch.cuda.is_available():
        qc = q.cuda()
        assert unsupported_reason(qc, qc, qc) is None
        assert "dtype" in unsupported_reason(qc.float(), qc.float(), qc.float())
        odd = torch.zeros(1, 2, 4, 80, dtype=torch.float16, device="cuda")
        assert "head_dim" in unsupported_reason(odd, odd, odd)


def test_auto_falls_back_and_forced_triton_errors_on_cpu():
    from chunkllama.attention import dca_attention, resolve_backend

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("the interpreter makes CPU tensors supported")
    case = ("cpu", "auto", 1, 2, 1, 8, 8, 64, 32, (0,))
    q, k, v, qpos, kpos, rope, config = make_inputs(case, torch.float32, "cpu")
    assert resolve_backend("auto", q, k, v) == "reference"
    dca_attention(q, k, v, qpos, kpos, rope, config, backend="auto")
    with pytest.raises(ValueError, match="triton"):
        dca_attention(q, k, v, qpos, kpos, rope, config, backend="triton")


# Real shapes on the GPU (pretraining 8192 -> chunk_len 5120), bf16 and fp16.
GPU_CASES = [
    ("gpu_prefill_16k_gqa4", "prefill", 1, 32, 8, 16384, 16384, 128, 8192, (0,)),
    ("gpu_prefill_odd_gqa8_pad", "prefill", 2, 32, 4, 11001, 11001, 128, 8192, (0, 1234)),
    ("gpu_prefill_chunked_gqa1", "prefill", 1, 8, 8, 3000, 13313, 64, 8192, (0,)),
    ("gpu_prefill_d64_gqa4", "prefill", 1, 16, 4, 10241, 10241, 64, 8192, (0,)),
    ("gpu_decode_32k", "decode", 1, 32, 8, 1, 32768, 128, 8192, (0,)),
    ("gpu_decode_pad_gqa8", "decode", 2, 32, 4, 1, 20481, 128, 8192, (0, 777)),
    ("gpu_decode_4tok", "decode", 1, 32, 8, 4, 15361, 64, 8192, (0,)),
    # the serving engine's last prefill piece of a 32k SmolLM2 prompt (20 tokens, 3 heads per KV head)
    ("gpu_auto_piece20_gqa3", "auto", 1, 9, 3, 20, 32818, 64, 8192, (0,)),
    ("gpu_auto_small", "auto", 2, 8, 2, 513, 1030, 128, 512, (0, 5)),
    ("gpu_prefill_tiny_chunks", "prefill", 2, 8, 2, 700, 900, 128, 64, (0, 33)),  # chunk_len 40 < BLOCK_M
    ("gpu_prefill_split_d128_pad", "prefill_split", 2, 32, 8, 11001, 11001, 128, 8192, (0, 1234)),  # 64x64 tiles
    ("gpu_prefill_single_d64", "prefill_nosplit", 1, 16, 4, 10241, 10241, 64, 8192, (0,)),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_matches_reference(case, dtype, request):
    """Op-level precision on the GPU: no more than 1.2x the reference path's own low-precision error.
    (bf16 decode measured 1.36x on an H200 before the decode kernel split its softmax weights for P.V:
    the reference path decodes in fp32, so one bf16 rounding of the weights was over the rule.)"""
    if case[0] == "gpu_auto_small" and dtype == torch.bfloat16:
        # head_dim 128 prefill keeps the single rounded query tile by default: measured 1.94x (0.00436 vs
        # 0.00224) on an H200. With CHUNKLLAMA_PREFILL_QSPLIT=1 the same case is 0.50x (0.00111) but the
        # split's 64x64 tiles make head_dim-128 prefill 1.72x slower (bench/results/prefill_qsplit*_h200.md),
        # slower than SDPA flash, so the split stays opt-in there (the split kind is tested below at 0.73x).
        request.applymarker(pytest.mark.xfail(reason="bf16 head_dim-128 prefill without the query split: 1.94x "
                                              "the reference error (issue 16's precision goal, open)", strict=False))
    result = run_case(case, dtype, "cuda")
    print(case[0], dtype, result)
    _check(result, dtype, ratio=1.2, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiled_equals_eager():
    """Inductor (fullgraph) keeps the custom ops and gives eager's output."""
    results = run_compile_case("cuda", backend="inductor", dtype=torch.bfloat16, cases=GPU_COMPILE_CASES)
    for name, result in results.items():
        assert result["equal"], (name, result)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("splits", [None, 7, 200])
def test_gpu_decode_same_result_every_run(splits):
    """Split-K decode is deterministic: no atomics, the same partials merged in the same order, also
    when some splits see no key (200 splits) and the merge takes several blocks of splits."""
    from chunkllama.attention.triton_decode import dca_decode

    case = ("race", "decode", 3, 32, 8, 2, 40001, 128, 8192, (0, 17, 3000))
    q, k, v, qpos, kpos, rope, config = make_inputs(case, torch.bfloat16, "cuda", seed=3)
    args = (q, k, v, qpos, kpos, rope.inv_freq, 1.0, config.chunk_len, config.chunk_size, q.shape[-1] ** -0.5)
    first = dca_decode(*args, splits=splits)
    for _ in range(50):
        assert torch.equal(dca_decode(*args, splits=splits), first)
    assert torch.isfinite(first).all()


if __name__ == "__main__" and "--worker" in sys.argv:
    worker_main(_worker_results)


@pytest.mark.parametrize(("q_heads", "kv_heads", "q_len", "kernel"), [
    (9, 3, 1, "decode"), (32, 8, 4, "decode"), (9, 3, 6, "prefill"), (9, 3, 20, "prefill"), (32, 8, 5, "prefill"),
])
def test_dispatch_sends_only_16_row_pieces_to_the_decode_kernel(monkeypatch, q_heads, kv_heads, q_len, kernel):
    """Which kernel a piece of ``q_len`` new tokens reaches (the kernels replaced by recorders)."""
    pytest.importorskip("triton")
    from chunkllama.attention import triton_dispatch
    from chunkllama.config import DCAConfig
    from chunkllama.rope import RotaryParams

    called = []
    monkeypatch.setattr(triton_dispatch, "dca_decode", lambda *a: called.append("decode"))
    monkeypatch.setattr(triton_dispatch, "dca_prefill", lambda *a: called.append("prefill"))
    q = torch.zeros(1, q_heads, q_len, 64, dtype=torch.float16)
    kv = torch.zeros(1, kv_heads, 100, 64, dtype=torch.float16)
    positions = torch.arange(100)[None]
    rope = RotaryParams(torch.ones(32), 1.0)
    triton_dispatch.launch(q, kv, kv, positions[:, -q_len:], positions, rope, DCAConfig(32), 0.125)
    assert called == [kernel]


_LARGE_TILE_DECODE = """
import torch
from chunkllama.attention import dca_attention
from chunkllama.attention.triton_decode import dca_decode
from chunkllama.config import DCAConfig
from chunkllama.rope import RotaryParams, apply_rope
tq, tk, d = {tq}, 32818, 64
cfg = DCAConfig(8192)
inv = 1.0 / (100000.0 ** (torch.arange(0, d, 2, device="cuda").float() / d))
rope = RotaryParams(inv, 1.0)
torch.manual_seed(0)
q = torch.randn(1, tq, 9, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
k = torch.randn(1, 3, tk, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn(1, 3, tk, d, device="cuda", dtype=torch.bfloat16)
kpos = torch.arange(tk, device="cuda")[None]
qpos = kpos[:, -tq:].contiguous()
k = apply_rope(k, rope, kpos % cfg.chunk_len)
out = dca_decode(q, k, v, qpos, kpos, inv, 1.0, cfg.chunk_len, int(cfg.chunk_size), d ** -0.5).float()
ref = dca_attention(q.float(), k.float(), v.float(), qpos, kpos, rope, cfg, d ** -0.5, backend="reference")
print("MAXERR", (out - ref).abs().max().item())
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("q_len", [
    pytest.param(10, id="rows32"),  # passed on the H200 (2026-12-03, second run)
    pytest.param(20, id="rows64", marks=pytest.mark.xfail(
        reason="the 64-row decode tile faults on the H200 (illegal memory access, twice on 2026-12-03; "
               "see DECODE_MAX_ROWS): the dispatcher does not use it", strict=False)),
])
def test_gpu_decode_kernel_with_32_and_64_rows(q_len):
    """The decode kernel called directly with more than 16 packed rows, in a subprocess (an illegal memory
    access leaves the CUDA context unusable for every later test)."""
    import subprocess
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    proc = subprocess.run([sys.executable, "-c", _LARGE_TILE_DECODE.format(tq=q_len)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = float(proc.stdout.split("MAXERR")[-1])
    assert err < 0.02, err


def test_decode_max_rows_setting_is_checked():
    pytest.importorskip("triton")
    from chunkllama.attention.triton_dispatch import DECODE_MAX_ROWS, _decode_max_rows

    assert DECODE_MAX_ROWS == 16 or os.environ.get("CHUNKLLAMA_DECODE_MAX_ROWS")
    assert _decode_max_rows("64") == 64
    with pytest.raises(ValueError, match="16, 32 or 64"):
        _decode_max_rows("128")


def test_decode_tiles_follow_the_cache_length(monkeypatch):
    """The H200-tuned split pass: 64-key tiles in 3 stages, 8 warps below 96k cached keys and 4 from there;
    CHUNKLLAMA_DECODE_CONFIG overrides (bench_attention.py --tune-decode)."""
    pytest.importorskip("triton")
    from chunkllama.attention import triton_decode

    monkeypatch.setattr(triton_decode, "_INTERPRET", False)
    monkeypatch.delenv("CHUNKLLAMA_DECODE_CONFIG", raising=False)
    assert triton_decode._decode_config(16384) == (64, 8, 3, 2)
    assert triton_decode._decode_config(triton_decode.LONG_CACHE - 1) == (64, 8, 3, 2)
    assert triton_decode._decode_config(131072) == (64, 4, 3, 2)
    monkeypatch.setenv("CHUNKLLAMA_DECODE_CONFIG", "128,8,2,2")
    assert triton_decode._decode_config(131072) == (128, 8, 2, 2)
