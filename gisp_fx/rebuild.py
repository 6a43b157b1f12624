"""A trajectory -> the model at any sparsity (or step) on it, rebuilt from the original weights: the recorded
removal order replayed in one shrink, repaired as the run was (or as asked)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch import nn

from gisp_fx.calibration import build_calibration
from gisp_fx.config import CompileConfig, Method
from gisp_fx.datasets import TEXT_SOURCES
from gisp_fx.device import resolve
from gisp_fx.errors import GispError
from gisp_fx.fingerprint import require_same_weights
from gisp_fx.loading import LoadedModel, load_model
from gisp_fx.outputs import refuse_overlap
from gisp_fx.preflight import require_types
from gisp_fx.passes.analyse import analyse
from gisp_fx.passes.importance import Scores
from gisp_fx.passes.pg import build_units, select_by_probability
from gisp_fx.passes.repair import MODES as REPAIR_MODES, RepairSettings, replay_repaired_
from gisp_fx.passes.repair_check import check_calibration
from gisp_fx.passes.select import FreedParams, parse_protect, select_uniform
from gisp_fx.plan import GroupPlan, GroupRef, Kind
from gisp_fx.rundir import TRAJECTORY_DIR
from gisp_fx.save import check_output_folder, save_pruned, staged_dir
from gisp_fx.trajectory import Trajectory, dense_scores


def load_trajectory(run_dir: str | Path) -> Trajectory:
    """The trajectory a `gisp-fx compile` output folder holds."""
    run = Path(run_dir)
    if not (run / TRAJECTORY_DIR / "trajectory.json").is_file():
        raise GispError(f"materialize: '{run}' holds no {TRAJECTORY_DIR}/trajectory.json; give a folder written by "
                        "`gisp-fx compile`")
    return Trajectory.load(run / TRAJECTORY_DIR)


def removals_for(traj: Trajectory, sparsity: float | None, step: int | None = None) -> tuple[GroupRef, ...]:
    """The removal-order prefix that reaches `sparsity`, or everything up to `step`; for a uniform per-layer
    method, the uniform selection at `sparsity` from the run's scores (see _uniform_removals)."""
    if step is not None:
        if not 0 <= step <= len(traj.steps):
            raise GispError(f"materialize: --step must be in 0..{len(traj.steps)}, got {step}")
        return traj.removed_until(step)
    for s in traj.steps:
        if sparsity is not None and abs(s.sparsity - sparsity) < 1e-9:
            return traj.removed_until(s.step)
    final = traj.steps[-1].sparsity if traj.steps else 0.0
    if sparsity is None or not 0 <= sparsity <= final + 1e-9:
        raise GispError(f"materialize: --sparsity must be in [0, {final:.4f}] (this trajectory's range), got {sparsity}")
    target = math.ceil(sparsity * traj.plan.decoder_params - 1e-6)
    method = traj.config.get("method")
    if method in (m.value for m in Method if m.uniform):
        return _uniform_removals(traj, target)
    if method == Method.PG.value:
        return _pg_removals(traj, target)
    # walk the recorded order; parameters freed are counted on the original plan, as the run counted them
    prefix, freed, counter = [], 0, FreedParams(traj.plan)
    for ref in traj.removed_until(len(traj.steps)):
        if freed >= target:
            break
        freed += counter.remove(ref)
        prefix.append(ref)
    return tuple(prefix)


def _uniform_removals(traj, params_needed: int) -> tuple[GroupRef, ...]:
    """A uniform method scores the dense model once and cuts the same ratio from every layer, so a prefix of its
    removal order is not what it would remove at a lower target: re-select from the recorded dense scores, which
    are exactly those a run compiled to this lower target computes (same model, same calibration)."""
    plan = traj.plan
    if "step1.heads" not in traj.scores or "step1.channels" not in traj.scores:
        raise GispError("materialize: this uniform-method run has no recorded scores (trajectory/scores.safetensors)")
    scores = Scores(dense_scores(plan, traj.scores["step1.heads"], "heads"), tuple(np.zeros(0) for _ in plan.layers),
                    dense_scores(plan, traj.scores["step1.channels"], "channels"), float("nan"))
    protect = parse_protect(traj.config.get("protect"), len(plan.layers))
    return select_uniform(plan, scores, params_needed, protect).removed


