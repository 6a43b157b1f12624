"""The record of a run: every step's removals (original indices), sparsity and scores; replayable."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gisp_fx.errors import GispError
from gisp_fx.plan import FreedParams, GroupPlan, GroupRef, Kind

TRAJECTORY_VERSION = 1


@dataclass(frozen=True)
class Step:
    step: int
    removed: tuple[tuple[int, str, int], ...]  # (layer, "head" | "channel", index in the ORIGINAL model), in order
    sparsity: float  # removed decoder-layer parameters / original decoder-layer parameters, after this step
    decoder_params: int
    total_params: int
    loss: float  # calibration loss before this step's removal
    wall_s: float

    def refs(self) -> tuple[GroupRef, ...]:
        return tuple(GroupRef(layer, Kind(kind), index) for layer, kind, index in self.removed)


@dataclass
class Trajectory:
    config: dict  # the CompileConfig as JSON
    plan: GroupPlan  # the original model's plan: the indices `removed` refer to
    steps: list[Step] = field(default_factory=list)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # "step{t}.heads" [L, H0] ..., NaN once removed
    history: list[dict] = field(default_factory=list)  # per-iteration record of an iterative optimiser (pg)
    repair: list[dict] = field(default_factory=list)  # each repair that ran: at which step ("end"), settings, time
    fingerprint: str | None = None  # hash of the dense model's prunable weights (gisp_fx.fingerprint); None: older runs
    recover: list[dict] = field(default_factory=list)  # each distillation run on the result (gisp-fx recover)

    def removed_until(self, step: int) -> tuple[GroupRef, ...]:
        return tuple(ref for s in self.steps if s.step <= step for ref in s.refs())

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        doc = {"version": TRAJECTORY_VERSION, "config": self.config, "plan": self.plan.to_json(),
               "steps": [asdict(s) for s in self.steps], "history": self.history}
        if self.repair:
            doc["repair"] = self.repair
        if self.fingerprint:
            doc["weights"] = self.fingerprint
        if self.recover:
            doc["recover"] = self.recover
        tmp = folder / "trajectory.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        if self.scores:
            save_file({k: v.contiguous() for k, v in self.scores.items()}, str(folder / "scores.safetensors.tmp"))
            (folder / "scores.safetensors.tmp").replace(folder / "scores.safetensors")
        tmp.replace(folder / "trajectory.json")  # last: a trajectory.json always has its scores beside it

    @staticmethod
    def load(folder: Path) -> "Trajectory":
        """The trajectory in `folder`, or a GispError saying which file is damaged and how."""
        from safetensors import SafetensorError

        path = folder / "trajectory.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GispError(f"trajectory '{path}' could not be read ({exc}); it is damaged: compile the run "
                            "again") from exc
        version = doc.get("version") if isinstance(doc, dict) else None
        if isinstance(version, int) and version > TRAJECTORY_VERSION:
            raise GispError(f"trajectory '{path}' has version {version}, written by a newer gisp-fx; this one reads "
                            f"version {TRAJECTORY_VERSION}: upgrade gisp-fx to read it")
        if version != TRAJECTORY_VERSION:
            raise GispError(f"trajectory '{path}' has no valid version (got {version!r}, expected "
                            f"{TRAJECTORY_VERSION}); it is not a gisp-fx trajectory or it is damaged")
        try:
            steps = [Step(**{**s, "removed": tuple(tuple(r) for r in s["removed"])}) for s in doc["steps"]]
            for step in steps:
                step.refs()  # every removal names a known group kind
            plan = GroupPlan.from_json(doc["plan"])
            config = doc["config"]
            if not isinstance(config, dict) or not isinstance(config.get("model"), str):
                raise ValueError("'config' must be an object naming the model")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GispError(f"trajectory '{path}' is incomplete or malformed ({type(exc).__name__}: {exc}); "
                            "it is damaged: compile the run again") from exc
        scores_path = folder / "scores.safetensors"
        try:
            scores = load_file(str(scores_path)) if scores_path.is_file() else {}
        except (SafetensorError, OSError) as exc:
            raise GispError(f"trajectory scores '{scores_path}' could not be read ({exc}); the file is damaged "
                            "or truncated: compile the run again") from exc
        history = doc.get("history", [])
        if not isinstance(history, list):
            raise GispError(f"trajectory '{path}': 'history' is a {type(history).__name__}, expected a list; it is "
                            "damaged: compile the run again")
        repair = doc.get("repair", [])
        if not isinstance(repair, list):
            raise GispError(f"trajectory '{path}': 'repair' is a {type(repair).__name__}, expected a list; it is "
                            "damaged: compile the run again")
        fingerprint = doc.get("weights")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise GispError(f"trajectory '{path}': 'weights' is a {type(fingerprint).__name__}, expected a hash "
                            "string; it is damaged: compile the run again")
        recover = doc.get("recover", [])
        if not isinstance(recover, list):
            raise GispError(f"trajectory '{path}': 'recover' is a {type(recover).__name__}, expected a list; it is "
                            "damaged: recover the run again")
        traj = Trajectory(config, plan, steps, scores, history, repair, fingerprint, recover)
        problem = inconsistency(traj)
        if problem:
            raise GispError(f"trajectory '{path}': {problem}; it is damaged or was edited: compile the run again")
        return traj


def inconsistency(traj: Trajectory) -> str | None:
    """The first way the steps contradict the plan or themselves, or None: steps numbered 1, 2, ... in order,
    every removal a group of the original plan (layer and index in range), no group removed twice, and each
    step's recorded sparsity and decoder parameters those its removals give (with the biases a repair at
    each step added)."""
    plan, freed, seen = traj.plan, 0, {}
    counter = FreedParams(plan)
    for position, step in enumerate(traj.steps, 1):
        if step.step != position:
            return f"step {position} is missing or out of order (the {position}th step is numbered {step.step})"
        for layer, kind, index in step.removed:
            group = f"{kind} {index} of layer {layer}"
            if not isinstance(layer, int) or not 0 <= layer < len(plan.layers):
                return f"step {step.step}: {group}: the model has layers 0..{len(plan.layers) - 1}"
            block = plan.layers[layer].attention if kind == "head" else plan.layers[layer].mlp
            size = (block.num_heads if kind == "head" else block.channels) if block is not None else 0
            if not isinstance(index, int) or not 0 <= index < size:
                return f"step {step.step}: {group} does not exist (layer {layer} has {size} {kind}s)"
            if (layer, kind, index) in seen:
                return f"step {step.step}: {group} is listed twice (first at step {seen[layer, kind, index]})"
            seen[layer, kind, index] = step.step
            freed += counter.remove(GroupRef(layer, Kind(kind), index))
        # a repair at every step may give consumers a bias the dense model lacked: those parameters count
        added = sum(int(r.get("bias_params_added", 0)) for r in traj.repair
                    if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step.step)
        sparsity = (freed - added) / plan.decoder_params
        if abs(step.sparsity - sparsity) > 1e-6 or step.decoder_params != plan.decoder_params - freed + added:
            return (f"step {step.step}: recorded sparsity {step.sparsity:.6f} ({step.decoder_params:,} decoder "
                    f"parameters) does not match its removals, which give {sparsity:.6f} "
                    f"({plan.decoder_params - freed:,})")
    return None


def _group_counts(plan: GroupPlan, kind: str) -> list[int]:
    return [(l.attention.num_heads if l.attention else 0) if kind == "heads" else (l.mlp.channels if l.mlp else 0)
            for l in plan.layers]


def scores_table(plan: GroupPlan, alive: list[tuple[list[int], list[int]]], values, kind: str) -> torch.Tensor:
    """Scores of the alive groups laid out on the original plan's grid, NaN where a group is gone."""
    sizes = _group_counts(plan, kind)
    width = max(sizes)
    table = np.full((len(plan.layers), width), np.nan, dtype=np.float64)
    for i, (heads, channels) in enumerate(alive):
        ids = heads if kind == "heads" else channels
        if len(ids):
            table[i, ids] = values[i]
    return torch.from_numpy(table)


def dense_scores(plan: GroupPlan, table: torch.Tensor, kind: str) -> tuple[np.ndarray, ...]:
    """The inverse of scores_table for a step that scored every group of `plan` (a run's first step)."""
    rows = table.cpu().numpy()
    return tuple(rows[i, :n] for i, n in enumerate(_group_counts(plan, kind)))
