"""Repair-aware scores (passes/repair_aware.py): the residual equals a reference least-squares fit, a duplicated
channel is ranked as recoverable, the scores weigh the run's selection, and the settings that cannot use them fail."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conftest import tiny_model, tokens
from gisp_fx.config import CompileConfig, GispConfig
from gisp_fx.errors import GispError
from gisp_fx.passes.analyse import analyse
from gisp_fx.passes.importance import LmCalibration, score
from gisp_fx.passes.repair_aware import gram_runs, group_residuals, repair_aware, unrecoverable_shares
from gisp_fx.plan import Axis, Member
from gisp_fx.prune import prune_


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 12, generator=g, dtype=torch.float64)
    # correlated features (8 factors behind 12, plus noise): some columns are partly predictable from the others
    x = torch.randn(12, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 300, generator=g, dtype=torch.float64)
    x += 0.1 * torch.randn(12, 300, generator=g, dtype=torch.float64)
    return w, x


@pytest.mark.parametrize("groups", [((0, 1), (2, 3), (5, 9)), ((4,), (6, 7, 8), (10,))])
def test_residual_equals_a_least_squares_refit(groups):
    """residual(S) = min_V ||W X - V X_K||^2 (K the other columns: what lsq leaves), energy(S) = ||W_S X_S||^2;
    equal and unequal group widths (the batched and the per-group path)."""
    w, x = _inputs()
    member = Member("down", Axis.COLS, groups)
    residual, energy = group_residuals(w, x @ x.T, member, damping=0.0)
    for g, cols in enumerate(groups):
        keep = [i for i in range(12) if i not in cols]
        v = torch.linalg.lstsq(x[keep].T, (w @ x).T).solution.T
        expected = float(((w @ x - v @ x[keep]) ** 2).sum())
        assert abs(residual[g] - expected) <= 1e-5 * expected
        assert abs(energy[g] - float(((w[:, list(cols)] @ x[list(cols)]) ** 2).sum())) <= 1e-8 * energy[g]
        assert 0 < residual[g] < energy[g]


def test_single_channel_share_is_independent_of_its_weights():
    """share = 1 / (H_jj (H^-1)_jj) for one column: its weights cancel."""
    w, x = _inputs(1)
    member = Member("down", Axis.COLS, tuple((i,) for i in range(12)))
    r1, e1 = group_residuals(w, x @ x.T, member, damping=0.0)
    r2, e2 = group_residuals(3 * w + torch.randn_like(w), x @ x.T, member, damping=0.0)
    h = x @ x.T
    expected = 1 / (h.diagonal() * torch.linalg.inv(h).diagonal())
    assert np.allclose(r1 / e1, expected.numpy(), rtol=1e-6) and np.allclose(r2 / e2, r1 / e1, rtol=1e-6)


def _duplicated():
    """A tiny Llama whose MLP channel 1 in layer 1 repeats channel 0 (same gate and up rows), so either one's output
    is rebuilt exactly from the other."""
    model = tiny_model("llama-gqa")
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight[1] = lin.weight[0]
    return model


def test_a_duplicated_channel_is_recoverable_and_ranked_first():
    model = _duplicated()
    plan, calib = analyse(model), LmCalibration(tokens(12, 16, seed=2), batch_size=4)
    heads, channels = unrecoverable_shares(model, plan, calib, skip=frozenset({0}))
    assert set(channels) == set(heads) == {1, 2}  # the skipped layer has none
    share = channels[1]
    assert share[0] < 1e-3 and share[1] < 1e-3  # each rebuilt from the other
    assert np.median(share[2:]) > 0.05 and (share <= 1).all() and (heads[1] > 0).all()
    plain = score(model, plan, calib, progress=False, skip=frozenset({0}))
    weighed = repair_aware(plan, plain, heads, channels)
    assert np.isnan(weighed.channels[0]).all()  # the skipped layer is left as it was
    assert np.allclose(weighed.channels[1], plain.channels[1] * np.sqrt(share))
    assert set(np.argsort(weighed.channels[1])[:2]) == {0, 1}  # the duplicates now rank lowest of their layer


def test_repair_aware_run_records_itself_and_changes_the_selection():
    model = tiny_model("llama-gqa")
    calib = LmCalibration(tokens(12, 16, seed=2), batch_size=4)
    plain = prune_(copy.deepcopy(model), GispConfig(sparsity=0.4, steps=2, protect="none"), calib, progress=False)
    aware = prune_(copy.deepcopy(model), GispConfig(sparsity=0.4, steps=2, protect="none", repair_aware=True), calib,
                   progress=False)
    assert aware.trajectory.config["repair_aware"] is True
    removed = [tuple(sorted(map(str, r.trajectory.removed_until(len(r.trajectory.steps))))) for r in (plain, aware)]
    assert removed[0] != removed[1]
    assert json.loads(json.dumps(aware.trajectory.config))["repair_aware"] is True


@pytest.mark.parametrize("kw, match", [
    (dict(method="wanda-sp"), "weights the global ranking of gisp and oneshot"),
    (dict(method="taylor-local"), "does not rank globally"),
])
def test_repair_aware_refuses_methods_without_a_global_ranking(kw, match):
    with pytest.raises(GispError, match=match):
        GispConfig(sparsity=0.3, repair_aware=True, **kw).validate()


def test_repair_aware_refuses_the_margin_objective():
    config = CompileConfig("m", 0.3, "out", objective="margin", tasks=("arc_easy",), repair_aware=True)
    with pytest.raises(GispError, match="--repair-aware fits on language-model windows"):
        config.validate()


def test_gram_runs_hold_at_most_the_budget():
    width = {"a": 4, "b": 4, "c": 8, "d": 2}  # 128, 128, 512, 32 bytes of fp64 Gram
    assert gram_runs(width, 256) == [["a", "b"], ["c"], ["d"]]  # c alone exceeds the budget: a run of its own
    assert gram_runs(width, 10**9) == [["a", "b", "c", "d"]]
    assert gram_runs(width, 1) == [["a"], ["b"], ["c"], ["d"]]


def test_shares_do_not_depend_on_the_gram_budget():
    """One forward pass holding every Gram, or a pass per consumer that stops after its layer: the same shares."""
    model = _duplicated()
    plan, calib = analyse(model), LmCalibration(tokens(12, 16, seed=2), batch_size=4)
    whole = unrecoverable_shares(model, plan, calib, budget=10**12)
    apart = unrecoverable_shares(model, plan, calib, budget=1)
    for one, other in zip(whole, apart):
        assert set(one) == set(other) == {0, 1, 2}
        for layer in one:
            np.testing.assert_allclose(one[layer], other[layer], rtol=1e-12, atol=0)
