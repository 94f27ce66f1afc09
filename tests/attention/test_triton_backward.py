"""The fused Triton backward of DCA prefill against the reference path's autograd gradients.

Two rules:

- **exact** (fp32 inputs, the kernels called directly; the interpreter computes fp32 dots exactly
  enough): ``dq``, ``dk``, ``dv`` within ``2e-5`` of the fp32 reference path's gradients.
- **low precision** (fp16, through :func:`chunkllama.attention.dca_attention` with
  ``backend="triton"``): error against the fp32 reference (same fp16-rounded inputs, upcast) at most
  ``2 x`` the error of the reference path run in fp16, plus a small ``atol`` (flash-attention's rule).

Keys enter rotated (as cached); the low-precision cases rotate them inside the graph with
:func:`chunkllama.attention.rotate_keys`, so ``dk`` also passes through the rotation kernel's backward.
On the CPU the kernels run under ``TRITON_INTERPRET=1`` in one subprocess (see ``interpreter_worker``);
the interpreter's bf16 ``tl.dot`` is wrong on the CPU, so bf16 runs in the GPU tests (``-m gpu``).
"""

from __future__ import annotations

import sys

import pytest
import torch

from interpreter_worker import run_worker, worker_main

ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3}

# (name, B, Hq, Hk, Tq, Tk, D, (pretraining_length, chunk_size, local_window), left pads per row)
# (32, None, None): chunk_len 20, tiles of 16 do not divide it (general per-element tiles);
# (64, 40, 8): chunk_len 32, tiles divide it (the phased path); (16, ...): chunk_len 10 < a tile.
CPU_CASES = [
    ("general_3chunks", 1, 2, 1, 61, 61, 64, (32, None, None), (0,)),
    ("phased_3chunks", 1, 2, 2, 96, 96, 64, (64, 40, 8), (0,)),
    ("gqa4_pad_chunked", 2, 4, 1, 40, 96, 64, (64, 40, 8), (3, 40)),
    ("gqa2_pad_general", 2, 4, 2, 45, 70, 64, (32, None, None), (0, 5)),
    ("tiny_chunks_pad", 2, 4, 2, 50, 77, 64, (16, None, None), (0, 7)),
    ("d128", 1, 2, 1, 60, 60, 128, (32, None, None), (0,)),
    ("decode_shaped", 2, 4, 2, 1, 70, 64, (32, None, None), (0, 5)),
]
EXACT_TOL = 2e-5
UNEQUAL_CASES = ("phased_3chunks", "gqa4_pad_chunked")


def make_case(case, seed=0):
    """Unrotated fp32 ``q``, ``k``, ``v``, a cotangent ``g``, positions, rope and config."""
    from chunkllama.config import DCAConfig
    from chunkllama.rope import RotaryParams

    _, batch, q_heads, kv_heads, q_len, kv_len, head_dim, (length, chunk, local), pads = case
    config = DCAConfig(length, chunk_size=chunk, local_window=local)
    gen = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    g = torch.randn(batch, q_heads, q_len, head_dim, generator=gen)
    key_positions = torch.arange(kv_len)[None, :] - torch.tensor(pads)[:, None]
    query_positions = key_positions[:, kv_len - q_len:].clone()
    return q, k, v, g, query_positions, key_positions, RotaryParams(inv_freq), config


