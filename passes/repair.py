"""(model, GroupPlan, Selection, calibration) -> the smaller model with its consumer linears re-fitted (repair).

What a removed head or channel fed into the model goes through one linear: its column block of o_proj (a head) or
down_proj (a channel), the "consumer". Repair changes only the consumers, from the calibration activations at
their inputs, captured by forward pre-hooks:

- bias (FLAP's bias compensation): the removed columns' mean contribution over the calibration tokens,
  W[:, R] @ mean(x_R), is added to the consumer's bias (one is created where the dense model had none);
- lsq (closed-form reconstruction): the kept columns are re-fitted so that the consumer's output on the calibration
  activations matches the output before removal, W'_S = W G[:, S] (G[S, S] + lambda I)^-1, from the Gram matrix
  G = sum x x^T (per-batch products in fp32, summed over batches in fp64), lambda = damping * mean(diag G[S, S]).
  With `intercept` the fit is affine: V and a bias b together, V from the centred moments G - s s^T / N (s = sum x,
  N tokens) and b = b0 + W mean(x) - V mean(x_S), which lsq alone can only approximate through the kept columns.

Inputs: "dense" (parallel) captures every consumer's input in one forward pass of the model before this removal;
"pruned" (sequential, as SparseGPT) goes layer by layer, each layer's inputs coming from the already pruned and
repaired layers above it: one forward pass of the model gathers the hidden states entering the first pruned layer
(and every layer's other call arguments), which are then carried through the layers one at a time, each pruned
layer fitted and repaired before it feeds the next.

Targets (with sequential inputs): "layer" fits the consumer's own output before removal on those inputs, W X_p;
"dense" fits the dense model's output of the consumer, W X_d, X_d carried through the untouched layers alongside
(so a fit also corrects what the pruned layers above changed): W'_S = W C[:, S] (G_p[S, S] + lambda I)^-1 with the
cross moments C = sum x_d x_p^T taken on the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gisp_fx.errors import GispError
from gisp_fx.plan import Axis, GroupPlan, Selection

MODES = ("none", "bias", "lsq")
AT = ("step", "end")
INPUTS = ("dense", "pruned")
TARGETS = ("layer", "dense")
# The default inputs are sequential, by measurement on SmolLM2 (benchmarks/results/repair.md, 256 test windows): 209.7
# against 225.2 (dense) at 50 %, 88.9 against 93.8 at 20 %; in one pass (hidden states carried layer to layer) they
# cost about twice the CPU of the dense inputs' one forward pass, no longer a forward pass per pruned layer.
DAMPING = 0.0001  # lambda relative to the mean diagonal of G[S, S] (SparseGPT's percdamp). Measured on SmolLM2
# (benchmarks/results/repair.md, 64 windows, 256 test windows): dense inputs at 50 %: 0.1 -> ppl 253.5, 0.01 -> 234.6,
# 0.001 -> 225.2; sequential inputs: 0.001 -> 209.7 / 88.9 (50 % / 20 %), 0.0001 -> 204.4 / 86.6, 1e-5 -> 203.4 / 86.3.
# Below 0.0001 the gain is under 0.5 %, and a ten times weaker ridge is worse conditioned, so 0.0001.


@dataclass(frozen=True)
class RepairSettings:
    mode: str = "none"  # none | bias | lsq
    at: str = "end"  # step: after every step of an iterative run | end: once, on the final removal
    inputs: str = "pruned"  # pruned (sequential) | dense (parallel): the measurement is noted at INPUTS
    damping: float = DAMPING
    target: str = "layer"  # layer: the consumer's own output on its inputs | dense: the dense model's (pruned inputs)
    sublayers: bool = False  # pruned inputs: the MLP's consumer fitted after the same layer's attention is repaired
    # lsq: fit a bias with the kept columns (an affine fit, on centred moments). Off: on SmolLM2 it gains 0.3 % at 50 %
    # (203.8 against 204.4, 256 test windows) and nothing at 20 % (86.52 against 86.57), for a bias the model lacked.
    intercept: bool = False

    def __post_init__(self):
        if self.target not in TARGETS:
            raise GispError(f"repair target must be one of {', '.join(TARGETS)}, got '{self.target}'")
        if self.target == "dense" and self.inputs != "pruned":
            raise GispError("repair target 'dense' fits sequential (pruned) inputs to the dense model's output; with "
                            "dense inputs it is the layer's own output already: use inputs 'pruned' or target 'layer'")
        if self.sublayers and self.inputs != "pruned":
            raise GispError("repair by sublayer fits the MLP on the inputs of the repaired attention, sequential "
                            "(pruned) inputs; with dense inputs there is no order: use inputs 'pruned'")
        if self.intercept and self.mode != "lsq":
            raise GispError(f"repair intercept fits a bias alongside lsq's columns; mode '{self.mode}' has no fit "
                            "(bias already is the mean shift): use mode 'lsq'")

    def to_json(self) -> dict:
        return {"mode": self.mode, "at": self.at, "inputs": self.inputs, "damping": self.damping,
                "target": self.target, "sublayers": self.sublayers, "intercept": self.intercept}


@dataclass
class _Moments:
    """Sums over the calibration tokens of one consumer's input x: sum x (fp64) and, for lsq, sum x x^T (fp64)."""

    total: torch.Tensor
    gram: torch.Tensor | None
    tokens: int = 0
    dense_total: torch.Tensor | None = None  # target dense: sum x_d, and (lsq) cross = sum x_d x_p^T
    cross: torch.Tensor | None = None


