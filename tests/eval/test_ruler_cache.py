"""RULER prompts kept on disk: a reload gives the very samples that were built, a changed input misses,
and a second evaluate_ruler run with the cache builds nothing and scores the same."""

from __future__ import annotations

import pytest

from chunkllama.eval import ruler, ruler_cache

SHORT = 1024


def _key(tokenizer, **overrides):
    kwargs = dict(task="niah_single_1", length=SHORT, n_samples=2, seed=42, depths=None, use_chat=None, words=None)
    kwargs.update(overrides)
    return ruler_cache.samples_key(ruler_cache.tokenizer_fingerprint(tokenizer), kwargs.pop("task"),
                                   kwargs.pop("length"), kwargs.pop("n_samples"), **kwargs)


@pytest.mark.parametrize(("task", "length"), [("niah_multikey_2", 2048), ("vt", 2048), ("cwe", 2048)])
def test_saved_samples_load_equal(tiny_tokenizer, tmp_path, task, length):
    built = ruler.build_samples(tiny_tokenizer, task, length, 2, seed=7, depths=[0.3])
    key = _key(tiny_tokenizer, task=task, length=length, seed=7, depths=[0.3])
    ruler_cache.save_samples(tmp_path, task, length, key, built)
    loaded = ruler_cache.load_samples(tmp_path, task, length, key)
    assert loaded == built and loaded[0].needle_token_depths == built[0].needle_token_depths
    assert all(isinstance(s.input_ids, tuple) and isinstance(s.needles, tuple) for s in loaded)
    other = _key(tiny_tokenizer, task=task, length=length, seed=8, depths=[0.3])
    assert ruler_cache.load_samples(tmp_path, task, length, other) is None


def test_every_input_changes_the_key(tiny_tokenizer):
    base = _key(tiny_tokenizer)
    changed = [_key(tiny_tokenizer, task="vt"), _key(tiny_tokenizer, length=2048), _key(tiny_tokenizer, n_samples=3),
               _key(tiny_tokenizer, seed=1), _key(tiny_tokenizer, depths=[0.5]), _key(tiny_tokenizer, use_chat=True),
               _key(tiny_tokenizer, words=["an", "essay"])]
    assert base == _key(tiny_tokenizer) and len({base, *changed}) == len(changed) + 1
    other = ruler_cache.samples_key("another tokenizer", "niah_single_1", SHORT, 2, seed=42, depths=None,
                                    use_chat=None, words=None)
    assert other != base


def test_tokenizer_fingerprint_follows_what_tokenizes(tiny_tokenizer, tiny_chat_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    fingerprint = ruler_cache.tokenizer_fingerprint
    assert fingerprint(reloaded) == fingerprint(tiny_tokenizer)  # the same tokenizer, another object
    assert fingerprint(tiny_chat_tokenizer) != fingerprint(tiny_tokenizer)  # a chat template changes prompts


def test_a_broken_file_is_built_again(tiny_tokenizer, tmp_path):
    key = _key(tiny_tokenizer)
    path = ruler_cache.save_samples(tmp_path, "niah_single_1", SHORT, key,
                                    ruler.build_samples(tiny_tokenizer, "niah_single_1", SHORT, 2))
    path.write_bytes(path.read_bytes()[:100])
    assert ruler_cache.load_samples(tmp_path, "niah_single_1", SHORT, key) is None


def test_second_run_loads_instead_of_building(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    kwargs = dict(n_samples=2, depths=[0.25, 0.75], max_new_tokens=3, progress=False, sample_cache=tmp_path / "cache")
    first, _ = ruler.evaluate_ruler(tiny_model, tiny_tokenizer, ["niah_single_1", "fwe"], [SHORT], ["dca"], **kwargs)
    assert len(list((tmp_path / "cache").glob("*.json.gz"))) == 2

    def no_building(*args, **kwargs):
        raise AssertionError("the cached prompts should have been loaded")

    monkeypatch.setattr(ruler, "build_samples", no_building)
    second, _ = ruler.evaluate_ruler(tiny_model, tiny_tokenizer, ["niah_single_1", "fwe"], [SHORT], ["dca"], **kwargs)
    assert [(r["task"], r["score"]) for r in second] == [(r["task"], r["score"]) for r in first]
