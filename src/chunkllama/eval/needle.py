"""Needle in a haystack (gkamradt's test): Paul Graham essays, one needle, depth x length grid.

For a total length ``L`` and a depth of ``p`` percent: the haystack (essays in sorted file order,
tokenized once, repeated if too short) is cut to the tokens left after the prompt's fixed text
and the needle; the needle is inserted at ``p`` percent of that context, moved back to just after
the nearest sentence end (a token ending in ``.``), as in the original test (``p = 100`` appends
it). The question follows the document; the model answers by greedy decoding. The score is the
fraction of the needle's key phrases (``sandwich``, ``dolores park``, ``sunny day``) in the answer;
a cell counts as found when the score is at least 0.5.

The heatmap follows the standard style: depth percent on y (0 at the top), length on x, red ->
yellow -> green for score 0 -> 1, a thin grid between cells.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from . import passkey as pk
from .methods import MethodSpec, method_applied

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "What is the best thing to do in San Francisco?"
SYSTEM_PROMPT = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
INSTRUCTION = "Don't give information outside the document or repeat your findings"
KEY_PHRASES = ("sandwich", "dolores park", "sunny day")
COLORS = ("#F0496E", "#EBB839", "#0CD79F")  # the standard test's red, yellow, green


def depth_grid(n: int) -> list[float]:
    """``n`` evenly spaced depth percents from 0 to 100 (11 -> 0, 10, ..., 100)."""
    if n < 1:
        raise ValueError("need at least one depth")
    if n == 1:
        return [50.0]
    return [round(100 * i / (n - 1), 2) for i in range(n)]


def stop_token_ids(tokenizer: Any) -> set[int]:
    """Token ids that end an answer: EOS and the usual end-of-turn markers in the vocabulary."""
    stops = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        stops.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"):
        if marker in vocab:
            stops.add(int(vocab[marker]))
    return stops


def cut_at_stop(tokens: Sequence[int], stops: set[int]) -> list[int]:
    """``tokens`` up to (not including) the first stop token."""
    out = []
    for token in tokens:
        if token in stops:
            break
        out.append(token)
    return out


def needle_score(answer: str) -> float:
    """Fraction of the needle's key phrases present in ``answer`` (case-insensitive)."""
    text = " ".join(answer.lower().split())
    return sum(phrase in text for phrase in KEY_PHRASES) / len(KEY_PHRASES)


def wrap_prompt(tokenizer: Any, context: str, use_chat: bool | None = None) -> str:
    """The full prompt text around ``context``: the chat template when the tokenizer has one."""
    if use_chat is None:
        use_chat = bool(getattr(tokenizer, "chat_template", None))
    user = f"{context}\n\n{QUESTION} {INSTRUCTION}"
    if use_chat:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{SYSTEM_PROMPT}\n\n{user}\nAnswer:"


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
    input_ids: tuple[int, ...]
    length: int
    depth_percent: float
    insertion_token: int  # index in the context where the needle starts
    context_tokens: int


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_needle_prompt(
    tokenizer: Any,
    haystack_ids: Sequence[int],
    length: int,
    depth_percent: float,
    use_chat: bool | None = None,
) -> NeedlePrompt:
    """The prompt of one grid cell; deterministic for given inputs."""
    overhead = len(_encode(tokenizer, wrap_prompt(tokenizer, "", use_chat)))
    needle_ids = _encode(tokenizer, NEEDLE)
    budget = length - overhead - len(needle_ids)
    if budget <= 0:
        raise ValueError(f"length={length} leaves no room for a haystack (prompt needs {overhead + len(needle_ids)}).")
    hay = list(haystack_ids)
    if not hay:
        raise ValueError("empty haystack")
    while len(hay) < budget:
        hay = hay + list(haystack_ids)
    context = hay[:budget]
    if depth_percent >= 100:
        insert = len(context)
    else:
        insert = int(len(context) * depth_percent / 100)
        back = insert
        while back > 0 and not tokenizer.decode([context[back - 1]]).rstrip().endswith("."):
            back -= 1
        insert = back if back > 0 else insert
    ids = context[:insert] + needle_ids + context[insert:]
    text = wrap_prompt(tokenizer, tokenizer.decode(ids), use_chat)
    return NeedlePrompt(tuple(_encode(tokenizer, text)), length, depth_percent, insert, len(context))


def evaluate_needle(
    model: nn.Module,
    tokenizer: Any,
    haystack: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    methods: Sequence[MethodSpec],
    max_new_tokens: int = 32,
    use_chat: bool | None = None,
    pretraining_length: int | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Score every (method, length, depth) cell. Returns ``(summary rows, per-cell samples)``."""
    from tqdm.auto import tqdm

    haystack_ids = _encode(tokenizer, haystack)
    stops = stop_token_ids(tokenizer)
    bar = tqdm(total=len(methods) * len(lengths) * len(depths), desc="needle", disable=not progress)
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    for spec in methods:
        for length in lengths:
            scores = []
            with method_applied(model, spec, length, pretraining_length) as record:
                for depth in depths:
                    bar.set_postfix_str(f"{spec.label} L={length} depth={depth:g}%")
                    prompt = build_needle_prompt(tokenizer, haystack_ids, length, depth, use_chat)
                    new = pk.greedy_generate(model, prompt.input_ids, max_new_tokens)
                    answer = tokenizer.decode(cut_at_stop(new, stops), skip_special_tokens=True).strip()
                    score = needle_score(answer)
                    scores.append(score)
                    samples.append(
                        {
                            "task": "needle",
                            "method": spec.label,
                            "L": length,
                            "n_tokens": len(prompt.input_ids),
                            "depth_percent": depth,
                            "score": score,
                            "found": score >= 0.5,
                            "answer": answer,
                        }
                    )
                    bar.update(1)
            rows.append(
                {
                    "task": "needle",
                    "method": spec.label,
                    "L": length,
                    "score": sum(scores) / len(scores),
                    "found": sum(s >= 0.5 for s in scores),
                    "n": len(scores),
                    "config": record,
                }
            )
            bar.write(f"needle {spec.label:>8} L={length:>6}: mean score {rows[-1]['score']:.2f}")
    bar.close()
    return rows, samples


def plot_heatmap(
    samples: Sequence[dict[str, Any]], method: str, path: str | Path, title: str | None = None
) -> Path:
    """Standard needle heatmap of one method: depth (y) x length (x), red -> green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cells = [s for s in samples if s["method"] == method]
    lengths = sorted({s["L"] for s in cells})
    depths = sorted({s["depth_percent"] for s in cells})
    grid = torch.full((len(depths), len(lengths)), float("nan"))
    for s in cells:
        grid[depths.index(s["depth_percent"]), lengths.index(s["L"])] = s["score"]
    cmap = LinearSegmentedColormap.from_list("needle", list(COLORS))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(lengths) + 3), 0.45 * len(depths) + 2.5), dpi=120)
    mesh = ax.pcolormesh(grid.numpy(), cmap=cmap, vmin=0.0, vmax=1.0, edgecolors="grey", linewidth=0.5)
    fig.colorbar(mesh, ax=ax, label="Score")
    ax.set_xticks([i + 0.5 for i in range(len(lengths))])
    ax.set_xticklabels([f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_yticks([i + 0.5 for i in range(len(depths))])
    ax.set_yticklabels([f"{d:g}" for d in depths])
    ax.invert_yaxis()
    ax.set_xlabel("Token Limit")
    ax.set_ylabel("Depth Percent")
    ax.set_title(title or f'Pressure Testing ({method})\nFact Retrieval Across Context Lengths ("Needle In A HayStack")')
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
