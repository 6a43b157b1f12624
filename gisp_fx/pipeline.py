"""The orchestrator: load -> capture -> analyse -> score -> plan -> rewrite -> report, one stage after another."""

from __future__ import annotations

from gisp_fx.plan import GroupPlan


def analyse(model) -> GroupPlan:
    """capture + find_groups on an in-memory model."""
    from gisp_fx.passes.capture import capture
    from gisp_fx.passes.groups import find_groups

    return find_groups(capture(model))


def inspect_model(spec: str, as_json: bool = False) -> str:
    from gisp_fx.inspect import format_plan
    from gisp_fx.loading import load_model

    plan = analyse(load_model(spec).model)
    return plan.dumps() if as_json else format_plan(plan)
