"""(model, GispConfig, calibration) -> PruneResult: the pruning loop, in place and in memory.

No files, no evaluation, no process-wide settings: the model passed in is the pruned (and, if asked, repaired)
model when `prune_` returns. Everything that writes, evaluates or launches processes (`compile_model`, the CLI)
is a layer over this."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from tqdm.auto import tqdm

from gisp_fx.calibration import as_calibration
from gisp_fx.config import Checkpoint, CompileConfig, GispConfig
from gisp_fx.errors import GispError
from gisp_fx.fingerprint import require_same_weights, weights_fingerprint
from gisp_fx.memory import free_bytes, free_memory, scoring_bytes
from gisp_fx.methods import StepInput, run_step
from gisp_fx.passes.analyse import analyse
from gisp_fx.passes.importance import LmCalibration, Scores
from gisp_fx.passes.repair import replay_repaired_, shrink_repaired_
from gisp_fx.passes.repair_check import check_calibration
from gisp_fx.passes.select import freed_params, parse_protect
from gisp_fx.plan import Alive, GroupPlan, GroupRef, Kind, Selection
from gisp_fx.trajectory import Step, Trajectory, scores_table


class StepFailed(GispError):
    """A step's calibration loss was not finite; the trajectory holds the steps before it."""

    def __init__(self, step: int, why: str):
        super().__init__(f"step {step}: {why}; stopped after {step - 1} good steps: lower --sparsity or change the "
                         "calibration data")
        self.step = step


@dataclass
class PruneResult:
    """What `prune_` did: the plans before and after, the trajectory (every step's removals by original index,
    sparsity and scores: replayable with `materialize`), and the last step's scores."""

    plan: GroupPlan
    plan0: GroupPlan
    trajectory: Trajectory
    scores: Scores | None
    checkpoint: bool  # whether the scoring pass recomputed activations (checkpointing)

    @property
    def sparsity(self) -> float:
        """Removed decoder-layer parameters / the dense model's decoder-layer parameters."""
        return (self.plan0.decoder_params - self.plan.decoder_params) / self.plan0.decoder_params


def use_checkpoint(config: GispConfig, model: nn.Module, calib) -> bool:
    """--checkpoint auto: recompute activations only when the scoring pass's estimated memory exceeds the budget
    (--memory-budget, default half the memory free now); on and off as they say."""
    if config.checkpoint != Checkpoint.AUTO.value:
        return config.checkpoint == Checkpoint.ON.value
    if not config.effective_method.gradient:
        return False
    batch, seq = (calib.batch_size, calib.input_ids.shape[1]) if isinstance(calib, LmCalibration) else (8, 128)
    device = next(model.parameters()).device
    budget = config.memory_budget_gb * 1e9 if config.memory_budget_gb is not None else free_bytes(device) / 2
    return scoring_bytes(model, batch, seq) > budget


def check_target(config: GispConfig, plan0: GroupPlan, protect: frozenset[int]) -> int:
    """The decoder parameters to remove, or a GispError (before any gradient) when the model's prunable groups,
    or those outside the protected layers, cannot reach the target."""
    target = math.ceil(config.sparsity * plan0.decoder_params)
    if target > plan0.prunable_params:  # e.g. OLMo-2, whose attention is kept whole
        share = plan0.prunable_params / plan0.decoder_params
        raise GispError(f"--sparsity {config.sparsity}: only {plan0.prunable_params:,} of the model's "
                        f"{plan0.decoder_params:,} decoder-layer parameters are prunable ({100 * share:.1f} %); "
                        f"choose --sparsity below {share:.3f} (`gisp-fx inspect` lists what is kept whole and why)")
    refs = [GroupRef(l.index, Kind.HEAD, h) for l in plan0.layers if l.index not in protect and l.attention
            for h in range(l.attention.num_heads)]
    refs += [GroupRef(l.index, Kind.CHANNEL, c) for l in plan0.layers if l.index not in protect and l.mlp
             for c in range(l.mlp.channels)]
    most = freed_params(plan0, Selection(tuple(refs))) if refs else 0
    if most < target:
        shown = ",".join(map(str, sorted(protect))) or "none"
        raise GispError(f"--sparsity {config.sparsity}: unreachable with protected layers {shown} (--protect "
                        f"{config.protect or 'default: first 10 % and last'}); pruning every group of the other "
                        f"{len(plan0.layers) - len(protect)} layers reaches at most {most / plan0.decoder_params:.4f} "
                        "decoder sparsity: lower --sparsity or protect fewer layers")
    return target


def adopt_(model: nn.Module, other: nn.Module) -> None:
    """Make `model` the module `other` is (its submodules, parameters, buffers and config), keeping the object:
    the caller's reference then holds the model the end repair rebuilt from the dense copy."""
    model.__dict__.update(other.__dict__)


