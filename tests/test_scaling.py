"""The scaling benchmark's runner (a real compile of a tiny model in its own process, watched from /proc) and its
report's arithmetic (FLOPs, activation bytes, the 7B/70B extrapolation) on a row with known numbers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scaling  # noqa: E402
import scaling_report  # noqa: E402


@pytest.mark.slow  # a compile in a subprocess
def test_runner_records_a_tiny_compile(tiny_folder, tmp_path):
    run = scaling.Run(tiny_folder("llama-gqa"), calib_samples=8, steps=2, eval_windows=2)
    row = scaling.run_one(run, 8 * 1024, tmp_path / "run.log", out_root=tmp_path)
    assert row["status"] == "ok", row.get("reason")
    assert [s["step"] for s in row["steps"]] == [1, 2]
    for s in row["steps"]:  # the CPU seconds of a step come from /proc samples around its printed end
        assert s["wall_s"] > 0 and s["cpu_s"] is not None and 0 <= s["cpu_s"] <= 2 * s["wall_s"] + 0.5
    assert row["cpu_s"] > sum(s["cpu_s"] for s in row["steps"])  # the whole process: load, perplexity, save
    # the sampled tree peak and the compile's own VmHWM agree within the sampling interval's growth
    assert 0.5 * row["peak_rss_mb_rank0"] < row["tree_peak_rss_mb"] <= 1.05 * row["peak_rss_mb_rank0"]
    assert 0.3 <= row["sparsity"] <= 0.4 and row["ppl_before"] > 1 and row["ppl_after"] > 1
    assert row["shape"]["num_hidden_layers"] >= 1 and row["budget"]["calib_samples"] == 8


@pytest.mark.slow  # a compile in a subprocess
def test_runner_stops_a_run_over_its_memory_budget(tiny_folder, tmp_path):
    run = scaling.Run(tiny_folder("llama-gqa"), calib_samples=8, steps=2, eval_windows=2)
    row = scaling.run_one(run, 50, tmp_path / "run.log", out_root=tmp_path)  # 50 MB: passed while importing
    assert row["status"] == "does not fit"
    assert row["reason"].startswith("stopped at ") and "(budget 0.0 GB)" in row["reason"]
    assert row["tree_peak_rss_mb"] > 50 and not any(tmp_path.glob("*/report.json"))


def _row(**changes) -> dict:
    # Qwen2.5-0.5B-like shape with an untied head: 24 layers, hidden 896, 4864 channels, 151,936 tokens
    shape = dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864, vocab_size=151936,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False)
    row = dict(key="q/float32/1p", model="q", dtype="float32", nproc=1, checkpoint=False, status="ok",
               budget=dict(scaling.BUDGET), params=630_167_424, fp32_weight_mb=630_167_424 * 4 / 2**20,
               tree_peak_rss_mb=10_000.0, ratio_tree=10_000 / (630_167_424 * 4 / 2**20), sparsity=0.3,
               ppl_before=20.0, ppl_after=40.0, load_avg_start=1.0, load_avg_end=2.0,
               steps=[{"step": 1, "wall_s": 200.0, "cpu_s": 100.0}, {"step": 2, "wall_s": 150.0, "cpu_s": 80.0}],
               shape=shape)
    return {**row, **changes}


def test_flops_and_activation_bytes_of_a_row():
    row = _row()
    n = 630_167_424 - 151_936 * 896  # the input embedding is a lookup
    assert scaling_report.compute_params(row) == n == 494_032_768
    assert scaling_report.step_flops(row) == 6 * n * 32 * 128
    assert scaling_report.step_flops(_row(checkpoint=True)) == 8 * n * 32 * 128
    # decoder linears: 24 x (2 x 896^2 + 2 x 896 x 128 + 3 x 896 x 4864) = 357,826,560
    assert scaling_report._decoder_of(row) == 357_826_560
    rest = 10_000 * 2**20 - 4 * 630_167_424 - 4 * 357_826_560
    assert scaling_report.activation_factor(row) == pytest.approx(rest / (8 * 128 * 24 * 896))


def test_extrapolation_arithmetic(tmp_path):
    md, png = tmp_path / "s.md", tmp_path / "s.png"
    scaling_report.write_report([_row()], md, png)
    text = md.read_text()
    # 7B: N = 6.738e9 - 32,000 x 4,096 = 6.607e9; 8 x 8 x N x 8,192 (forward, recomputed forward, backward) + 2 x N x
    # 65,536 = 4.330e15 FLOPs
    assert "6.607 B" in text and "4.330e+15" in text
    # at 6 x 494,032,768 x 4,096 / 100 CPU s = 121.4 GFLOP per CPU-second, 2 cores: 4.330e15 / 242.8e9 s = 5.0 h
    assert "121.4 GFLOP per CPU-second" in text and "| 5.0 h |" in text
    # one H100 at 40 % of 989 TFLOP/s: 4.330e15 / 395.6e12 = 10.9 s
    assert "= 10.9 s" in text
    # 70B memory: bf16 weights 2 x 68.977e9 = 138.0 GB; fp32 gradient sums 4 x 68.451e9 = 273.8 GB: not one GPU
    assert "| 138.0 GB | 273.8 GB |" in text and png.stat().st_size > 10_000


def test_removal_agreement_between_runs_of_one_model(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, "RUNS_DIR", tmp_path)
    sets = {"m/float32/1p": [[[1, "head", 0], [1, "channel", 5]], [[2, "channel", 7]]],
            "m/bfloat16/1p": [[[1, "head", 0], [2, "channel", 7], [3, "channel", 1]]]}
    for key, steps in sets.items():
        folder = tmp_path / scaling._folder(key) / "trajectory"
        folder.mkdir(parents=True)
        (folder / "trajectory.json").write_text(json.dumps({"steps": [{"removed": s} for s in steps]}))
    rows = [{"key": k, "model": "m", "status": "ok", "budget": {}} for k in sets] + [
        {"key": "m/float32/2p", "model": "m", "status": "does not fit"}]
    got = scaling.agreement(rows[1], rows)
    assert got == {"m/float32/1p": {"shared": 2, "this": 3, "other": 3, "jaccard": 0.5, "of_this": 2 / 3}}
    assert scaling.agreement(rows[2], rows) == {}


def test_kill_tree_reaches_children_in_their_own_session():
    import subprocess
    import time

    # torchrun's workers run in sessions of their own: a process-group kill would leave them behind
    code = ("import subprocess, sys; p = subprocess.Popen(['sleep', '300'], start_new_session=True); "
            "print(p.pid, flush=True); p.wait()")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert os.getsid(child) != os.getsid(parent.pid) and child in scaling._tree(parent.pid)
    scaling._kill_tree(parent.pid)
    parent.wait(timeout=10)

    def gone() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    for _ in range(100):
        if gone():
            break
        time.sleep(0.05)
    assert gone()


def test_log_progress_of_a_stopped_run(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("Loading weights: 100%|##| 39/39 [00:00<00:00]\ndense ppl:   0%|  | 0/4 [00:00<?]\r"
                   "dense ppl: 100%|##| 4/4 [00:23<00:00, 5.7s/batch]\npruning:   0%|  | 0/1\n"
                   "step 1 gradients:  50%|#  | 1/2 [03:40<03:40]\r")
    assert scaling.log_progress(log) == ["dense ppl 4/4 in 00:23"]  # the unfinished gradient bar is not listed
    assert scaling.log_progress(tmp_path / "missing.log") == []
