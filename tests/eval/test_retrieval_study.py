"""bench/bench_retrieval_study.py: the goal check and the merge on synthetic rows, and the script end to end on
a tiny random model (CPU, tiny lengths): row schema, merging of runs, the report."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench_script

CAND = "dca(pretraining_length=4096)"


@pytest.fixture(scope="module")
def study():
    return load_bench_script("bench_retrieval_study")


@pytest.fixture
def model_dir(tiny_model, tiny_tokenizer, tmp_path):
    """The tiny model and tokenizer saved as a model directory (what --model takes)."""
    path = tmp_path / "model"
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _cut_after(monkeypatch, module, name, calls_allowed):
    """Make ``module.name`` raise KeyboardInterrupt (a time limit's SIGINT) once it has run ``calls_allowed`` times."""
    real, calls = getattr(module, name), []

    def run_then_cut(*args, **kwargs):
        calls.append(1)
        if len(calls) > calls_allowed:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, run_then_cut)


def _q(method, length, ppl, passkey):
    return {"bench": "quality", "method": method, "L": length, "ppl": ppl, "passkey": passkey}


def _r(method, length, task, score):
    return {"bench": "ruler", "method": method, "task": task, "L": length, "score": score}


def _rows():
    rows = [_q(CAND, 8192, 22.0, 1.0), _q(CAND, 32768, 23.0, 0.85), _q(CAND, 65536, 24.2, 0.80),
            _q("dca", 8192, 22.2, 1.0), _q("dca", 32768, 24.2, 0.45), _q("dca", 65536, 26.4, 0.0),
            _q("yarn", 8192, 22.2, 1.0), _q("yarn", 32768, 28.3, 0.7), _q("yarn", 65536, 42.6, 0.35),
            _q("ntk", 8192, 22.2, 1.0), _q("ntk", 32768, 39.9, 1.0), _q("ntk", 65536, 100.4, 0.4)]
    scores = {CAND: (0.6, 0.5), "dca": (0.5, 0.4), "yarn": (0.55, 0.45), "ntk": (0.3, 0.2)}
    for method, (s32, s64) in scores.items():
        for task in ("vt", "fwe"):
            rows += [_r(method, 32768, task, s32), _r(method, 65536, task, s64)]
    return rows


def test_goal_check_met_and_not_met(study):
    rows = _rows()
    g = study.goal_check(rows, CAND)
    assert (g["passkey"], g["ppl"], g["ruler"], g["verdict"]) == ("met", "met", "met", "met")
    assert g["ppl_ratio"] == pytest.approx(1.1)  # the bound is inclusive
    assert g["passkey_values"] == {32768: 0.85, 65536: 0.80}
    dca = study.goal_check(rows, "dca")  # compared with yarn and ntk only, not with itself
    assert (dca["passkey"], dca["ppl"], dca["ruler"], dca["verdict"]) == ("not met", "not met", "not met", "not met")  # 26.4 / 22.2 = 1.19
    assert set(dca["ruler_cells"][0]["baselines"]) == {"yarn", "ntk"}
    ntk = study.goal_check(rows, "ntk")
    assert (ntk["passkey"], ntk["ppl"], ntk["verdict"]) == ("not met", "not met", "not met")
    # RULER average must be above every baseline at both lengths: equal is not above
    tied = [dict(r, score=0.55) if r["bench"] == "ruler" and r["method"] == CAND and r["L"] == 32768 else r
            for r in rows]
    assert study.goal_check(tied, CAND)["ruler"] == "not met"


def test_goal_check_incomplete(study):
    rows = _rows()
    no_ruler = [r for r in rows if r["bench"] == "quality"]
    g = study.goal_check(no_ruler, CAND)
    assert (g["passkey"], g["ppl"], g["ruler"], g["verdict"]) == ("met", "met", "incomplete", "incomplete")
    assert study.goal_check(no_ruler, "dca")["verdict"] == "not met"  # a failed part decides
    no_64k = [r for r in rows if r["L"] != 65536]
    g = study.goal_check(no_64k, CAND)
    assert (g["passkey"], g["ppl"], g["ruler"], g["verdict"]) == ("incomplete",) * 4
    only_baselines_missing = [r for r in rows if not (r["bench"] == "ruler" and r["method"] != CAND)]
    assert study.goal_check(only_baselines_missing, CAND)["ruler"] == "incomplete"
    assert study.goal_check(rows, "unknown")["verdict"] == "incomplete"


def test_goal_check_compares_over_common_tasks(study):
    rows = _rows() + [_r(CAND, n, "cwe", 0.0) for n in (32768, 65536)]  # a task no baseline ran
    g = study.goal_check(rows, CAND)
    assert g["ruler"] == "met"  # over vt and fwe only
    assert g["ruler_cells"][0]["baselines"]["dca"] == {"method": 0.6, "baseline": 0.5, "n_tasks": 2}
    assert g["ruler_cells"][0]["method"] == pytest.approx(0.4)  # its own average, over its three tasks