def _check_arguments(model, config, calibration) -> None:
    if not isinstance(model, nn.Module):
        raise GispError(f"prune_: model must be a torch.nn.Module (a Hugging Face causal LM), got "
                        f"{type(model).__name__}")
    if not isinstance(config, GispConfig):
        raise GispError(f"prune_: config must be a GispConfig (e.g. GispConfig(sparsity=0.5)), got "
                        f"{type(config).__name__}")
    if calibration is None and not config.effective_method.calibration_free:
        raise GispError(f"prune_: --method {config.method} needs calibration data: token-id windows or "
                        "lm_windows(tokenizer)")


def prune_(model: nn.Module, config: GispConfig, calibration=None, *, progress: bool = True,
           on_step: Callable[[Trajectory, nn.Module], None] | None = None, resume: Trajectory | None = None,
           record: dict | None = None, shard_device: str | None = None, repair_calibration=None) -> PruneResult:
    """Prune `model` in place to `config.sparsity` of its decoder-layer parameters.

    `calibration`: token-id windows [n, seq] (LongTensor) or an object of `lm_windows`, `mc_sequences` or
    `custom_objective` (none for magnitude and random). `on_step(trajectory, model)` runs after every step;
    `resume` continues a trajectory of the same model and settings (its removals are replayed first); `record`
    is what the trajectory stores as its config (default: `config` as compile settings without a model name);
    `repair_calibration`: the windows the repair fits on (default: `calibration`)."""
    _check_arguments(model, config, calibration)
    config.validate()
    calib = as_calibration(calibration) if calibration is not None else None
    plan0 = analyse(model)
    free_memory()  # the capture's temporaries, before scoring stacks on them
    protect = parse_protect(config.protect, len(plan0.layers))
    target = check_target(config, plan0, protect)
    repair = config.repair_settings()
    fit = as_calibration(repair_calibration) if repair_calibration is not None else calib
    check_calibration(plan0, fit, repair)
    checkpoint = use_checkpoint(config, model, calib)
    # repair at the end replays the final removal on the dense model: keep a dense copy until then
    dense = copy.deepcopy(model) if repair.mode != "none" and repair.at == "end" else None

    if resume is not None:
        if resume.plan != plan0:
            raise GispError("resume: the model is not the one the trajectory started from")
        require_same_weights(resume.fingerprint, model, plan0, str(resume.config.get("model")), "--resume")
        traj = resume
        at_step = repair.at == "step"
        chunks = [s.refs() for s in traj.steps] if at_step else [traj.removed_until(len(traj.steps))]
        plan, alive, _ = replay_repaired_(model, plan0, chunks, fit if at_step else None, repair, progress)
    else:
        record = record if record is not None else CompileConfig.from_gisp(config).to_json()
        traj = Trajectory({**record, "groups_per_step": None}, plan0)
        traj.fingerprint = weights_fingerprint(model, plan0)
        plan, alive = plan0, Alive(plan0)

    scores = None
    removed = plan0.decoder_params - plan.decoder_params
    bar = tqdm(total=config.schedule_steps, initial=len(traj.steps), desc="pruning", unit="step",
               disable=not progress)
    while removed < target:
        t = len(traj.steps) + 1
        t0 = time.perf_counter()
        step_input = StepInput(config, model, plan, plan0, calib, target - removed, protect, traj, t, checkpoint,
                               progress, shard_device)
        try:
            scores, selection = run_step(step_input)
        except FloatingPointError as exc:
            raise StepFailed(t, str(exc)) from exc
        free_memory()
        original = tuple(alive.original(ref) for ref in selection.removed)
        for name, values in (("heads", scores.heads), ("channels", scores.channels)):
            traj.scores[f"step{t}.{name}"] = scores_table(plan0, list(zip(alive.heads, alive.channels)), values, name)
        plan, repaired = shrink_repaired_(model, plan, selection, fit if repair.at == "step" else None, repair,
                                          progress)
        if repaired:
            traj.repair.append({"step": t, **repaired})
        alive.remove(original)
        removed = plan0.decoder_params - plan.decoder_params
        step = Step(t, tuple((r.layer, r.kind.value, r.index) for r in original), removed / plan0.decoder_params,
                    plan.decoder_params, plan.total_params, scores.loss, time.perf_counter() - t0)
        traj.steps.append(step)
        heads = sum(r.kind is Kind.HEAD for r in original)
        if progress:
            tqdm.write(f"step {t}: removed {len(original)} groups ({heads} heads, {len(original) - heads} channels), "
                       f"sparsity {100 * step.sparsity:.1f} %, calibration loss {scores.loss:.3f}, {step.wall_s:.1f} s")
        bar.total = max(bar.total, t)
        bar.update(1)
        if on_step is not None:
            on_step(traj, model)
    bar.close()
    if dense is not None:
        plan, _, (repaired,) = replay_repaired_(dense, plan0, [traj.removed_until(len(traj.steps))], fit, repair,
                                                progress)
        adopt_(model, dense)
        del dense
        traj.repair.append({"step": "end", **repaired})
    return PruneResult(plan, plan0, traj, scores, checkpoint)
