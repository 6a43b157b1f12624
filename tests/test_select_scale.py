"""The vectorised selection and bookkeeping (select.Ranking, select_uniform, Member.remapped, pipeline.Alive)
give exactly what the plain per-group loops they replaced give, on plans with GQA, uneven groups and protection."""

from __future__ import annotations

import math
import runpy

import numpy as np
import pytest

from gisp_fx.passes.importance import Scores
from gisp_fx.passes.select import (
    FreedParams,
    Normalize,
    default_protected,
    freed_params,
    groups_to_reach,
    rank,
    select,
    select_uniform,
)
from gisp_fx.passes.shrink import restrict
from gisp_fx.plan import Alive
from gisp_fx.plan import Axis, GroupPlan, GroupRef, Kind, Member, Selection

llama_plan = runpy.run_path("benchmarks/selection_scale.py")["llama_plan"]


# -- the loops the vectorised code replaced (reference semantics, spec §3) ---------------------------------------
def naive_rank(plan, scores, normalize, original, protect):
    out = []
    for layer in plan.layers:
        if layer.index in protect:
            continue
        first, a, mlp = original.layers[layer.index], layer.attention, layer.mlp
        if a is not None:
            for h in range(a.num_heads):
                denom = {Normalize.REFERENCE: 4 * first.attention.head_dim * original.hidden_size,
                         Normalize.PARAMS: plan.head_params(a, h) + (plan.kv_params(a, a.kv_of_head[h]) if a.mha
                                                                     else 0),
                         Normalize.NONE: 1}[normalize]
                out.append((scores.heads[layer.index][h] / denom, GroupRef(layer.index, Kind.HEAD, h)))
        if mlp is not None:
            for c in range(mlp.channels):
                denom = {Normalize.REFERENCE: len(first.mlp.members) * first.mlp.channels, Normalize.PARAMS: plan.channel_params(mlp, c),
                         Normalize.NONE: 1}[normalize]
                out.append((scores.channels[layer.index][c] / denom, GroupRef(layer.index, Kind.CHANNEL, c)))
    out.sort(key=lambda c: (c[0], c[1].layer, c[1].kind.value, c[1].index))
    return out


def naive_select(plan, ranked, count, needed, cap):
    freed, taken, skipped, total = FreedParams(plan), [], [], 0
    for _, ref in ranked:
        if (count is not None and len(taken) >= count) or total >= needed:
            break
        if cap is not None and total + freed.cost(ref) > cap and taken:
            skipped.append(ref)
            continue
        total += freed.remove(ref)
        taken.append(ref)
    for ref in skipped:
        if (count is not None and len(taken) >= count) or total >= needed:
            break
        total += freed.remove(ref)
        taken.append(ref)
    return tuple(taken)


def naive_reach(plan, ranked, needed):
    freed, total = FreedParams(plan), 0
    for n, (_, ref) in enumerate(ranked, 1):
        total += freed.remove(ref)
        if total >= needed:
            return n
    return len(ranked)


def naive_uniform(plan, scores, needed, protect):
    def at(ratio):
        taken = []
        for layer in plan.layers:
            if layer.index in protect:
                continue
            a, m = layer.attention, layer.mlp
            k = math.floor(ratio * a.num_heads + 1e-9)
            order = sorted(range(a.num_heads), key=lambda h: (scores.heads[layer.index][h], h))
            taken += [GroupRef(layer.index, Kind.HEAD, h) for h in order[:k]]
            k = math.floor(ratio * m.channels + 1e-9)
            order = sorted(range(m.channels), key=lambda c: (scores.channels[layer.index][c], c))
            taken += [GroupRef(layer.index, Kind.CHANNEL, c) for c in order[:k]]
        return Selection(tuple(taken))

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if freed_params(plan, at(mid)) >= needed:
            hi = mid
        else:
            lo = mid
    return at(hi).removed


def scores_for(plan: GroupPlan, seed: int, ties: bool = False) -> Scores:
    rng = np.random.default_rng(seed)
    draw = (lambda n: rng.integers(0, 4, n).astype(np.float64)) if ties else rng.random
    return Scores(tuple(draw(l.attention.num_heads) for l in plan.layers),
                  tuple(draw(l.attention.num_kv_heads) for l in plan.layers),
                  tuple(draw(l.mlp.channels) for l in plan.layers), 1.0)


PLANS = {"mha": dict(layers=6, heads=4, kv_heads=4, head_dim=8, hidden=32, inter=40),
         "gqa": dict(layers=6, heads=8, kv_heads=2, head_dim=4, hidden=32, inter=24)}