class _Stop(Exception):
    """Raised by a hook after the last layer whose consumers are needed: the rest of the forward is skipped."""


def consumer_columns(plan: GroupPlan, selection: Selection) -> dict[str, np.ndarray]:
    """The input columns each consumer linear loses with `selection` (sorted, in the plan's current numbering)."""
    from gisp_fx.plan import Kind

    out: dict[str, set[int]] = {}
    for layer in plan.layers:
        a, m = layer.attention, layer.mlp
        for block, members, kind in ((a, a.query if a else (), Kind.HEAD), (m, m.members if m else (), Kind.CHANNEL)):
            gone = selection.of(layer.index, kind)
            if block is None or not gone:
                continue
            for member in members:
                if member.axis is Axis.COLS:
                    cols = out.setdefault(member.module, set())
                    for g in gone:
                        cols.update(member.index[g])
    return {name: np.array(sorted(cols), dtype=np.int64) for name, cols in out.items() if cols}


def min_tokens(plan: GroupPlan) -> int:
    """Calibration tokens an lsq fit needs: at least the widest consumer's input features (else G is singular)."""
    widths = [plan.linear(m.module).in_features for layer in plan.layers
              for members in ((layer.attention.query if layer.attention else ()), (layer.mlp.members if layer.mlp else ()))
              for m in members if m.axis is Axis.COLS]
    return max(widths, default=0)


def check_calibration(plan: GroupPlan, calib, settings: RepairSettings) -> None:
    """One GispError when the calibration cannot serve the repair: not language-model windows, or (lsq) fewer
    calibration tokens than the widest consumer has input features."""
    from gisp_fx.passes.importance import LmCalibration

    if settings.mode == "none":
        return
    if not isinstance(calib, LmCalibration):
        raise GispError(f"--repair {settings.mode} fits on language-model calibration windows (the ppl objective), "
                        f"got {type(calib).__name__}; use --objective ppl or --repair none")
    tokens, need = int(calib.input_ids.numel()), min_tokens(plan)
    if settings.mode == "lsq" and tokens < need:
        n, L = calib.input_ids.shape
        raise GispError(f"--repair lsq: the calibration set has {tokens:,} tokens ({n} x {L}), fewer than the "
                        f"{need:,} input features of the widest consumer linear, so its Gram matrix is singular and "
                        "the fit is ill-posed; give more --calib-samples or a longer --seq-len, or use --repair bias")