def _pg_removals(traj, params_needed: int) -> tuple[GroupRef, ...]:
    """A pg run at a lower sparsity: the least likely structures under the run's learned probabilities (what the
    probabilities rank; a run to that sparsity would learn other probabilities)."""
    config = CompileConfig.from_json(traj.config)
    plan = traj.plan
    units = build_units(plan, config.pg_groups, parse_protect(config.protect, len(plan.layers)))
    heads = dense_scores(plan, traj.scores["step1.heads"], "heads")
    channels = dense_scores(plan, traj.scores["step1.channels"], "channels")
    probs = np.array([(heads if refs[0].kind is Kind.HEAD else channels)[refs[0].layer][refs[0].index]
                      for refs in units.groups])
    return select_by_probability(plan, units, probs, params_needed, config.pg_budget).removed


def materialize_repair(traj, override: str | None, calib: str | None, repair_samples: int | None = None):
    """The repair a materialize runs, and the CompileConfig to rebuild its calibration from (the run's recorded
    calibration settings; None when no repair runs), checked before any model is loaded: the run's own repair
    unless `override` names another; a run repaired at every step can only be replayed as it ran (or
    unrepaired, --repair none), since its removal order was scored on repaired models."""
    config = CompileConfig.from_json(traj.config)
    recorded = config.repair_settings()
    if traj.repair and recorded.mode != "none":  # the inputs and damping the run used (the defaults may have moved)
        first = traj.repair[0]
        recorded = replace(recorded, inputs=first.get("inputs", recorded.inputs),
                            damping=float(first.get("damping", recorded.damping)),
                            target=first.get("target", "layer"),  # runs before targets were recorded: layer
                            sublayers=bool(first.get("sublayers", False)),
                            intercept=bool(first.get("intercept", False)),
                            epochs=int(first.get("epochs", recorded.epochs)), lr=float(first.get("lr", recorded.lr)))
    if override is not None and override not in REPAIR_MODES:
        raise GispError(f"materialize: --repair must be one of {', '.join(REPAIR_MODES)}, got '{override}'")
    if override is None or override == recorded.mode:
        settings = recorded
    elif override == "none":
        settings = RepairSettings()
    elif recorded.mode != "none" and recorded.at == "step":
        raise GispError(f"materialize: this run repaired ({recorded.mode}) after every step, so its removal order "
                        f"was scored on repaired models; reproduce it with --repair {recorded.mode}, or give "
                        "--repair none for the unrepaired replay")
    else:
        settings = RepairSettings(override, "end")
    if settings.mode == "none":
        if repair_samples is not None:
            raise GispError("materialize: --repair-samples is the number of windows a repair fits on; this materialize "
                            "runs none (give --repair bias|lsq|block, or leave --repair-samples out)")
        if calib is not None:
            raise GispError("materialize: --calib is the calibration text of a repair; this materialize runs none "
                            "(give --repair bias|lsq|block, or leave --calib out)")
        return settings, None
    if repair_samples is None and settings is recorded and traj.repair and traj.repair[0].get("tokens"):
        repair_samples = traj.repair[0]["tokens"] // config.seq_len  # the windows it fitted on, whatever today's default
    config = replace(config, repair=settings.mode, calib=calib or config.calib,
                     repair_samples=config.repair_samples if repair_samples is None else repair_samples)
    config.validate(frozenset())  # e.g. a calibration-free method has no data to repair from
    if config.calib and config.calib not in TEXT_SOURCES and not Path(config.calib).is_file():
        raise GispError(f"materialize: --repair {settings.mode} needs the run's calibration data, and its "
                        f"calibration file '{config.calib}' is not there; pass --calib FILE (the same text), or "
                        "--repair none")
    return settings, config


