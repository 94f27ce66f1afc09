"""Scoring of generated answers the way L-Eval (and SCROLLS, for F1 / ROUGE) does.

Closed-ended (``evaluation == "exam"``):
- option tasks (coursera, quality, tpo): the answer letters are pulled out of the generation
  (:func:`extract_option_letters`; several letters allowed for coursera), the gold is its first
  word reduced to ``A-D``; exact letters score 1, a strict subset of the gold letters 0.25 (L-Eval's
  "did not select all correct options").
- True/False (sci_fi, gold like ``True [fact: False]``): loyalty and fact are scored separately
  (:func:`judge_labels`), each 1 when the first true/false word matches.
- everything else (topic retrieval): 1 when the gold, lower-cased without spaces, occurs in the
  first non-trivial line of the generation.
Open-ended: token F1 (SQuAD normalisation) and ROUGE-1/2/L F-measures (rouge-score tokenisation,
no stemming), as percentages in :func:`score_answer`'s output; ``em`` (SCROLLS exact match after
normalisation) for few-shot records that ask for it.
"""

from __future__ import annotations

import collections
import math
import re
import string

OPTION_TASKS = ("coursera", "quality", "tpo")
_MULTI_OPTION_TASKS = ("coursera",)
_LETTERS = "ABCD"


# ----------------------------------------------------------------------------- normalisation
def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _leval_normalize(text: str) -> str:
    # L-Eval's exam normalisation keeps case (so option letters stay upper case).
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


# ----------------------------------------------------------------------------- option letters
def gold_option_letters(gold: str) -> str:
    """``"AB"``, ``"(B) text"``, ``"B. text"`` -> the letters A-D of the first word."""
    words = gold.split()
    return re.sub(r"[^A-D]", "", words[0]) if words else ""


def extract_option_letters(response: str, multi: bool = False) -> str:
    """Option letters in a generation: ``"B"``, ``"AB"``, ``"(B) text"``, ``"The answer is C."``.

    ``multi`` (coursera) keeps every letter of a leading run (``"ACD"``) or of listed options;
    otherwise the first A-D letter is the answer. Returns sorted unique letters, or ``""``.
    """
    text = response.strip()
    if not text:
        return ""
    if text in _LETTERS:
        return text
    if not multi:
        # prefer a letter standing alone ("(B)", "B.", "answer: B") over one inside a word
        match = re.search(r"(?<![A-Za-z])([A-D])(?![a-z])", text)
        if match:
            return match.group(1)
        return next((ch for ch in text if ch in _LETTERS), "")
    run = ""
    rest = text
    while rest and rest[0] in _LETTERS:
        run += rest[0]
        rest = rest[1:]
    if len(run) > 1 and (not rest or not rest[0].isalpha()):
        return "".join(sorted(set(run)))
    text = text.split("Question")[0]
    options = re.findall(r"(?<![A-Za-z])([A-D])(?=[\s.,;:)]|$)", text)
    letters = "".join(sorted(set(options)))
    if letters:
        return letters
    for ch in text:
        if ch in _LETTERS:
            return ch
    return ""


def option_score(prediction_letters: str, gold_letters: str) -> float:
    """1 for the exact set of letters, 0.25 for a non-empty strict subset, else 0 (L-Eval)."""
    pred, gold = set(prediction_letters), set(gold_letters)
    if not pred or not gold:
        return 0.0
    if pred == gold:
        return 1.0
    if pred < gold:
        return 0.25
    return 0.0


# ----------------------------------------------------------------------------- true / false
def _first_truth_word(text: str) -> str:
    for word in text.lower().split():
        if "true" in word:
            return "true"
        if "false" in word:
            return "false"
    return "<error>"


def judge_labels(text: str) -> tuple[str, str]:
    """``"True [fact: False]"`` -> ``("true", "false")``; a missing part is ``"<error>"``."""
    loyalty, sep, fact = text.partition("[fact:")
    return _first_truth_word(loyalty), (_first_truth_word(fact.rstrip("] \n")) if sep else "<error>")