def _forward_batches(model: nn.Module, calib, desc: str, progress: bool) -> None:
    """The calibration windows through `model` batch by batch, for its hooks (a hook may end a batch with _Stop)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        ids = calib.input_ids
        for i in tqdm(range(0, len(ids), calib.batch_size), desc=desc, leave=False, disable=not progress,
                      unit="batch"):
            try:
                model(input_ids=ids[i : i + calib.batch_size].to(device), use_cache=False)
            except _Stop:
                pass


def _check_reached(columns, moments: dict[str, _Moments]) -> None:
    missing = sorted(set(columns) - set(moments))
    if missing:
        raise GispError(f"repair: no calibration activations reached {', '.join(missing[:3])}; the forward pass "
                        "did not run these linears (a gisp-fx bug for this family, please report it)")


def _moment_hooks(model: nn.Module, columns, moments: dict[str, _Moments], gram: bool) -> list:
    """Forward pre-hooks on the linears in `columns` that add each call's inputs to `moments` (the caller removes
    the returned handles)."""

    def hook(name):
        def fn(_module, inputs):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            m = moments.get(name)
            if m is None:
                d, dev = x.shape[-1], x.device
                m = moments[name] = _Moments(torch.zeros(d, dtype=torch.float64, device=dev),
                                             torch.zeros(d, d, dtype=torch.float64, device=dev) if gram else None)
            m.total += x.sum(0, dtype=torch.float64)
            if gram:
                xf = x.float()
                m.gram += (xf.T @ xf).double()
            m.tokens += x.shape[0]
        return fn

    return [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in columns]


def collect(model: nn.Module, columns: dict[str, np.ndarray], calib, gram: bool, stop_after: str | None = None,
            progress: bool = False) -> dict[str, _Moments]:
    """Run the calibration windows through `model`; sum the inputs (and their Gram) of every linear in `columns`."""
    moments: dict[str, _Moments] = {}

    def stop(*_):
        raise _Stop

    handles = _moment_hooks(model, columns, moments, gram)
    if stop_after is not None:
        handles.append(model.get_submodule(stop_after).register_forward_hook(stop))
    was_training = model.training
    try:
        model.eval()
        _forward_batches(model, calib, "repair activations", progress)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    _check_reached(columns, moments)
    return moments


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


def centred(moments: "_Moments") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Gram (and cross moments) about the means, G - s s^T / N (C - s_d s^T / N): an affine fit's moments."""
    n, s = moments.tokens, moments.total.double()
    gram = moments.gram.double() - torch.outer(s, s) / n
    cross = None if moments.cross is None else moments.cross.double() - torch.outer(moments.dense_total.double(), s) / n
    return gram, cross


def bias_shift(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The removed columns' mean contribution to the output, W[:, R] @ mean(x_R), in fp64."""
    return weight.double().index_select(1, removed) @ mean.double().index_select(0, removed)


def _apply(model: nn.Module, columns: dict[str, np.ndarray], moments: dict[str, _Moments],
           settings: RepairSettings) -> dict[str, int]:
    """Write the repaired weights (or biases) into the consumers, still at full width; shrink_ then drops R.
    Returns the biases created (consumer -> parameters) where the dense model had none."""
    created = {}
    with torch.no_grad():
        for name, removed in columns.items():
            lin, m = model.get_submodule(name), moments[name]
            w = lin.weight
            gone = torch.as_tensor(removed, device=w.device)
            if settings.mode == "bias":
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
            if not settings.intercept:
                w[:, keep] = lsq_columns(w, m.gram, keep, settings.damping, m.cross).to(w.dtype)
                continue
            # affine: V on the centred moments, then the bias that matches the target's mean, W mu_t - V mu_S
            gram, cross = centred(m)
            v = lsq_columns(w, gram, keep, settings.damping, cross)
            mean_t = (m.total if m.dense_total is None else m.dense_total).double() / m.tokens
            shift = w.double() @ mean_t - v @ (m.total.double() / m.tokens).index_select(0, keep)
            if lin.bias is None:
                created[name] = lin.out_features
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=w.dtype, device=w.device),
                                        requires_grad=w.requires_grad)
            lin.bias.copy_((lin.bias.double() + shift).to(w.dtype))
            w[:, keep] = v.to(w.dtype)
    return created


