"""Passkey sweep: deterministic prompts, protocol-compatible trial ids, end-to-end run."""

import json

from chunkllama.eval import passkey as pk
from chunkllama.eval.commands import run_passkey
from chunkllama.eval.passkey_task import sweep_prompts


def test_sweep_matches_protocol_with_one_trial_per_depth(tiny_tokenizer):
    prompts = sweep_prompts(tiny_tokenizer, 300, n_depths=5)
    reference = pk.passkey_prompts(tiny_tokenizer, 300, n_trials=5)
    assert prompts == reference
    assert [p.depth for p in prompts] == [0.1, 0.3, 0.5, 0.7, 0.9]


def test_sweep_is_deterministic_and_repeats_depths(tiny_tokenizer):
    a = sweep_prompts(tiny_tokenizer, 300, n_depths=2, trials_per_depth=3)
    b = sweep_prompts(tiny_tokenizer, 300, n_depths=2, trials_per_depth=3)
    assert a == b and len(a) == 6
    assert [p.depth for p in a] == [0.25] * 3 + [0.75] * 3
    assert len({p.passkey for p in a}) == 6


def test_run_passkey_end_to_end(tiny_model, tiny_tokenizer, tmp_path):
    out = tmp_path / "pk"
    rows = run_passkey((tiny_model, tiny_tokenizer), ["none", "dca"], ["256", "384"], str(out), depths=2, progress=False)
    assert [(r["method"], r["L"], r["n"]) for r in rows] == [("none", 256, 2), ("none", 384, 2), ("dca", 256, 2), ("dca", 384, 2)]
    assert all(0.0 <= r["passkey"] <= 1.0 and set(r["by_depth"]) == {"0.25", "0.75"} for r in rows)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(len(s["predicted_ids"]) == len(s["answer_ids"]) for s in samples)
    assert (out / "passkey_vs_length.png").is_file()
    greedy = run_passkey((tiny_model, tiny_tokenizer), "dca", "256", str(tmp_path / "g"), depths=2, greedy=True, progress=False)
    teacher = [r for r in rows if r["method"] == "dca" and r["L"] == 256][0]
    assert greedy[0]["passkey"] == teacher["passkey"]  # teacher forcing == greedy verdict
