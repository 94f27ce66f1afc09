"""Passkey retrieval swept over lengths x depths x methods (prompts from :mod:`.passkey`).

For every length ``L`` and depth index ``d`` of ``n_depths`` (depth ``(d + 0.5) / n_depths``),
``trials_per_depth`` prompts are built; repetition ``r`` uses trial id ``d + r * n_depths`` for
its key. With one trial per depth this is exactly the protocol of ``../shared/DEVICE.md``
(trials ``t = 0..n-1``, key ``Random(t)``, depth ``(t + 0.5) / n``). Each cell's accuracy is the
fraction of its prompts answered correctly, scored by teacher forcing (default) or greedy decoding.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from . import passkey as pk
from .methods import MethodSpec, method_applied


def sweep_prompts(tokenizer: Any, length: int, n_depths: int = 5, trials_per_depth: int = 1) -> list[pk.PasskeyPrompt]:
    """The prompts of one length: ``n_depths * trials_per_depth`` of them, depth-major."""
    prompts = []
    for d in range(n_depths):
        depth = pk.trial_depth(d, n_depths)
        for r in range(trials_per_depth):
            prompts.append(pk.make_passkey_prompt(tokenizer, length, trial=d + r * n_depths, depth=depth))
    return prompts


def evaluate_passkey(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int],
    methods: Sequence[MethodSpec],
    n_depths: int = 5,
    trials_per_depth: int = 1,
    greedy: bool = False,
    pretraining_length: int | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Passkey accuracy per (method, length) and per (method, length, depth).

    Returns ``(summary rows, per-trial samples)``. Summary rows carry ``passkey`` (accuracy),
    ``correct``/``n`` and ``by_depth`` (depth -> accuracy), and the method's read-back config.
    """
    from tqdm.auto import tqdm

    prompts = {length: sweep_prompts(tokenizer, length, n_depths, trials_per_depth) for length in lengths}
    total = len(methods) * sum(len(p) for p in prompts.values())
    bar = tqdm(total=total, desc="passkey", disable=not progress)
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    for spec in methods:
        for length in lengths:
            bar.set_postfix_str(f"{spec.label} L={length}")
            by_depth: dict[float, list[bool]] = {}
            with method_applied(model, spec, length, pretraining_length) as record:
                for prompt in prompts[length]:
                    result = pk.score_greedy(model, prompt) if greedy else pk.score_teacher_forcing(model, prompt)
                    by_depth.setdefault(round(prompt.depth, 4), []).append(result.correct)
                    samples.append(
                        {
                            "task": "passkey",
                            "method": spec.label,
                            "L": length,
                            "n_tokens": len(prompt.input_ids),
                            "depth": prompt.depth,
                            "passkey": prompt.passkey,
                            "correct": result.correct,
                            "predicted": tokenizer.decode(list(result.predicted_ids)),
                            "predicted_ids": list(result.predicted_ids),
                            "answer_ids": list(result.answer_ids),
                        }
                    )
                    bar.update(1)
            correct = sum(sum(v) for v in by_depth.values())
            n = sum(len(v) for v in by_depth.values())
            rows.append(
                {
                    "task": "passkey",
                    "method": spec.label,
                    "L": length,
                    "passkey": correct / n,
                    "correct": correct,
                    "n": n,
                    "by_depth": {str(d): sum(v) / len(v) for d, v in sorted(by_depth.items())},
                    "scoring": "greedy" if greedy else "teacher_forcing",
                    "config": record,
                }
            )
            bar.write(f"passkey {spec.label:>8} L={length:>6}: {correct}/{n}")
    bar.close()
    return rows, samples
