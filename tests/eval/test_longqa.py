"""L-Eval / few-shot prompts: middle truncation, layouts, end-to-end scoring."""

import json

import pytest

from chunkllama.eval.commands import run_longqa
from chunkllama.eval.longqa import QAItem, build_prompt, iter_items, render_prompt, truncate_middle


def test_truncate_middle_keeps_both_ends(tiny_tokenizer):
    text = "Startups are hard. " + "The sky is blue. " * 50 + "Most founders work on ideas."
    cut, truncated = truncate_middle(tiny_tokenizer, text, 20)
    assert truncated and cut.startswith("Startups") and cut.endswith("ideas.")
    assert len(tiny_tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 22
    assert truncate_middle(tiny_tokenizer, "short", 20) == ("short", False)


def test_iter_items_both_layouts():
    leval = [{"input": "doc", "instructions": ["q1", "q2"], "outputs": ["A", "B"], "evaluation": "exam"},
             {"input": "doc2", "instructions": ["q3"], "outputs": ["x"], "evaluation": "human"}]
    items = iter_items("tpo", leval)
    assert [(i.question, i.gold) for i in items] == [("q1", "A"), ("q2", "B")]
    assert len(iter_items("tpo", leval, limit=1)) == 1
    few = [{"input": "doc", "query": "q", "output": "o", "query_examples": ["e1"], "output_examples": ["a1"]}]
    (item,) = iter_items("qasper", few)
    assert item.few_shot == (("e1", "a1"),)


def test_few_shot_layout_and_chat_template(tiny_tokenizer, tiny_chat_tokenizer):
    item = QAItem("qasper", 0, 0, "DOC", "Q?", "gold", "f1", (("E1?", " a1"), ("E2?", " a2")))
    assert render_prompt(tiny_tokenizer, item, "DOC") == (
        "DOC\n\nQuestion: E1? \nAnswer: a1\n\nQuestion: E2? \nAnswer: a2\n\nQuestion: Q? \nAnswer:")
    exam = QAItem("tpo", 0, 0, "DOC", "Which?\nA. x\nB. y", "A", "exam")
    chat = render_prompt(tiny_chat_tokenizer, exam, "DOC")
    assert chat.startswith("<s>system\n") and "<s>assistant\n" in chat and chat.endswith("Answer:")
    assert not render_prompt(tiny_tokenizer, exam, "DOC").startswith("<s>")


def test_build_prompt_fits_max_length(tiny_tokenizer):
    item = QAItem("tpo", 0, 0, "The sky is blue. " * 200, "Which?\nA. x\nB. y", "A", "exam")
    ids, truncated = build_prompt(tiny_tokenizer, item, 256, 16)
    assert truncated and len(ids) <= 240
    with pytest.raises(ValueError, match="no room"):
        build_prompt(tiny_tokenizer, item, 64, 16)


def test_run_longqa_end_to_end(tiny_model, tiny_chat_tokenizer, tiny_data, tmp_path):
    out = tmp_path / "qa"
    rows = run_longqa((tiny_model, tiny_chat_tokenizer), "none,dca", None, str(tiny_data), str(out), max_length=320,
                      max_new_tokens=3, progress=False)
    assert sorted((r["task"], r["method"]) for r in rows) == [
        ("coursera", "dca"), ("coursera", "none"), ("scientific_qa", "dca"), ("scientific_qa", "none")]
    assert all(0 <= r["score"] <= 100 for r in rows)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(s["n_tokens"] <= 317 for s in samples)
    limited = run_longqa((tiny_model, tiny_chat_tokenizer), "none", "coursera", str(tiny_data), str(tmp_path / "l"),
                         max_length=320, limit=1, max_new_tokens=2, progress=False)
    assert limited[0]["n"] == 1
