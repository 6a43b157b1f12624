"""The closed-form fits of a repair: moments of a consumer linear's inputs, and from them its new kept columns
(lsq, optionally affine) or bias (the removed inputs' mean contribution); see passes/repair.py for how they are used."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from gisp_fx.errors import GispError
from gisp_fx.plan import GroupPlan


@dataclass
class Moments:
    """Sums over the calibration tokens of one consumer's input x: sum x (fp64) and, for lsq, sum x x^T (fp64)."""

    total: torch.Tensor
    gram: torch.Tensor | None
    tokens: int = 0
    dense_total: torch.Tensor | None = None  # target dense: sum x_d, and (lsq) cross = sum x_d x_p^T
    cross: torch.Tensor | None = None


def check_reached(columns, moments: dict[str, Moments]) -> None:
    missing = sorted(set(columns) - set(moments))
    if missing:
        raise GispError(f"repair: no calibration activations reached {', '.join(missing[:3])}; the forward pass "
                        "did not run these linears (a gisp-fx bug for this family, please report it)")


def moment_hooks(model: nn.Module, columns, moments: dict[str, Moments], gram: bool) -> list:
    """Forward pre-hooks on the linears in `columns` that add each call's inputs to `moments` (the caller removes
    the returned handles)."""

    def hook(name):
        def fn(_module, inputs):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            m = moments.get(name)
            if m is None:
                d, dev = x.shape[-1], x.device
                m = moments[name] = Moments(torch.zeros(d, dtype=torch.float64, device=dev),
                                             torch.zeros(d, d, dtype=torch.float64, device=dev) if gram else None)
            m.total += x.sum(0, dtype=torch.float64)
            if gram:
                xf = x.float()
                m.gram += (xf.T @ xf).double()
            m.tokens += x.shape[0]
        return fn

    return [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in columns]


def lsq_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damping: float,
                cross: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_V ||W X - V X_S||^2 + lambda ||V||^2 in closed form: W G[:, S] (G[S, S] + lambda I)^-1, in fp64.

    `gram` is G = X X^T over all input features; lambda = damping * mean(diag G[S, S]). With `cross` = X_d X^T
    the target is another input's output, argmin_V ||W X_d - V X_S||^2 + lambda ||V||^2 = W C[:, S] (...)^-1."""
    w, g = weight.double(), gram.double()
    gss = g.index_select(0, keep).index_select(1, keep)
    rhs = w @ (g if cross is None else cross.double()).index_select(1, keep)  # [out, |S|]
    lam = damping * gss.diagonal().mean()
    a = gss + lam * torch.eye(len(keep), dtype=g.dtype, device=g.device)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise GispError(f"repair lsq: the kept inputs' Gram matrix (+ damping {damping}) is not positive definite "
                        f"(leading minor {int(info)} of {len(keep)}); the calibration activations do not span the "
                        "kept features: give more calibration tokens or raise the damping")
    return torch.cholesky_solve(rhs.T, chol).T


def centred(moments: "Moments") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Gram (and cross moments) about the means, G - s s^T / N (C - s_d s^T / N): an affine fit's moments."""
    n, s = moments.tokens, moments.total.double()
    gram = moments.gram.double() - torch.outer(s, s) / n
    cross = None if moments.cross is None else moments.cross.double() - torch.outer(moments.dense_total.double(), s) / n
    return gram, cross


def bias_shift(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The removed columns' mean contribution to the output, W[:, R] @ mean(x_R), in fp64."""
    return weight.double().index_select(1, removed) @ mean.double().index_select(0, removed)


def apply_(model: nn.Module, columns: dict[str, np.ndarray], moments: dict[str, Moments], mode: str,
           damping: float, intercept: bool) -> dict[str, int]:
    """Write the repaired weights (or biases) into the consumers, still at full width; shrink_ then drops R.
    Returns the biases created (consumer -> parameters) where the dense model had none."""
    created = {}
    with torch.no_grad():
        for name, removed in columns.items():
            lin, m = model.get_submodule(name), moments[name]
            w = lin.weight
            gone = torch.as_tensor(removed, device=w.device)
            if mode == "bias":
                if m.dense_total is None:
                    shift = bias_shift(w, m.total / m.tokens, gone)
                else:  # the dense output's mean minus what the kept columns give on the pruned inputs
                    kept = torch.as_tensor(np.setdiff1d(np.arange(lin.in_features), removed), device=w.device)
                    shift = w.double() @ (m.dense_total / m.tokens) - bias_shift(w, m.total / m.tokens, kept)
                if lin.bias is None:
                    created[name] = lin.out_features
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=w.dtype, device=w.device),
                                            requires_grad=w.requires_grad)
                lin.bias.copy_((lin.bias.double() + shift).to(w.dtype))
                continue
            stays = np.ones(lin.in_features, dtype=bool)
            stays[removed] = False
            keep = torch.as_tensor(np.flatnonzero(stays), device=w.device)
            if not len(keep):  # a consumer that loses every column has nothing left to fit
                continue
            if not intercept:
                w[:, keep] = lsq_columns(w, m.gram, keep, damping, m.cross).to(w.dtype)
                continue
            # affine: V on the centred moments, then the bias that matches the target's mean, W mu_t - V mu_S
            gram, cross = centred(m)
            v = lsq_columns(w, gram, keep, damping, cross)
            mean_t = (m.total if m.dense_total is None else m.dense_total).double() / m.tokens
            shift = w.double() @ mean_t - v @ (m.total.double() / m.tokens).index_select(0, keep)
            if lin.bias is None:
                created[name] = lin.out_features
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=w.dtype, device=w.device),
                                        requires_grad=w.requires_grad)
            lin.bias.copy_((lin.bias.double() + shift).to(w.dtype))
            w[:, keep] = v.to(w.dtype)
    return created


def with_biases(plan: GroupPlan, created: dict[str, int]) -> GroupPlan:
    """The plan once consumers gained biases: their LinearInfo says so and the parameter counts include them (an
    emptied block keeps its consumer's bias as its output bias, still in its layer)."""
    if not created:
        return plan
    linears = tuple(replace(i, bias=True) if i.module in created else i for i in plan.linears)
    layers = tuple(replace(l, params=l.params + sum(n for name, n in created.items()
                                                     if name.startswith(l.module + "."))) for l in plan.layers)
    return replace(plan, linears=linears, layers=layers, total_params=plan.total_params + sum(created.values()))
