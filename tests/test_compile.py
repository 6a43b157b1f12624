"""The compile pipeline on tiny models: trajectory, materialize, determinism, resume, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer, tokens
from gisp_fx.cli import main
from gisp_fx.config import CompileConfig
from gisp_fx.errors import GispError
from gisp_fx.loading import LoadedModel, load_model
from gisp_fx.passes.importance import CustomCalibration, LmCalibration
from gisp_fx.passes.analyse import analyse
from gisp_fx.compile import compile_model
from gisp_fx.rebuild import save_materialized as materialize
from gisp_fx.trajectory import Trajectory

PROBE = tokens(2, 10, seed=9)


def _loaded(arch="llama-gqa", layers=4):
    return LoadedModel(tiny_model(arch, num_hidden_layers=layers), tiny_tokenizer(), "tiny")


def _config(tmp_path, name="run", **kw):
    base = dict(model="tiny", sparsity=0.4, output=str(tmp_path / name), protect="none", eval_windows=2)
    if kw.get("method", "gisp") == "gisp" and not kw.get("oneshot"):
        base["steps"] = 3  # --steps applies to iterative gisp only; the other methods refuse it
    return CompileConfig(**{**base, **kw})


def _calib():
    return LmCalibration(tokens(12, 16, seed=2), batch_size=4)


def _run(tmp_path, name="run", on_step=None, **kw):
    return compile_model(_config(tmp_path, name, **kw), calibration=_calib(), loaded=_loaded(), on_step=on_step,
                         progress=False)


def test_compile_writes_model_trajectory_and_report(tmp_path):
    logits = {}

    def record(step, model):
        with torch.no_grad():
            logits[step] = model(input_ids=PROBE).logits.clone()

    result = _run(tmp_path, on_step=record)
    out = result.output
    for name in ("config.json", "model.safetensors", "modeling_gisp.py", "tokenizer.json", "report.md",
                 "report.json", "kept_per_layer.png", "trajectory/trajectory.json", "trajectory/scores.safetensors"):
        assert (out / name).is_file(), name
    assert not out.with_name(out.name + ".partial").exists()
    report = json.loads((out / "report.json").read_text())
    assert 0.4 <= report["sparsity"]["measured"] <= 0.405
    assert report["params"]["after"] < report["params"]["before"]
    assert math.isfinite(report["perplexity"]["before"]) and math.isfinite(report["perplexity"]["after"])
    traj = Trajectory.load(out / "trajectory")
    sparsities = [s.sparsity for s in traj.steps]
    assert sparsities == sorted(sparsities) and len(traj.steps) >= 3
    # the linear schedule: the same number of groups at every step but the last
    assert len({len(s.removed) for s in traj.steps[:-1]}) == 1
    # every step's scores are stored, NaN exactly where a group was already gone
    removed_before = set()
    for s in traj.steps:
        heads = traj.scores[f"step{s.step}.heads"]
        for layer, kind, index in removed_before:
            if kind == "head":
                assert torch.isnan(heads[layer, index])
        removed_before.update(s.removed)
    # the saved folder is the run's final model
    final = load_model(str(out)).model
    with torch.no_grad():
        assert torch.equal(final(input_ids=PROBE).logits, logits[len(traj.steps)])
    # materialize rebuilds every step from the original weights, identical to the run's own model at that step
    for s in traj.steps:
        model, _, sparsity = materialize(str(out), None, str(tmp_path / f"m{s.step}"), step=s.step, loaded=_loaded())
        assert sparsity == pytest.approx(s.sparsity)
        with torch.no_grad():
            assert torch.equal(model(input_ids=PROBE).logits, logits[s.step])
    mid = traj.steps[1]
    model, _, sparsity = materialize(str(out), mid.sparsity, str(tmp_path / "mid"), loaded=_loaded())
    with torch.no_grad():
        assert torch.equal(model(input_ids=PROBE).logits, logits[mid.step])
    # between two steps: a prefix of the next step's removal order, at or just above the requested sparsity
    between = (traj.steps[0].sparsity + traj.steps[1].sparsity) / 2
    _, plan, sparsity = materialize(str(out), between, str(tmp_path / "between"), loaded=_loaded())
    assert between <= sparsity < traj.steps[1].sparsity


def test_same_seed_same_trajectory(tmp_path):
    a = Trajectory.load(_run(tmp_path, "a").output / "trajectory")
    b = Trajectory.load(_run(tmp_path, "b").output / "trajectory")
    assert [s.removed for s in a.steps] == [s.removed for s in b.steps]
    assert all(torch.equal(a.scores[k].nan_to_num(-1), b.scores[k].nan_to_num(-1)) for k in a.scores)


def test_oneshot_is_one_step(tmp_path):
    traj = Trajectory.load(_run(tmp_path, oneshot=True).output / "trajectory")
    assert len(traj.steps) == 1


def test_resume_continues_an_interrupted_run(tmp_path):
    full = Trajectory.load(_run(tmp_path, "full").output / "trajectory")

    def crash(step, model):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "cut", on_step=crash)
    partial = tmp_path / "cut.partial"
    assert len(Trajectory.load(partial / "trajectory").steps) == 2
    assert not (tmp_path / "cut").exists()
    cfg = _config(tmp_path, "cut")
    resumed = compile_model(cfg, calibration=_calib(), loaded=_loaded(), resume=True, progress=False)
    traj = Trajectory.load(resumed.output / "trajectory")
    assert [s.removed for s in traj.steps] == [s.removed for s in full.steps]
    with pytest.raises(GispError, match="no unfinished run"):
        compile_model(_config(tmp_path, "never"), calibration=_calib(), loaded=_loaded(), resume=True)


@pytest.mark.parametrize("sparsity", [0.0, -0.1, 0.96, 1.5])
def test_sparsity_out_of_range(tmp_path, sparsity):
    with pytest.raises(GispError, match=r"--sparsity must be in \(0, 0.95\]"):
        compile_model(_config(tmp_path, sparsity=sparsity), calibration=_calib(), loaded=_loaded())


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(GispError, match="exists; pass --overwrite"):
        _run(tmp_path)
    result = compile_model(_config(tmp_path), calibration=_calib(), loaded=_loaded(), overwrite=True,
                           progress=False)
    assert (result.output / "report.json").is_file()


def test_calibration_too_short(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("w5 w6 w7 " * 20)
    cfg = _config(tmp_path, calib=str(text), calib_samples=8, seq_len=16)
    with pytest.raises(GispError, match="short.txt.*8 were requested"):
        compile_model(cfg, loaded=_loaded())


def test_nan_loss_stops_and_keeps_the_last_good_trajectory(tmp_path):
    calls = {"n": 0}
    ids = tokens(8, 12, seed=2)

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = model(input_ids=batch, labels=batch).loss
        return loss * float("nan") if calls["n"] > 2 else loss  # step 1 uses 2 batches; step 2 goes NaN

    calib = CustomCalibration([ids[:4], ids[4:]], [4, 4], loss_fn)
    with pytest.raises(GispError, match="step 2: calibration loss is nan.*1 steps"):
        compile_model(_config(tmp_path), calibration=calib, loaded=_loaded(), progress=False)
    kept = Trajectory.load(tmp_path / "run.partial" / "trajectory")
    assert len(kept.steps) == 1
    assert not (tmp_path / "run").exists()


def test_cli_compile_on_a_folder(tiny_folder, tmp_path, capsys):
    path = tiny_folder("llama-gqa")
    out = tmp_path / "cli-out"
    assert main(["compile", path, "--sparsity", "0.3", "--steps", "2", "--calib-samples", "8", "--seq-len", "32",
                 "--eval-windows", "2", "--protect", "none", "--output", str(out), "--export", "onnx"]) == 0
    printed = capsys.readouterr().out
    assert "report.md" in printed and str(out) in printed and "parity vs torch" in printed
    assert json.loads((out / "onnx" / "gisp_onnx.json").read_text())["with_past"]
    assert load_model(str(out)).model.config.gisp["linears"]
    assert main(["materialize", str(out), "--step", "1", "--output", str(tmp_path / "m1")]) == 0
    assert main(["materialize", str(out), "--sparsity", "0.9", "--output", str(tmp_path / "m2")]) == 2
    assert "this trajectory's range" in capsys.readouterr().err


def test_margin_objective_end_to_end(tmp_path):
    cfg = _config(tmp_path, objective="margin", tasks=("arc_easy", "winogrande"), calib_samples=6, steps=2)
    result = compile_model(cfg, loaded=_loaded(), progress=False)
    assert 0.4 <= result.report["sparsity"]["measured"] <= 0.405


@pytest.mark.parametrize("tasks, message", [(("piqa",), "no bundled training split"),
                                            (("arc_easy", "nonsense"), "unknown task 'nonsense'")])
def test_margin_objective_bad_tasks(tmp_path, tasks, message):
    with pytest.raises(GispError, match=message):
        compile_model(_config(tmp_path, objective="margin", tasks=tasks), loaded=_loaded())


@pytest.mark.parametrize("method", ["oneshot", "wanda-sp", "magnitude", "taylor-local", "random"])
def test_every_method_writes_the_same_outputs(tmp_path, method):
    result = _run(tmp_path, method=method, protect=None)
    report = result.report
    assert report["method"] == method and len(report["steps"]) == 1
    assert 0.4 <= report["sparsity"]["measured"] <= 0.45
    assert (result.output / "model.safetensors").is_file() and (result.output / "trajectory/trajectory.json").is_file()
    if method in ("wanda-sp", "taylor-local"):  # uniform: every unprotected layer keeps the same channel count
        kept = {l["channels"][0] for l in report["layers"][:-1] if l["layer"] >= 1}
        assert len(kept) == 1


@pytest.mark.parametrize("method", ["wanda-sp", "taylor-local"])
def test_uniform_run_materializes_what_a_lower_target_compiles(tmp_path, method):
    # a uniform method's lower sparsities come from its recorded dense scores, not from a prefix of its removal
    # order (which would empty the first layers): exactly the model a run compiled to that target gives
    high = _run(tmp_path, "high", method=method, sparsity=0.5)
    low = _run(tmp_path, "low", method=method, sparsity=0.3)
    model, plan, sparsity = materialize(str(high.output), 0.3, str(tmp_path / "m"), loaded=_loaded())
    assert sparsity == pytest.approx(low.report["sparsity"]["measured"])
    compiled = load_model(str(low.output)).model
    assert [l.mlp.channels for l in plan.layers] == [l.mlp.channels for l in analyse(compiled).layers]
    assert len({l.mlp.channels for l in plan.layers}) == 1  # still the same ratio in every layer
    with torch.no_grad():
        assert torch.equal(model(input_ids=PROBE).logits, compiled(input_ids=PROBE).logits)


def test_baseline_scores_by_hand():
    from gisp_fx.passes.baselines import magnitude_scores, wanda_sp_scores
    from gisp_fx.passes.analyse import analyse

    model = tiny_model("llama-gqa")
    plan = analyse(model)
    mag = magnitude_scores(model, plan)
    w = model.model.layers[1].mlp
    expected = torch.sqrt(w.gate_proj.weight[7].pow(2).sum() + w.up_proj.weight[7].pow(2).sum()
                          + w.down_proj.weight[:, 7].pow(2).sum()).item()
    assert mag.channels[1][7] == pytest.approx(expected, rel=1e-6)
    ids = tokens(4, 10, seed=6)
    captured = []
    handle = w.down_proj.register_forward_pre_hook(lambda m, i: captured.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    norm = torch.cat(captured).pow(2).sum(0).sqrt()
    wanda = wanda_sp_scores(model, plan, LmCalibration(ids, 2), progress=False)
    assert wanda.channels[1][7] == pytest.approx((w.down_proj.weight[:, 7].abs() * norm[7]).sum().item(), rel=1e-5)
