"""RULER-style tasks: prompt generators (length, depth, recoverable answers, seeds), scoring, runner."""

from __future__ import annotations

import collections
import json
import math
import re

import pytest

from chunkllama.eval import ruler_tasks as rt

LENGTH = 2048  # the tiny byte-level tokenizer needs ~1000 tokens for vt's smallest prompt
SHORT = 1024  # for running the tiny model
ESSAY = " ".join(
    f"Startups are hard in year {i}. Most founders work on ideas they think are good! Why? Growth matters."
    for i in range(60)
)


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _unit_tokens(tokenizer, sample: rt.RulerSample) -> int:
    """An upper bound on the tokens one more haystack unit adds to ``sample``'s prompt."""
    spec = rt.TASKS[sample.task]
    if spec.family == "niah" and spec.param("type_haystack") == "needle":
        return max(_tokens(tokenizer, "\n" + line) for line in sample.text.splitlines() if "special magic" in line) + 2
    if spec.family in ("niah", "variable_tracking"):
        if spec.family == "niah" and spec.param("type_haystack") == "essay":
            return max(_tokens(tokenizer, " " + w) for w in ESSAY.split()) + 2
        return _tokens(tokenizer, "\n" + rt.NOISE) + 2
    return 24  # cwe / fwe: one more list word re-draws (cwe) or re-shuffles (fwe) the list


@pytest.fixture(scope="module")
def samples(tiny_tokenizer):
    return {task: rt.make_ruler_sample(tiny_tokenizer, task, LENGTH, depth=0.5, essay=ESSAY) for task in rt.TASK_NAMES}


def test_task_names_and_parsing():
    assert len(rt.TASK_NAMES) == 11
    assert rt.parse_tasks("all") == list(rt.TASK_NAMES)
    assert rt.parse_tasks("niah") == [t for t in rt.TASK_NAMES if t.startswith("niah")]
    assert rt.parse_tasks("vt, cwe,vt") == ["vt", "cwe"]
    with pytest.raises(ValueError, match="Unknown RULER task 'nope'.*niah_single_1"):
        rt.parse_tasks("vt,nope")
    assert rt.needs_essay(["niah_single_2"]) and not rt.needs_essay(["niah_single_1", "vt", "cwe", "fwe"])
    assert rt.DEPTH_GRID[0] == 0.0 and rt.DEPTH_GRID[-1] == 1.0 and len(rt.DEPTH_GRID) == 40


@pytest.mark.parametrize("task", rt.TASK_NAMES)
def test_length_is_hit(tiny_tokenizer, samples, task):
    s = samples[task]
    assert s.input_ids == tuple(tiny_tokenizer(s.text, add_special_tokens=False)["input_ids"])
    gap = LENGTH - s.max_new_tokens - len(s.input_ids)
    assert 0 <= gap < _unit_tokens(tiny_tokenizer, s), (task, gap)
    assert s.max_new_tokens == {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120,
                                "freq_words_extraction": 50}[rt.TASKS[task].family]


def test_seeds_reproduce_prompts(tiny_tokenizer, samples):
    for task in ("niah_multikey_2", "vt", "cwe", "fwe", "niah_multivalue"):
        again = rt.make_ruler_sample(tiny_tokenizer, task, LENGTH, depth=0.5, essay=ESSAY, hint=3)
        assert again == samples[task]
        other = rt.make_ruler_sample(tiny_tokenizer, task, LENGTH, depth=0.5, essay=ESSAY, index=1)
        assert other.answers != samples[task].answers
        reseeded = rt.make_ruler_sample(tiny_tokenizer, task, LENGTH, depth=0.5, essay=ESSAY, seed=7)
        assert reseeded.answers != samples[task].answers
    assert rt.sample_seed("vt", 4096, 3, 42) == "ruler:vt:4096:3:42"


