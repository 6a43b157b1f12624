"""(GroupPlan, Scores, budget) -> Selection: block-normalised scores, one global ranking, weakest first (spec §3)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from gisp_fx.errors import GispError
from gisp_fx.passes.importance import Scores
from gisp_fx.plan import GroupPlan, GroupRef, Kind, Selection


class Normalize(enum.Enum):
    REFERENCE = "reference"  # head / (4 * head_dim * hidden), channel / (3 * intermediate), the reference's constants
    PARAMS = "params"  # each group / the parameters its removal frees
    NONE = "none"


def default_protected(num_layers: int) -> frozenset[int]:
    """The reference default: the first floor(0.1 * L) layers and the last one are never pruned."""
    return frozenset(range(math.floor(0.1 * num_layers))) | {num_layers - 1}


def parse_protect(spec: str | None, num_layers: int) -> frozenset[int]:
    """'--protect' value -> layer indices: None = reference default, 'none' = no layer, '0,1,29' = those."""
    if spec is None:
        return default_protected(num_layers)
    if spec.strip().lower() == "none":
        return frozenset()
    try:
        layers = frozenset(int(x) for x in spec.split(",") if x.strip())
    except ValueError as exc:
        raise GispError(f"--protect: expected 'none' or comma-separated layer indices, got '{spec}'") from exc
    bad = sorted(i for i in layers if not 0 <= i < num_layers)
    if bad:
        raise GispError(f"--protect: layers {bad} do not exist; the model has layers 0..{num_layers - 1}")
    return layers


@dataclass(frozen=True)
class Candidate:
    value: float  # normalised score: lower goes first
    ref: GroupRef


def rank(plan: GroupPlan, scores: Scores, normalize: Normalize, original: GroupPlan,
         protect: frozenset[int]) -> list[Candidate]:
    """Every group of every unprotected layer, weakest first (ties broken by layer, kind, index)."""
    out = []
    for layer in plan.layers:
        if layer.index in protect:
            continue
        first = original.layers[layer.index]
        a, mlp = layer.attention, layer.mlp
        if a is not None:
            for h in range(a.num_heads):
                if normalize is Normalize.REFERENCE:
                    denom = 4 * first.attention.head_dim * original.hidden_size
                elif normalize is Normalize.PARAMS:
                    denom = plan.head_params(a, h) + (plan.kv_params(a, a.kv_of_head[h]) if a.mha else 0)
                else:
                    denom = 1
                out.append(Candidate(scores.heads[layer.index][h] / denom, GroupRef(layer.index, Kind.HEAD, h)))
        if mlp is not None:
            for c in range(mlp.channels):
                if normalize is Normalize.REFERENCE:
                    denom = 3 * first.mlp.channels
                elif normalize is Normalize.PARAMS:
                    denom = plan.channel_params(mlp, c)
                else:
                    denom = 1
                out.append(Candidate(scores.channels[layer.index][c] / denom,
                                     GroupRef(layer.index, Kind.CHANNEL, c)))
    out.sort(key=lambda c: (c.value, c.ref.layer, c.ref.kind.value, c.ref.index))
    return out


class FreedParams:
    """Parameters freed by removing groups one by one (a K/V group's rows count once its last head goes)."""

    def __init__(self, plan: GroupPlan):
        self.plan = plan
        self.alive_in_kv: dict[tuple[int, int], int] = {}
        for layer in plan.layers:
            if layer.attention is not None:
                for g in layer.attention.kv_of_head:
                    key = (layer.index, g)
                    self.alive_in_kv[key] = self.alive_in_kv.get(key, 0) + 1

    def cost(self, ref: GroupRef) -> int:
        layer = self.plan.layers[ref.layer]
        if ref.kind is Kind.CHANNEL:
            return self.plan.channel_params(layer.mlp, ref.index)
        a = layer.attention
        g = a.kv_of_head[ref.index]
        last = self.alive_in_kv[(ref.layer, g)] == 1
        return self.plan.head_params(a, ref.index) + (self.plan.kv_params(a, g) if last else 0)

    def remove(self, ref: GroupRef) -> int:
        params = self.cost(ref)
        if ref.kind is Kind.HEAD:
            self.alive_in_kv[(ref.layer, self.plan.layers[ref.layer].attention.kv_of_head[ref.index])] -= 1
        return params


def select(plan: GroupPlan, ranked: list[Candidate], count: int | None, params_needed: int,
           params_cap: int | None = None) -> Selection:
    """Take groups weakest first until `count` are taken or `params_needed` parameters are freed.

    A group that would take the total past `params_cap` is passed over for the next (smaller) one, so that the
    last step lands within tolerance of the target instead of overshooting by a whole attention head.
    """
    freed, taken, skipped = FreedParams(plan), [], []
    total = 0
    for cand in ranked:
        if (count is not None and len(taken) >= count) or total >= params_needed:
            break
        if params_cap is not None and total + freed.cost(cand.ref) > params_cap and taken:
            skipped.append(cand)
            continue
        total += freed.remove(cand.ref)
        taken.append(cand.ref)
    for cand in skipped:  # nothing smaller was left: accept the overshoot rather than stop short
        if (count is not None and len(taken) >= count) or total >= params_needed:
            break
        total += freed.remove(cand.ref)
        taken.append(cand.ref)
    return Selection(tuple(taken))


def groups_to_reach(plan: GroupPlan, ranked: list[Candidate], params_needed: int) -> int:
    """How many groups of this ranking one would remove to free `params_needed` parameters."""
    freed, total = FreedParams(plan), 0
    for n, cand in enumerate(ranked, 1):
        total += freed.remove(cand.ref)
        if total >= params_needed:
            return n
    return len(ranked)


def freed_params(plan: GroupPlan, selection: Selection) -> int:
    freed = FreedParams(plan)
    return sum(freed.remove(ref) for ref in selection.removed)


def select_uniform(plan: GroupPlan, scores: Scores, params_needed: int, protect: frozenset[int]) -> Selection:
    """The same fraction of heads and of channels in every unprotected layer (FLAP / LLM-Pruner style), the
    smallest fraction that frees `params_needed`; within a layer the lowest scores go."""

    def at(ratio: float) -> Selection:
        taken = []
        for layer in plan.layers:
            if layer.index in protect:
                continue
            a, m = layer.attention, layer.mlp
            if a is not None:
                k = math.floor(ratio * a.num_heads + 1e-9)
                order = sorted(range(a.num_heads), key=lambda h: (scores.heads[layer.index][h], h))
                taken += [GroupRef(layer.index, Kind.HEAD, h) for h in order[:k]]
            if m is not None:
                k = math.floor(ratio * m.channels + 1e-9)
                order = sorted(range(m.channels), key=lambda c: (scores.channels[layer.index][c], c))
                taken += [GroupRef(layer.index, Kind.CHANNEL, c) for c in order[:k]]
        return Selection(tuple(taken))

    if freed_params(plan, at(1.0)) < params_needed:
        raise GispError("uniform selection: even every unprotected group frees fewer parameters than the target")
    lo, hi = 0.0, 1.0
    for _ in range(40):  # bisection on the ratio: freed parameters grow with it
        mid = (lo + hi) / 2
        if freed_params(plan, at(mid)) >= params_needed:
            hi = mid
        else:
            lo = mid
    return at(hi)
