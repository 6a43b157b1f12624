"""The benchmark scripts run end to end (on a tiny model folder) and write their reports."""

from __future__ import annotations

import json
import runpy
import sys

import pytest

pytestmark = pytest.mark.slow  # whole benchmarks, end to end


def _run_script(path: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [path, *argv])
    runpy.run_path(path, run_name="__main__")


def test_quality_benchmark_on_a_tiny_model(tiny_folder, tmp_path, monkeypatch):
    model = tiny_folder("llama-gqa")
    out = tmp_path / "quality"
    common = ["--model", model, "--sparsities", "0.3,0.4", "--limit", "2", "--windows", "2", "--calib-samples", "4",
              "--steps", "2", "--runs", str(tmp_path / "runs"), "--output", str(out), "--pg-sparsities", "0.3"]
    _run_script("benchmarks/quality.py", ["--methods", "gisp,wanda-sp,random,pg", "--pg-iters", "2", *common],
                monkeypatch)
    doc = json.loads((out / "quality.json").read_text())
    assert [(r["method"], r["target"], r.get("pg_iters")) for r in doc["rows"]] == [
        ("dense", 0.0, None), ("gisp", 0.3, None), ("gisp", 0.4, None), ("wanda-sp", 0.3, None),
        ("wanda-sp", 0.4, None), ("random", 0.3, None), ("random", 0.4, None), ("pg", 0.3, 2)]
    # --append adds a pg budget and keeps every other row as measured (the dense row is not re-measured)
    before = doc["rows"]
    _run_script("benchmarks/quality.py", ["--methods", "pg", "--pg-iters", "3", "--append", *common], monkeypatch)
    after = json.loads((out / "quality.json").read_text())["rows"]
    assert after[:len(before)] == before and len(after) == len(before) + 1
    assert (after[-1]["method"], after[-1]["pg_iters"]) == ("pg", 3)
    assert "| pg (3 it) | 30" in (out / "quality.md").read_text()
    with pytest.raises(SystemExit, match="--limit"):  # a table measured on other subsets is not appended to
        _run_script("benchmarks/quality.py", ["--methods", "pg", "--append", *common[:-2], "--limit", "3"],
                    monkeypatch)
    for r in doc["rows"][1:]:
        # global methods land within tolerance; a uniform ratio is coarse on a tiny model (2 unprotected layers of
        # 4 heads): wanda-sp's smallest step above 20 % is 32.5 %, so the grid starts at 30 %
        slack = 0.1 if r["method"] == "wanda-sp" else 0.03
        assert r["target"] - 1e-9 <= r["sparsity"] <= r["target"] + slack
        assert 0 <= r["cmqa"] <= 1 and r["wikitext2"] > 1
    assert (out / "quality.md").is_file() and (out / "quality.png").stat().st_size > 10_000


def test_trajectory_benchmark_on_a_tiny_model(tiny_folder, tmp_path, monkeypatch):
    from gisp_fx.cli import main

    run = tmp_path / "run"
    assert main(["compile", tiny_folder("llama-gqa"), "--sparsity", "0.4", "--steps", "2", "--calib-samples", "4",
                 "--seq-len", "32", "--eval-windows", "2", "--output", str(run)]) == 0
    _run_script("benchmarks/trajectory_ppl.py", [str(run), "--sparsities", "0.2,0.4", "--windows", "3"], monkeypatch)
    doc = json.loads((run / "quality" / "trajectory_ppl.json").read_text())
    assert [round(r["target"], 1) for r in doc["rows"]] == [0.0, 0.2, 0.4]
    assert doc["rows"][1]["params"] > doc["rows"][2]["params"]


