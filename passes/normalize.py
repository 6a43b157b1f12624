"""nn.Module -> the same nn.Module with every linear-like layer a plain nn.Linear (in place; weights kept exactly).

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
