"""L-Eval / SCROLLS scoring against hand-made cases."""

import pytest

from chunkllama.eval import metrics as M


@pytest.mark.parametrize(
    "gold, letters",
    [("A", "A"), ("AB", "AB"), ("(B) the second option", "B"), ("B. text", "B"), ("ACD", "ACD"), ("text", "")],
)
def test_gold_option_letters(gold, letters):
    assert M.gold_option_letters(gold) == letters


@pytest.mark.parametrize(
    "response, multi, expected",
    [
        ("B", False, "B"),
        ("(B) text of the option", False, "B"),
        ("The answer is C.", False, "C"),
        ("Answer: D", False, "D"),
        ("", False, ""),
        ("AB", True, "AB"),
        ("BA", True, "AB"),
        ("ACD. Because", True, "ACD"),
        ("(B) text", True, "B"),
        ("A and C are correct", True, "AC"),
        ("Answer: B", True, "B"),
        ("C\nQuestion 2. A B", True, "C"),
    ],
)
def test_extract_option_letters(response, multi, expected):
    assert M.extract_option_letters(response, multi=multi) == expected


def test_option_score_partial_credit():
    assert M.option_score("AB", "AB") == 1.0
    assert M.option_score("A", "AB") == 0.25  # L-Eval: not all correct options selected
    assert M.option_score("ABC", "AB") == 0.0
    assert M.option_score("", "A") == 0.0
    assert M.option_score("C", "A") == 0.0


def test_judge_true_false_with_fact():
    assert M.judge_labels("True [fact: False]") == ("true", "false")
    assert M.judge_labels("False") == ("false", "<error>")
    assert M.judge_score("True. [fact: False]", "True [fact: False]") == {"loyalty": 1.0, "fact": 1.0, "score": 1.0}
    assert M.judge_score("False [fact: False]", "True [fact: False]")["score"] == 0.5
    assert M.judge_score("true", "True")["score"] == 1.0


def test_contains_score_topic_retrieval():
    assert M.contains_score("The role of art in society", "The role of art in society") == 1.0
    assert M.contains_score("\nthe Role of Art in society.\nmore", "The role of art in society") == 1.0
    assert M.contains_score("space tourism", "The role of art in society") == 0.0
    assert M.contains_score("42", "42.0") == 1.0


def test_f1_and_rouge_hand_made():
    assert M.f1_score("the cat sat", "a cat sat") == 1.0  # articles dropped
    assert M.f1_score("cat", "cat sat") == pytest.approx(2 / 3)
    assert M.f1_score("", "") == 1.0
    assert M.f1_score("dog", "cat") == 0.0
    # LCS("a b c d", "a c d e") = 3 -> P = R = 3/4
    assert M.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert M.rouge_n("a b c d", "a c d e", 1) == pytest.approx(0.75)
    assert M.rouge_n("a b c d", "a c d e", 2) == pytest.approx(1 / 3)
    assert M.rouge_l("Hello, World!", "hello world") == 1.0


def test_score_answer_dispatch():
    assert M.score_answer("coursera", "exam", "AB", "AB")["score"] == 100
    assert M.score_answer("coursera", "exam", "A", "AB")["score"] == 25
    assert M.score_answer("tpo", "exam", "(C) the third", "C")["score"] == 100
    assert M.score_answer("sci_fi", "exam", "True [fact: True]", "True [fact: False]")["score"] == 50
    assert M.score_answer("topic_retrieval_longchat", "exam", "The future of space tourism", "The future of space tourism")["score"] == 100
    f1 = M.score_answer("scientific_qa", "f1", "relu and tanh", "relu, selu, tanh")
    assert f1["score"] == pytest.approx(100 * M.f1_score("relu and tanh", "relu, selu, tanh"))
    rouge = M.score_answer("meeting_summ", "rouge", "a b c d", "a c d e")
    assert rouge["score"] == pytest.approx(75.0)


def test_exact_match_scrolls():
    assert M.exact_match("The Answer.", "answer") == 1.0
    assert M.exact_match("an answer here", "answer") == 0.0
    assert M.score_answer("quality", "em", "The answer", "answer")["score"] == 100