def _with_biases(plan: GroupPlan, created: dict[str, int]) -> GroupPlan:
    """The plan once consumers gained biases: their LinearInfo says so and the parameter counts include them (an
    emptied block keeps its consumer's bias as its output bias, still in its layer)."""
    from dataclasses import replace

    if not created:
        return plan
    linears = tuple(replace(i, bias=True) if i.module in created else i for i in plan.linears)
    layers = tuple(replace(l, params=l.params + sum(n for name, n in created.items()
                                                     if name.startswith(l.module + "."))) for l in plan.layers)
    return replace(plan, linears=linears, layers=layers, total_params=plan.total_params + sum(created.values()))


class _LayerCalls:
    """Each calibration batch's call of a run of decoder layers: the hidden states entering the first of them and,
    for every layer, the other positional and keyword arguments the model passed it (masks, rotary tables, position
    ids: they do not depend on the hidden states, so one forward pass of the model yields them all)."""

    def __init__(self, model: nn.Module, modules: list[str], calib, progress: bool, dense: bool = False):
        self.hidden: list[torch.Tensor] = []
        self.dense: list[torch.Tensor] | None = None  # dense=True: the dense model's hidden states, carried alongside
        self.calls: dict[str, list[tuple[tuple, dict]]] = {m: [] for m in modules}
        first, last = modules[0], modules[-1]

        def catch(name):
            def fn(_module, args, kwargs):
                args, kwargs = list(args), dict(kwargs)
                h = args.pop(0) if args else kwargs.pop("hidden_states")
                if name == first:
                    self.hidden.append(h.detach().clone())
                self.calls[name].append((tuple(args), kwargs))
                if name == last:
                    raise _Stop
            return fn

        handles = [model.get_submodule(m).register_forward_pre_hook(catch(m), with_kwargs=True) for m in modules]
        try:
            _forward_batches(model, calib, "repair: layer inputs", progress)
        finally:
            for h in handles:
                h.remove()
        if any(len(c) != len(self.hidden) for c in self.calls.values()):
            raise GispError(f"repair: the forward pass did not call every decoder layer from {first} to {last} "
                            "once per batch (a gisp-fx bug for this family, please report it)")
        if dense:  # nothing above the first pruned layer is pruned: both streams start equal
            self.dense = [h.clone() for h in self.hidden]

    def gather(self, model: nn.Module, module: str) -> None:
        """Call `module` on the current hidden states for its hooks only (the output is not kept)."""
        layer = model.get_submodule(module)
        with torch.inference_mode():
            for h, (args, kwargs) in zip(self.hidden, self.calls[module]):
                layer(h, *args, **kwargs)

    def dense_inputs(self, model: nn.Module, module: str, names) -> list[dict[str, torch.Tensor]]:
        """Target dense: `module` (still untouched, so the dense model's layer) on the dense hidden states, which it
        advances; returns, per batch, the inputs of the linears `names` (tokens x features)."""
        layer = model.get_submodule(module)
        batches: list[dict[str, torch.Tensor]] = []

        def keep(name):
            def fn(_module, inputs):
                batches[-1][name] = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            return fn

        handles = [model.get_submodule(n).register_forward_pre_hook(keep(n)) for n in names]
        try:
            with torch.inference_mode():
                for b, (args, kwargs) in enumerate(self.calls[module]):
                    batches.append({})
                    out = layer(self.dense[b], *args, **kwargs)
                    self.dense[b] = out[0] if isinstance(out, (tuple, list)) else out
        finally:
            for h in handles:
                h.remove()
        return batches

    def gather_paired(self, model: nn.Module, module: str, columns, moments: dict[str, "_Moments"], gram: bool,
                      dense: list[dict[str, torch.Tensor]]) -> None:
        """Target dense: `module` on the pruned hidden states; its consumers' inputs and the dense ones of the same
        tokens (`dense`, from dense_inputs) summed into `moments` (sum x_p, G_p, sum x_d, C = sum x_d x_p^T)."""
        layer = model.get_submodule(module)
        batch = [0]

        def add(name):
            def fn(_module, inputs):
                xp, xd = inputs[0].detach().reshape(-1, inputs[0].shape[-1]), dense[batch[0]][name]
                m = moments.get(name)
                if m is None:
                    d, dev = xp.shape[-1], xp.device
                    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=dev)  # noqa: E731
                    m = moments[name] = _Moments(zeros(d), zeros(d, d) if gram else None, 0, zeros(d),
                                                 zeros(d, d) if gram else None)
                m.total += xp.sum(0, dtype=torch.float64)
                m.dense_total += xd.sum(0, dtype=torch.float64)
                if gram:
                    pf, df = xp.float(), xd.float()
                    m.gram += (pf.T @ pf).double()
                    m.cross += (df.T @ pf).double()
                m.tokens += xp.shape[0]
            return fn

        handles = [model.get_submodule(n).register_forward_pre_hook(add(n)) for n in columns]
        try:
            with torch.inference_mode():
                for b, (args, kwargs) in enumerate(self.calls[module]):
                    batch[0] = b
                    layer(self.hidden[b], *args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    def run(self, model: nn.Module, module: str, dense: bool = False) -> None:
        """Advance the hidden states through `module` (as it is now: pruned and repaired, or untouched), and with
        `dense` the dense stream too (an untouched layer is the dense model's)."""
        layer = model.get_submodule(module)
        with torch.inference_mode():
            for b, (args, kwargs) in enumerate(self.calls.pop(module)):
                for stream in (self.hidden, self.dense) if dense else (self.hidden,):
                    out = layer(stream[b], *args, **kwargs)
                    stream[b] = out[0] if isinstance(out, (tuple, list)) else out


def _sequential_(model: nn.Module, plan: GroupPlan, selection: Selection, calib, settings: RepairSettings,
                 progress: bool):
    """Sequential ("pruned") inputs in one pass: the hidden states are carried layer to layer, so each pruned
    layer is fitted on the activations of the already pruned and repaired layers above it, and every layer runs
    twice at most (once to gather its consumers' inputs, once repaired to feed the next)."""
    from gisp_fx.passes.shrink import shrink_
    from gisp_fx.plan import Kind

    pruned = sorted({r.layer for r in selection.removed})
    columns, created, tokens = {}, {}, 0
    if not pruned:
        return shrink_(model, plan, selection), columns, created, tokens
    span = [plan.layers[i].module for i in range(pruned[0], pruned[-1] + 1)]
    was_training = model.training
    model.eval()
    try:
        paired = settings.target == "dense"
        calls = _LayerCalls(model, span, calib, progress, dense=paired)
        for index, module in zip(range(pruned[0], pruned[-1] + 1),
                                 tqdm(span, desc="repair: layers", leave=False, disable=not progress, unit="layer")):
            if index in pruned:
                part = Selection(tuple(r for r in selection.removed if r.layer == index))
                dense = calls.dense_inputs(model, module, consumer_columns(plan, part)) if paired else None
                # by sublayer: the attention's consumer first, then the MLP's on the inputs of the pruned attention
                subs = [Selection(tuple(r for r in part.removed if (r.kind is Kind.CHANNEL) == mlp)) for mlp in (False, True)]
                for sub in (subs if settings.sublayers else [part]):
                    if not sub.removed:
                        continue
                    cols = consumer_columns(plan, sub)
                    moments: dict[str, _Moments] = {}
                    if paired:
                        calls.gather_paired(model, module, cols, moments, settings.mode == "lsq", dense)
                    else:
                        handles = _moment_hooks(model, cols, moments, settings.mode == "lsq")
                        try:
                            calls.gather(model, module)
                        finally:
                            for h in handles:
                                h.remove()
                    _check_reached(cols, moments)
                    made = _apply(model, cols, moments, settings)
                    plan = _with_biases(shrink_(model, plan, sub), made)  # other layers' indices stay as they were
                    created.update(made)
                    columns.update(cols)
                    tokens = next(iter(moments.values())).tokens
            if index != pruned[-1]:
                calls.run(model, module, dense=paired and index not in pruned)
    finally:
        model.train(was_training)
    return plan, columns, created, tokens


def shrink_repaired_(model: nn.Module, plan: GroupPlan, selection: Selection, calib,
                     settings: RepairSettings, progress: bool = False) -> tuple[GroupPlan, dict | None]:
    """shrink_ with the consumers repaired first; returns the new plan and a record of the repair (None when
    `settings.mode` is none or `calib` is None)."""
    from gisp_fx.passes.shrink import shrink_

    if settings.mode == "none" or calib is None:
        return shrink_(model, plan, selection), None
    t0 = time.perf_counter()
    need_gram = settings.mode == "lsq"
    if settings.inputs == "dense":
        columns = consumer_columns(plan, selection)
        last = max((l for l in plan.layers if any(n.startswith(l.module + ".") for n in columns)),
                   key=lambda l: l.index, default=None)
        moments = collect(model, columns, calib, need_gram, last.module, progress) if columns else {}
        created = _apply(model, columns, moments, settings)
        passes, tokens = int(bool(columns)), next(iter(moments.values())).tokens if moments else 0
        plan = _with_biases(shrink_(model, plan, selection), created)
    else:
        plan, columns, created, tokens = _sequential_(model, plan, selection, calib, settings, progress)
        passes = int(bool(columns))
    record = {**settings.to_json(), "linears": len(columns), "columns_removed": int(sum(map(len, columns.values()))),
              "tokens": tokens, "forward_passes": passes, "bias_params_added": sum(created.values()), "wall_s": time.perf_counter() - t0}
    return plan, record


def replay_repaired_(model: nn.Module, plan0: GroupPlan, chunks, calib, settings: RepairSettings,
                     progress: bool = False):
    """Remove `chunks` (tuples of GroupRefs by ORIGINAL index) one after another from a model at `plan0`,
    repairing before each removal (no repair when `calib` is None); returns (plan, alive, repair records)."""
    from gisp_fx.pipeline import _Alive

    alive, plan, records = _Alive(plan0), plan0, []
    for chunk in chunks:
        if chunk:
            plan, record = shrink_repaired_(model, plan, Selection(tuple(alive.current(r) for r in chunk)), calib,
                                            settings, progress)
            alive.remove(chunk)
            records.append(record)
    return plan, alive, records


def materialize_repair(traj, override: str | None, calib: str | None):
    """The repair a materialize runs, and the CompileConfig to rebuild its calibration from (the run's recorded
    calibration settings; None when no repair runs), checked before any model is loaded: the run's own repair
    unless `override` names another; a run repaired at every step can only be replayed as it ran (or
    unrepaired, --repair none), since its removal order was scored on repaired models."""
    from dataclasses import replace
    from pathlib import Path

    from gisp_fx.config import CompileConfig, REPAIR_MODES

    config = CompileConfig.from_json(traj.config)
    recorded = config.repair_settings()
    if traj.repair and recorded.mode != "none":  # the inputs and damping the run used (the defaults may have moved)
        first = traj.repair[0]
        recorded = replace(recorded, inputs=first.get("inputs", recorded.inputs),
                            damping=float(first.get("damping", recorded.damping)),
                            target=first.get("target", "layer"),  # runs before targets were recorded: layer
                            sublayers=bool(first.get("sublayers", False)),
                            intercept=bool(first.get("intercept", False)))
    if override is not None and override not in REPAIR_MODES:
        raise GispError(f"materialize: --repair must be one of {', '.join(REPAIR_MODES)}, got '{override}'")
    if override is None or override == recorded.mode:
        settings = recorded
    elif override == "none":
        settings = RepairSettings()
    elif recorded.mode != "none" and recorded.at == "step":
        raise GispError(f"materialize: this run repaired ({recorded.mode}) after every step, so its removal order "
                        f"was scored on repaired models; reproduce it with --repair {recorded.mode}, or give "
                        "--repair none for the unrepaired replay")
    else:
        settings = RepairSettings(override, "end")
    if settings.mode == "none":
        if calib is not None:
            raise GispError("materialize: --calib is the calibration text of a repair; this materialize runs none "
                            "(give --repair bias|lsq, or leave --calib out)")
        return settings, None
    config = replace(config, repair=settings.mode, calib=calib or config.calib)
    config.validate(frozenset())  # e.g. a calibration-free method has no data to repair from
    if config.calib and not Path(config.calib).is_file():
        raise GispError(f"materialize: --repair {settings.mode} needs the run's calibration data, and its "
                        f"calibration file '{config.calib}' is not there; pass --calib FILE (the same text), or "
                        "--repair none")
    return settings, config