def test_calib_budget_benchmark_on_a_tiny_model(tiny_folder, tmp_path, monkeypatch):
    model, rows = tiny_folder("llama-gqa"), tmp_path / "budget.json"
    common = ["--json", str(rows)]
    _run_script("benchmarks/calib_budget.py", [*common, "run", "--model", model, "--cells", "4x1,8x2", "--eval", "2",
                                               "--sparsity", "0.4", "--runs", str(tmp_path / "runs")], monkeypatch)
    doc = json.loads(rows.read_text())["rows"]
    assert [r["kind"] for r in doc] == ["dense", "cell", "cell", "cell", "cell"]
    none, lsq = [r for r in doc if r["key"].startswith("cell|8x2|")]
    assert (none["repair"], lsq["repair"], lsq["inputs"]) == ("none", "lsq-end", "pruned")
    # the repaired row replays the same selection: same sparsity, its own (different) perplexity and a repair time
    assert lsq["sparsity"] == none["sparsity"] and lsq["ppl"] != none["ppl"] and lsq["repair_wall_s"] > 0
    assert 0.4 - 1e-9 <= none["sparsity"] <= 0.43 and all(r["ppl"] > 1 for r in doc)
    # a second run reuses the finished compiles (same settings) and replaces its rows rather than adding to them
    _run_script("benchmarks/calib_budget.py", [*common, "run", "--model", model, "--cells", "8x2", "--eval", "2",
                                               "--sparsity", "0.4", "--runs", str(tmp_path / "runs")], monkeypatch)
    again = json.loads(rows.read_text())["rows"]
    assert len(again) == len(doc)
    assert [r for r in again if r["key"] == none["key"]][0]["compile_wall_s"] == none["compile_wall_s"]
    _run_script("benchmarks/calib_budget.py", [*common, "table"], monkeypatch)
    md = (tmp_path / "budget.md").read_text()
    assert "| 8 | 2 | lsq-end (sequential, 0.0001) |" in md and "| 4 | 1 | none |" in md
    assert (tmp_path / "budget.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):  # a malformed cell is refused by the parser before anything runs
        _run_script("benchmarks/calib_budget.py", [*common, "run", "--model", model, "--cells", "8by2"], monkeypatch)


def test_quality_benchmark_gsm8k_calibration_and_block_rows(tiny_folder, tmp_path, monkeypatch):
    """--calib gsm8k labels its rows and runs apart, --gsm8k adds exact match to the rows up to --gsm8k-up-to,
    +block repairs, and a later --append at a lower sparsity is served from the existing run."""
    model = tiny_folder("llama-gqa")
    out, runs = tmp_path / "quality", tmp_path / "runs"
    common = ["--model", model, "--limit", "2", "--windows", "2", "--calib-samples", "4", "--steps", "2",
              "--calib", "gsm8k", "--gsm8k", "2", "--gsm8k-up-to", "0.2", "--runs", str(runs), "--output", str(out)]
    _run_script("benchmarks/quality.py", [*common, "--methods", "gisp,gisp+block", "--sparsities", "0.3"], monkeypatch)
    doc = json.loads((out / "quality.json").read_text())
    assert [(r["method"], r.get("calib")) for r in doc["rows"]] == [
        ("dense", None), ("gisp", "gsm8k"), ("gisp+block", "gsm8k")]
    dense, gisp, block = doc["rows"]
    assert 0 <= dense["gsm8k"] <= 1 and dense["task_n"]["gsm8k"] == 2
    assert "gsm8k" not in gisp and "gsm8k" not in block  # above --gsm8k-up-to
    assert json.loads((runs / "gisp-30-gsm8k" / "report.json").read_text())["config"]["calib"] == "gsm8k"
    assert block["wikitext2"] != gisp["wikitext2"] and block["repair"] == "block"
    assert gisp["compile_s"] == block["compile_s"] > 0  # one run serves both rows
    md = (out / "quality.md").read_text()
    assert "| gisp [gsm8k calib] | 3" in md and "gsm8k EM" in md and " ± " in md and "| - |" in md
    _run_script("benchmarks/quality.py", [*common, "--append", "--methods", "gisp", "--sparsities", "0.2"], monkeypatch)
    rows = json.loads((out / "quality.json").read_text())["rows"]
    low = [r for r in rows if r["method"] == "gisp" and r["target"] == 0.2]
    assert len(rows) == 4 and len(low) == 1 and low[0]["compile_s"] == gisp["compile_s"]  # the 30 % run served it
    assert 0 <= low[0]["gsm8k"] <= 1 and not (runs / "gisp-20-gsm8k").exists()
    for extra in ([], ["--repair-samples", "8"]):  # the same repair on the run's 4 windows, then on 8: two rows
        _run_script("benchmarks/quality.py", [*common, "--append", "--methods", "gisp+lsq", "--sparsities", "0.3",
                                              *extra], monkeypatch)
    rows = json.loads((out / "quality.json").read_text())["rows"]
    lsq = [r for r in rows if r["method"] == "gisp+lsq"]
    assert len(rows) == 6 and [r.get("repair_samples") for r in lsq] == [None, 8]  # kept apart, not replaced
    # each repaired row records the windows it fitted on (4 already give 512 tokens for the 64-wide consumers)
    assert [r["repair_windows"] for r in lsq] == [4, 8] and block["repair_windows"] == 256
    assert "| gisp+lsq [8 repair windows] [gsm8k calib] | 3" in (out / "quality.md").read_text()
    steps3 = [("--steps" if a == "--steps" else "3" if prev == "--steps" else a) for prev, a in zip(["", *common], common)]
    with pytest.raises(SystemExit, match=r"gisp-30-gsm8k was compiled with steps 2 \(this invocation 3\)"):
        _run_script("benchmarks/quality.py", [*steps3, "--append", "--methods", "gisp", "--sparsities", "0.2"],
                    monkeypatch)  # a run made with other settings does not serve rows labelled with these
    assert json.loads((out / "quality.json").read_text())["rows"] == rows  # and the table is untouched
    for bad in (["--methods", "gisp", "--repair-samples", "8"], ["--methods", "gisp+lsq", "--repair-samples", "0"]):
        with pytest.raises(SystemExit, match="--repair-samples"):  # refused before anything loads or is written
            _run_script("benchmarks/quality.py", [*common, "--append", "--sparsities", "0.3", *bad], monkeypatch)
    assert json.loads((out / "quality.json").read_text())["rows"] == rows


def test_quality_cmqa_standard_error():
    """The 7-task average's standard error: sqrt(sum p(1-p)/n) / 7."""
    from gisp_fx.tasks import MC_EVAL_TASKS

    ns = runpy.run_path("benchmarks/quality.py")  # not run as __main__: only its functions
    row = {t: 0.5 for t in MC_EVAL_TASKS}
    assert ns["cmqa_se"](row, 100) == pytest.approx((7 * 0.25 / 100) ** 0.5 / 7)
    row["task_n"] = {t: 25 for t in MC_EVAL_TASKS}  # each task's own count, where the row recorded it
    assert ns["cmqa_se"](row, 100) == pytest.approx((7 * 0.25 / 25) ** 0.5 / 7)
    assert ns["_slug"]("Qwen/Qwen2.5-0.5B") == "qwen-qwen2.5-0.5b" and ns["_slug"]("qwen2.5-coder-0.5b") == \
        "qwen2.5-coder-0.5b"


def test_quality_table_groups_each_methods_rows_by_sparsity():
    """Rows appended by later invocations join their method's rows in the table, lowest sparsity first; methods
    keep the order in which they were first measured (dense first)."""
    ns = runpy.run_path("benchmarks/quality.py")  # not run as __main__: only its functions
    rows = [{"method": "dense", "target": 0.0, "sparsity": 0.0}] + [
        {"method": m, "target": s, "sparsity": s, **extra} for m, s, extra in [
            ("gisp", 0.5, {}), ("wanda-sp", 0.5, {}), ("gisp", 0.2, {"calib": "gsm8k"}), ("gisp", 0.2, {}),
            ("wanda-sp", 0.2, {}), ("gisp", 0.3, {})]]
    order = [(ns["_label"](r), r["sparsity"]) for r in ns["_ordered"](rows)]
    assert order == [("dense", 0.0), ("gisp", 0.2), ("gisp", 0.3), ("gisp", 0.5), ("wanda-sp", 0.2),
                     ("wanda-sp", 0.5), ("gisp [gsm8k calib]", 0.2)]
