"""Repair-aware scores: each group's loss-gradient score weighted by the share of its output that a least-squares
repair (passes/repair.py, lsq) could not rebuild from the groups that stay.

A head or MLP channel reaches the rest of the model through one consumer linear (its column block S of o_proj or
down_proj). When S goes and the kept columns K are re-fitted to the consumer's old output on the calibration inputs
X (Gram H = X X^T), what is left of the removed contribution W_S X_S is its part that X_K cannot predict:

    residual(S) = tr(W_S (H^-1)_SS^-1 W_S^T)        (the Schur complement of H_KK in H)
    energy(S)   = tr(W_S H_SS W_S^T)                (the contribution itself)

and share(S) = residual / energy lies in [0, 1]: near 0 for a group the others duplicate, 1 for one no kept group
can stand in for (for a single channel, share = 1 / (H_jj (H^-1)_jj), whatever its weights). GISP's score is the
first-order loss change of removing a group, linear in the size of the output change, so the repair-aware score is
score * sqrt(share): the loss change of the output change a repair leaves. It is the single-removal view (as OBS
saliencies are): groups removed together in one step may stand in for each other, which the iterative schedule
re-measures at its next step.

The Gram matrices come from forward passes over the calibration windows (no gradients), fp64, damped as the lsq
repair is (lambda = damping * mean diag H). Each pass gathers the Grams of a run of consumers whose in_features^2 * 8
bytes fit in `budget` and stops after the decoder layer of the last of them: memory stays under the budget (plus one consumer), at the cost
of a pass per run (on Qwen2.5-Coder-1.5B every Gram together is about 17 GiB: 4 GiB takes four or five passes).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from gisp_fx.errors import GispError
from gisp_fx.passes.importance import LmCalibration, Scores
from gisp_fx.passes.repair import DAMPING, collect
from gisp_fx.plan import Axis, GroupPlan, Member

EXPONENT = 0.5  # score * share ** EXPONENT: the first-order score scales with the output change's amplitude
GRAM_BUDGET = 4 * 2**30  # bytes of fp64 Gram matrices held at once; more than this takes another forward pass


def _consumers(plan: GroupPlan, skip: frozenset[int]) -> dict[str, list[tuple[int, str, Member]]]:
    """Consumer linear -> the (layer, 'heads' | 'channels', member) whose column groups it holds."""
    out: dict[str, list[tuple[int, str, Member]]] = {}
    for layer in plan.layers:
        if layer.index in skip:
            continue
        a, m = layer.attention, layer.mlp
        for kind, members in (("heads", a.query if a is not None and a.num_heads else ()),
                              ("channels", m.members if m is not None and m.channels else ())):
            for member in members:
                if member.axis is Axis.COLS:
                    out.setdefault(member.module, []).append((layer.index, kind, member))
    return out


def group_residuals(weight: torch.Tensor, gram: torch.Tensor, member: Member, damping: float = DAMPING
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per group of `member` (columns of the consumer `weight` [out, in]): the output energy a least-squares re-fit
    of the other columns leaves, tr(W_S ((H + lambda I)^-1)_SS^-1 W_S^T), and the group's own output energy
    tr(W_S H_SS W_S^T), H = `gram` (fp64)."""
    h = gram.double()
    lam = float(damping * h.diagonal().mean())
    hd = h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    chol, info = torch.linalg.cholesky_ex(hd)
    if int(info) != 0:
        raise GispError(f"repair-aware scores: the Gram matrix of {member.module}'s inputs (+ damping {damping}) is "
                        f"not positive definite (leading minor {int(info)}); give more calibration tokens")
    inv = torch.cholesky_inverse(chol)
    w = weight.detach().double().to(h.device)
    grid = member.grid
    if grid is not None:  # every group as wide: one batched solve
        idx = torch.as_tensor(grid, dtype=torch.long, device=h.device)  # [G, w]
        rhs = w[:, idx].permute(1, 2, 0)  # [G, w, out]: W_S^T per group
        a = inv[idx[:, :, None], idx[:, None, :]]  # [G, w, w]
        residual = (torch.linalg.solve(a, rhs) * rhs).sum((1, 2))
        energy = (h[idx[:, :, None], idx[:, None, :]] @ rhs * rhs).sum((1, 2))
        return residual.cpu().numpy(), energy.cpu().numpy()
    residual, energy = np.zeros(len(member.index)), np.zeros(len(member.index))
    for g, cols in enumerate(member.index):
        s = torch.as_tensor(cols, dtype=torch.long, device=h.device)
        ws = w.index_select(1, s)  # [out, |S|]
        a = inv.index_select(0, s).index_select(1, s)
        residual[g] = float((torch.linalg.solve(a, ws.T).T * ws).sum())
        energy[g] = float((ws @ h.index_select(0, s).index_select(1, s) * ws).sum())
    return residual, energy


