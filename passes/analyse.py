"""nn.Module -> GroupPlan: normalise the linears, capture the FX graph, find the prunable groups."""

from __future__ import annotations

from torch import nn

from gisp_fx.passes.capture import capture
from gisp_fx.passes.groups import find_groups
from gisp_fx.passes.normalize import normalize_
from gisp_fx.plan import GroupPlan


def analyse(model: nn.Module) -> GroupPlan:
    """The model's prunable groups, per layer, found on its captured graph.

    Refuses declared unsupported configurations, and turns Conv1D and custom linears into nn.Linear in place
    (normalize_) before the capture."""
    normalize_(model)
    return find_groups(capture(model))
