"""RULER-style tasks run on a model: tasks x lengths x methods, greedy answers, recall scores.

Prompts come from :mod:`.ruler_tasks` (built once per length and shared by every method); each
method is applied with :func:`.methods.method_applied` for the length at hand; answers are decoded
greedily with the KV cache (:func:`.passkey.greedy_generate`, or ``model.generate`` on left-padded
batches of ``batch_size`` prompts), stopping at the tokenizer's end-of-turn tokens, cleaned as
RULER's evaluator does and scored with :func:`.ruler_tasks.string_match_all` (a fraction in [0, 1]).

Rows (one per method x task x length, then one ``task = "average"`` row per method x length, the
unweighted mean over the tasks run)::

    {"bench": "ruler", "method": "dca", "task": "niah_single_1", "L": 32768, "score": 0.85, "n": 20,
     "by_depth": {"0.25": 1.0, ...}, "config": {...method read back from the model...}}
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import passkey as pk
from . import ruler_cache
from . import ruler_tasks as rt
from .methods import MethodSpec, method_applied, parse_methods
from .needle import cut_at_stop, stop_token_ids


def check_batching(batch_size: int, prefill_chunk: int | None) -> None:
    """Raise ValueError for a batch size below 1, or batches combined with a chunked prefill."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}.")
    if batch_size > 1 and prefill_chunk is not None:
        raise ValueError("--prefill-chunk works with --batch-size 1 only (batches are prefilled in one forward); "
                         "leave one of them out.")


MASK_BUDGET_BYTES = 16 * 2**30  # most memory a padded batch's attention mask may take in a non-DCA method