def _grads(fn, tensors, dtype, g):
    leaves = [t.to(dtype).detach().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    (out.float() * g).sum().backward()
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def run_case(case, dtype, device) -> dict:
    """Errors of out, dq, dk, dv: kernel vs fp32 reference, and (low precision) reference vs fp32 reference."""
    from chunkllama.attention import dca_attention, rotate_keys
    from chunkllama.attention.reference import reference_dca_attention
    from chunkllama.attention.triton_prefill_backward import dca_prefill_trainable
    from chunkllama.positions import key_rope_positions

    q, k, v, g, qpos, kpos, rope, config = make_case(case)
    q, k, v, g, qpos, kpos = (t.to(device) for t in (q, k, v, g, qpos, kpos))
    rope = type(rope)(rope.inv_freq.to(device))
    scale = q.shape[-1] ** -0.5
    rotation = key_rope_positions(kpos.clamp(min=0), config.chunk_len)
    names = ("out", "dq", "dk", "dv")

    if dtype == torch.float32:  # kernels directly, keys given rotated
        k = rotate_keys(k, rope, rotation, backend="reference")
        want = _grads(lambda a, b, c: reference_dca_attention(a, b, c, qpos, kpos, rope, config, scale), (q, k, v),
                      torch.float32, g)
        got = _grads(lambda a, b, c: dca_prefill_trainable(a, b, c, qpos, kpos, rope.inv_freq, 1.0, config.chunk_len,
                                                            config.chunk_size, scale), (q, k, v), torch.float32, g)
        return {n: {"err": (a - b).abs().max().item(), "max": b.abs().max().item()} for n, a, b in zip(names, got, want)}

    q, k, v = (t.to(dtype).float() for t in (q, k, v))  # the low-precision inputs, exactly, for every path

    def dca(backend):
        def fn(a, b, c):
            return dca_attention(a, rotate_keys(b, rope, rotation, backend), c, qpos, kpos, rope, config, scale,
                                 backend=backend)
        return fn

    want = _grads(dca("reference"), (q, k, v), torch.float32, g)
    lowp = _grads(dca("reference"), (q, k, v), dtype, g)
    got = _grads(dca("triton"), (q, k, v), dtype, g)
    return {
        n: {"err": (a - w).abs().max().item(), "ref_err": (r - w).abs().max().item(), "max": w.abs().max().item(),
            "finite": bool(torch.isfinite(a).all())}
        for n, a, r, w in zip(names, got, lowp, want)
    }


def run_model_case(device="cpu", dtype=torch.float16) -> dict:
    """A tiny Llama (head_dim 64, GQA 4:1), left-padded batch of 61 tokens over 3+ chunks: parameter gradients
    of ``loss.backward()`` with backend "triton" and "reference" in ``dtype``, vs the fp32 model on "reference"."""
    import transformers

    import chunkllama

    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=256, rope_theta=10000.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(4.0)  # sharper attention, so a wrong rotation shows
    ids = torch.randint(3, 96, (2, 61), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)
    ids, mask, position_ids = ids.to(device), mask.to(device), position_ids.to(device)

    def grads(model_dtype, backend):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=model_dtype).to(device)
        model.load_state_dict(base.state_dict())
        chunkllama.apply_dca(model, 32, backend=backend)
        logits = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits.float()
        keep = mask[:, 1:].bool()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])
        loss.backward()
        return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    want, lowp, got = grads(torch.float32, "reference"), grads(dtype, "reference"), grads(dtype, "triton")
    attention = [n for n in want if "self_attn" in n]
    return {
        n: {"err": (got[n] - want[n]).abs().max().item(), "ref_err": (lowp[n] - want[n]).abs().max().item(),
            "max": want[n].abs().max().item()}
        for n in attention + ["model.embed_tokens.weight"]
    }


def run_rope_case(device="cpu", dtype=torch.float16) -> dict:
    """Gradient of the rotation kernel (its backward: the same kernel at -positions) vs autograd of
    :func:`chunkllama.rope.apply_rope`, positions up to 40, attention scaling 1.3."""
    from chunkllama.attention.triton_rope import rotate_at
    from chunkllama.rope import RotaryParams, apply_rope

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 41, 64, generator=gen).to(device, dtype)
    g = torch.randn(2, 3, 41, 64, generator=gen).to(device, dtype)
    positions = torch.stack([torch.arange(41), torch.arange(41).flip(0)]).to(device)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))).to(device)
    grads = []
    for fn in (lambda t: rotate_at(t, positions, inv_freq, 1.3), lambda t: apply_rope(t, RotaryParams(inv_freq, 1.3), positions)):
        leaf = x.clone().requires_grad_(True)
        fn(leaf).backward(g)
        grads.append(leaf.grad.float())
    return {"err": (grads[0] - grads[1]).abs().max().item(), "max": grads[1].abs().max().item()}


