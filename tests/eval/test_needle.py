"""Needle prompts: deterministic, needle at a sentence end near the depth, heatmap written."""

from chunkllama.eval.commands import run_needle
from chunkllama.eval.needle import NEEDLE, build_needle_prompt, depth_grid, needle_score


def test_depth_grid_and_score():
    assert depth_grid(11) == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert needle_score("Eat a sandwich and sit in Dolores  Park on a sunny day.") == 1.0
    assert needle_score("eat a SANDWICH") == 1 / 3
    assert needle_score("I don't know") == 0.0


def test_needle_prompt_deterministic_and_placed(tiny_tokenizer):
    hay = tiny_tokenizer("Startups are hard. Most founders work on ideas. " * 20, add_special_tokens=False)["input_ids"]
    for depth in (0, 50, 100):
        a = build_needle_prompt(tiny_tokenizer, hay, 300, depth)
        assert a == build_needle_prompt(tiny_tokenizer, hay, 300, depth)
        text = tiny_tokenizer.decode(a.input_ids)
        assert NEEDLE.strip() in text
        assert abs(len(a.input_ids) - 300) <= 8
        if depth == 50:
            assert 0 < a.insertion_token <= a.context_tokens // 2
            before = tiny_tokenizer.decode(list(hay * 2)[: a.insertion_token])
            assert before.rstrip().endswith(".")
    assert build_needle_prompt(tiny_tokenizer, hay, 300, 0).insertion_token == 0


def test_run_needle_end_to_end(tiny_model, tiny_chat_tokenizer, tiny_data, tmp_path):
    out = tmp_path / "needle"
    rows = run_needle((tiny_model, tiny_chat_tokenizer), "none,dca", "256,320", str(tiny_data), str(out), depths=3,
                      max_new_tokens=4, progress=False)
    assert [(r["method"], r["L"], r["n"]) for r in rows] == [("none", 256, 3), ("none", 320, 3), ("dca", 256, 3), ("dca", 320, 3)]
    assert (out / "needle_dca.png").stat().st_size > 0 and (out / "needle_none.png").is_file()
    assert (out / "summary.json").is_file() and (out / "table.md").is_file()
