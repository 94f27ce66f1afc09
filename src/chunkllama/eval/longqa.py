"""Long-document QA: L-Eval tasks (zero-shot) and the seed's few-shot layout, greedy decoding.

Two record layouts are accepted, one JSON object per line:

- **L-Eval**: ``input`` (the document), ``instructions`` (questions), ``outputs`` (gold answers,
  same order), ``evaluation`` (``exam`` | ``f1`` | ``rouge``). Each question becomes one prompt:
  a task-specific system prompt, then the document and the question; for option tasks the
  prompt ends with ``Answer:``. With a chat template (chat models) the system prompt and the
  user turn go through ``tokenizer.apply_chat_template``; otherwise plain text.
- **few-shot** (the seed's SCROLLS-style layout): ``input``, ``query``, ``output``,
  ``query_examples``, ``output_examples``. The prompt is the document followed by
  ``"\\n\\nQuestion: {q} \\nAnswer:{a}"`` for every example and ``"\\n\\nQuestion: {query} \\nAnswer:"``;
  no chat template; the generation is cut at the next ``Question:``.

Documents longer than the room left by ``max_length`` (minus the prompt's fixed text and the
tokens to generate) are truncated in the middle: the first and last halves of the budget are kept.
Scoring is :func:`chunkllama.eval.metrics.score_answer`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from torch import nn

from . import passkey as pk
from .methods import MethodSpec, method_applied
from .metrics import OPTION_TASKS, score_answer
from .needle import cut_at_stop, stop_token_ids

SYSTEM_PROMPTS = {
    "topic": (
        "Below is a record of a long conversation between a USER and an ASSISTANT that covers several "
        "topics. Each topic starts with the USER saying 'I would like to discuss the topic of <TOPIC>'. "
        "Remember every <TOPIC>; at the end you will be asked for the first, second or third one."
    ),
    "coursera": (
        "You are given a long document. Answer the question about it. A multiple-choice question may "
        "have one or several correct options; answer only with the letters of all correct options "
        "(for example A or AB)."
    ),
    "sci_fi": (
        "You are given a science-fiction story. Answer each question with \"True\" or \"False\", "
        "based on the story rather than on background knowledge."
    ),
    "exam": (
        "You are given a long document. Answer the question about it. A multiple-choice question has "
        "exactly one correct option; answer only with its letter (for example A or B). Answer other "
        "questions concisely and accurately."
    ),
    "open": (
        "You are given a long document. Follow the instruction that comes after it: answer the "
        "question, summarise, or write what is asked, based on the document."
    ),
}
DEFAULT_NEW_TOKENS = {"exam": 32, "em": 32, "f1": 128, "rouge": 256}


def system_prompt(task: str, evaluation: str) -> str:
    for key in ("topic", "coursera", "sci_fi"):
        if key in task:
            return SYSTEM_PROMPTS[key]
    return SYSTEM_PROMPTS["exam" if evaluation == "exam" else "open"]


@dataclasses.dataclass(frozen=True)
class QAItem:
    """One question: its document, question, gold answer and scoring."""

    task: str
    doc_index: int
    question_index: int
    document: str
    question: str
    gold: str
    evaluation: str
    few_shot: tuple[tuple[str, str], ...] | None = None  # (query, output) examples, seed layout


def iter_items(task: str, records: Sequence[dict[str, Any]], limit: int | None = None) -> list[QAItem]:
    """Questions of a task in file order (the first ``limit`` of them when given)."""
    items: list[QAItem] = []
    for doc_index, record in enumerate(records):
        if "query" in record:  # few-shot layout
            examples = tuple(zip(record.get("query_examples", []), record.get("output_examples", [])))
            gold = record["output"]
            items.append(
                QAItem(task, doc_index, 0, record["input"], record["query"],
                       gold if isinstance(gold, str) else gold[0], record.get("evaluation", "f1"), examples)
            )
        else:
            evaluation = record.get("evaluation", "exam")
            if evaluation not in ("exam", "f1", "rouge", "em"):
                continue  # human / LLM-judged records have no automatic metric
            for q, (question, gold) in enumerate(zip(record["instructions"], record["outputs"])):
                items.append(QAItem(task, doc_index, q, record["input"], question, gold, evaluation))
        if limit is not None and len(items) >= limit:
            return items[:limit]
    return items


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_middle(tokenizer: Any, text: str, max_tokens: int) -> tuple[str, bool]:
    """``text`` cut to ``max_tokens`` tokens by dropping its middle; returns (text, truncated)."""
    ids = _encode(tokenizer, text)
    if len(ids) <= max_tokens:
        return text, False
    if max_tokens <= 0:
        return "", True
    head = max_tokens // 2
    tail = max_tokens - head
    return tokenizer.decode(ids[:head]) + tokenizer.decode(ids[len(ids) - tail:]), True


def render_prompt(tokenizer: Any, item: QAItem, document: str, use_chat: bool | None = None) -> str:
    """The prompt text of ``item`` around ``document`` (which may be truncated)."""
    if item.few_shot is not None:
        text = document
        for query, output in item.few_shot:
            text += f"\n\nQuestion: {query} \nAnswer:{output}"
        return text + f"\n\nQuestion: {item.question} \nAnswer:"
    if use_chat is None:
        use_chat = bool(getattr(tokenizer, "chat_template", None))
    system = system_prompt(item.task, item.evaluation)
    if "topic" in item.task:
        user = f"{document}\n\n{item.question}"
    elif item.evaluation == "exam":
        user = (f"Document is as follows. {document}\nQuestion: {item.question}\n"
                "Please directly give the answer without any additional output or explanation.")
    else:
        user = f"Document is as follows. {document}\nInstruction: {item.question}\nAnswer this question with {len(item.gold.split())} words."
    answer_prefix = "\nAnswer:" if item.evaluation == "exam" and "topic" not in item.task else ""
    if use_chat:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + answer_prefix.lstrip("\n")
    return f"{system}\n\n{user}{answer_prefix or chr(10) + 'Answer:'}"


def build_prompt(
    tokenizer: Any, item: QAItem, max_length: int, max_new_tokens: int, use_chat: bool | None = None
) -> tuple[list[int], bool]:
    """Token ids of the prompt (document truncated in the middle to fit) and whether it was cut."""
    overhead = len(_encode(tokenizer, render_prompt(tokenizer, item, "", use_chat)))
    budget = max_length - max_new_tokens - overhead
    if budget <= 0:
        raise ValueError(
            f"max_length={max_length} leaves no room for the document: the prompt's fixed text takes "
            f"{overhead} tokens and {max_new_tokens} are reserved for the answer."
        )
    document, truncated = truncate_middle(tokenizer, item.document, budget)
    ids = _encode(tokenizer, render_prompt(tokenizer, item, document, use_chat))
    if len(ids) > max_length - max_new_tokens:  # re-tokenisation drift at the cut
        document, _ = truncate_middle(tokenizer, item.document, budget - (len(ids) - (max_length - max_new_tokens)))
        ids = _encode(tokenizer, render_prompt(tokenizer, item, document, use_chat))
        truncated = True
    return ids, truncated


def clean_generation(item: QAItem, text: str) -> str:
    """Cut a few-shot answer at the next ``Question:``; strip whitespace."""
    if item.few_shot is not None:
        for part in text.split("Question:"):
            if len(part.replace("\n", "")) > 1:
                return part.strip()
    return text.strip()


def evaluate_longqa(
    model: nn.Module,
    tokenizer: Any,
    tasks: dict[str, Sequence[dict[str, Any]]],
    methods: Sequence[MethodSpec],
    max_length: int,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    use_chat: bool | None = None,
    pretraining_length: int | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Score every task with every method. Returns ``(summary rows, per-question samples)``.

    Summary rows: ``{"task", "method", "L", "score", "n", "evaluation", ...}`` where ``score`` is
    the mean of the task's headline metric (0..100).
    """
    from tqdm.auto import tqdm

    items = {task: iter_items(task, records, limit) for task, records in tasks.items()}
    bar = tqdm(total=len(methods) * sum(len(v) for v in items.values()), desc="longqa", disable=not progress)
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    stops = stop_token_ids(tokenizer)
    for spec in methods:
        with method_applied(model, spec, max_length, pretraining_length) as record:
            for task, task_items in items.items():
                bar.set_postfix_str(f"{spec.label} {task}")
                metrics_sum: dict[str, float] = {}
                for item in task_items:
                    n_new = max_new_tokens or DEFAULT_NEW_TOKENS.get(item.evaluation, 128)
                    ids, truncated = build_prompt(tokenizer, item, max_length, n_new, use_chat)
                    new = pk.greedy_generate(model, ids, n_new)
                    new = cut_at_stop(new, stops)
                    prediction = clean_generation(item, tokenizer.decode(new, skip_special_tokens=True))
                    scores = score_answer(task, item.evaluation, prediction, item.gold)
                    for key, value in scores.items():
                        if isinstance(value, (int, float)):
                            metrics_sum[key] = metrics_sum.get(key, 0.0) + float(value)
                    samples.append(
                        {
                            "task": task,
                            "method": spec.label,
                            "L": max_length,
                            "doc": item.doc_index,
                            "question_index": item.question_index,
                            "question": item.question,
                            "gold": item.gold,
                            "prediction": prediction,
                            "evaluation": item.evaluation,
                            "n_tokens": len(ids),
                            "truncated": truncated,
                            **scores,
                        }
                    )
                    bar.update(1)
                n = len(task_items)
                means = {k: v / n for k, v in metrics_sum.items()} if n else {}
                rows.append(
                    {
                        "task": task,
                        "method": spec.label,
                        "L": max_length,
                        "score": means.get("score"),
                        "n": n,
                        "evaluation": task_items[0].evaluation if task_items else None,
                        "metrics": means,
                        "config": record,
                    }
                )
                bar.write(f"longqa {spec.label:>8} {task}: {means.get('score', float('nan')):.2f} (n={n})")
    bar.close()
    return rows, samples


__all__ = [
    "OPTION_TASKS",
    "QAItem",
    "build_prompt",
    "evaluate_longqa",
    "iter_items",
    "render_prompt",
    "truncate_middle",
]
