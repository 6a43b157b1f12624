"""(model, GroupPlan[, calibration]) -> Scores for the baseline criteria: magnitude, random, Wanda-sp."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gisp_fx.passes.calib_loop import batch_loss, run_batches, windows
from gisp_fx.passes.importance import LmCalibration, Scores, _group_sums
from gisp_fx.plan import Axis, GroupPlan, Member


def _blocks(plan: GroupPlan):
    for layer in plan.layers:
        a, m = layer.attention, layer.mlp
        yield (a.query if a else (), a.num_heads if a else 0, m.members if m else (), m.channels if m else 0)


def _scores_from(plan: GroupPlan, per_axis: dict[tuple[str, Axis], np.ndarray], loss: float,
                 axes=(Axis.ROWS, Axis.COLS)) -> Scores:
    def total(members: tuple[Member, ...], count: int) -> np.ndarray:
        out = np.zeros(count)
        for m in members:
            if m.axis in axes:
                out += _group_sums(m, per_axis[(m.module, m.axis)])
        return out

    heads, channels = [], []
    for query, nq, members, nc in _blocks(plan):
        heads.append(total(query, nq))
        channels.append(total(members, nc))
    return Scores(tuple(heads), tuple(np.zeros(0) for _ in heads), tuple(channels), loss)


def magnitude_scores(model: nn.Module, plan: GroupPlan) -> Scores:
    """Global L2 norm of each group's weights (Torch-Pruning's MagnitudeImportance, p=2)."""
    per_axis = {}
    with torch.no_grad():
        for info in plan.linears:
            w = model.get_submodule(info.module).weight.double() ** 2
            per_axis[(info.module, Axis.ROWS)] = w.sum(1).cpu().numpy()
            per_axis[(info.module, Axis.COLS)] = w.sum(0).cpu().numpy()
    squares = _scores_from(plan, per_axis, float("nan"))
    return Scores(tuple(np.sqrt(h) for h in squares.heads), squares.kv,
                  tuple(np.sqrt(c) for c in squares.channels), squares.loss)


def random_scores(plan: GroupPlan, seed: int) -> Scores:
    rng = np.random.default_rng(seed)
    heads, channels = [], []
    for _, nq, _, nc in _blocks(plan):
        heads.append(rng.random(nq))
        channels.append(rng.random(nc))
    return Scores(tuple(heads), tuple(np.zeros(0) for _ in heads), tuple(channels), float("nan"))


def wanda_sp_scores(model: nn.Module, plan: GroupPlan, calib: LmCalibration, progress: bool = True) -> Scores:
    """Wanda-sp (as in FLAP and the GISP repository): |W| * ||X|| summed over the output projection's columns of
    each group (o_proj columns of a head, the down_proj column of a channel), ||X|| over all calibration tokens."""
    out_side = {m.module for query, _, members, _ in _blocks(plan) for m in query + members if m.axis is Axis.COLS}
    sq: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_module, inputs):
            x = inputs[0].detach().double()
            sq[name] = sq.get(name, 0) + (x.reshape(-1, x.shape[-1]) ** 2).sum(0)
        return fn

    device = next(model.parameters()).device
    losses = run_batches(model, windows(calib.input_ids, calib.batch_size, device), batch_loss,
                         hooks={name: hook(name) for name in out_side}, desc="activations", progress=progress)
    per_axis = {}
    with torch.no_grad():
        for name in out_side:
            w = model.get_submodule(name).weight.double().abs()
            per_axis[(name, Axis.COLS)] = (w * sq[name].sqrt()).sum(0).cpu().numpy()
    return _scores_from(plan, per_axis, float(np.mean([loss.item() for loss in losses])), axes=(Axis.COLS,))
