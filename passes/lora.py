"""(model, linear names, rank) -> the model with low-rank adapters on those linears; merge_lora_ folds them back.

W x + (alpha / r) B A x with A [r, in] drawn small and B [out, r] zero, so the adapted model starts equal to the
model. Merging adds (alpha / r) B A to W in fp32 and puts the original nn.Linear back: the merged model has exactly
the pruned shapes and modules it had before, nothing grows.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        dev = base.weight.device
        a = torch.empty(rank, base.in_features)
        bound = 1 / math.sqrt(base.in_features)  # nn.Linear's own init range, as LoRA's reference code uses
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(dev))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x.to(self.lora_a.dtype) @ self.lora_a.T @ self.lora_b.T * self.scale).to(x.dtype)

    def delta(self) -> torch.Tensor:
        return (self.lora_b.double() @ self.lora_a.double()) * self.scale


def add_lora_(model: nn.Module, names: list[str], rank: int, alpha: float, seed: int) -> list[nn.Parameter]:
    """Wrap each linear `names` (dotted module names) in a LoraLinear; returns the adapters' parameters."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        base = getattr(owner, leaf)
        assert isinstance(base, nn.Linear), f"{name} is a {type(base).__name__}"
        wrapped = LoraLinear(base, rank, alpha, generator)
        setattr(owner, leaf, wrapped)
        params += [wrapped.lora_a, wrapped.lora_b]
    return params


def lora_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, LoraLinear)]


def merge_lora_(model: nn.Module) -> int:
    """Fold every adapter into its linear's weight (summed in fp64, stored in the weight's dtype) and put the plain
    nn.Linear back; returns the number of linears merged."""
    names = lora_modules(model)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        lora = getattr(owner, leaf)
        with torch.no_grad():
            w = lora.base.weight
            w.copy_((w.double() + lora.delta()).to(w.dtype))
        setattr(owner, leaf, lora.base)
    return len(names)