def test_merge_keeps_fields_and_recomputes_averages(study):
    old = [dict(_q("dca", 8192, 22.2, None), ppl_windows=2), _q("dca", 16384, 23.0, 0.9),
           _r("dca", 8192, "vt", 0.5), _r("dca", 8192, "fwe", 0.1),
           {"bench": "ruler", "method": "dca", "task": "average", "L": 8192, "score": 0.3}]
    new = [_q("dca", 8192, None, 0.75), _r("dca", 8192, "vt", 0.7), _q("yarn", 8192, 22.3, 0.5),
           {"bench": "ruler", "method": "dca", "task": "average", "L": 8192, "score": 0.7}]
    merged = study.with_averages(study.merge_rows(old, new))
    q = {(r["method"], r["L"]): r for r in merged if r["bench"] == "quality"}
    assert q[("dca", 8192)] == {"bench": "quality", "method": "dca", "L": 8192, "ppl": 22.2, "passkey": 0.75,
                                "ppl_windows": 2}
    assert q[("dca", 16384)]["passkey"] == 0.9 and q[("yarn", 8192)]["ppl"] == 22.3
    ruler = {r["task"]: r for r in merged if r["bench"] == "ruler"}
    assert ruler["vt"]["score"] == 0.7 and ruler["fwe"]["score"] == 0.1
    assert ruler["average"]["score"] == pytest.approx(0.4) and ruler["average"]["n_tasks"] == 2
    assert sum(r["task"] == "average" for r in merged if r["bench"] == "ruler") == 1


def test_merge_folds_files_from_separate_runs(study, tmp_path):
    """Two GPU calls that each started from the same committed file: --merge keeps both calls' rows and commands."""
    env = {"device": "NVIDIA H200", "torch": "2", "transformers": "5", "commit": "abc", "dtype": "bfloat16"}
    base = {"commands": ["run 0"], "environment": env, "rows": [_q("dca", 8192, 22.2, 1.0)]}
    first = {**base, "commands": ["run 0", "run 1"], "rows": base["rows"] + [_q("yarn", 8192, 22.3, 0.5)]}
    second = {**base, "commands": ["run 0", "run 2"],
              "rows": base["rows"] + [_r("dca", 8192, "vt", 0.4), _r("dca", 8192, "fwe", 0.2)]}
    out = tmp_path / "results"
    out.mkdir()
    (out / "retrieval_study_h200.json").write_text(json.dumps(base))
    files = []
    for i, data in enumerate((first, second)):
        files.append(tmp_path / f"call{i}.json")
        files[-1].write_text(json.dumps(data))
    assert study.main(["--merge", *map(str, files), "--tag", "h200", "--out-dir", str(out)]) == 0
    merged = json.loads((out / "retrieval_study_h200.json").read_text())
    assert merged["commands"] == ["run 0", "run 1", "run 2"]
    keys = {(r["bench"], r["method"], r.get("task"), r["L"]) for r in merged["rows"]}
    assert keys == {("quality", "dca", None, 8192), ("quality", "yarn", None, 8192), ("ruler", "dca", "vt", 8192),
                    ("ruler", "dca", "fwe", 8192), ("ruler", "dca", "average", 8192)}
    average = next(r for r in merged["rows"] if r.get("task") == "average")
    assert average["score"] == pytest.approx(0.3)
    assert "| yarn |" in (out / "retrieval_study_h200.md").read_text()
    with pytest.raises(SystemExit):
        study.main(["--merge", str(files[0]), "--out-dir", str(out)])  # no --tag: which file is meant?
    with pytest.raises(SystemExit):
        study.main(["--merge", str(tmp_path / "absent.json"), "--tag", "h200", "--out-dir", str(out)])


def test_a_cut_ruler_run_keeps_the_methods_it_finished(study, model_dir, tiny_data, tmp_path, monkeypatch):
    import chunkllama.eval.ruler as ruler

    _cut_after(monkeypatch, ruler, "answer_batch", 1)  # the second method's first batch: the run is cut
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        study.main(["--model", str(model_dir), "--data", str(tiny_data), "--out-dir", str(out), "--tag", "cpu",
                    "--methods", "none,dca", "--lengths", "512", "--passkey-trials", "0", "--ppl-windows", "0",
                    "--ruler-samples", "2", "--ruler-batch-size", "2", "--ruler-tasks", "niah_single_1",
                    "--ruler-max-new-tokens", "4"])
    data = json.loads((out / "retrieval_study_cpu.json").read_text())
    assert {(r["method"], r["task"]) for r in data["rows"]} == {("none", "niah_single_1"), ("none", "average")}
    assert len(data["commands"]) == 1 and "ruler" in (out / "retrieval_study_cpu.md").read_text().lower()