def judge_score(prediction: str, gold: str) -> dict[str, float]:
    """Loyalty / fact accuracy of a True/False answer; ``score`` is their mean."""
    gold_loyalty, gold_fact = judge_labels(gold)
    pred_loyalty, pred_fact = judge_labels(prediction)
    loyalty = float(pred_loyalty == gold_loyalty)
    result = {"loyalty": loyalty}
    if gold_fact != "<error>":
        result["fact"] = float(pred_fact == gold_fact)
        result["score"] = (loyalty + result["fact"]) / 2
    else:
        result["score"] = loyalty
    return result


# ----------------------------------------------------------------------------- containment
def first_answer_line(prediction: str) -> str:
    for line in prediction.split("\n"):
        if len(line) > 1:
            return line
    return prediction


def contains_score(prediction: str, gold: str) -> float:
    """L-Eval's exact match for free-form closed answers: gold (no spaces, lower) in the first line."""
    try:
        return float(float(prediction) == float(gold))
    except ValueError:
        pass
    line = first_answer_line(prediction)
    return float(gold.lower().replace(" ", "") in line.lower().replace(" ", ""))


# ----------------------------------------------------------------------------- F1 / ROUGE
def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 after SQuAD normalisation (0..1)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    """SCROLLS exact match: equal after SQuAD normalisation (0 or 1)."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenisation: lower case, non-alphanumerics to spaces."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _f_measure(overlap: int, n_pred: int, n_gold: int) -> float:
    if overlap == 0 or n_pred == 0 or n_gold == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_gold
    return 2 * precision * recall / (precision + recall)


def rouge_n(prediction: str, gold: str, n: int = 1) -> float:
    """ROUGE-N F-measure (0..1)."""
    def grams(tokens: list[str]) -> collections.Counter:
        return collections.Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    pred, ref = grams(rouge_tokens(prediction)), grams(rouge_tokens(gold))
    return _f_measure(sum((pred & ref).values()), sum(pred.values()), sum(ref.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens, 0..1)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(gold)
    return _f_measure(lcs_length(pred, ref), len(pred), len(ref))


# ----------------------------------------------------------------------------- dispatch
def score_answer(task: str, evaluation: str, prediction: str, gold: str) -> dict[str, float]:
    """Score one answer; the returned ``score`` (0..100) is the task's L-Eval headline metric.

    Args:
        task: task name (file stem), e.g. ``coursera``; decides option / judge handling.
        evaluation: the document's ``evaluation`` field: ``exam``, ``f1`` or ``rouge`` (L-Eval), or
            ``em`` (SCROLLS exact match, for few-shot records).
    """
    if evaluation == "exam":
        if any(t in task for t in OPTION_TASKS):
            pred = extract_option_letters(prediction, multi=any(t in task for t in _MULTI_OPTION_TASKS))
            return {"score": 100 * option_score(pred, gold_option_letters(gold)), "extracted": pred}  # type: ignore[dict-item]
        if "[fact:" in gold.lower() or "sci_fi" in task:
            return {k: 100 * v for k, v in judge_score(prediction, gold).items()}
        return {"score": 100 * contains_score(prediction, gold)}
    if evaluation == "em":
        return {"score": 100 * exact_match(prediction, gold), "f1": 100 * f1_score(prediction, gold)}
    f1 = f1_score(prediction, gold)
    r1, r2, rl = rouge_n(prediction, gold, 1), rouge_n(prediction, gold, 2), rouge_l(prediction, gold)
    result = {"f1": 100 * f1, "rouge1": 100 * r1, "rouge2": 100 * r2, "rougeL": 100 * rl}
    if evaluation == "rouge":
        result["rouge_geomean"] = 100 * math.pow(r1 * r2 * rl, 1 / 3) if r1 * r2 * rl > 0 else 0.0
        result["score"] = result["rougeL"]
    else:
        result["score"] = result["f1"]
    return result
