"""The batched engine: batched greedy output equals each request served alone (rows of different
lengths crossing DCA chunk boundaries, requests joining mid-way), the prefix cache skips a shared
prefix and gives the same answer, LRU eviction, cancellation frees the slot, limits."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import DynamicCache

from chunkllama import apply_dca
from chunkllama.serving.batching import (
    BatchedEngine, ContextTooLong, Delta, EngineStopped, Failed, Finished, Progress, QueueFull,
)
from chunkllama.serving.prefix_cache import PrefixCache
from chunkllama.serving.sampling import SamplingParams

WINDOW = 32  # DCA: chunk_size 24, local_window 4, chunk_len 20


@pytest.fixture(scope="module")
def model(tokenizer):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # sharper attention than the default init, so a wrong position shows
        for name, param in lm.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0.0, 0.25)
    return apply_dca(lm, pretraining_length=WINDOW)


def prompt(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=gen).tolist()


def greedy_alone(model, ids, new):
    """Reference: one sequence, one full prefill, then a plain cached greedy loop."""
    cache = DynamicCache()
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), None, None, cache, use_cache=True).logits[:, -1]
        for _ in range(new):
            token = int(logits.argmax(-1))
            out.append(token)
            pos = torch.tensor([[len(ids) + len(out) - 1]])
            logits = model(torch.tensor([[token]]), None, pos, cache, use_cache=True).logits[:, -1]
    return out


class Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, (Finished, Failed)):
            self.done.set()

    @property
    def final(self):
        assert self.done.wait(60), "request did not finish"
        return self.events[-1]


def run(engine, ids, new, **params):
    col = Collector()
    engine.submit(ids, SamplingParams(max_new_tokens=new, **params), col)
    return col


@pytest.fixture
def engine(model, tokenizer):
    eng = BatchedEngine(model, tokenizer, max_batch=4, max_queue=8, prefill_chunk=16, eos_token_ids=())
    yield eng.start()
    eng.stop(timeout=5)


def test_batched_greedy_equals_each_request_alone(engine, model):
    lengths, new = (45, 70, 23, 61), 24  # different lengths; every row crosses a chunk boundary (20, 40, ...)
    prompts = [prompt(n, seed=n) for n in lengths]
    collectors = [run(engine, p, new) for p in prompts]
    late = run(engine, prompt(33, seed=5), new)  # queued: joins when a slot frees, others still decoding
    for p, col in zip(prompts + [prompt(33, seed=5)], collectors + [late]):
        final = col.final
        assert isinstance(final, Finished) and final.finish_reason == "length"
        assert list(final.token_ids) == greedy_alone(model, p, new)
        assert final.completion_tokens == new and final.prompt_tokens == len(p)
        assert "".join(e.text for e in col.events if isinstance(e, Delta)) == final.text
        progress = [e for e in col.events if isinstance(e, Progress)]
        assert progress[-1] == Progress(len(p), len(p)) and len(progress) == -(-len(p) // 16)
    assert engine.metrics()["mean_batch"] > 1.5  # really batched


def test_short_prompts_arriving_together_prefill_in_one_batch(model, tokenizer):
    """Whole short prompts (1 and 2 tokens too: their pads tie with them at position 1) read in one
    left-padded forward give the same greedy answers as alone."""
    eng = BatchedEngine(model, tokenizer, max_batch=8, prefill_chunk=256, eos_token_ids=())
    prompts = [prompt(n, seed=100 + n) for n in (1, 2, 5, 12, 30, 41)]
    collectors = [run(eng, p, 16) for p in prompts]  # queued before the worker starts: one prefill group
    eng.start()
    try:
        for p, col in zip(prompts, collectors):
            assert list(col.final.token_ids) == greedy_alone(model, p, 16), len(p)
        stats = eng.metrics()
        assert stats["prompt_tokens"] == sum(map(len, prompts)) and stats["decode_steps"] == 15  # one prefill forward, then 15 steps
    finally:
        eng.stop()


def test_request_joins_a_running_batch(engine, model):
    long_col = run(engine, prompt(30, seed=1), 60)
    while not any(isinstance(e, Delta) for e in long_col.events):
        time.sleep(0.005)
    short = prompt(50, seed=2)
    short_col = run(engine, short, 8)
    assert list(short_col.final.token_ids) == greedy_alone(model, short, 8)
    assert not long_col.done.is_set(), "the short request had to wait for the long one"
    assert list(long_col.final.token_ids) == greedy_alone(model, prompt(30, seed=1), 60)


def test_prefix_cache_skips_the_shared_prefix(engine, model):
    document = prompt(57, seed=7)
    first = run(engine, document + prompt(6, seed=8), 10).final
    assert first.cached_tokens == 0
    follow_up = document + prompt(9, seed=9)
    second = run(engine, follow_up, 10).final
    assert second.cached_tokens == 57  # the document's KV came from the cache
    progress = [e for e in engine.metrics()["prefix_cache"].items()]
    assert dict(progress)["hits"] == 1
    assert list(second.token_ids) == greedy_alone(model, follow_up, 10)
    # the same prompt again reuses all but its last token (whose logits are needed)
    again = run(engine, follow_up, 10).final
    assert again.cached_tokens == len(follow_up) - 1 and again.token_ids == second.token_ids


def test_fp8_kv_cache_batched_and_prefix_cached_equals_alone(model, tokenizer):
    """With kv_cache_dtype='fp8' the engine's caches hold packed FP8 rows; batching (left padding with zero
    rows), the prefix cache and joining a batch give the answers of the same model served alone."""
    import copy

    fp8 = apply_dca(copy.deepcopy(model), pretraining_length=WINDOW, kv_cache_dtype="fp8")
    eng = BatchedEngine(fp8, tokenizer, max_batch=4, max_queue=8, prefill_chunk=16, eos_token_ids=()).start()
    try:
        document = prompt(57, seed=7)
        prompts = [document + prompt(6, seed=8), prompt(45, seed=45), prompt(23, seed=23)]
        collectors = [run(eng, p, 12) for p in prompts]
        for p, col in zip(prompts, collectors):
            assert list(col.final.token_ids) == greedy_alone(fp8, p, 12)
        follow_up = document + prompt(9, seed=9)
        second = run(eng, follow_up, 10).final
        assert second.cached_tokens == 57 and list(second.token_ids) == greedy_alone(fp8, follow_up, 10)
        assert all(k.dtype == torch.uint8 for entry in eng.prefix_cache._entries.values() for k, _ in entry.kv)
    finally:
        eng.stop(timeout=5)


def test_prefix_cache_lru_eviction_and_superseded_entries():
    def kv(n):
        return [(torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4))]  # 2 layers' worth: 2*2*n*4*4 bytes

    per_token = 2 * 2 * 4 * 4
    cache = PrefixCache(budget_bytes=25 * per_token)
    cache.store([1, 2, 3, 4, 5], kv(5))
    cache.store([1, 2, 3, 4, 5, 6, 7], kv(7))  # extends the first: replaces it
    assert len(cache) == 1 and cache.nbytes == 7 * per_token
    cache.store([9, 9, 9, 9, 9, 9, 9, 9, 9, 9], kv(10))
    assert cache.lookup([1, 2, 3, 8], limit=10)[0] == 3  # touches the first entry: now most recent
    cache.store([5] * 10, kv(10))  # 27 > 25: evicts the least recently used, the 9s
    assert len(cache) == 2 and cache.nbytes == 17 * per_token
    assert cache.lookup([9, 9, 9], limit=3) == (0, None)
    length, got = cache.lookup([1, 2, 3, 4, 5, 6, 7, 8], limit=6)
    assert length == 6 and got[0][0].shape == (1, 2, 6, 4)
    cache.store([7] * 30, kv(30))  # larger than the whole budget: not stored
    assert len(cache) == 2


def test_cancel_frees_the_slot(model, tokenizer):
    eng = BatchedEngine(model, tokenizer, max_batch=1, max_queue=4, eos_token_ids=()).start()
    try:
        endless = Collector()
        handle = eng.submit(prompt(20, seed=3), SamplingParams(max_new_tokens=200), endless)
        waiting = run(eng, prompt(25, seed=4), 5)
        while not any(isinstance(e, Delta) for e in endless.events):
            time.sleep(0.005)
        handle.cancel()
        assert endless.final.finish_reason == "abort" and endless.final.completion_tokens < 200
        assert list(waiting.final.token_ids) == greedy_alone(model, prompt(25, seed=4), 5)
        assert eng.metrics()["cancelled"] == 1 and not eng.busy()
    finally:
        eng.stop(timeout=5)


def test_limits_context_and_queue(model, tokenizer):
    eng = BatchedEngine(model, tokenizer, max_batch=1, max_queue=1, max_context=64, eos_token_ids=())
    with pytest.raises(ContextTooLong, match="64 tokens") as info:
        eng.submit(prompt(64, seed=1), SamplingParams(), Collector())
    assert info.value.prompt_tokens == 64
    eng.submit(prompt(10, seed=1), SamplingParams(), Collector())  # takes the free slot (worker not started)
    eng.submit(prompt(10, seed=1), SamplingParams(), Collector())  # waits in the queue
    with pytest.raises(QueueFull, match="max-queue 1"):
        eng.submit(prompt(10, seed=1), SamplingParams(), Collector())
    eng.start()
    eng.stop(timeout=10)
    # answers stop at max_context: 60-token prompt, 64-token context -> at most 4 new tokens
    eng2 = BatchedEngine(model, tokenizer, max_context=64, eos_token_ids=()).start()
    try:
        final = run(eng2, prompt(60, seed=2), 50).final
        assert final.completion_tokens == 4 and final.finish_reason == "length"
    finally:
        eng2.stop()


def test_a_failing_consumer_does_not_disturb_others(engine, model):
    def broken(event):
        raise RuntimeError("client bug")

    engine.submit(prompt(30, seed=11), SamplingParams(max_new_tokens=30), broken)
    good = run(engine, prompt(40, seed=12), 12)
    assert list(good.final.token_ids) == greedy_alone(model, prompt(40, seed=12), 12)


def test_needs_dca(tokenizer):
    import transformers

    config = transformers.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="apply_dca"):
        BatchedEngine(transformers.AutoModelForCausalLM.from_config(config), tokenizer)


def test_device_error_stops_the_engine_and_fails_every_request(model, tokenizer, monkeypatch):
    """An error that leaves the device unusable (CUDA: illegal memory access) fails every request at once,
    and later ones are refused with the reason, instead of clients waiting on a dead worker."""
    eng = BatchedEngine(model, tokenizer, max_batch=2, max_queue=8, prefill_chunk=16, eos_token_ids=()).start()
    calls = {"n": 0}
    forward = eng._forward

    def failing_forward(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return forward(*args)

    monkeypatch.setattr(eng, "_forward", failing_forward)
    try:
        collectors = [run(eng, prompt(40, seed=s), 20) for s in (1, 2, 3)]  # the third waits in the queue
        finals = [c.final for c in collectors]
        assert all(isinstance(f, Failed) and "illegal memory access" in f.message for f in finals), finals
        assert "illegal memory access" in eng.failure
        with pytest.raises(EngineStopped, match="fatal error"):
            run(eng, prompt(10, seed=4), 2)
        assert eng.metrics()["failed"] == 3
    finally:
        eng.stop(timeout=2)


def test_an_error_seeding_one_request_fails_that_request_only(engine, model, monkeypatch):
    bad = prompt(30, seed=21)
    lookup = engine.prefix_cache.lookup

    def lookup_or_fail(tokens, limit):
        if list(tokens) == bad:
            raise ValueError("broken entry")
        return lookup(tokens, limit)

    monkeypatch.setattr(engine.prefix_cache, "lookup", lookup_or_fail)
    engine.prefix_cache.budget_bytes = 1 << 20  # lookups happen only with a budget
    failed, good = run(engine, bad, 5), run(engine, prompt(35, seed=22), 6)
    assert isinstance(failed.final, Failed) and "broken entry" in failed.final.message
    assert list(good.final.token_ids) == greedy_alone(model, prompt(35, seed=22), 6)
    assert engine.failure is None


def engine_pieces_case(device: str, tokenizer) -> dict:
    """Prompts whose last prefill piece has every size from 1 to 21 tokens (3 query heads per KV head: 3 to
    63 packed rows), served together on the Triton backend; each first answer token vs the reference
    backend's (rows whose reference top-two gap is under 0.05 are left out as near-ties)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=192, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, head_dim=64, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval().to(device)
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0.0, 0.25)
    prompts = [prompt(32 * 3 + size, seed=size) for size in range(1, 22)]
    apply_dca(lm, pretraining_length=64, backend="reference")
    expected = []
    with torch.no_grad():
        for p in prompts:
            top = lm(torch.tensor([p], device=device)).logits[0, -1].float().topk(2)
            expected.append((int(top.indices[0]), float(top.values[0] - top.values[1])))
    apply_dca(lm, pretraining_length=64, backend="triton")
    eng = BatchedEngine(lm, tokenizer, max_batch=8, max_queue=32, prefill_chunk=32, eos_token_ids=()).start()
    try:
        finals = [c.final for c in [run(eng, p, 3) for p in prompts]]
    finally:
        eng.stop(timeout=5)
    return {"failed": [f.message for f in finals if isinstance(f, Failed)],
            "mismatch": [i for i, (f, (tok, gap)) in enumerate(zip(finals, expected))
                         if isinstance(f, Finished) and gap >= 0.05 and f.token_ids[0] != tok],
            "compared": sum(gap >= 0.05 for _, gap in expected)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_engine_serves_last_pieces_of_every_size(tokenizer):
    """The serving engine's mix of prefill pieces and decode steps on the Triton kernels (the 64-row decode
    tile faulted here once, on the H200): nothing fails, first tokens as the reference backend's."""
    result = engine_pieces_case("cuda", tokenizer)
    assert not result["failed"] and not result["mismatch"] and result["compared"] >= 10, result  # 12 of 21 in the CPU interpreter