def run_compile_case() -> dict:
    """``torch.compile(fullgraph=True, backend="aot_eager")`` traces forward and backward through the custom
    ops (the autograd formula registered with ``torch.library``): gradients equal eager's."""
    from chunkllama.attention.triton_prefill_backward import dca_prefill_trainable

    q, k, v, g, qpos, kpos, rope, config = make_case(CPU_CASES[3])

    def step(a, b, c):
        return dca_prefill_trainable(a, b, c, qpos, kpos, rope.inv_freq, 1.0, config.chunk_len, config.chunk_size, 0.125)

    runs = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        leaves = [t.half().requires_grad_(True) for t in (q, k, v)]
        (fn(*leaves).float() * g).sum().backward()
        runs.append([t.grad for t in leaves])
    return {"equal": [bool(torch.equal(a, b)) for a, b in zip(*runs)]}


# Unequal tiles (``BLOCK_M,BLOCK_N,warps,stages`` of the dK/dV and the dQ kernel): key tiles spanning two
# query tiles (the dK/dV walk's diagonal is two masked tiles) and query blocks spanning two key tiles.
UNEQUAL_TILES = {"CHUNKLLAMA_BWD_DKDV_CONFIG": "16,32,1,1", "CHUNKLLAMA_BWD_DQ_CONFIG": "32,16,1,1"}


def run_with_env(case, env: dict) -> dict:
    """:func:`run_case` on fp32 with the environment variables ``env`` set for its duration."""
    import os

    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        return run_case(case, torch.float32, "cpu")
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def _worker_results() -> dict:
    results = {"rope": run_rope_case(), "compiled": run_compile_case()}
    for case in CPU_CASES:
        if case[4] > 1:  # the exact rule on the prefill kernel itself
            results["exact/" + case[0]] = run_case(case, torch.float32, "cpu")
            if case[0] in UNEQUAL_CASES:
                results["unequal/" + case[0]] = run_with_env(case, UNEQUAL_TILES)
        results["fp16/" + case[0]] = run_case(case, torch.float16, "cpu")
    results["model"] = run_model_case()
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    return run_worker(__file__)


def _check_lowp(result, dtype, ratio=2.0, atol=None):
    """``err <= ratio * ref_err + atol``; ``atol`` defaults to ``ATOL[dtype]`` (of gradients of order 1)."""
    for name, r in result.items():
        assert r.get("finite", True), (name, r)
        assert r["max"] > 1e-3, (name, r)  # not vacuous
        bound = ATOL[dtype] * max(1.0, r["max"]) if atol is None else atol * r["max"]
        assert r["err"] <= ratio * r["ref_err"] + bound, (name, r)


@pytest.mark.parametrize("case", [c for c in CPU_CASES if c[4] > 1], ids=[c[0] for c in CPU_CASES if c[4] > 1])
def test_interpreter_gradients_exact_fp32(case, interpreter_results):
    for name, r in interpreter_results["exact/" + case[0]].items():
        assert r["max"] > 1e-2 and r["err"] <= EXACT_TOL, (name, r)


@pytest.mark.parametrize("name", sorted(UNEQUAL_CASES))
def test_interpreter_gradients_exact_with_unequal_tiles(name, interpreter_results):
    """The phased walks with key and query tiles of different sizes (diagonals of several tiles)."""
    for tensor, r in interpreter_results["unequal/" + name].items():
        assert r["max"] > 1e-2 and r["err"] <= EXACT_TOL, (tensor, r)


@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_interpreter_gradients_fp16_within_reference_error(case, interpreter_results):
    _check_lowp(interpreter_results["fp16/" + case[0]], torch.float16)


