"""(model, calibration batches, hooks) -> per-batch outputs: the one loop every pass runs calibration data through.

It puts the model in eval mode with its KV cache off, registers forward pre-hooks on the named modules, runs each
batch (without autograd unless asked), and restores the hooks, the train/eval state and the cache setting however
the loop ends. The losses it offers go through the LM head in chunks (passes/lm_loss.py): full-vocabulary logits
of a whole batch are never held."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from gisp_fx.passes.lm_loss import chunked_lm_loss, token_nll

T = TypeVar("T")


class StopForward(Exception):
    """Raised by a hook once the rest of a batch's forward pass is not needed; the loop moves to the next batch."""


@contextlib.contextmanager
def calibration_state(model: nn.Module):
    """Eval mode (no dropout) and no KV cache for the duration; both restored after."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        model.eval()
        if config is not None:
            config.use_cache = False
        yield model
    finally:
        if config is not None:
            config.use_cache = use_cache
        model.train(was_training)


@contextlib.contextmanager
def hooked(model: nn.Module, hooks: Mapping[str, Callable] | None):
    """Forward pre-hooks `hooks[name](module, inputs)` on the named submodules for the duration."""
    handles = [model.get_submodule(name).register_forward_pre_hook(fn) for name, fn in (hooks or {}).items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def windows(ids: torch.Tensor, batch_size: int, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Token windows [n, seq] cut into batches of `batch_size` rows, moved to `device`."""
    return [ids[i : i + batch_size].to(device) if device is not None else ids[i : i + batch_size]
            for i in range(0, len(ids), batch_size)]


def hidden_states(model: nn.Module, ids: torch.Tensor) -> None:
    """The decoder alone (no LM head): for hooks inside the layers."""
    model.base_model(input_ids=ids, use_cache=False)


def batch_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the batch, the head in chunks; differentiable when autograd is on."""
    if torch.is_grad_enabled():
        return chunked_lm_loss(model, ids)
    return token_nll(model, ids).mean()


def sequence_losses(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence [batch], the head in chunks."""
    return token_nll(model, ids).mean(1)


def run_batches(model: nn.Module, batches: Iterable[T], forward: Callable[[nn.Module, T], object], *,
                hooks: Mapping[str, Callable] | None = None, grad: bool = False, desc: str = "calibration",
                progress: bool = False) -> list:
    """`forward(model, batch)` for every batch, in eval mode with the cache off and `hooks` registered; without
    autograd unless `grad`. Returns what each call returned (None for a batch a hook stopped with StopForward)."""
    out = []
    batches = list(batches)
    with calibration_state(model), hooked(model, hooks), (torch.enable_grad() if grad else torch.inference_mode()):
        for batch in tqdm(batches, desc=desc, leave=False, disable=not progress, unit="batch"):
            try:
                out.append(forward(model, batch))
            except StopForward:
                out.append(None)
    return out