def test_a_cut_quality_run_keeps_the_cells_it_finished(study, model_dir, tiny_data, tmp_path, monkeypatch):
    import chunkllama.eval.perplexity as perplexity

    _cut_after(monkeypatch, perplexity, "evaluate_ppl", 2)  # the second method's first length: the run is cut
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        study.main(["--model", str(model_dir), "--data", str(tiny_data), "--out-dir", str(out), "--tag", "cpu",
                    "--methods", "none,dca", "--lengths", "256,512", "--passkey-trials", "0", "--ppl-windows", "1"])
    data = json.loads((out / "retrieval_study_cpu.json").read_text())
    assert {(r["method"], r["L"]) for r in data["rows"]} == {("none", 256), ("none", 512)}
    assert all(r["ppl"] > 1 for r in data["rows"]) and len(data["commands"]) == 1


def test_estimate_fits_the_call_limit(study):
    """The default quality run of one length stays well under the 8 minutes asked for, at every length."""
    for length in (8192, 16384, 32768, 65536):
        e = study.estimate_seconds(6, length, 20, 2, 0)
        assert e["ruler"] == 0 and e["total"] < 8 * 60
    assert study.estimate_seconds(6, 65536, 20, 2, 0)["quality"] > study.estimate_seconds(6, 8192, 20, 2, 0)["quality"]
    one, ten = (study.estimate_seconds(4, 65536, 0, 0, 10, 11, 64.0, b)["ruler"] for b in (1, 10))
    assert ten < one / 2  # batching divides the decode steps, not the prefills or the prompt building
    per_method = study.estimate_seconds(2, 65536, 0, 0, 10, 11, 64.0, [10, 1])["ruler"]  # dca 10, yarn 1 at 64k
    halves = [study.estimate_seconds(2, 65536, 0, 0, 10, 11, 64.0, b)["ruler"] for b in (10, 1)]
    assert halves[0] < per_method < halves[1] and per_method == pytest.approx(sum(halves) / 2)


def test_script_end_to_end(study, model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    common = ["--model", str(model_dir), "--data", str(tiny_data), "--out-dir", str(out), "--tag", "cpu",
              "--goal-base", "256", "--goal-long", "512,768"]
    methods = "none,dca,dca:pretraining_length=32"
    assert study.main([*common, "--methods", methods, "--lengths", "256,512,768", "--passkey-trials", "4",
                       "--passkey-depths", "2"]) == 0
    data = json.loads((out / "retrieval_study_cpu.json").read_text())
    rows = data["rows"]
    labels = ["none", "dca", "dca(pretraining_length=32)"]
    assert [(r["method"], r["L"]) for r in rows] == [(m, n) for m in labels for n in (256, 512, 768)]
    for r in rows:
        assert r["bench"] == "quality" and r["ppl"] > 1 and r["passkey_n"] == 4
        assert r["passkey"] == r["passkey_correct"] / 4 and set(r["passkey_by_depth"]) == {"0.25", "0.75"}
    assert rows[-1]["config"]["dca"]["pretraining_length"] == 32
    assert [g["method"] for g in data["goal"]] == labels
    assert all(g["ruler"] == "incomplete" and g["ppl"] in ("met", "not met") for g in data["goal"])

    # second run: RULER only (one task), merged into the same file; the quality rows stay
    assert study.main([*common, "--methods", "none,dca", "--lengths", "512,768", "--passkey-trials", "0",
                       "--ppl-windows", "0", "--ruler-samples", "1", "--ruler-tasks", "niah_single_1",
                       "--ruler-max-new-tokens", "4", "--ruler-batch-size", "2"]) == 0
    data = json.loads((out / "retrieval_study_cpu.json").read_text())
    rows = data["rows"]
    assert len(data["commands"]) == 2
    assert sum(r["bench"] == "quality" for r in rows) == 9
    ruler = [r for r in rows if r["bench"] == "ruler"]
    assert {(r["method"], r["task"], r["L"]) for r in ruler} == {
        (m, t, n) for m in ("none", "dca") for t in ("niah_single_1", "average") for n in (512, 768)}
    assert all(0 <= r["score"] <= 1 for r in ruler)
    goal = {g["method"]: g for g in data["goal"]}
    assert goal["none"]["ruler"] in ("met", "not met")  # compared with dca now
    assert goal["dca(pretraining_length=32)"]["ruler"] == "incomplete"

    # third run: passkey only for one cell; its ppl survives the merge
    before = next(r for r in rows if r["method"] == "dca" and r["L"] == 256 and r["bench"] == "quality")
    assert study.main([*common, "--methods", "dca", "--lengths", "256", "--passkey-trials", "2",
                       "--passkey-depths", "2", "--ppl-windows", "0"]) == 0
    rows = json.loads((out / "retrieval_study_cpu.json").read_text())["rows"]
    after = next(r for r in rows if r["method"] == "dca" and r["L"] == 256 and r["bench"] == "quality")
    assert after["ppl"] == before["ppl"] and after["passkey_n"] == 2
    md = (out / "retrieval_study_cpu.md").read_text()
    for heading in ("## Perplexity (PG19)", "## Passkey (fraction correct)", "## RULER-style average",
                    "## Goal check"):
        assert heading in md
    assert md.count("**incomplete**") + md.count("**not met**") + md.count("**met**") == 3