def materialize_model(traj: Trajectory, sparsity: float | None, *, step: int | None = None,
                      loaded: LoadedModel | None = None, device: str = "cpu", dtype: str = "float32",
                      repair: str | None = None, calib: str | None = None, repair_samples: int | None = None
                      ) -> tuple[LoadedModel, GroupPlan, float]:
    """The model at `sparsity` (or after `step`) of a trajectory, rebuilt in memory from the original weights
    (`loaded`, else the model the trajectory names), repaired as the run was (or as `repair` says) on the run's
    calibration (or the text file `calib`), on the run's repair windows or `repair_samples` of them; returns
    (loaded, plan, sparsity)."""
    removed = removals_for(traj, sparsity, step)
    settings, calib_config = materialize_repair(traj, repair, calib, repair_samples)
    dev, dt = resolve(device, dtype)
    if loaded is None:
        if not traj.config.get("model"):
            raise GispError("materialize: this trajectory names no model to rebuild from; pass the dense model")
        loaded = load_model(traj.config["model"], dtype=dt, device=str(dev))
    plan0 = analyse(loaded.model)
    if plan0 != traj.plan:
        raise GispError(f"materialize: the model '{traj.config.get('model')}' is not the one this trajectory pruned")
    require_same_weights(traj.fingerprint, loaded.model, plan0, str(traj.config.get("model")), "materialize")
    calibration = None
    if calib_config:  # the windows the run's repair fitted on (its record, --repair-samples, or the default for plan0)
        calibration = build_calibration(calib_config, loaded.tokenizer, windows=calib_config.repair_windows_for(plan0))
        check_calibration(plan0, calibration, settings)  # refuses an ill-posed fit, as compile does; notes a thin one
    chunks = [removed]
    if settings.at == "step" and settings.mode != "none":  # repaired after every recorded step, as the run was
        chunks = [tuple(r for r in removed if r in refs) for refs in (set(s.refs()) for s in traj.steps)]
    plan, _, _ = replay_repaired_(loaded.model, plan0, chunks, calibration, settings)
    return loaded, plan, (plan0.decoder_params - plan.decoder_params) / plan0.decoder_params


def materialize(run_or_trajectory: str | Path | Trajectory, sparsity: float | None = None, *,
                step: int | None = None, model: nn.Module | LoadedModel | None = None, device: str = "cpu",
                dtype: str = "float32", repair: str | None = None, repair_samples: int | None = None) -> LoadedModel:
    """The model at `sparsity` (or after `step`) of a run folder's or an in-memory trajectory, in memory.
    `model`: the dense model it pruned (default: load the model the trajectory names); `repair_samples`: the windows
    a repair fits on (default: as the run recorded)."""
    if isinstance(run_or_trajectory, Trajectory):
        traj = run_or_trajectory
    elif isinstance(run_or_trajectory, (str, Path)):
        traj = load_trajectory(run_or_trajectory)
    else:
        raise GispError(f"materialize: expected a run folder or a Trajectory, got {type(run_or_trajectory).__name__}")
    if isinstance(model, nn.Module):
        model = LoadedModel(model, None, "in memory")
    elif model is not None and not isinstance(model, LoadedModel):
        raise GispError(f"materialize: model must be the dense nn.Module or a LoadedModel, got {type(model).__name__}")
    return materialize_model(traj, sparsity, step=step, loaded=model, device=device, dtype=dtype, repair=repair,
                             repair_samples=repair_samples)[0]


def save_materialized(run_dir: str, sparsity: float | None, output: str, *, step: int | None = None,
                      overwrite: bool = False, loaded: LoadedModel | None = None, device: str = "cpu",
                      dtype: str = "float32", repair: str | None = None, calib: str | None = None,
                      repair_samples: int | None = None):
    """`gisp-fx materialize`: rebuild the model at a sparsity (or step) of a run and save it as a model folder;
    returns (model, plan, sparsity)."""
    require_types("materialize", run_dir=(run_dir, (str, Path)), sparsity=(sparsity, (float, int, type(None))),
                  output=(output, (str, Path)), step=(step, (int, type(None))))
    out = check_output_folder(output)
    refuse_overlap(out, {"the run folder": run_dir, "its model": load_trajectory(run_dir).config["model"]})
    if out.exists() and not overwrite:
        raise GispError(f"--output '{out}' exists; pass --overwrite to replace it")
    loaded, plan, sparsity = materialize_model(load_trajectory(run_dir), sparsity, step=step, loaded=loaded,
                                               device=device, dtype=dtype, repair=repair, calib=calib,
                                               repair_samples=repair_samples)
    with staged_dir(out) as tmp:
        save_pruned(loaded.model, loaded.tokenizer, tmp)
    return loaded.model, plan, sparsity
