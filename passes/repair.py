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

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gisp_fx.errors import GispError
from gisp_fx.passes.calib_loop import StopForward, hidden_states, run_batches, windows
from gisp_fx.passes.repair_block import EPOCHS as BLOCK_EPOCHS, LR as BLOCK_LR, record_calls, reconstruct_
from gisp_fx.passes.repair_fit import Moments, apply_, check_reached, moment_hooks, with_biases
from gisp_fx.passes.shrink import shrink_
from gisp_fx.plan import Alive, Axis, GroupPlan, Kind, Selection

MODES = ("none", "bias", "lsq", "block")  # block: lsq, then each pruned sublayer trained (passes/repair_block.py)
AT = ("step", "end")
# block's calibration windows unless given: on SmolLM2 at 50 % (256 test windows), 8 epochs at lr 1e-3 on 256 windows
# gave 169.7, on the compile's 64 windows 188.8 (and 180.2 with 32 epochs, the same number of steps): it overfits 64
BLOCK_SAMPLES = 256
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
    mode: str = "none"  # none | bias | lsq | block
    at: str = "end"  # step: after every step of an iterative run | end: once, on the final removal
    inputs: str = "pruned"  # pruned (sequential) | dense (parallel): the measurement is noted at INPUTS
    damping: float = DAMPING
    target: str = "layer"  # layer: the consumer's own output on its inputs | dense: the dense model's (pruned inputs)
    sublayers: bool = False  # pruned inputs: the MLP's consumer fitted after the same layer's attention is repaired
    # lsq: fit a bias with the kept columns (an affine fit, on centred moments). Off: on SmolLM2 it gains 0.3 % at 50 %
    # (203.8 against 204.4, 256 test windows) and nothing at 20 % (86.52 against 86.57), for a bias the model lacked.
    intercept: bool = False
    epochs: int = BLOCK_EPOCHS  # block: Adam epochs over the calibration batches per sublayer
    lr: float = BLOCK_LR  # block: Adam's learning rate

    def __post_init__(self):
        if self.mode == "block" and (self.inputs != "pruned" or self.target != "layer" or self.sublayers):
            raise GispError("repair block trains each pruned sublayer on the inputs that reach it in the pruned "
                            "model, to the dense sublayer's output on them: it needs inputs 'pruned', target "
                            "'layer' and no sublayers flag (it already goes attention, then MLP)")
        if self.mode == "block" and (self.epochs < 1 or not self.lr > 0):
            raise GispError(f"repair block needs epochs >= 1 and a learning rate > 0, got {self.epochs} and {self.lr}")
        if self.target not in TARGETS:
            raise GispError(f"repair target must be one of {', '.join(TARGETS)}, got '{self.target}'")
        if self.target == "dense" and self.inputs != "pruned":
            raise GispError("repair target 'dense' fits sequential (pruned) inputs to the dense model's output; with "
                            "dense inputs it is the layer's own output already: use inputs 'pruned' or target 'layer'")
        if self.sublayers and self.inputs != "pruned":
            raise GispError("repair by sublayer fits the MLP on the inputs of the repaired attention, sequential "
                            "(pruned) inputs; with dense inputs there is no order: use inputs 'pruned'")
        if self.intercept and self.mode not in ("lsq", "block"):
            raise GispError(f"repair intercept fits a bias alongside lsq's columns; mode '{self.mode}' has no fit "
                            "(bias already is the mean shift): use mode 'lsq'")

    @property
    def fits(self) -> bool:
        """Whether the consumers' kept columns are re-fitted in closed form (lsq, and block before its training)."""
        return self.mode in ("lsq", "block")

    def to_json(self) -> dict:
        out = {"mode": self.mode, "at": self.at, "inputs": self.inputs, "damping": self.damping,
               "target": self.target, "sublayers": self.sublayers, "intercept": self.intercept}
        if self.mode == "block":
            out.update(epochs=self.epochs, lr=self.lr)
        return out