def _needle_lines(text: str, kind: str) -> dict[str, list[str]]:
    """key -> values of every ``One of the special magic ... for KEY is: VALUE.`` in ``text``."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    for key, value in re.findall(rf"One of the special magic {kind} for (\S+) is: (\S+)\.", text):
        found[key].append(value)
    return found


@pytest.mark.parametrize("task", [t for t in rt.TASK_NAMES if t.startswith("niah")])
def test_niah_answers_are_recoverable(samples, task):
    s = samples[task]
    spec = rt.TASKS[task]
    kind = spec.param("type_needle_v")
    context_end = s.text.rindex("What ")
    question = s.text[context_end:]
    needles = _needle_lines(s.text[:context_end], kind)
    queried = [k for k in needles if k in question]
    assert len(queried) == spec.param("num_needle_q")
    assert sorted(v for k in queried for v in needles[k]) == sorted(s.answers)
    assert all(len(needles[k]) == spec.param("num_needle_v") for k in queried)
    value_pattern = {"numbers": r"\d{7}", "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"}[kind]
    assert all(re.fullmatch(value_pattern, a) for a in s.answers)
    if spec.param("num_needle_q") * spec.param("num_needle_v") == 1:
        assert "A special magic " + kind[:-1] + " is hidden" in s.text and "What is the special magic" in s.text
    else:
        assert "Some special magic " + kind + " are hidden" in s.text and "What are all the special magic" in s.text
    if spec.param("type_haystack") == "needle":
        assert sum(map(len, needles.values())) == s.n_units + 1  # the distractors have other keys
    else:
        assert len(needles) == spec.param("num_needle_k")


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey_2", "niah_multiquery"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_target_needle_at_depth(tiny_tokenizer, task, depth):
    s = rt.make_ruler_sample(tiny_tokenizer, task, LENGTH, depth=depth, essay=ESSAY)
    assert s.depth == depth
    i = next(i for i, n in enumerate(s.needles) if n.is_target)
    target = s.needles[i]
    assert s.answers[0] in target.text
    if rt.TASKS[task].param("type_haystack") != "essay":
        assert target.slot == min(int(depth * s.n_units), s.n_units)
    # the needle's first token sits at ``depth`` of the context's tokens, give or take a line or a
    # sentence and the other needles
    assert abs(s.needle_token_depths[i] - depth) <= 0.06, (s.needle_token_depths[i], depth)
    assert tiny_tokenizer.decode(list(s.input_ids[s.needle_tokens[i]:])).lstrip().startswith(target.text[:20])


def test_variable_tracking_chain_resolves(samples):
    s = samples["vt"]
    question = s.text.rindex("Question: Find all variables")
    example_end = s.text.index("Memorize and track", 1)  # the solved example comes first
    assert s.text.count("Memorize and track") == 2
    value = re.search(r"assigned the value (\d{5})", s.text[question:]).group(1)
    assignments = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)", s.text[example_end:question]))

    def resolve(name: str) -> str:
        rhs = assignments[name]
        return resolve(rhs[4:]) if rhs.startswith("VAR ") else rhs

    assert sorted(n for n in assignments if resolve(n) == value) == sorted(s.answers)
    assert len(s.answers) == 5 and all(re.fullmatch(r"[A-Z]{5}", a) for a in s.answers)
    assert f"5 variables are assigned the value {value}, they are:" in s.text


def test_common_words_are_the_most_common(samples):
    s = samples["cwe"]
    main = s.text[s.text.rindex("Below is a numbered list"):]
    counts = collections.Counter(re.findall(r"\d+\. (\S+)", main.split("\nQuestion:")[0]))
    top = {w for w, _ in counts.most_common(10)}
    assert top == set(s.answers) and len(s.answers) == 10
    assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
    assert s.text.count("Below is a numbered list") == 2  # one solved example, as RULER


def test_frequent_words_are_the_most_frequent(samples):
    s = samples["fwe"]
    counts = collections.Counter(s.text[s.text.index("coded words. ") + 13: s.text.index("\nQuestion:")].split())
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "..." and set(ranked[1:4]) == set(s.answers)
    assert counts[ranked[3]] > counts[ranked[4]]


def test_zeta_and_counts():
    assert math.isclose(rt.zeta(2.0), math.pi**2 / 6, rel_tol=1e-10)
    assert math.isclose(rt.zeta(4.0), math.pi**4 / 90, rel_tol=1e-10)
    assert rt.fwe_counts(1000, 4, 2.0) == [607, 151, 67, 37]


def test_chat_template_wraps_prompt(tiny_chat_tokenizer):
    s = rt.make_ruler_sample(tiny_chat_tokenizer, "niah_single_1", LENGTH, depth=0.5)
    assert s.text.startswith("<s>user\nA special magic number is hidden")
    assert "</s>\n<s>assistant\nThe special magic number for " in s.text
    assert s.text.endswith("mentioned in the provided text is")
    assert 0 <= LENGTH - 128 - len(s.input_ids) < 50


def test_fit_units_finds_the_largest_fitting_size():
    for hint in (1, 5, 29, 30, 31, 400, 10**6):
        calls = []

        def count(n):
            calls.append(n)
            return 10 + 3 * n + (n % 2)  # 30 -> 100 fits a budget of 100, 31 -> 104 does not

        assert rt.fit_units(count, 100, hint) == 30
        if hint in (30, 31):
            assert len(set(calls)) <= 6, calls
    assert rt.fit_units(lambda n: 10 + 3 * n, 99, 7, minimum=5) == 29
    assert rt.fit_units(lambda n: 10 + 3 * n, 30, 7, minimum=5) == 6
    assert rt.fit_units(lambda n: 10 + 3 * n, 26, 7, minimum=5) == 5
    with pytest.raises(ValueError, match="smallest haystack"):
        rt.fit_units(lambda n: 200 + n, 100, 3)


def test_bad_arguments(tiny_tokenizer):
    with pytest.raises(ValueError, match="too short for RULER task 'vt'"):
        rt.make_ruler_sample(tiny_tokenizer, "vt", 300)
    with pytest.raises(ValueError, match="depth"):
        rt.make_ruler_sample(tiny_tokenizer, "niah_single_1", LENGTH, depth=1.5)
    with pytest.raises(ValueError, match="essay"):
        rt.make_ruler_sample(tiny_tokenizer, "niah_single_2", LENGTH)
    with pytest.raises(ValueError, match="Unknown RULER task"):
        rt.make_ruler_sample(tiny_tokenizer, "qa_1", LENGTH)


# --- scoring ------------------------------------------------------------------------------------


def test_string_match_all_and_part():
    refs = ["1234567", "ABCDE"]
    assert rt.string_match_all("The numbers are 1234567 and abcde.", refs) == 1.0
    assert rt.string_match_all("1234567", refs) == 0.5
    assert rt.string_match_all("123456", refs) == 0.0
    assert rt.string_match_all("VAR abcdef", ["ABCDE"]) == 1.0  # substring match, as RULER
    assert rt.string_match_part("nothing but abcde", refs) == 1.0
    assert rt.string_match_part("none", refs) == 0.0
    assert rt.postprocess_prediction("  1. a\x00b\t \n") == "1. a\nb"
    with pytest.raises(ValueError):
        rt.string_match_all("x", [])


# --- running a model ----------------------------------------------------------------------------


def test_evaluate_ruler_end_to_end(tiny_model, tiny_tokenizer):
    from chunkllama.eval.ruler import evaluate_ruler

    rows, records = evaluate_ruler(tiny_model, tiny_tokenizer, ["niah_single_1", "fwe"], [SHORT], ["none", "dca"],
                                   n_samples=2, depths=[0.25, 0.75], max_new_tokens=6,
                                   progress=False)
    assert [(r["method"], r["task"]) for r in rows] == [
        ("none", "niah_single_1"), ("none", "fwe"), ("none", "average"),
        ("dca", "niah_single_1"), ("dca", "fwe"), ("dca", "average"),
    ]
    for r in rows:
        assert r["bench"] == "ruler" and r["L"] == SHORT and 0.0 <= r["score"] <= 1.0
    assert rows[0]["n"] == 2 and set(rows[0]["by_depth"]) == {"0.25", "0.75"}
    assert rows[2]["score"] == pytest.approx((rows[0]["score"] + rows[1]["score"]) / 2)
    assert rows[3]["config"]["dca"] is not None and rows[0]["config"]["dca"] is None
    assert len(records) == 8 and {r["depth"] for r in records if r["task"] == "niah_single_1"} == {0.25, 0.75}
    for r in records:
        assert r["score"] == rt.string_match_all(r["prediction"], r["answers"])
        assert r["n_tokens"] <= SHORT - (128 if r["task"] == "niah_single_1" else 50)
    json.dumps(records)


@pytest.mark.parametrize("method", ["none", "dca"])
def test_batched_answers_equal_one_at_a_time(tiny_model, tiny_tokenizer, method):
    from chunkllama.eval.ruler import evaluate_ruler

    kwargs = dict(n_samples=3, depths=[0.2, 0.5, 0.8], max_new_tokens=8, progress=False)
    # niah prompts differ in length by a few tokens, so the batch is left-padded
    _, alone = evaluate_ruler(tiny_model, tiny_tokenizer, ["niah_single_1", "fwe"], [SHORT], [method], **kwargs)
    _, batched = evaluate_ruler(tiny_model, tiny_tokenizer, ["niah_single_1", "fwe"], [SHORT], [method],
                                batch_size=2, **kwargs)
    assert len({r["n_tokens"] for r in alone}) > 1
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in alone]
    assert any(r["prediction"] for r in alone)


def test_batches_outside_dca_shrink_to_fit_their_attention_mask():
    from chunkllama.eval.methods import MethodSpec
    from chunkllama.eval.ruler import method_batch_size

    gib = 2**30
    # 10 padded prompts of 64k in bf16 need an 80 GiB (B, 1, L, L) mask in the model's own attention
    assert method_batch_size(MethodSpec("yarn"), 10, 65536, 2, budget_bytes=16 * gib) == 2
    assert method_batch_size(MethodSpec("ntk"), 10, 32768, 2, budget_bytes=16 * gib) == 8
    assert method_batch_size(MethodSpec("none"), 10, 65536, 4, budget_bytes=16 * gib) == 1
    assert method_batch_size(MethodSpec("none"), 10, 8192, 2, budget_bytes=16 * gib) == 10
    # DCA never forms the mask; batch size 1 stays 1
    assert method_batch_size(MethodSpec("dca"), 10, 1 << 20, 2, budget_bytes=16 * gib) == 10
    assert method_batch_size(MethodSpec("yarn"), 1, 8192, 2, budget_bytes=1) == 1


def test_evaluate_ruler_uses_the_smaller_batches(tiny_model, tiny_tokenizer, monkeypatch):
    from chunkllama.eval import ruler

    sizes = []
    real = ruler.answer_batch

    def recording(model, tokenizer, samples, *args, **kwargs):
        sizes.append(len(samples))
        return real(model, tokenizer, samples, *args, **kwargs)

    monkeypatch.setattr(ruler, "answer_batch", recording)
    monkeypatch.setattr(ruler, "MASK_BUDGET_BYTES", 2 * SHORT * SHORT * 4)  # two fp32 rows of the mask
    ruler.evaluate_ruler(tiny_model, tiny_tokenizer, ["fwe"], [SHORT], ["none", "dca"], n_samples=4, batch_size=4,
                         max_new_tokens=2, progress=False)
    assert sizes == [2, 2, 4]  # none: two batches of 2; dca: one batch of 4


def test_rows_are_handed_over_per_method_and_length(tiny_model, tiny_tokenizer):
    from chunkllama.eval.ruler import evaluate_ruler

    cells = []
    rows, _ = evaluate_ruler(tiny_model, tiny_tokenizer, ["niah_single_1", "fwe"], [SHORT], ["none", "dca"],
                             n_samples=1, max_new_tokens=2, progress=False, on_rows=lambda c: cells.append(list(c)))
    assert [[(r["method"], r["task"]) for r in c] for c in cells] == [
        [(m, "niah_single_1"), (m, "fwe"), (m, "average")] for m in ("none", "dca")]
    assert [r for c in cells for r in c] == rows


def test_batching_arguments_are_checked(tiny_model, tiny_tokenizer):
    from chunkllama.eval.ruler import evaluate_ruler

    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        evaluate_ruler(tiny_model, tiny_tokenizer, ["fwe"], [SHORT], ["dca"], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="--prefill-chunk works with --batch-size 1 only"):
        evaluate_ruler(tiny_model, tiny_tokenizer, ["fwe"], [SHORT], ["dca"], batch_size=2, prefill_chunk=64,
                       progress=False)


def test_run_ruler_writes_report_and_checks_arguments_first(tiny_model, tiny_tokenizer, tiny_data, tmp_path):
    from chunkllama.eval.ruler_command import eval_ruler, run_ruler

    out = tmp_path / "ruler"
    rows = run_ruler((tiny_model, tiny_tokenizer), "dca", "niah_single_2", [SHORT], str(out), n_samples=1,
                     depths=2, data=str(tiny_data), max_new_tokens=4, progress=False)
    assert [r["task"] for r in rows] == ["niah_single_2", "average"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "ruler" and summary["settings"]["depths"] == [0.25, 0.75]
    assert "niah_single_2" in (out / "table.md").read_text() and (out / "ruler_vs_length.png").stat().st_size > 0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 1
    # every argument is checked before a model would load (the model name here does not exist)
    for kwargs, message in [
        ({"tasks": "nope"}, "Unknown RULER task"),
        ({"methods": "bogus"}, "(?i)unknown method"),
        ({"lengths": "100"}, "too short"),
        ({"lengths": "8x"}, "Bad --lengths"),
        ({"samples": 0}, "--samples"),
        ({"depths": 0}, "--depths"),
        ({"max_new_tokens": 0}, "--max-new-tokens"),
    ]:
        with pytest.raises(ValueError, match=message):
            eval_ruler(model="/nonexistent/model", data=str(tiny_data), **kwargs)
    with pytest.raises(FileNotFoundError):
        eval_ruler(model="/nonexistent/model", tasks="niah_single_2", data=str(tmp_path / "missing"))


def test_a_cut_run_keeps_its_finished_rows(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    import chunkllama.eval.ruler as ruler
    from chunkllama.eval.ruler_command import PARTIAL_ROWS, run_ruler

    real, calls = ruler.answer, []

    def answer_then_cut(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the second method's first prompt: Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ruler, "answer", answer_then_cut)
    out = tmp_path / "ruler"
    with pytest.raises(KeyboardInterrupt):
        run_ruler((tiny_model, tiny_tokenizer), "none,dca", "fwe", [SHORT], str(out), n_samples=1, max_new_tokens=2,
                  progress=False)
    kept = [json.loads(line) for line in (out / PARTIAL_ROWS).read_text().splitlines()]
    assert [(r["method"], r["task"]) for r in kept] == [("none", "fwe"), ("none", "average")]
    assert not (out / "summary.json").exists()

    monkeypatch.setattr(ruler, "answer", real)
    rows = run_ruler((tiny_model, tiny_tokenizer), "none,dca", "fwe", [SHORT], str(out), n_samples=1, max_new_tokens=2,
                     progress=False)
    assert not (out / PARTIAL_ROWS).exists()  # the report holds every row now
    assert json.loads((out / "summary.json").read_text())["rows"] == json.loads(json.dumps(rows))


def test_cli_parser_accepts_eval_ruler():
    from chunkllama.cli import build_parser
    from chunkllama.eval.ruler_command import eval_ruler

    args = build_parser({"eval ruler": eval_ruler}).parse_args(
        ["eval", "ruler", "--tasks", "vt,cwe", "--lengths", "8k,16k", "--samples", "3", "--depths", "5", "--no-chat"]
    )
    assert (args.tasks, args.lengths, args.samples, args.depths, args.chat) == ("vt,cwe", "8k,16k", 3, 5, False)
    assert args._command is eval_ruler


@pytest.mark.slow
def test_default_tokenizer_prompts_at_8k(shared_data):
    """SmolLM2's own tokenizer and chat template, the real essays: every task fits 8k tightly."""
    from transformers import AutoTokenizer

    from chunkllama.eval.data import essays_text
    from chunkllama.models import converted_gguf_dir, default_gguf_path

    try:
        tokenizer = AutoTokenizer.from_pretrained(converted_gguf_dir(default_gguf_path()))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    words = rt.essay_words(essays_text(shared_data))
    for task in rt.TASK_NAMES:
        s = rt.make_ruler_sample(tokenizer, task, 8192, depth=0.4, essay=words)
        gap = 8192 - s.max_new_tokens - len(s.input_ids)
        limit = 90 if task == "niah_multikey_3" else 30  # one UUID needle line / one noise line / a few words
        assert 0 <= gap < limit, (task, gap)
        assert s.text.startswith("<|im_start|>") and all(a in s.text for a in s.answers)
        if s.depth is not None:
            i = next(i for i, n in enumerate(s.needles) if n.is_target)
            assert abs(s.needle_token_depths[i] - 0.4) < 0.03, (task, s.needle_token_depths)
