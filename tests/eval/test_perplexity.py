"""PG19 protocol: window placement, sliced loss == full loss, end-to-end run."""

import json
import math

import torch
import torch.nn.functional as F

from chunkllama.eval.commands import run_ppl
from chunkllama.eval.data import pg19_corpus, pg19_texts
from chunkllama.eval.perplexity import perplexity, sequence_nll, window_starts


def test_window_starts_protocol():
    assert window_starts(1000, 100) == [0, 900]  # DEVICE.md: w * (N - L) // 1 for w = 0, 1
    assert window_starts(1000, 100, n_windows=3) == [0, 450, 900]
    assert window_starts(1000, 100, n_windows=1) == [0]
    assert window_starts(1000, 400, stride=256) == [0, 256, 512]
    assert window_starts(100, 100) == [0, 0]


def test_sliced_loss_equals_full_logits(tiny_model):
    ids = torch.randint(3, 300, (1, 150))
    total, n = sequence_nll(tiny_model, ids, slice_size=16)
    logits = tiny_model(ids).logits[0, :-1]
    assert n == 149
    assert math.isclose(total, F.cross_entropy(logits, ids[0, 1:], reduction="sum").item(), rel_tol=1e-5)


def test_perplexity_is_exp_of_mean_over_windows(tiny_model):
    tokens = torch.randint(3, 300, (500,))
    result = perplexity(tiny_model, tokens, 100)
    s0, _ = sequence_nll(tiny_model, tokens[:100].unsqueeze(0))
    s1, _ = sequence_nll(tiny_model, tokens[400:].unsqueeze(0))
    assert math.isclose(result["ppl"], math.exp((s0 + s1) / 198), rel_tol=1e-6)


def test_pg19_loader_sorted_and_skips_exact(tiny_data):
    names = [n for n, _ in pg19_texts(tiny_data)]
    assert names == ["1_a.txt", "2_b.txt"]
    assert pg19_corpus(tiny_data / "pg19").count("\n\n") >= 1


def test_run_ppl_end_to_end(tiny_model, tiny_tokenizer, tiny_data, tmp_path):
    out = tmp_path / "ppl"
    rows = run_ppl((tiny_model, tiny_tokenizer), "none,yarn,ntk,dca", "64,128", str(tiny_data), str(out), progress=False)
    assert [(r["method"], r["L"]) for r in rows] == [(m, L) for m in ("none", "yarn", "ntk", "dca") for L in (64, 128)]
    assert all(math.isfinite(r["ppl"]) and r["n_predictions"] == 2 * (r["L"] - 1) for r in rows)
    # within the window every method is plain RoPE (dca: one chunk is 40 tokens, so not at 64)
    assert math.isclose(rows[0]["ppl"], rows[2]["ppl"]) and math.isclose(rows[0]["ppl"], rows[4]["ppl"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "ppl" and len(summary["rows"]) == 8 and "torch" in summary["environment"]
    assert len((out / "samples.jsonl").read_text().splitlines()) == 16
    assert (out / "ppl_vs_length.png").stat().st_size > 0
    assert "| dca |" in (out / "table.md").read_text()