@pytest.mark.parametrize("normalize", list(Normalize))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", sorted(PLANS))
def test_rank_select_and_reach_equal_the_loops(shape, ties, normalize):
    plan = llama_plan(**PLANS[shape])
    protect = default_protected(len(plan.layers)) | {2}
    # a second step: the plan after a first removal, ranked against the original (kv groups half gone)
    first = select(plan, rank(plan, scores_for(plan, 0), normalize, plan, protect), 9, 10**9)
    for current in (plan, restrict(plan, first).plan):
        scores = scores_for(current, 1, ties)
        ranked = rank(current, scores, normalize, plan, protect)
        expected = naive_rank(current, scores, normalize, plan, protect)
        assert [(c.value, c.ref) for c in ranked] == expected
        for frac in (0.05, 0.2, 0.5, 2.0):
            needed = math.ceil(frac * current.decoder_params)
            assert groups_to_reach(current, ranked, needed) == naive_reach(current, expected, needed)
            for count, cap in ((None, None), (5, None), (None, needed + 200), (7, needed + 50)):
                assert select(current, ranked, count, needed, cap).removed == naive_select(
                    current, expected, count, needed, cap)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", sorted(PLANS))
def test_select_uniform_equals_the_bisection_loop(shape, ties):
    plan = llama_plan(**PLANS[shape])
    protect = default_protected(len(plan.layers))
    scores = scores_for(plan, 3, ties)
    for frac in (0.1, 0.3, 0.55):
        needed = math.ceil(frac * plan.decoder_params)
        got = select_uniform(plan, scores, needed, protect).removed
        assert got == naive_uniform(plan, scores, needed, protect)
        assert freed_params(plan, Selection(got)) >= needed


def test_remapped_member_equals_the_dict_lookup():
    uneven = Member("m", Axis.ROWS, ((0, 1), (2,), (3, 4, 5), (7, 9)))
    even = Member("m", Axis.COLS, tuple((2 * g, 2 * g + 1) for g in range(6)))
    for member, groups, kept in ((uneven, [0, 2, 3], (0, 1, 3, 4, 5, 7, 9)), (even, [1, 4, 5], (2, 3, 8, 9, 10, 11))):
        position = {old: new for new, old in enumerate(kept)}
        expected = tuple(tuple(position[i] for i in member.index[g]) for g in groups)
        out = member.remapped(groups, kept)
        assert out.index == expected and out.module == member.module and out.axis is member.axis
        assert out.grid is None or out.grid.tolist() == [list(ix) for ix in expected]
    with pytest.raises(KeyError):
        uneven.remapped([1], (0, 1))  # index 2 is not kept


def test_alive_maps_indices_back_after_removals():
    plan = llama_plan(**PLANS["gqa"])
    alive = Alive(plan)
    alive.remove([GroupRef(1, Kind.HEAD, 2), GroupRef(1, Kind.HEAD, 5), GroupRef(1, Kind.CHANNEL, 0)])
    assert alive.heads[1].tolist() == [0, 1, 3, 4, 6, 7] and alive.channels[1].tolist() == list(range(1, 24))
    assert alive.original(GroupRef(1, Kind.HEAD, 2)) == GroupRef(1, Kind.HEAD, 3)
    assert alive.current(GroupRef(1, Kind.HEAD, 6)) == GroupRef(1, Kind.HEAD, 4)
    with pytest.raises(ValueError):
        alive.current(GroupRef(1, Kind.HEAD, 5))
    with pytest.raises(ValueError):
        alive.remove([GroupRef(1, Kind.HEAD, 5)])


def test_selection_of_and_plan_linear_lookup():
    plan = llama_plan(**PLANS["mha"])
    sel = Selection((GroupRef(1, Kind.HEAD, 2), GroupRef(1, Kind.CHANNEL, 3), GroupRef(1, Kind.HEAD, 0)))
    assert sel.of(1, Kind.HEAD) == {0, 2} and sel.of(1, Kind.CHANNEL) == {3} and sel.of(0, Kind.HEAD) == set()
    assert plan.linear("model.layers.3.mlp.down_proj").in_features == 40
    with pytest.raises(KeyError):
        plan.linear("model.layers.9.mlp.down_proj")


@pytest.mark.parametrize("arch, vectors", [("llama-gqa", 3), ("opt", 2), ("gpt2", 2)])
def test_reference_channel_constant_counts_the_mlp_linears(arch, vectors):
    """Spec §3's 3*I is written for the gated MLP (gate, up, down); a two-linear MLP (fc1, fc2) spans 2 vectors per
    channel, so its constant is 2*I: the rank of a channel equals its score over that constant."""
    from conftest import tiny_model

    from gisp_fx.passes.select import mlp_vectors
    from gisp_fx.passes.analyse import analyse

    plan = analyse(tiny_model(arch))
    mlp = plan.layers[0].mlp
    assert mlp_vectors(mlp) == vectors
    rng = np.random.default_rng(0)
    scores = Scores(tuple(rng.random(lp.attention.num_heads) for lp in plan.layers),
                    tuple(np.zeros(0) for _ in plan.layers),
                    tuple(rng.random(lp.mlp.channels) for lp in plan.layers), float("nan"))
    ranked = rank(plan, scores, Normalize.REFERENCE, plan, frozenset())
    ref = GroupRef(0, Kind.CHANNEL, 3)
    value = next(c.value for c in (ranked[i] for i in range(len(ranked))) if c.ref == ref)
    assert value == pytest.approx(scores.channels[0][3] / (vectors * mlp.channels), rel=1e-12)