def consumer_columns(plan: GroupPlan, selection: Selection) -> dict[str, np.ndarray]:
    """The input columns each consumer linear loses with `selection` (sorted, in the plan's current numbering)."""
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


def _forward_batches(model: nn.Module, calib, desc: str, progress: bool, hooks=None) -> None:
    """The calibration windows through `model`'s decoder batch by batch, for its hooks (a hook may end a batch with
    StopForward)."""
    device = next(model.parameters()).device
    run_batches(model, windows(calib.input_ids, calib.batch_size, device), hidden_states, hooks=hooks, desc=desc,
                progress=progress)


def collect(model: nn.Module, columns: dict[str, np.ndarray], calib, gram: bool, stop_after: str | None = None,
            progress: bool = False) -> dict[str, Moments]:
    """Run the calibration windows through `model`; sum the inputs (and their Gram) of every linear in `columns`."""
    moments: dict[str, Moments] = {}

    def stop(*_):
        raise StopForward

    handles = moment_hooks(model, columns, moments, gram)
    if stop_after is not None:
        handles.append(model.get_submodule(stop_after).register_forward_hook(stop))
    try:
        _forward_batches(model, calib, "repair activations", progress)
    finally:
        for h in handles:
            h.remove()
    check_reached(columns, moments)
    return moments


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
                    raise StopForward
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

    def gather_paired(self, model: nn.Module, module: str, columns, moments: dict[str, "Moments"], gram: bool,
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
                    m = moments[name] = Moments(zeros(d), zeros(d, d) if gram else None, 0, zeros(d),
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


def _sublayers(plan: GroupPlan, part: Selection) -> list[str]:
    """The modules that hold the consumers `part` removes columns of (self_attn, then mlp): what block trains."""
    names = []
    for mlp in (False, True):
        sub = Selection(tuple(r for r in part.removed if (r.kind is Kind.CHANNEL) == mlp))
        if sub.removed:
            names += sorted({c.rsplit(".", 1)[0] for c in consumer_columns(plan, sub)} - set(names))
    return names


def _reconstruct_layer_(model: nn.Module, index: int, module: str, before: nn.Module, names: list[str],
                        calls: "_LayerCalls", settings: RepairSettings) -> list[dict]:
    """Block: the pruned layer `module` (lsq-fitted and shrunk) has its pruned sublayers `names` (attention, then
    MLP) trained one after the other to the output of the same sublayer of `before` (the layer before the removal)
    on the inputs that reach it now (passes/repair_block.py). Returns one record per sublayer."""
    layer, out = model.get_submodule(module), []
    for k, name in enumerate(names):
        rel = name[len(module) + 1:]
        target = layer.get_submodule(rel)
        if not any(p.numel() for p in target.parameters()):
            continue  # an emptied block has nothing left to train
        inputs = record_calls(layer, target, calls.hidden, calls.calls[module])
        rec = reconstruct_(target, before.get_submodule(rel), inputs, settings.epochs, settings.lr,
                           seed=2 * index + k)
        out.append({"module": name, **rec})
    return out


def _sequential_(model: nn.Module, plan: GroupPlan, selection: Selection, calib, settings: RepairSettings,
                 progress: bool, blocks: list | None = None):
    """Sequential ("pruned") inputs in one pass: the hidden states are carried layer to layer, so each pruned
    layer is fitted on the activations of the already pruned and repaired layers above it, and every layer runs
    twice at most (once to gather its consumers' inputs, once repaired to feed the next)."""
    pruned = sorted({r.layer for r in selection.removed})
    columns, created, tokens = {}, {}, 0
    blocks = [] if blocks is None else blocks  # block: a record per trained sublayer
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
                before = copy.deepcopy(model.get_submodule(module)) if settings.mode == "block" else None
                names = _sublayers(plan, part) if before is not None else []
                dense = calls.dense_inputs(model, module, consumer_columns(plan, part)) if paired else None
                # by sublayer: the attention's consumer first, then the MLP's on the inputs of the pruned attention
                subs = [Selection(tuple(r for r in part.removed if (r.kind is Kind.CHANNEL) == mlp)) for mlp in (False, True)]
                for sub in (subs if settings.sublayers else [part]):
                    if not sub.removed:
                        continue
                    cols = consumer_columns(plan, sub)
                    moments: dict[str, Moments] = {}
                    if paired:
                        calls.gather_paired(model, module, cols, moments, settings.fits, dense)
                    else:
                        handles = moment_hooks(model, cols, moments, settings.fits)
                        try:
                            calls.gather(model, module)
                        finally:
                            for h in handles:
                                h.remove()
                    check_reached(cols, moments)
                    made = apply_(model, cols, moments, settings.mode, settings.damping, settings.intercept)
                    plan = with_biases(shrink_(model, plan, sub), made)  # other layers' indices stay as they were
                    created.update(made)
                    columns.update(cols)
                    tokens = next(iter(moments.values())).tokens
                if before is not None:
                    blocks.extend(_reconstruct_layer_(model, index, module, before, names, calls, settings))
            if index != pruned[-1]:
                calls.run(model, module, dense=paired and index not in pruned)
    finally:
        model.train(was_training)
    return plan, columns, created, tokens


def shrink_repaired_(model: nn.Module, plan: GroupPlan, selection: Selection, calib,
                     settings: RepairSettings, progress: bool = False) -> tuple[GroupPlan, dict | None]:
    """shrink_ with the consumers repaired first; returns the new plan and a record of the repair (None when
    `settings.mode` is none or `calib` is None)."""
    if settings.mode == "none" or calib is None:
        return shrink_(model, plan, selection), None
    t0 = time.perf_counter()
    need_gram = settings.fits
    if settings.inputs == "dense":
        columns = consumer_columns(plan, selection)
        last = max((l for l in plan.layers if any(n.startswith(l.module + ".") for n in columns)),
                   key=lambda l: l.index, default=None)
        moments = collect(model, columns, calib, need_gram, last.module, progress) if columns else {}
        created = apply_(model, columns, moments, settings.mode, settings.damping, settings.intercept)
        passes, tokens = int(bool(columns)), next(iter(moments.values())).tokens if moments else 0
        plan = with_biases(shrink_(model, plan, selection), created)
    else:
        blocks: list[dict] = []
        plan, columns, created, tokens = _sequential_(model, plan, selection, calib, settings, progress, blocks)
        passes = int(bool(columns))
    if settings.mode == "block":
        extra = {"sublayers_trained": len(blocks),
                 "error_before": float(np.mean([b["error_before"] for b in blocks])) if blocks else 0.0,
                 "error_after": float(np.mean([b["error_after"] for b in blocks])) if blocks else 0.0,
                 "reverted": sum(not b["kept"] for b in blocks),
                 "trained": [{k: b[k] for k in ("module", "error_before", "error_after", "kept")} for b in blocks]}
    else:
        extra = {}
    record = {**extra, **settings.to_json(), "linears": len(columns), "columns_removed": int(sum(map(len, columns.values()))),
              "tokens": tokens, "forward_passes": passes, "bias_params_added": sum(created.values()), "wall_s": time.perf_counter() - t0}
    return plan, record


def replay_repaired_(model: nn.Module, plan0: GroupPlan, chunks, calib, settings: RepairSettings,
                     progress: bool = False):
    """Remove `chunks` (tuples of GroupRefs by ORIGINAL index) one after another from a model at `plan0`,
    repairing before each removal (no repair when `calib` is None); returns (plan, alive, repair records)."""
    alive, plan, records = Alive(plan0), plan0, []
    for chunk in chunks:
        if chunk:
            plan, record = shrink_repaired_(model, plan, Selection(tuple(alive.current(r) for r in chunk)), calib,
                                            settings, progress)
            alive.remove(chunk)
            records.append(record)
    return plan, alive, records
