"""(GroupPlan, Scores, budget) -> Selection: block-normalised scores, one global ranking, weakest first (spec §3)."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gisp_fx.errors import GispError
from gisp_fx.passes.importance import Scores
from gisp_fx.plan import FreedParams, freed_params  # noqa: F401  (re-exported: moved to the plan module)
from gisp_fx.plan import AttentionBlock, GroupPlan, GroupRef, Kind, Selection


class Normalize(enum.Enum):
    REFERENCE = "reference"  # head / (4 * head_dim * hidden), channel / (vectors * intermediate): 3*I gated, 2*I fc1/fc2
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
    if not spec.strip(" ,"):  # '' would silently protect nothing: 'none' says so on purpose
        raise GispError(f"--protect: got '{spec}', an empty list; give 'none' to protect no layer, comma-separated "
                        "layer indices, or leave the flag out for the default (first 10 % and the last layer)")
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


def _costs(plan: GroupPlan, members, count: int) -> np.ndarray:
    """Parameters each of `count` groups holds in `members` (int64), from the members' index sizes."""
    total = np.zeros(count, dtype=np.int64)
    for m in members:
        total += m.sizes * plan.unit_params(m)
    return total


@dataclass(frozen=True, eq=False)
class Ranking(Sequence):
    """Candidates weakest first, held as arrays (a 7B plan has ~3 * 10^5 groups); indexing gives a Candidate.

    `cost` is what a group frees on its own; a head also frees its K/V group's `kv_cost` when it is the last of
    the `kv_heads` heads of that group (ids in `kv`, -1 for a channel) to go.
    """

    value: np.ndarray  # float64
    layer: np.ndarray  # int64
    head: np.ndarray  # bool: a query head (else an MLP channel)
    group: np.ndarray  # int64: the group's index in the plan ranked
    cost: np.ndarray  # int64
    kv: np.ndarray  # int64: K/V group id (into kv_cost / kv_heads) of a head, -1 for a channel
    kv_cost: np.ndarray  # int64, per K/V group id
    kv_heads: np.ndarray  # int64, per K/V group id: its query heads in the plan

    def __len__(self) -> int:
        return len(self.value)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        kind = Kind.HEAD if self.head[i] else Kind.CHANNEL
        return Candidate(float(self.value[i]), GroupRef(int(self.layer[i]), kind, int(self.group[i])))

    @staticmethod
    def build(plan: GroupPlan, value, layer, head, index) -> "Ranking":
        """A ranking of these groups in the given order, with their costs looked up in `plan`."""
        kv_base, kv_cost, kv_heads = {}, [], []
        for lp in plan.layers:
            a = lp.attention
            if a is not None:
                kv_base[lp.index] = len(kv_cost)
                kv_cost.extend(_costs(plan, a.kv, a.num_kv_heads).tolist())
                kv_heads.extend(np.bincount(np.asarray(a.kv_of_head, dtype=np.int64), minlength=a.num_kv_heads))
        layer, head, index = (np.asarray(x, dtype=t) for x, t in ((layer, np.int64), (head, bool), (index, np.int64)))
        cost = np.zeros(len(layer), dtype=np.int64)
        kv = np.full(len(layer), -1, dtype=np.int64)
        for lp in plan.layers:
            here = layer == lp.index
            if not here.any():
                continue
            a, m = lp.attention, lp.mlp
            h, c = here & head, here & ~head
            if h.any():
                cost[h] = _costs(plan, a.query, a.num_heads)[index[h]]
                kv[h] = kv_base[lp.index] + np.asarray(a.kv_of_head, dtype=np.int64)[index[h]]
            if c.any():
                cost[c] = _costs(plan, m.members, m.channels)[index[c]]
        return Ranking(np.asarray(value, dtype=np.float64), layer, head, index, cost, kv,
                       np.asarray(kv_cost, dtype=np.int64), np.asarray(kv_heads, dtype=np.int64))

    @staticmethod
    def of(plan: GroupPlan, candidates) -> "Ranking":
        if isinstance(candidates, Ranking):
            return candidates
        cands = list(candidates)
        return Ranking.build(plan, [c.value for c in cands], [c.ref.layer for c in cands],
                             [c.ref.kind is Kind.HEAD for c in cands], [c.ref.index for c in cands])

    def freed_in_order(self) -> np.ndarray:
        """Parameters freed by each group when the ranking is taken in order from the top (int64)."""
        freed = self.cost.copy()
        heads = np.flatnonzero(self.kv >= 0)
        if len(heads):
            groups = self.kv[heads]
            seen = np.bincount(groups, minlength=len(self.kv_cost))
            last = np.full(len(self.kv_cost), -1, dtype=np.int64)
            np.maximum.at(last, groups, heads)
            done = np.flatnonzero((seen == self.kv_heads) & (last >= 0))
            freed[last[done]] += self.kv_cost[done]
        return freed


def mlp_vectors(block) -> int:
    """Weight vectors one channel spans (a row or column per member linear): 3 for a gated MLP (gate, up, down),
    2 for fc1/fc2. The reference's channel constant 3*I is this count times I, written for Llama's gated MLP."""
    return int(sum(m.sizes[0] for m in block.members)) if block.channels else 0


def _denominators(plan: GroupPlan, block, first, normalize: Normalize, original: GroupPlan) -> np.ndarray | int:
    """Spec §3 normalisation of one block's scores: the reference's per-block-type constant (heads 4*d*H,
    channels vectors*I), each group's own parameters (params), or 1."""
    if normalize is Normalize.NONE:
        return 1
    if isinstance(block, AttentionBlock):
        if normalize is Normalize.REFERENCE:
            return 4 * first.attention.head_dim * original.hidden_size
        denom = _costs(plan, block.query, block.num_heads)
        if block.mha:
            denom = denom + _costs(plan, block.kv, block.num_kv_heads)[np.asarray(block.kv_of_head, dtype=np.int64)]
        return denom
    if normalize is Normalize.REFERENCE:
        return mlp_vectors(first.mlp) * first.mlp.channels
    return _costs(plan, block.members, block.channels)


