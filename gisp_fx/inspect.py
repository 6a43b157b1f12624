"""GroupPlan -> the per-layer table `gisp-fx inspect` prints."""

from __future__ import annotations

from gisp_fx.loading import load_model
from gisp_fx.passes.analyse import analyse
from gisp_fx.plan import GroupPlan


def format_plan(plan: GroupPlan) -> str:
    head = ("layer", "module", "q heads", "kv heads", "head dim", "mlp ch", "prunable params", "layer params")
    rows = []
    for layer in plan.layers:
        a, m = layer.attention, layer.mlp
        rows.append((
            str(layer.index), layer.module, str(a.num_heads if a else 0), str(a.num_kv_heads if a else 0),
            str(a.head_dim if a else "-"), str(m.channels if m else 0),
            f"{plan.layer_prunable_params(layer):,}", f"{layer.params:,}",
        ))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    lines.append("")
    lines.append(
        f"{len(plan.layers)} layers ({plan.model_type}): {plan.prunable_params:,} prunable of "
        f"{plan.decoder_params:,} decoder-layer parameters ({100 * plan.prunable_params / plan.decoder_params:.1f} %); "
        f"{plan.total_params:,} parameters in the model"
    )
    for module, why in plan.kept:
        lines.append(f"not pruned: {module} ({why})")
    return "\n".join(lines)


def inspect_model(spec: str, as_json: bool = False) -> str:
    """`gisp-fx inspect`: the groups of the model `spec` names, as the table or as the plan's JSON."""
    plan = analyse(load_model(spec).model)
    return plan.dumps() if as_json else format_plan(plan)
