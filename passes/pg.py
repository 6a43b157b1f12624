"""(model, GroupPlan, calibration, budget) -> PgResult: keep-probabilities learned by policy gradient, forward only.

The second seed method (Gao et al., ACL 2025; ../shared/PG_SPEC.md): one Bernoulli keep-probability `s` per
structure (a K/V group with its query heads, or a query head; an MLP channel). Each iteration samples K masks,
runs the masked model (the mask multiplies the consumer's input columns: o_proj per head, down_proj per channel,
through forward pre-hooks; no weight is copied or changed), and moves `s` along the normalised REINFORCE estimate
`sum_k (L_k - b)(m_k - s) / sqrt(s(1 - s)) / (K - 1)` with a moving-average baseline `b` and a cosine learning
rate, then projects `s` back onto the budget. No backward pass runs through the model: memory is inference's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gisp_fx.errors import GispError
from gisp_fx.passes.calib_loop import calibration_state, sequence_losses, windows
from gisp_fx.passes.importance import LmCalibration, Scores
from gisp_fx.plan import Axis, GroupPlan, GroupRef, Kind, Selection

EPS = 1e-7
CONST_KEEP = 0.9  # 'const' init: the metric's keep-set starts at this probability, the rest at 1 - it
BASELINE_WINDOW = 5  # the reference's moving-average window W


@dataclass(frozen=True)
class PgConfig:
    iters: int = 100
    samples: int = 2  # K masks per iteration
    lr: float = 0.05
    init: str = "sigmap"  # sigmap | const | random
    granularity: str = "kv"  # kv: a K/V group with all its query heads (the reference); head: one query head
    budget: str = "params"  # params: expected freed decoder parameters = target; reference: one kept ratio per block
    penalty: float = 0.0  # lambda of the push toward 0/1 (the reference script: 0)
    seed: int = 0

    def validate(self) -> "PgConfig":
        if self.samples < 2:
            raise GispError(f"--pg-samples must be at least 2 (the estimator divides by K - 1), got {self.samples}")
        if self.iters < 0:
            raise GispError(f"--pg-iters must be at least 0 (0 selects by the initial probabilities: the control "
                            f"that shows what the iterations add), got {self.iters}")
        if not self.lr > 0:
            raise GispError(f"--pg-lr must be positive, got {self.lr}")
        for name, value, allowed in (("--pg-init", self.init, ("sigmap", "const", "random")),
                                     ("--pg-groups", self.granularity, ("kv", "head")),
                                     ("--pg-budget", self.budget, ("params", "reference"))):
            if value not in allowed:
                raise GispError(f"{name} must be one of {', '.join(allowed)}, got '{value}'")
        return self


@dataclass(frozen=True)
class Units:
    """The learned structures: per unit its layer, kind, the plan groups it covers, and the parameters it frees."""

    layer: np.ndarray  # [U]
    kind: np.ndarray  # [U] 0 = attention unit, 1 = MLP channel
    groups: tuple[tuple[GroupRef, ...], ...]  # plan groups removed together with this unit
    params: np.ndarray  # [U] parameters freed when the unit goes (float64)


@dataclass
class PgResult:
    probs: np.ndarray  # [U] final keep-probabilities
    units: Units
    history: list[dict] = field(default_factory=list)  # per iteration: loss, baseline, budget, entropy, lr

    def scores(self, plan: GroupPlan) -> Scores:
        """Keep-probabilities laid out as per-group scores (higher = keep), for the trajectory and materialize."""
        heads = [np.ones(l.attention.num_heads) if l.attention else np.zeros(0) for l in plan.layers]
        channels = [np.ones(l.mlp.channels) if l.mlp else np.zeros(0) for l in plan.layers]
        for p, refs in zip(self.probs, self.units.groups):
            for ref in refs:
                (heads if ref.kind is Kind.HEAD else channels)[ref.layer][ref.index] = p
        loss = self.history[-1]["loss"] if self.history else float("nan")
        return Scores(tuple(heads), tuple(np.zeros(0) for _ in heads), tuple(channels), loss)


def build_units(plan: GroupPlan, granularity: str, protect: frozenset[int]) -> Units:
    layer, kind, groups, params = [], [], [], []
    for l in plan.layers:
        if l.index in protect:
            continue
        a = l.attention
        if a is not None:
            by_kv: dict[int, list[int]] = {}
            for h, g in enumerate(a.kv_of_head):
                by_kv.setdefault(g, []).append(h)
            for g, heads in by_kv.items():
                kv = plan.kv_params(a, g)
                units = [heads] if granularity == "kv" else [[h] for h in heads]
                for us in units:
                    layer.append(l.index)
                    kind.append(0)
                    groups.append(tuple(GroupRef(l.index, Kind.HEAD, h) for h in us))
                    # a K/V group's rows go with its last head: each head carries its share of them
                    params.append(sum(plan.head_params(a, h) for h in us) + kv * len(us) / len(heads))
        if l.mlp is not None:
            for c in range(l.mlp.channels):
                layer.append(l.index)
                kind.append(1)
                groups.append((GroupRef(l.index, Kind.CHANNEL, c),))
                params.append(plan.channel_params(l.mlp, c))
    if not groups:
        raise GispError("pg: every layer is protected; nothing to learn (see --protect)")
    return Units(np.array(layer), np.array(kind), tuple(groups), np.array(params, dtype=np.float64))


# -- the budget ----------------------------------------------------------------------------------------------
def project(s: np.ndarray, weights: np.ndarray, target: float, iters: int = 100) -> np.ndarray:
    """clip(s - v, 0, 1) with v found by bisection so that sum(weights * result) == target (weights > 0)."""
    total = float(weights.sum())
    if not 0 <= target <= total + 1e-9:
        raise GispError(f"pg: the budget {target:.6g} is outside [0, {total:.6g}]")
    lo, hi = float(s.min()) - 1.0, float(s.max())  # at lo everything clips to 1, at hi everything to 0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if float((weights * np.clip(s - mid, 0, 1)).sum()) > target:
            lo = mid
        else:
            hi = mid
    out = np.clip(s - (lo + hi) / 2, 0, 1)
    # bisection leaves a residue of ~2^-iters; put it on the free coordinates so the budget holds exactly
    free = (out > 0) & (out < 1)
    gap = target - float((weights * out).sum())
    if free.any() and gap:
        out[free] = np.clip(out[free] + gap / weights[free].sum(), 0, 1)
    return out


@dataclass(frozen=True)
class Budget:
    """Each block of units (one for `params`, attention and MLP apart for `reference`) and its kept target."""

    blocks: tuple[tuple[np.ndarray, np.ndarray, float], ...]  # (unit mask, weights, target of sum(w * s))

    def project(self, s: np.ndarray) -> np.ndarray:
        out = s.copy()
        for mask, w, target in self.blocks:
            out[mask] = project(s[mask], w, target)
        return out

    def spent(self, s: np.ndarray) -> list[float]:
        return [float((w * s[mask]).sum()) for mask, w, _ in self.blocks]


def make_budget(units: Units, params_removed: float, kind: str) -> Budget:
    """`params`: the expected freed parameters equal the target; `reference`: one structure ratio r kept in both
    blocks, the r for which removing the same fraction of attention units and of channels frees the target."""
    if kind == "params":
        keep = float(units.params.sum()) - params_removed
        return Budget(((np.ones(len(units.params), bool), units.params, keep),))
    blocks = [(units.kind == k) for k in (0, 1) if (units.kind == k).any()]
    mean = [float(units.params[b].mean()) for b in blocks]
    count = [int(b.sum()) for b in blocks]
    removed = params_removed / sum(m * c for m, c in zip(mean, count))  # the same fraction of both blocks
    if removed > 1:
        raise GispError("pg: the target needs more parameters than the unprotected structures hold")
    return Budget(tuple((b, np.ones(c), (1 - removed) * c) for b, c in zip(blocks, count)))


# -- initialisation ------------------------------------------------------------------------------------------
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def initial_probs(units: Units, metric: np.ndarray, mode: str, keep_rate: float, seed: int) -> np.ndarray:
    """sigmap: per layer and block type, z-score the metric, sigmoid, shift so the mean is the kept rate, clip;
    const: the top `keep_rate` of the metric at CONST_KEEP, the rest at 1 - CONST_KEEP; random: uniform."""
    if mode == "random":
        return np.random.default_rng(seed).random(len(units.params))
    s = np.empty(len(units.params))
    if mode == "const":
        order = np.argsort(-metric, kind="stable")
        s[:] = 1 - CONST_KEEP
        s[order[: round(keep_rate * len(s))]] = CONST_KEEP
        return s
    for key in set(zip(units.layer.tolist(), units.kind.tolist())):
        idx = np.flatnonzero((units.layer == key[0]) & (units.kind == key[1]))
        m = metric[idx]
        z = (m - m.mean()) / (m.std() + EPS)
        p = _sigmoid(z)
        s[idx] = np.clip(p - p.mean() + keep_rate, 0, 1)
    return s


def unit_metric(units: Units, wanda: Scores) -> np.ndarray:
    """Wanda-sp per unit: a head unit averages the metric over its query heads."""
    return np.array([np.mean([(wanda.heads if r.kind is Kind.HEAD else wanda.channels)[r.layer][r.index]
                              for r in refs]) for refs in units.groups])


# -- the masked forward --------------------------------------------------------------------------------------
class Masker:
    """Forward pre-hooks that multiply each consumer linear's input columns by its structures' sampled masks."""

    def __init__(self, model: nn.Module, plan: GroupPlan, units: Units):
        device = next(model.parameters()).device
        cols: dict[str, list[tuple[int, list[int]]]] = {}  # consumer -> (unit, its input columns)
        for u, refs in enumerate(units.groups):
            for ref in refs:
                layer = plan.layers[ref.layer]
                members = layer.attention.query if ref.kind is Kind.HEAD else layer.mlp.members
                for m in members:
                    if m.axis is Axis.COLS:
                        cols.setdefault(m.module, []).append((u, list(m.index[ref.index])))
        self.index: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, entries in cols.items():
            unit_of = [u for u, c in entries for _ in c]
            columns = [i for _, c in entries for i in c]
            self.index[name] = (torch.tensor(columns, device=device), torch.tensor(unit_of, device=device))
        self.model = model
        self.masks: torch.Tensor | None = None  # [batch, U] for the current forward
        self.handles = []

    def __enter__(self) -> "Masker":
        for name, (columns, unit_of) in self.index.items():
            module = self.model.get_submodule(name)
            self.handles.append(module.register_forward_pre_hook(self._hook(columns, unit_of)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, columns: torch.Tensor, unit_of: torch.Tensor):
        def fn(_module, inputs):
            x = inputs[0]
            scale = torch.ones(x.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
            scale[:, columns] = self.masks[:, unit_of].to(x.dtype)
            shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
            return (x * scale.view(shape),) + tuple(inputs[1:])
        return fn


def optimise(loss_fn, s0: np.ndarray, budget: Budget, config: PgConfig, progress: bool = True) -> PgResult:
    """The policy-gradient loop (PG_SPEC.md section 3) over `loss_fn(t, masks [n, U]) -> losses [n]`, where each
    of the n rows is one independent sample (a mask and the loss it gave). Returns the probabilities and history."""
    gen = torch.Generator().manual_seed(config.seed)
    s = budget.project(s0)
    baseline = None
    history = []
    for t in tqdm(range(config.iters), desc="pg", unit="iter", disable=not progress, leave=False):
        m, loss = loss_fn(t, lambda n: torch.bernoulli(torch.from_numpy(s).expand(n, -1), generator=gen).numpy())
        ok = np.isfinite(loss)
        if ok.sum() < 2:
            raise GispError(f"pg: iteration {t + 1}: fewer than 2 finite losses; lower --pg-lr or the target")
        m, loss = m[ok], loss[ok]
        mean = float(loss.mean())
        baseline = mean if baseline is None else (1 - 1 / BASELINE_WINDOW) * baseline + mean / BASELINE_WINDOW
        score = (m - s) / np.sqrt(np.clip(s * (1 - s), EPS, None))
        grad = ((loss - baseline)[:, None] * score).sum(0) / (len(loss) - 1)
        if config.penalty:
            grad += config.penalty * (np.log(1 - s + EPS) - np.log(s + EPS))
        lr = config.lr * 0.5 * (1 + math.cos(math.pi * t / config.iters))
        s = budget.project(s - lr * grad)
        p = np.clip(s, EPS, 1 - EPS)
        entropy = float((-(p * np.log(p) + (1 - p) * np.log(1 - p))).mean())
        history.append({"iter": t + 1, "loss": mean, "baseline": baseline, "budget": budget.spent(s),
                        "entropy": entropy, "lr": lr})
    return PgResult(s, Units(np.zeros(0), np.zeros(0), (), np.zeros(0)), history)


def train(model: nn.Module, plan: GroupPlan, calib: LmCalibration, units: Units, s0: np.ndarray, budget: Budget,
          config: PgConfig, progress: bool = True) -> PgResult:
    """`optimise` with the masked model's per-sequence losses: each of the K samples draws one mask per sequence
    of the batch (beyond the reference, which draws one per batch), so a forward pass yields batch samples."""
    device = next(model.parameters()).device
    batches = windows(calib.input_ids, calib.batch_size)
    with calibration_state(model), Masker(model, plan, units) as masker, torch.inference_mode():
        def loss_fn(t: int, sample):
            ids = batches[t % len(batches)].to(device)
            masks, losses = [], []
            for _ in range(config.samples):
                m = sample(len(ids))
                masker.masks = torch.from_numpy(m).to(device)
                masks.append(m)
                losses.append(sequence_losses(model, ids).double().cpu().numpy())
            return np.concatenate(masks), np.concatenate(losses)

        result = optimise(loss_fn, s0, budget, config, progress)
    return PgResult(result.probs, units, result.history)


# -- the final selection -------------------------------------------------------------------------------------
def select_by_probability(plan: GroupPlan, units: Units, probs: np.ndarray, params_needed: int,
                          budget: str) -> Selection:
    """Remove the least likely units until `params_needed` parameters are freed (PG_SPEC.md section 4): one global
    order for `params`; for `reference`, the smallest equal fraction of attention units and of channels."""
    from gisp_fx.passes.select import FreedParams

    order = np.lexsort((np.arange(len(probs)), probs))  # lowest probability first, ties by unit order

    def take(units_in_order) -> tuple[list[GroupRef], int]:
        freed, taken, total = FreedParams(plan), [], 0
        for u in units_in_order:
            if budget == "params" and total >= params_needed:
                break
            for ref in units.groups[u]:
                total += freed.remove(ref)
                taken.append(ref)
        return taken, total

    if budget == "params":
        taken, total = take(order)
    else:
        blocks = [order[units.kind[order] == k] for k in (0, 1)]

        def at(fraction: float):
            return take([u for b in blocks for u in b[: math.floor(fraction * len(b) + 1e-9)]])

        lo, hi = 0.0, 1.0
        for _ in range(30):  # bisection on the shared fraction: freed parameters grow with it
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if at(mid)[1] >= params_needed else (mid, hi)
        taken, total = at(hi)
    if total < params_needed:
        raise GispError("pg: every unprotected structure together frees fewer parameters than the target")
    return Selection(tuple(taken))


def pg_prune(model: nn.Module, plan: GroupPlan, calib, params_removed: int, protect: frozenset[int],
             config: PgConfig, progress: bool = True) -> PgResult:
    """Learn keep-probabilities for every unprotected structure of `plan` on `model`, forward passes only."""
    from gisp_fx.passes.baselines import wanda_sp_scores

    if not isinstance(calib, LmCalibration):
        raise GispError("--method pg needs language-model calibration windows (the ppl objective)")
    config.validate()
    units = build_units(plan, config.granularity, protect)
    budget = make_budget(units, params_removed, config.budget)
    keep_rate = 1 - params_removed / float(units.params.sum())
    metric = np.zeros(len(units.params))
    if config.init in ("sigmap", "const"):
        metric = unit_metric(units, wanda_sp_scores(model, plan, calib, progress))
    s0 = initial_probs(units, metric, config.init, keep_rate, config.seed)
    return train(model, plan, calib, units, s0, budget, config, progress)