def method_batch_size(spec: MethodSpec, batch_size: int, length: int, element_bytes: int,
                      budget_bytes: int | None = None) -> int:
    """Prompts per ``generate`` call for ``spec`` at ``length`` tokens.

    DCA reads padding from the position ids and never forms a mask. Every other method runs the
    model's own attention, which turns a padded batch's attention mask into a dense
    ``(B, 1, L, L)`` tensor of ``element_bytes`` per entry (80 GiB for 10 prompts of 64k in bf16):
    the batch shrinks until that tensor fits ``budget_bytes`` (default :data:`MASK_BUDGET_BYTES`; at
    least one prompt).
    """
    if spec.name == "dca" or batch_size == 1:
        return batch_size
    budget = MASK_BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(1, min(batch_size, budget // (length * length * element_bytes)))


def sample_depth(index: int, depths: Sequence[float] | None) -> float | None:
    """The target depth of sample ``index``: ``depths[index % len(depths)]``, or None (RULER's random)."""
    return None if not depths else float(depths[index % len(depths)])


def build_samples(
    tokenizer: Any,
    task: str,
    length: int,
    n_samples: int,
    *,
    seed: int = 42,
    depths: Sequence[float] | None = None,
    essay: str | Sequence[str] | None = None,
    use_chat: bool | None = None,
) -> list[rt.RulerSample]:
    """Samples ``0..n_samples-1`` of ``task`` at ``length``; each starts its size search from the last."""
    words = rt.essay_words(essay) if isinstance(essay, str) else essay
    samples: list[rt.RulerSample] = []
    for index in range(n_samples):
        samples.append(
            rt.make_ruler_sample(
                tokenizer, task, length, index=index, seed=seed, depth=sample_depth(index, depths), essay=words,
                use_chat=use_chat, hint=samples[-1].n_units if samples else None,
            )
        )
    return samples


def token_budget(sample: rt.RulerSample, max_new_tokens: int | None) -> int:
    """Tokens ``sample``'s answer may take: the task's budget, capped by ``max_new_tokens`` when given."""
    return sample.max_new_tokens if max_new_tokens is None else min(max_new_tokens, sample.max_new_tokens)


def cleaned_answer(tokenizer: Any, new_tokens: Sequence[int], stops: set[int]) -> str:
    """The generated tokens up to the first stop token, decoded and cleaned as RULER's evaluator does."""
    return rt.postprocess_prediction(tokenizer.decode(cut_at_stop(new_tokens, stops), skip_special_tokens=True))


def answer(model: nn.Module, tokenizer: Any, sample: rt.RulerSample, stops: set[int],
           prefill_chunk: int | None = None, max_new_tokens: int | None = None) -> str:
    """The model's greedy answer to ``sample``, cut at the first stop token and cleaned like RULER.

    At most ``sample.max_new_tokens`` tokens are generated, fewer when ``max_new_tokens`` is smaller.
    """
    new = pk.greedy_generate(model, sample.input_ids, token_budget(sample, max_new_tokens), prefill_chunk=prefill_chunk,
                             stop_ids=stops)
    return cleaned_answer(tokenizer, new, stops)


def model_element_bytes(model: nn.Module) -> int:
    """Bytes per element of the model's floating-point parameters (its attention masks' dtype)."""
    return next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4)


def answer_batch(model: nn.Module, tokenizer: Any, samples: Sequence[rt.RulerSample], stops: set[int],
                 max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers to ``samples`` from one ``model.generate`` call on a left-padded batch.

    Each row stops at its first token of ``stops`` (``generate`` pads the finished rows) and is cut
    and cleaned as :func:`answer` does; every row gets at most its own ``max_new_tokens`` budget.
    """
    limits = [token_budget(s, max_new_tokens) for s in samples]
    width = max(len(s.input_ids) for s in samples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops, default=0)
    device = next(model.parameters()).device
    ids = torch.full((len(samples), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        ids[row, width - n:] = torch.as_tensor(list(sample.input_ids), dtype=torch.long)
        mask[row, width - n:] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(limits), do_sample=False,
            eos_token_id=sorted(stops) or None, pad_token_id=int(pad), temperature=None, top_p=None, top_k=None,
        )
    return [cleaned_answer(tokenizer, out[row, width:width + limit].tolist(), stops)
            for row, limit in enumerate(limits)]


def evaluate_ruler(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    lengths: Sequence[int],
    methods: Sequence[MethodSpec | str],
    n_samples: int = 20,
    *,
    essay: str | Sequence[str] | None = None,
    seed: int = 42,
    depths: Sequence[float] | None = None,
    use_chat: bool | None = None,
    pretraining_length: int | None = None,
    prefill_chunk: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
    sample_cache: str | os.PathLike[str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Score every (method, task, length) cell on ``n_samples`` prompts.

    Args:
        model, tokenizer: a causal LM and its tokenizer (the methods are applied to ``model`` in
            turn and removed again).
        tasks: names from :data:`.ruler_tasks.TASKS` (see :func:`.ruler_tasks.parse_tasks`).
        lengths: token budgets (prompt + answer), e.g. ``[8192, 32768]``.
        methods: method specs (``"dca"``, ``MethodSpec("yarn")``, ...).
        n_samples: prompts per cell.
        essay: the Paul Graham essays' text (needed by the essay-haystack NIAH tasks).
        seed: the samples' seed; with the same arguments every prompt is the same.
        depths: NIAH target depths, cycled over the samples (sample ``i`` at ``depths[i % len]``);
            None places them at random grid depths as RULER does.
        use_chat: wrap prompts in the chat template; default: when the tokenizer has one.
        pretraining_length: the model's window for the methods; default: from its config.
        prefill_chunk: prefill this many tokens per forward (all at once when None).
        max_new_tokens: cap on the tokens generated per answer (default: RULER's per task: 128 NIAH,
            30 vt, 120 cwe, 50 fwe); prompts are fitted to the task's own budget either way.
        batch_size: answer this many prompts of a task at once (left-padded ``model.generate``);
            1 decodes each prompt alone, which is the only mode ``prefill_chunk`` works with.
            Methods other than DCA may take fewer at long lengths (:func:`method_batch_size`).
        progress: show a progress bar.
        on_rows: called with each method x length's rows (its tasks, then its average) as soon as
            they are complete, e.g. to save them before a long run is cut short.
        sample_cache: a folder to keep the built prompts in and load them from when every input they
            depend on is the same (:mod:`.ruler_cache`).

    Returns:
        ``(rows, samples)``: the rows described in the module docstring, and one record per prompt
        (answers, prediction, score, depth, needle token depths).
    """
    from tqdm.auto import tqdm

    specs = [parse_methods(m)[0] if isinstance(m, str) else m for m in methods]
    tasks = list(tasks)
    for task in tasks:
        if task not in rt.TASKS:
            raise ValueError(f"Unknown RULER task {task!r}; choose from {', '.join(rt.TASK_NAMES)}.")
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
    check_batching(batch_size, prefill_chunk)
    words = rt.essay_words(essay) if isinstance(essay, str) else essay
    stops = stop_token_ids(tokenizer)
    bar = tqdm(total=len(specs) * len(tasks) * len(lengths) * n_samples, desc="ruler", disable=not progress)
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    fingerprint = ruler_cache.tokenizer_fingerprint(tokenizer) if sample_cache is not None else None
    element_bytes = model_element_bytes(model)  # of the padding masks outside DCA

    def samples_for(task: str, length: int) -> list[rt.RulerSample]:
        key = None
        if sample_cache is not None:
            key = ruler_cache.samples_key(fingerprint, task, length, n_samples, seed=seed, depths=depths,
                                          use_chat=use_chat, words=words)
            found = ruler_cache.load_samples(sample_cache, task, length, key)
            if found is not None:
                return found
        samples = build_samples(tokenizer, task, length, n_samples, seed=seed, depths=depths, essay=words,
                                use_chat=use_chat)
        if key is not None:
            ruler_cache.save_samples(sample_cache, task, length, key, samples)
        return samples

    for length in lengths:
        bar.set_postfix_str(f"building prompts L={length}")
        prompts = {task: samples_for(task, length) for task in tasks}
        for spec in specs:
            run_batch = method_batch_size(spec, batch_size, length, element_bytes)
            if run_batch < batch_size:
                mask_gib = batch_size * length * length * element_bytes / 2**30
                bar.write(f"ruler {spec.label}: batches of {run_batch} at L={length}, not {batch_size}: outside DCA "
                          f"the model's attention would expand the padding mask to {mask_gib:.0f} GiB")
            with method_applied(model, spec, length, pretraining_length) as record:
                task_scores = []
                for task in tasks:
                    bar.set_postfix_str(f"{spec.label} {task} L={length}")
                    scores: list[float] = []
                    by_depth: dict[float, list[float]] = {}
                    predictions: list[str] = []
                    for start in range(0, len(prompts[task]), run_batch):
                        batch = prompts[task][start:start + run_batch]
                        if run_batch == 1:
                            predictions.append(answer(model, tokenizer, batch[0], stops, prefill_chunk, max_new_tokens))
                        else:
                            predictions += answer_batch(model, tokenizer, batch, stops, max_new_tokens)
                        bar.update(len(batch))
                    for sample, prediction in zip(prompts[task], predictions):
                        score = rt.string_match_all(prediction, sample.answers)
                        scores.append(score)
                        if sample.depth is not None:
                            by_depth.setdefault(round(sample.depth, 4), []).append(score)
                        records.append({
                            "bench": "ruler", "task": task, "method": spec.label, "L": length,
                            "index": sample.index, "n_tokens": len(sample.input_ids), "depth": sample.depth,
                            "needle_token_depths": [round(d, 4) for d in sample.needle_token_depths],
                            "answers": list(sample.answers), "prediction": prediction, "score": score,
                        })
                    mean = sum(scores) / len(scores)
                    task_scores.append(mean)
                    rows.append({
                        "bench": "ruler", "method": spec.label, "task": task, "L": length, "score": mean,
                        "n": len(scores),
                        "by_depth": {str(d): sum(v) / len(v) for d, v in sorted(by_depth.items())},
                        "config": record,
                    })
                    bar.write(f"ruler {spec.label:>8} {task:>16} L={length:>6}: {mean:.3f}")
            rows.append({
                "bench": "ruler", "method": spec.label, "task": "average", "L": length,
                "score": rt.ruler_average(task_scores), "n_tasks": len(task_scores), "tasks": tasks,
                "config": record,
            })
            if on_rows is not None:
                on_rows(rows[-len(tasks) - 1:])
    bar.close()
    return rows, records
