"""The method table: for each Method, how one pruning step scores the groups and chooses what goes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gisp_fx.config import GispConfig, Method
from gisp_fx.distributed import rank_device
from gisp_fx.errors import GispError
from gisp_fx.passes.baselines import magnitude_scores, random_scores, wanda_sp_scores
from gisp_fx.passes.importance import LmCalibration, Scores, score
from gisp_fx.passes.pg import pg_prune, select_by_probability
from gisp_fx.passes.repair_aware import repair_aware, unrecoverable_shares
from gisp_fx.passes.select import Normalize, groups_to_reach, rank, select, select_uniform
from gisp_fx.plan import GroupPlan, Selection
from gisp_fx.sharded import sharded_score
from gisp_fx.trajectory import Trajectory

TOLERANCE = 0.004  # a run stops within this fraction of decoder parameters above the target sparsity


@dataclass
class StepInput:
    """What one step of the pruning loop hands the method."""

    config: GispConfig
    model: nn.Module
    plan: GroupPlan  # the model's current plan
    plan0: GroupPlan  # the dense model's
    calib: object
    needed: int  # decoder parameters still to remove
    protect: frozenset[int]
    trajectory: Trajectory
    step: int
    checkpoint: bool
    progress: bool
    shard_device: str | None = None  # --shard: where this process's part of the sharded replica runs


def _gradient(s: StepInput) -> Scores:
    """Loss-gradient scores; the protected layers are skipped (NaN: no selection reads them)."""
    desc = f"step {s.step} gradients"
    if s.config.shard:
        device = torch.device(rank_device(s.shard_device or "cpu"))
        return sharded_score(s.model, s.plan, s.calib, progress=s.progress, desc=desc, checkpoint=s.checkpoint,
                             device=device, skip=s.protect)
    return score(s.model, s.plan, s.calib, progress=s.progress, desc=desc, checkpoint=s.checkpoint, skip=s.protect)


def _repair_aware(s: StepInput) -> Scores:
    """Loss-gradient scores, each weighted by the share of its group's output an lsq repair could not rebuild."""
    scores = _gradient(s)
    heads, channels = unrecoverable_shares(s.model, s.plan, s.calib, s.protect, progress=s.progress)
    return repair_aware(s.plan, scores, heads, channels)


def _wanda(s: StepInput) -> Scores:
    if not isinstance(s.calib, LmCalibration):
        raise GispError("--method wanda-sp needs language-model calibration windows (the ppl objective)")
    return wanda_sp_scores(s.model, s.plan, s.calib, s.progress)


SCORERS: dict[Method, Callable[[StepInput], Scores]] = {
    Method.GISP: _gradient,
    Method.ONESHOT: _gradient,
    Method.TAYLOR_LOCAL: _gradient,
    Method.WANDA_SP: _wanda,
    Method.MAGNITUDE: lambda s: magnitude_scores(s.model, s.plan),
    Method.RANDOM: lambda s: random_scores(s.plan, s.config.seed),
}


def choose(s: StepInput, scores: Scores) -> Selection:
    """This step's removals: a uniform per-layer ratio, or the global ranking in groups of `groups_per_step`."""
    method = s.config.effective_method
    if method.uniform:
        return select_uniform(s.plan, scores, s.needed, s.protect)
    normalize = Normalize(s.config.normalize) if method.normalizing else Normalize.NONE
    ranked = rank(s.plan, scores, normalize, s.plan0, s.protect)
    if not ranked:
        reached = (s.plan0.decoder_params - s.plan.decoder_params) / s.plan0.decoder_params
        raise GispError(f"step {s.step}: every unprotected group is gone at sparsity {reached:.3f}; the target "
                        f"{s.config.sparsity} cannot be reached with these protected layers (see --protect)")
    record = s.trajectory.config
    steps = s.config.schedule_steps
    if record.get("groups_per_step") is None and steps > 1:
        record["groups_per_step"] = math.ceil(groups_to_reach(s.plan, ranked, s.needed) / steps)
    cap = s.needed + math.floor(TOLERANCE * s.plan0.decoder_params)
    return select(s.plan, ranked, record.get("groups_per_step"), s.needed, params_cap=cap)


def _pg_step(s: StepInput) -> tuple[Scores, Selection]:
    """Policy-gradient pruning: learn keep-probabilities (forward passes only), then drop the least likely."""
    config = s.config.pg_config()
    result = pg_prune(s.model, s.plan, s.calib, s.needed, s.protect, config, s.progress)
    s.trajectory.history = result.history
    selection = select_by_probability(s.plan, result.units, result.probs, s.needed, config.budget)
    return result.scores(s.plan), selection


def run_step(s: StepInput) -> tuple[Scores, Selection]:
    """Scores and removals of one step of `s.config`'s method."""
    method = s.config.effective_method
    if method is Method.PG:
        return _pg_step(s)
    scores = (_repair_aware if s.config.repair_aware else SCORERS[method])(s)
    return scores, choose(s, scores)