def test_interpreter_patched_model_backward_matches_reference(interpreter_results):
    """``loss.backward()`` through a patched fp16 Llama on backend "triton" (prefill kernel, its backward and
    the rotation kernel's backward) gives the parameter gradients of the reference path, FA's rule (measured
    ratios 0.7-1.7; the gradients are small, so the slack is relative: 0.2% of the largest entry)."""
    _check_lowp(interpreter_results["model"], torch.float16, atol=2e-3)


def test_interpreter_rotation_kernel_backward(interpreter_results):
    """The key rotation's gradient reaches the key projection: kernel backward = autograd of apply_rope."""
    result = interpreter_results["rope"]
    assert result["max"] > 1.0 and result["err"] <= 4e-3 * result["max"], result  # fp16 rounding apart


def test_interpreter_compiled_backward_equals_eager(interpreter_results):
    assert interpreter_results["compiled"]["equal"] == [True, True, True]


def test_prefill_op_without_backward_refuses_gradients():
    pytest.importorskip("triton")
    from chunkllama.attention.triton_prefill import dca_prefill

    q = torch.zeros(1, 2, 4, 64, dtype=torch.float16, requires_grad=True)
    pos = torch.arange(4)[None]
    with pytest.raises(RuntimeError, match="dca_prefill_trainable"):
        dca_prefill(q, q, q, pos, pos, torch.ones(32), 1.0, 20, 24, 0.125)


# ---------------------------------------------------------------------------------------------- GPU

# Llama-3-ish geometry at small scale: pretraining 1024 -> chunk_len 640 (tiles divide it), and an odd
# chunk_len (pretraining 200 -> 125) for the general path; bf16 and fp16, GQA, head_dim 64 and 128, padding.
GPU_CASES = [
    ("gpu_gqa4_d128", 1, 32, 8, 2100, 2100, 128, (1024, None, None), (0,)),
    ("gpu_gqa8_d128_pad", 2, 16, 2, 1500, 1500, 128, (1024, None, None), (0, 333)),
    ("gpu_gqa4_d64_general", 2, 8, 2, 700, 900, 64, (200, None, None), (0, 33)),
    ("gpu_gqa1_d64", 1, 8, 8, 1300, 1300, 64, (1024, None, None), (0,)),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_gradients_within_reference_error(case, dtype):
    result = run_case(case, dtype, "cuda")
    print(case[0], dtype, result)
    _check_lowp(result, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", GPU_CASES[:1] + GPU_CASES[2:3], ids=["phased", "general"])
def test_gpu_gradients_exact_fp32_kernels(case):
    """The kernels on fp32 inputs (tf32 dots on the GPU: looser than the CPU's exact rule)."""
    result = run_case(case, torch.float32, "cuda")
    for name, r in result.items():
        assert r["err"] <= 2e-2 * r["max"], (name, r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backward_deterministic():
    from chunkllama.attention.triton_prefill_backward import dca_prefill_trainable

    q, k, v, g, qpos, kpos, rope, config = make_case(GPU_CASES[1])
    args = [t.cuda() for t in (qpos, kpos)] + [rope.inv_freq.cuda(), 1.0, config.chunk_len, config.chunk_size, 0.1]
    leaves = [t.cuda().bfloat16().requires_grad_(True) for t in (q, k, v)]
    first = None
    for _ in range(5):
        for t in leaves:
            t.grad = None
        (dca_prefill_trainable(*leaves, *args).float() * g.cuda()).sum().backward()
        grads = [t.grad.clone() for t in leaves]
        if first is None:
            first = grads
        assert all(torch.equal(a, b) for a, b in zip(grads, first))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_patched_model_backward_matches_reference():
    _check_lowp(run_model_case("cuda", torch.bfloat16), torch.bfloat16, atol=1e-2)


if __name__ == "__main__" and "--worker" in sys.argv:
    worker_main(_worker_results)