def rank(plan: GroupPlan, scores: Scores, normalize: Normalize, original: GroupPlan,
         protect: frozenset[int]) -> Ranking:
    """Every group of every unprotected layer, weakest first (ties broken by layer, kind, index)."""
    value, layer, head, index = [], [], [], []
    for lp in plan.layers:
        if lp.index in protect:
            continue
        first = original.layers[lp.index]
        for block, block_scores, is_head in ((lp.attention, scores.heads, True), (lp.mlp, scores.channels, False)):
            if block is None:
                continue
            n = block.num_heads if is_head else block.channels
            denom = _denominators(plan, block, first, normalize, original)
            value.append(np.asarray(block_scores[lp.index], dtype=np.float64) / denom)
            head.append(np.full(n, is_head, dtype=bool))
            index.append(np.arange(n, dtype=np.int64))
            layer.append(np.full(n, lp.index, dtype=np.int64))
    if not value:
        return Ranking.build(plan, [], [], [], [])
    value, layer, head, index = (np.concatenate(x) for x in (value, layer, head, index))
    # Kind.CHANNEL.value ("channel") sorts before Kind.HEAD.value ("head"): a channel wins a tie
    order = np.lexsort((index, head, layer, value))
    return Ranking.build(plan, value[order], layer[order], head[order], index[order])


def select(plan: GroupPlan, ranked: Ranking | list[Candidate], count: int | None, params_needed: int,
           params_cap: int | None = None) -> Selection:
    """Take groups weakest first until `count` are taken or `params_needed` parameters are freed.

    A group that would take the total past `params_cap` is passed over for the next (smaller) one, so that the
    last step lands within tolerance of the target instead of overshooting by a whole attention head.
    """
    r = Ranking.of(plan, ranked)
    costs, kv, kv_cost, alive = r.cost.tolist(), r.kv.tolist(), r.kv_cost.tolist(), r.kv_heads.tolist()

    def cost(i: int) -> int:
        g = kv[i]
        return costs[i] + (kv_cost[g] if g >= 0 and alive[g] == 1 else 0)

    taken, skipped, total = [], [], 0

    def take(i: int) -> None:
        nonlocal total
        total += cost(i)
        if kv[i] >= 0:
            alive[kv[i]] -= 1
        taken.append(i)

    for i in range(len(r)):
        if (count is not None and len(taken) >= count) or total >= params_needed:
            break
        if params_cap is not None and total + cost(i) > params_cap and taken:
            skipped.append(i)
            continue
        take(i)
    for i in skipped:  # nothing smaller was left: accept the overshoot rather than stop short
        if (count is not None and len(taken) >= count) or total >= params_needed:
            break
        take(i)
    return Selection(tuple(r[i].ref for i in taken))


def groups_to_reach(plan: GroupPlan, ranked: Ranking | list[Candidate], params_needed: int) -> int:
    """How many groups of this ranking one would remove to free `params_needed` parameters."""
    r = Ranking.of(plan, ranked)
    reached = np.cumsum(r.freed_in_order())
    n = int(np.searchsorted(reached, params_needed, side="left")) + 1
    return min(n, len(r))


def select_uniform(plan: GroupPlan, scores: Scores, params_needed: int, protect: frozenset[int]) -> Selection:
    """The same fraction of heads and of channels in every unprotected layer (FLAP / LLM-Pruner style), the
    smallest fraction that frees `params_needed`; within a layer the lowest scores go."""
    # per unprotected layer and kind: the removal order (lowest score, then index) and the parameters freed by
    # each prefix of it, so that a ratio's freed total is a sum of lookups and the bisection costs nothing
    blocks = []  # (layer, kind, group count, order, cumulative freed with a leading 0)
    for lp in plan.layers:
        if lp.index in protect:
            continue
        a, m = lp.attention, lp.mlp
        if a is not None:
            order = np.argsort(np.asarray(scores.heads[lp.index], dtype=np.float64), kind="stable")
            sub = Ranking.build(plan, np.zeros(a.num_heads), np.full(a.num_heads, lp.index), np.ones(a.num_heads, bool),
                                order)
            blocks.append((lp.index, Kind.HEAD, a.num_heads, order, np.concatenate([[0], np.cumsum(sub.freed_in_order())])))
        if m is not None:
            order = np.argsort(np.asarray(scores.channels[lp.index], dtype=np.float64), kind="stable")
            freed = _costs(plan, m.members, m.channels)[order]
            blocks.append((lp.index, Kind.CHANNEL, m.channels, order, np.concatenate([[0], np.cumsum(freed)])))

    def counts(ratio: float) -> list[int]:
        return [math.floor(ratio * n + 1e-9) for _, _, n, _, _ in blocks]

    def freed_at(ratio: float) -> int:
        return sum(int(cum[k]) for k, (*_, cum) in zip(counts(ratio), blocks))

    if freed_at(1.0) < params_needed:
        raise GispError("uniform selection: even every unprotected group frees fewer parameters than the target")
    lo, hi = 0.0, 1.0
    for _ in range(40):  # bisection on the ratio: freed parameters grow with it
        mid = (lo + hi) / 2
        if freed_at(mid) >= params_needed:
            hi = mid
        else:
            lo = mid
    taken = []
    for k, (layer, kind, _, order, _) in zip(counts(hi), blocks):
        taken += [GroupRef(layer, kind, i) for i in order[:k].tolist()]
    return Selection(tuple(taken))
