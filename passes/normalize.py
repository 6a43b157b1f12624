"""nn.Module -> the same nn.Module, checked prunable, with every linear-like layer a plain nn.Linear (in place).

Some families compute linears their own way: GPT-2's `Conv1D` stores its weight as [in, out] and runs addmm;
Falcon's `FalconLinear` subclasses nn.Linear but runs `x @ W.T + b`. Neither reaches the graph as aten.linear, so
the analysis would not see them. Each is replaced by an nn.Linear holding the same numbers (transposed for
Conv1D); a probe input checks that the replacement computes what the original did before it is swapped in. The
names are recorded on the model (`gisp_linearized`) so that the saved pruned folder rebuilds the same linears.
"""

from __future__ import annotations

import torch
from torch import nn

from gisp_fx.errors import GispError
from gisp_fx.modeling_gisp import LINEARIZED_ATTR, _set_module, linear_like


# Config switches whose effect no traced value shows, under which removing heads would silently change the model.
# Declared per family (model_type, the switch, why), checked before analysis.
REFUSED = (
    ("falcon", lambda c: bool(getattr(c, "alibi", False)),
     "alibi=True: ALiBi slopes are computed from the number of heads, so removing heads would change the slopes "
     "of the heads that stay"),
    ("falcon", lambda c: bool(c.new_decoder_architecture) and (c.num_kv_heads or 1) > 1,
     "new_decoder_architecture with num_kv_heads > 1: its fused query_key_value is reshaped to "
     "num_heads // num_kv_heads query heads per K/V group, which breaks once groups keep different head counts"),
)


def normalize_(model: nn.Module) -> tuple[str, ...]:
    """Refuse the declared unsupported configurations, then linearize_; the names linearized."""
    config = getattr(model, "config", None)
    for model_type, applies, why in REFUSED:
        if getattr(config, "model_type", None) == model_type and applies(config):
            raise GispError(f"analysis: {type(model).__name__} with {why}; gisp-fx cannot prune its heads correctly")
    return linearize_(model)


def linearize_(model: nn.Module) -> tuple[str, ...]:
    """Replace every Conv1D and every nn.Linear subclass with its own forward by an equal nn.Linear; their names."""
    done = list(getattr(model, LINEARIZED_ATTR, ()))
    for name, old in list(model.named_modules()):
        new = linear_like(old)
        if new is None:
            continue
        with torch.no_grad():
            new.weight.copy_(old.weight.T if not isinstance(old, nn.Linear) else old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
            probe = torch.randn(3, new.in_features, generator=torch.Generator().manual_seed(0)).to(new.weight)
            want, got = old(probe), new(probe)
        if want.shape != got.shape or not torch.allclose(want, got, atol=1e-5, rtol=1e-4):
            raise GispError(f"normalize: '{name}' ({type(old).__name__}) does not compute x @ W.T + b, so it cannot be "
                            "treated as a linear layer; gisp-fx does not know how to prune it")
        new.requires_grad_(old.weight.requires_grad)
        _set_module(model, name, new)
        done.append(name)
    setattr(model, LINEARIZED_ATTR, tuple(done))
    return tuple(done)
