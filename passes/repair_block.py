"""Block-wise reconstruction (`--repair block`): after a pruned layer's closed-form lsq fit, its attention and its
MLP are each trained, apart, to reproduce the dense sublayer's output on the inputs that reach them in the pruned
model (as "A Free Lunch in LLM Compression", arXiv 2510.14444, fits attention and MLP separately).

For one decoder layer, with its hidden states carried through the already pruned and repaired layers above it
(passes/repair.py's sequential inputs):

1. every call of the pruned attention module is recorded (its hidden-state input and the other arguments the layer
   passed: rotary tables, mask); the target is the dense attention (a copy of the sublayer taken before the removal)
   on those same inputs;
2. every kept weight of the attention (q/k/v rows, o_proj columns, biases, any norm inside it) is trained by Adam on
   the mean squared error to the target, a fixed number of epochs over the calibration batches in a seeded order;
3. the MLP then gets the same, on the inputs that reach it through the reconstructed attention: gate/up rows and
   down_proj columns together.

Nothing outside the pruned sublayers changes (the layer's norms, the embeddings, the head). A sublayer whose error
grows (it cannot, from the lsq start, unless the learning rate is far too high) is put back as lsq left it; the
record says, per sublayer, the relative error before and after. Training runs in fp32 whatever the model's dtype (a
copy of the sublayer, written back in its dtype), so bf16 weights are not updated by rounding noise.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils._pytree import tree_map

# Measured on SmolLM2 at 50 % (benchmarks/results/repair.md, 256 test windows; lsq alone 204.43 on 64 windows, 198.73
# on 256): on 64 windows, 8 epochs at lr 1e-4 / 3e-4 / 1e-3 gave 198.95 / 194.40 / 188.75, 32 epochs at 1e-3 180.24;
# on 256 windows (BLOCK_SAMPLES in passes/repair.py) 8 epochs at 1e-3 gave 169.66.
EPOCHS = 8  # passes over the calibration batches per sublayer
LR = 1e-3  # Adam's learning rate (constant); the lsq fit is the start, and a sublayer it makes worse is put back


def _normal(x):
    """A tensor made in inference mode, cloned outside it (so autograd can save it); anything else as it is."""
    return x.clone() if isinstance(x, torch.Tensor) else x


def _to_float(x):
    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def record_calls(layer: nn.Module, sub: nn.Module, hidden: list[torch.Tensor], calls: list[tuple[tuple, dict]]):
    """Run `layer` on every batch of `hidden` (with its recorded other arguments `calls`) and return every call of
    its submodule `sub` as (args, kwargs), with tensors usable by autograd. The layer's outputs are not kept."""
    got: list[tuple[tuple, dict]] = []

    def catch(_module, args, kwargs):
        got.append((args, kwargs))

    handle = sub.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.inference_mode():
            for h, (args, kwargs) in zip(hidden, calls):
                layer(h, *args, **kwargs)
    finally:
        handle.remove()
    return [tree_map(_normal, c) for c in got]


def _error(sub: nn.Module, inputs, targets) -> float:
    """sum ||sub(x) - target||^2 / sum ||target||^2 over the batches (no autograd)."""
    num = den = 0.0
    with torch.no_grad():
        for (args, kwargs), t in zip(inputs, targets):
            num += float((_first(sub(*args, **kwargs)) - t).pow(2).sum())
            den += float(t.pow(2).sum())
    return num / max(den, 1e-30)


def reconstruct_(sub: nn.Module, dense: nn.Module, inputs, epochs: int = EPOCHS, lr: float = LR,
                 seed: int = 0) -> dict:
    """Train every parameter of `sub` (a pruned sublayer) so that its output on `inputs` (a list of (args, kwargs)
    calls) matches `dense`'s (the sublayer before removal) on the same calls. In place; returns the relative
    squared errors before and after, and the steps taken."""
    dtype = next(sub.parameters()).dtype
    work = sub if dtype == torch.float32 else copy.deepcopy(sub).float()
    ref = dense if next(dense.parameters()).dtype == torch.float32 else copy.deepcopy(dense).float()
    inputs = [tree_map(_to_float, c) for c in inputs]
    with torch.no_grad():
        targets = [_first(ref(*args, **kwargs)).detach() for args, kwargs in inputs]
    before = _error(work, inputs, targets)
    start = {k: v.detach().clone() for k, v in work.state_dict().items()}
    params = [p for p in work.parameters()]
    flags = [p.requires_grad for p in params]
    was_training = work.training
    work.eval()  # no dropout: the targets come from the eval-mode dense sublayer
    steps = 0
    try:
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            for _ in range(epochs):
                for b in torch.randperm(len(inputs), generator=gen).tolist():
                    args, kwargs = inputs[b]
                    t = targets[b]
                    loss = (_first(work(*args, **kwargs)) - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-30)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
        work.train(was_training)
    after = _error(work, inputs, targets)
    kept = after <= before
    with torch.no_grad():
        if not kept:
            work.load_state_dict(start)
        if work is not sub:
            for name, p in sub.state_dict().items():
                p.copy_(work.state_dict()[name].to(p.dtype))
    return {"error_before": before, "error_after": after if kept else before, "steps": steps, "kept": kept}