def gram_runs(width: dict[str, int], budget: int) -> list[list[str]]:
    """The consumers (in forward order, `width` their in_features) in runs whose fp64 Grams fit in `budget` bytes
    together; a consumer larger than the budget is a run of its own."""
    runs: list[list[str]] = []
    held = 0
    for name, n in width.items():
        size = n * n * 8
        if not runs or held + size > budget:
            runs.append([])
            held = 0
        runs[-1].append(name)
        held += size
    return runs


def unrecoverable_shares(model: nn.Module, plan: GroupPlan, calib: LmCalibration, skip: frozenset[int] = frozenset(),
                         damping: float = DAMPING, progress: bool = False, budget: int = GRAM_BUDGET
                         ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """share(S) of every head and channel outside the layers in `skip`: {layer: per-head}, {layer: per-channel};
    at most `budget` bytes of Gram matrices (one consumer's if that is larger) are held at once."""
    if not isinstance(calib, LmCalibration):
        raise GispError("repair-aware scores fit on language-model calibration windows (the ppl objective), got "
                        f"{type(calib).__name__}")
    consumers = _consumers(plan, skip)
    if not consumers:
        return {}, {}
    width = {name: plan.linear(name).in_features for name in consumers}
    sums: dict[tuple[int, str], list[np.ndarray]] = {}
    layer_of = {lp.index: lp.module for lp in plan.layers}
    for run in gram_runs(width, budget):  # each pass stops after the decoder layer of its last consumer
        moments = collect(model, {name: np.arange(width[name]) for name in run}, calib, gram=True,
                          stop_after=layer_of[consumers[run[-1]][0][0]], progress=progress)
        for name in run:
            weight = model.get_submodule(name).weight
            for layer, kind, member in consumers[name]:
                residual, energy = group_residuals(weight, moments[name].gram, member, damping)
                acc = sums.setdefault((layer, kind), [np.zeros_like(residual), np.zeros_like(energy)])
                acc[0] += residual
                acc[1] += energy
            del moments[name]  # free each Gram once its consumer is done
    heads, channels = {}, {}
    for (layer, kind), (residual, energy) in sums.items():
        share = np.where(energy > 0, residual / np.where(energy > 0, energy, 1.0), 1.0)
        (heads if kind == "heads" else channels)[layer] = np.clip(share, 0.0, 1.0)
    return heads, channels


def repair_aware(plan: GroupPlan, scores: Scores, heads: dict[int, np.ndarray], channels: dict[int, np.ndarray],
                 exponent: float = EXPONENT) -> Scores:
    """`scores` (of `plan`) with every head's and channel's score multiplied by share ** exponent (the layers
    without shares, the skipped ones, unchanged)."""
    def weigh(per_layer, shares):
        return tuple(s * shares[lp.index] ** exponent if lp.index in shares else s
                     for lp, s in zip(plan.layers, per_layer))

    return replace(scores, heads=weigh(scores.heads, heads), channels=weigh(scores.channels, channels))
