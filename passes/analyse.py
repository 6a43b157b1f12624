"""nn.Module -> GroupPlan: normalise the linears, capture the FX graph, find the prunable groups.

A capture (torch.export) is the slow part of an analysis: about 5 s for a 4-layer test model, tens of seconds for a
real one. Its graph depends on the model's structure only (its classes, config, module tree and parameter shapes),
never on weight values, so the plan of a structure already analysed in this process is reused. `cache=False`
always captures afresh: the compile's verifier, which must read the pruned model's own graph, uses it.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from gisp_fx.passes.capture import capture
from gisp_fx.passes.groups import find_groups
from gisp_fx.passes.normalize import normalize_
from gisp_fx.plan import GroupPlan

CACHE_SIZE = 16  # structures kept (a plan is a few KB of indices)
_PLANS: OrderedDict[tuple, GroupPlan] = OrderedDict()


def structure_key(model: nn.Module) -> tuple | None:
    """What the captured graph is a function of: the model's class, its config (pruned shapes and attention
    implementation included), every module's name and class, and every parameter's and buffer's name, shape, dtype
    and device type. None (nothing cached) where the config cannot be written out, or where a module's forward is
    replaced on the instance or carries hooks: the graph then depends on more than the structure."""
    if any("forward" in vars(m) or m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return None
    config = getattr(model, "config", None)
    try:
        settings = repr(sorted(config.to_dict().items())) if config is not None else ""
    except Exception:  # an exotic config: analyse without the cache
        return None
    impl = getattr(config, "_attn_implementation", None)
    modules = tuple((name, type(m).__module__, type(m).__qualname__) for name, m in model.named_modules())
    tensors = tuple((name, tuple(t.shape), str(t.dtype), t.device.type)
                    for name, t in [*model.named_parameters(remove_duplicate=False),
                                    *model.named_buffers(remove_duplicate=False)])
    ties = tuple(name for name, p in model.named_parameters(remove_duplicate=True))  # which parameters are shared
    return (type(model).__module__, type(model).__qualname__, settings, impl, modules, tensors, ties)


def analyse(model: nn.Module, *, cache: bool = True) -> GroupPlan:
    """The model's prunable groups, per layer, found on its captured graph.

    Refuses declared unsupported configurations, and turns Conv1D and custom linears into nn.Linear in place
    (normalize_) before the capture. `cache`: reuse the plan of an identical structure analysed before in this
    process (see the module docstring); False captures afresh."""
    normalize_(model)
    key = structure_key(model) if cache else None
    if key is not None and key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key]
    plan = find_groups(capture(model))
    if key is not None:
        _PLANS[key] = plan
        while len(_PLANS) > CACHE_SIZE:
            _PLANS.popitem(last=False)
    return plan
