"""Per-step selection and bookkeeping on a synthetic Llama-2-7B-sized plan (32 layers, 32 heads of 128, 11,008
MLP channels, hidden 4,096): rank, groups_to_reach, select, select_uniform, the rewrite's plan (restrict), the
alive-index bookkeeping and the score tables, each timed on its own. No model is built: only the plan.

    python benchmarks/selection_scale.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from gisp_fx.passes.importance import Scores
from gisp_fx.passes.select import Normalize, default_protected, groups_to_reach, rank, select, select_uniform
from gisp_fx.passes.shrink import restrict
from gisp_fx.methods import TOLERANCE
from gisp_fx.plan import Alive
from gisp_fx.plan import AttentionBlock, Axis, GroupPlan, LayerPlan, LinearInfo, Member, MlpBlock
from gisp_fx.trajectory import scores_table


def llama_plan(layers: int = 32, heads: int = 32, kv_heads: int = 32, head_dim: int = 128, hidden: int = 4096,
               inter: int = 11008) -> GroupPlan:
    """The GroupPlan find_groups gives a Llama model of these sizes (MHA when kv_heads == heads)."""
    per_kv = heads // kv_heads
    q_ix = tuple(tuple(range(h * head_dim, (h + 1) * head_dim)) for h in range(heads))
    kv_ix = tuple(tuple(range(g * head_dim, (g + 1) * head_dim)) for g in range(kv_heads))
    ch_ix = tuple((c,) for c in range(inter))
    plan_layers, linears = [], []
    for i in range(layers):
        p = f"model.layers.{i}"
        att = AttentionBlock(
            f"{p}.self_attn", head_dim,
            (Member(f"{p}.self_attn.q_proj", Axis.ROWS, q_ix), Member(f"{p}.self_attn.o_proj", Axis.COLS, q_ix)),
            (Member(f"{p}.self_attn.k_proj", Axis.ROWS, kv_ix), Member(f"{p}.self_attn.v_proj", Axis.ROWS, kv_ix)),
            tuple(h // per_kv for h in range(heads)), kv_heads == heads)
        mlp = MlpBlock(f"{p}.mlp", (Member(f"{p}.mlp.gate_proj", Axis.ROWS, ch_ix),
                                    Member(f"{p}.mlp.up_proj", Axis.ROWS, ch_ix),
                                    Member(f"{p}.mlp.down_proj", Axis.COLS, ch_ix)))
        q, kv = heads * head_dim, kv_heads * head_dim
        linears += [LinearInfo(f"{p}.self_attn.q_proj", hidden, q, False),
                    LinearInfo(f"{p}.self_attn.k_proj", hidden, kv, False),
                    LinearInfo(f"{p}.self_attn.v_proj", hidden, kv, False),
                    LinearInfo(f"{p}.self_attn.o_proj", q, hidden, False),
                    LinearInfo(f"{p}.mlp.gate_proj", hidden, inter, False),
                    LinearInfo(f"{p}.mlp.up_proj", hidden, inter, False),
                    LinearInfo(f"{p}.mlp.down_proj", inter, hidden, False)]
        params = 2 * hidden * q + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
        plan_layers.append(LayerPlan(i, p, params, att, mlp))
    decoder = sum(lp.params for lp in plan_layers)
    return GroupPlan("llama", hidden, decoder + 2 * 32000 * hidden + hidden, tuple(plan_layers), tuple(linears))


def random_scores(plan: GroupPlan, seed: int = 0) -> Scores:
    rng = np.random.default_rng(seed)
    heads = tuple(rng.random(lp.attention.num_heads) for lp in plan.layers)
    kv = tuple(rng.random(lp.attention.num_kv_heads) for lp in plan.layers)
    channels = tuple(rng.random(lp.mlp.channels) for lp in plan.layers)
    return Scores(heads, kv, channels, 1.0)


CPU: dict[str, float] = {}  # process CPU seconds per phase: the machine is shared, wall time carries others' load


def timed(timings: dict, name: str, fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    timings[name] = time.perf_counter() - t0
    CPU[name] = time.process_time() - c0
    print(f"{name:28s} {timings[name]:9.3f} s wall {CPU[name]:9.3f} s cpu", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the timings here")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=8, help="schedule steps: the first step takes 1/steps of the groups")
    args = ap.parse_args()

    timings: dict[str, float] = {}
    plan = timed(timings, "build plan", llama_plan)
    scores = random_scores(plan)
    protect = default_protected(len(plan.layers))
    needed = math.ceil(args.sparsity * plan.decoder_params)
    cap = needed + math.floor(TOLERANCE * plan.decoder_params)

    # one global-ranking step, as pipeline.compile_model runs it (first step of a `--steps` schedule)
    step: dict[str, float] = {}
    ranked = timed(step, "rank", lambda: rank(plan, scores, Normalize.REFERENCE, plan, protect))
    n = timed(step, "groups_to_reach", lambda: groups_to_reach(plan, ranked, needed))
    per_step = math.ceil(n / args.steps)
    sel = timed(step, "select", lambda: select(plan, ranked, per_step, needed, params_cap=cap))
    alive = Alive(plan)
    original = timed(step, "alive.original", lambda: tuple(alive.original(r) for r in sel.removed))
    alive_lists = list(zip(alive.heads, alive.channels))
    timed(step, "scores_table (x2)", lambda: [scores_table(plan, alive_lists, v, k)
                                              for k, v in (("heads", scores.heads), ("channels", scores.channels))])
    rw = timed(step, "restrict (rewrite plan)", lambda: restrict(plan, sel))
    timed(step, "alive.remove", lambda: alive.remove(original))
    # the second step works on the smaller plan, with the alive lists no longer the identity
    plan2 = rw.plan
    scores2 = random_scores(plan2, 1)
    ranked2 = timed(step, "rank (step 2)", lambda: rank(plan2, scores2, Normalize.REFERENCE, plan, protect))
    sel2 = timed(step, "select (step 2)", lambda: select(plan2, ranked2, per_step, needed, params_cap=cap))
    original2 = timed(step, "alive.original (step 2)", lambda: tuple(alive.original(r) for r in sel2.removed))
    alive_lists = list(zip(alive.heads, alive.channels))
    timed(step, "scores_table (step 2)", lambda: [scores_table(plan, alive_lists, v, k) for k, v in
                                                  (("heads", scores2.heads), ("channels", scores2.channels))])
    timed(step, "restrict (step 2)", lambda: restrict(plan2, sel2))
    timed(step, "alive.remove (step 2)", lambda: alive.remove(original2))
    timings.update(step)
    uniform = timed(timings, "select_uniform", lambda: select_uniform(plan, scores, needed, protect))

    first = ("rank", "groups_to_reach", "select", "alive.original", "scores_table (x2)", "restrict (rewrite plan)",
             "alive.remove")
    second = ("rank (step 2)", "select (step 2)", "alive.original (step 2)", "scores_table (step 2)",
              "restrict (step 2)", "alive.remove (step 2)")
    for total, parts in (("step 1 total", first), ("step 2 total", second)):
        timings[total], CPU[total] = sum(timings[k] for k in parts), sum(CPU[k] for k in parts)
        print(f"{total:28s} {timings[total]:9.3f} s wall {CPU[total]:9.3f} s cpu")
    print(f"groups: {len(ranked)} ranked, {n} to reach {args.sparsity}, {len(sel.removed)} in step 1, "
          f"{len(uniform.removed)} uniform; step 2: {sum(r.kind.value == 'head' for r in sel2.removed)} heads, "
          f"{sum(r.kind.value == 'channel' for r in sel2.removed)} channels")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"plan": "llama-2-7b-sized", "sparsity": args.sparsity, "steps": args.steps,
                       "groups_ranked": len(ranked), "groups_to_reach": n, "step1_groups": len(sel.removed),
                       "uniform_groups": len(uniform.removed), "wall_s": timings, "cpu_s": CPU}, f, indent=1)


if __name__ == "__main__":
    main()
