"""--method pg: the estimator on a toy problem, the budget projection, forward-only runs, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model, tokens
from gisp_fx.cli import main
from gisp_fx.loading import load_model
from gisp_fx.passes.importance import LmCalibration
from gisp_fx.passes.pg import Budget, PgConfig, build_units, make_budget, optimise, project
from gisp_fx.passes.analyse import analyse
from gisp_fx.compile import compile_model
from gisp_fx.rebuild import save_materialized as materialize
from gisp_fx.trajectory import Trajectory
from test_compile import PROBE, _config, _loaded


def test_estimator_finds_the_known_optimum_of_a_toy_problem():
    """Removing unit i costs c_i (loss = sum of the costs of the removed units); keeping 4 of 10, the optimum keeps
    the 4 costliest. Starting from uniform probabilities, the learned ones must rank exactly those 4 on top."""
    rng = np.random.default_rng(0)
    cost = rng.permutation(np.linspace(0.1, 1.0, 10))
    budget = Budget(((np.ones(10, bool), np.ones(10), 4.0),))

    def loss_fn(t, sample):
        m = sample(16)
        return m, ((1 - m) * cost).sum(1) + rng.normal(0, 0.01, 16)

    result = optimise(loss_fn, np.full(10, 0.4), budget, PgConfig(iters=300, lr=0.05), progress=False)
    assert set(np.argsort(-result.probs)[:4]) == set(np.argsort(-cost)[:4])
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert abs(result.probs.sum() - 4.0) <= 1e-6


@pytest.mark.parametrize("kind", ["params", "reference"])
def test_projection_keeps_the_budget_exactly(kind):
    model = tiny_model("llama-gqa")
    plan = analyse(model)
    units = build_units(plan, "head", frozenset())
    budget = make_budget(units, 0.4 * units.params.sum(), kind)
    s = budget.project(np.random.default_rng(1).normal(0.5, 0.8, len(units.params)))
    assert ((0 <= s) & (s <= 1)).all()
    for (mask, w, target), spent in zip(budget.blocks, budget.spent(s)):
        assert abs(spent - target) <= 1e-6 * max(1.0, target)
    assert len(budget.blocks) == (1 if kind == "params" else 2)
    w = np.array([3.0, 1.0, 2.0])
    assert abs((w * project(np.array([0.9, -0.2, 1.7]), w, 2.5)).sum() - 2.5) <= 1e-9


def _pg(tmp_path, name="pg", **kw):
    calib = LmCalibration(tokens(8, 16, seed=2), batch_size=4)
    cfg = _config(tmp_path, name, method="pg", sparsity=0.4, **{"pg_iters": 6, **kw})
    return compile_model(cfg, calibration=calib, loaded=_loaded(), progress=False)


@pytest.mark.slow  # pg compiles
def test_pg_end_to_end_forward_only_and_seeded(tmp_path):
    loaded = _loaded()
    touched = []
    for p in loaded.model.parameters():
        p.register_hook(lambda g: touched.append(g))  # fires only if a backward ever reaches a weight
    calib = LmCalibration(tokens(8, 16, seed=2), batch_size=4)
    cfg = _config(tmp_path, "pg", method="pg", sparsity=0.4, pg_iters=6)
    result = compile_model(cfg, calibration=calib, loaded=loaded, progress=False)
    assert not touched and all(p.grad is None for p in loaded.model.parameters())
    report = result.report
    assert 0.4 <= report["sparsity"]["measured"] <= 0.41 and report["history"]["iterations"] == 6
    assert (result.output / "pg_history.png").stat().st_size > 0
    traj = Trajectory.load(result.output / "trajectory")
    assert len(traj.history) == 6 and {"loss", "baseline", "budget", "entropy"} <= set(traj.history[0])
    # the saved folder is the run's model, and equals the dense model with the removed structures masked
    saved = load_model(str(result.output)).model
    with torch.no_grad():
        assert torch.equal(saved(input_ids=PROBE).logits, loaded.model(input_ids=PROBE).logits)
    again = _pg(tmp_path, "again")
    assert [s.removed for s in Trajectory.load(again.output / "trajectory").steps] == [s.removed for s in traj.steps]
    # materialize at a lower sparsity keeps the most likely structures of the run (here a K/V unit, two query
    # heads and their K/V rows, is 7 % of the tiny decoder: the overshoot is at most one unit)
    _, plan, sparsity = materialize(str(result.output), 0.2, str(tmp_path / "m20"), loaded=_loaded())
    assert 0.2 <= sparsity < 0.2 + 0.072


@pytest.mark.slow  # pg compiles
def test_pg_pruned_equals_masked(tmp_path):
    from test_rewrite import mask_

    result = _pg(tmp_path, pg_groups="head")
    traj = Trajectory.load(result.output / "trajectory")
    from gisp_fx.plan import Selection

    dense = tiny_model("llama-gqa", num_hidden_layers=4)
    mask_(dense, analyse(dense), Selection(traj.removed_until(1)))
    with torch.no_grad():
        assert (load_model(str(result.output)).model(input_ids=PROBE).logits
                - dense(input_ids=PROBE).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("flags, message", [
    (["--pg-samples", "1"], "--pg-samples must be at least 2"),
    (["--pg-iters", "-1"], "--pg-iters must be at least 0"),
    (["--objective", "margin", "--tasks", "arc_easy"], "--objective margin needs a gradient method"),
])
def test_pg_bad_input(tiny_folder, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["compile", tiny_folder(), "--sparsity", "0.3", "--method", "pg", "--output", str(out)] + flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1
    assert not out.exists() and not Path(str(out) + ".partial").exists()


@pytest.mark.slow  # pg compiles
def test_zero_iterations_select_by_the_initialisation(tmp_path):
    """--pg-iters 0 is the control for what the iterations add: it prunes by the initial (Wanda-sp sigmap)
    probabilities projected onto the budget, which is what iterations with a vanishing learning rate keep."""
    zero = _pg(tmp_path, "zero", pg_iters=0)
    still = _pg(tmp_path, "still", pg_iters=3, pg_lr=1e-12)
    removed = [Trajectory.load(r.output / "trajectory").steps[0].removed for r in (zero, still)]
    assert removed[0] == removed[1] and len(removed[0]) > 0
    assert "history" not in zero.report and 0.4 <= zero.report["sparsity"]["measured"] <= 0.41
