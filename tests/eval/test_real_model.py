"""The default model (SmolLM2-135M-Instruct) on real data at small lengths (minutes on a 2-core CPU)."""

import math

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from chunkllama.models import load_model

    try:
        return load_model()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_ppl_default_model_inside_window(smol, shared_data):
    from chunkllama.eval.data import pg19_corpus
    from chunkllama.eval.methods import parse_methods
    from chunkllama.eval.perplexity import evaluate_ppl, tokenize_corpus

    model, tokenizer = smol
    tokens = tokenize_corpus(tokenizer, pg19_corpus(shared_data))
    assert 900_000 < tokens.numel() < 950_000  # DEVICE.md: about 920k tokens
    rows, _ = evaluate_ppl(model, tokens, [1024], parse_methods("none,yarn,dca"), progress=False)
    ppl = {r["method"]: r["ppl"] for r in rows}
    assert 10 < ppl["none"] < 40
    # inside the window yarn is not applied and DCA is one chunk: all equal to plain RoPE
    assert math.isclose(ppl["yarn"], ppl["none"], rel_tol=1e-6)
    assert math.isclose(ppl["dca"], ppl["none"], rel_tol=1e-3)


def test_passkey_default_model_2k(smol):
    from chunkllama.eval.methods import parse_methods
    from chunkllama.eval.passkey_task import evaluate_passkey

    model, tokenizer = smol
    rows, _ = evaluate_passkey(model, tokenizer, [2048], parse_methods("none"), n_depths=2, progress=False)
    assert rows[0]["passkey"] >= 0.5
