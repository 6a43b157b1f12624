"""(model, GroupPlan, calibration) -> Scores: first-order loss importance |w * gbar| summed per group (spec §2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gisp_fx.errors import GispError
from gisp_fx.memory import trim_
from gisp_fx.passes.calib_loop import run_batches
from gisp_fx.passes.lm_loss import LOSS_CHUNK, check_head_, checkpointed, chunked_lm_loss
from gisp_fx.plan import Axis, GroupPlan, Member


@dataclass(frozen=True)
class LmCalibration:
    """Perplexity objective: mean token cross-entropy over `input_ids` windows [N, L]."""

    input_ids: torch.Tensor
    batch_size: int = 8


@dataclass(frozen=True)
class McSequence:
    input_ids: tuple[int, ...]
    option_tokens: int  # the last `option_tokens` ids are the option; the loss is taken on them only
    correct: bool


@dataclass(frozen=True)
class MarginCalibration:
    """Margin objective (spec §5): gradients averaged over correct and over incorrect options separately."""

    sequences: tuple[McSequence, ...]
    pad_id: int
    batch_size: int = 8


@dataclass(frozen=True)
class CustomCalibration:
    """A user objective: `loss_fn(model, batch)` returns the batch-mean loss; `sizes` weight the batches."""

    batches: Sequence[Any]
    sizes: Sequence[int]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]


Calibration = LmCalibration | MarginCalibration | CustomCalibration


@dataclass(frozen=True)
class Scores:
    """One importance number per group of the plan it was computed against."""

    heads: tuple[np.ndarray, ...]  # per layer, per query head (empty when the layer has no attention left)
    kv: tuple[np.ndarray, ...]  # per layer, per K/V group (MHA only; NaN under GQA, where nothing reads them)
    channels: tuple[np.ndarray, ...]  # per layer, per MLP channel
    loss: float  # mean calibration loss of the model scored (LM objective) or mean option loss (margin)


def _prunable_linears(model: nn.Module, plan: GroupPlan, skip: frozenset[int] = frozenset()) -> dict[str, nn.Linear]:
    """The linears whose gradients the scores need: every member of every block outside `skip`, except the K/V
    members of a GQA attention (a GQA head is scored from its q rows and o columns only, and nothing reads the K/V
    groups' own scores: they come out NaN) unless the same linear also holds query rows (a fused QKV)."""
    names = set()
    for layer in plan.layers:
        if layer.index in skip:
            continue
        a, mlp = layer.attention, layer.mlp
        if a is not None:
            names.update(m.module for m in (a.query + a.kv if a.mha else a.query))
        if mlp is not None:
            names.update(m.module for m in mlp.members)
    return {name: model.get_submodule(name) for name in sorted(names)}




def _option_losses(model: nn.Module, batch: list[McSequence], pad_id: int, device) -> torch.Tensor:
    """Per-sequence mean cross-entropy over the option tokens (right padding)."""
    width = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    target = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, s in enumerate(batch):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        mask[i, :n] = 1
        target[i, n - s.option_tokens : n] = True
    ids, mask, target = ids.to(device), mask.to(device), target.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    t = target[:, 1:].float()
    return (nll * t).sum(1) / t.sum(1)


def _accumulate(model, linears, work, desc: str, progress: bool) -> tuple[dict[str, tuple], float, int]:
    """Sum of gradients of sum-over-batch losses over `work` [(closure -> (batch-mean loss, size))], in fp32
    whatever the weights' dtype (a half-precision .grad is moved into an fp32 sum after every batch)."""
    params = [p for lin in linears.values() for p in (lin.weight, lin.bias) if p is not None]
    for p in params:
        p.grad = None
    sums = {id(p): None for p in params if p.dtype != torch.float32}

    def step(_model, closure) -> tuple[float, int]:
        loss, size = closure()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"calibration loss is {loss.item()}")
        (loss * size).backward()
        value = loss.item() * size
        del loss
        trim_()
        for p in params:
            if id(p) in sums and p.grad is not None:
                sums[id(p)] = p.grad.float() if sums[id(p)] is None else sums[id(p)].add_(p.grad)
                p.grad = None
        return value, size

    done = run_batches(model, work, step, grad=True, desc=desc, progress=progress)
    total_loss, total_n = sum(v for v, _ in done), sum(n for _, n in done)

    def total(p):
        return sums[id(p)] if id(p) in sums else p.grad

    grads = {name: (total(lin.weight), total(lin.bias) if lin.bias is not None else None)
             for name, lin in linears.items()}
    return grads, total_loss, total_n


def average_gradients(model: nn.Module, plan: GroupPlan, calib: Calibration, progress: bool = True,
                      desc: str = "gradients", *, loss_chunk: int = LOSS_CHUNK, checkpoint: bool = False,
                      even_batches: bool = False, skip: frozenset[int] = frozenset(),
                      ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], float]:
    """gbar per prunable linear (weight, bias): (1/N) sum_b (loss_b * size_b)'; margin: g_pos - g_neg.

    The LM objective's loss goes through the head in chunks of `loss_chunk` logits (0: the model's own loss on
    full logits); `checkpoint` recomputes each decoder layer's activations in backward instead of keeping them.
    `even_batches` (FSDP: every forward and backward is a collective of all ranks): a rank with fewer windows than
    the first runs its last batch again, weighted 0, until it has run as many batches as the first.
    Layers in `skip` (protected ones, never pruned) get no gradient: no fp32 sum of their weights' size, and
    backward stops at the first layer that needs one; the other layers' gradients are unchanged.
    """
    with checkpointed(model, checkpoint):
        return _average_gradients(model, plan, calib, progress, desc, loss_chunk, even_batches, skip)


def _average_gradients(model, plan, calib, progress, desc, loss_chunk, even_batches=False, skip=frozenset()):
    linears = _prunable_linears(model, plan, skip)
    if not linears:
        raise GispError("scoring: every layer with prunable groups is protected; there is nothing to score "
                        "(see --protect)")
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for lin in linears.values():
            lin.weight.requires_grad_(True)
            if lin.bias is not None:
                lin.bias.requires_grad_(True)
        if isinstance(calib, LmCalibration):  # run_batches holds eval mode (no dropout) and the cache off
            ids = _my_share(calib.input_ids)
            if loss_chunk > 0:
                check_head_(model, ids.to(device))
            work = [(lambda b=ids[i : i + calib.batch_size].to(device): (chunked_lm_loss(model, b, loss_chunk), len(b)))
                    for i in range(0, len(ids), calib.batch_size)]
            most = math.ceil(len(_my_share(calib.input_ids, 0)) / calib.batch_size)  # the first rank's batches
            last = ids[-calib.batch_size :].to(device)
            work += [lambda: (chunked_lm_loss(model, last, loss_chunk), 0)] * (most - len(work) if even_batches else 0)
            grads, loss, n = _all_reduced(*_accumulate(model, linears, work, desc, progress))
            return _scaled(grads, 1.0 / n), loss / n
        if isinstance(calib, CustomCalibration):
            work = [(lambda b=b, s=s: (calib.loss_fn(model, b), s)) for b, s in zip(calib.batches, calib.sizes)]
            grads, loss, n = _accumulate(model, linears, work, desc, progress)
            return _scaled(grads, 1.0 / n), loss / n
        sides = []
        for correct in (True, False):
            seqs = [s for s in calib.sequences if s.correct is correct]
            if not seqs:
                raise GispError("margin objective: the calibration set has no "
                                f"{'correct' if correct else 'incorrect'} options")
            work = [(lambda b=seqs[i : i + calib.batch_size]: (_option_losses(model, b, calib.pad_id, device).mean(),
                                                               len(b)))
                    for i in range(0, len(seqs), calib.batch_size)]
            grads, loss, n = _accumulate(model, linears, work, f"{desc} ({'pos' if correct else 'neg'})", progress)
            sides.append((_scaled(grads, 1.0 / n), loss / n))
        (pos, pos_loss), (neg, _) = sides
        diff = {k: (pos[k][0] - neg[k][0], None if pos[k][1] is None else pos[k][1] - neg[k][1]) for k in pos}
        return diff, pos_loss
    finally:
        for lin in linears.values():
            lin.weight.grad = None
            if lin.bias is not None:
                lin.bias.grad = None
        for n, p in model.named_parameters():
            p.requires_grad_(saved.get(n, False))


def _world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group this process is in; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _my_share(ids: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """This rank's (or `rank`'s) contiguous share of the calibration windows (all of them in one process)."""
    mine, world = _world()
    rank = mine if rank is None else rank
    if world == 1:
        return ids
    if len(ids) < world:
        raise GispError(f"--nproc: {world} processes but only {len(ids)} calibration windows; every process needs "
                        "at least one (raise --calib-samples or use fewer processes)")
    return torch.tensor_split(ids, world)[rank]


def _all_reduced(grads, total_loss: float, total_n: int):
    """Every rank's gradient sums, loss sum and window count added up (each sum is already weighted by its
    windows), so that every rank divides the same totals and selects the same groups."""
    rank, world = _world()
    if world == 1:
        return grads, total_loss, total_n
    import torch.distributed as dist

    from torch.distributed.tensor import DTensor

    for w, b in grads.values():
        for t in (w, b):
            if t is not None and not isinstance(t, DTensor):  # --shard: FSDP2 has reduce-scattered its shards
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
    totals = torch.tensor([total_loss, float(total_n)], dtype=torch.float64,
                          device=next(iter(grads.values()))[0].device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return grads, totals[0].item(), int(round(totals[1].item()))


def _scaled(grads, factor):
    """The sums times `factor`, in place (the sums are this call's own: no second copy of every gradient)."""
    return {k: (w.mul_(factor), None if b is None else b.mul_(factor)) for k, (w, b) in grads.items()}


def _group_sums(member: Member, per_index: np.ndarray) -> np.ndarray:
    lengths = np.array([len(ix) for ix in member.index])
    flat = np.fromiter((i for ix in member.index for i in ix), dtype=np.int64, count=int(lengths.sum()))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.add.reduceat(per_index[flat], starts)


def score_from_gradients(model: nn.Module, plan: GroupPlan, grads, loss: float,
                         skip: frozenset[int] = frozenset()) -> Scores:
    """Element score |w * g| (abs after averaging), summed over each group's rows and columns; NaN for every group
    of the layers in `skip`, which were not scored."""
    per_axis: dict[tuple[str, Axis], np.ndarray] = {}
    with torch.no_grad():
        for name, (gw, gb) in grads.items():
            lin = model.get_submodule(name)
            rows, cols = axis_sums(lin.weight, lin.bias, gw, gb)
            per_axis[(name, Axis.ROWS)] = rows.cpu().numpy()
            per_axis[(name, Axis.COLS)] = cols.cpu().numpy()
    return scores_from_axis_sums(plan, per_axis, loss, skip)


def axis_sums(weight: torch.Tensor, bias: torch.Tensor | None, gw: torch.Tensor, gb: torch.Tensor | None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 sums of |w * g| over each row (with the row's |b * g_b|) and over each column of one linear."""
    elem = (weight * gw).abs().double()
    rows = elem.sum(1)
    if gb is not None:
        rows = rows + (bias * gb).abs().double()
    return rows, elem.sum(0)


def scores_from_axis_sums(plan: GroupPlan, per_axis: dict[tuple[str, Axis], np.ndarray], loss: float,
                          skip: frozenset[int] = frozenset()) -> Scores:
    """Per-linear row and column sums of |w * g| -> each group's sum over its rows and columns (NaN in the layers
    of `skip`, which have no sums)."""

    def block_scores(members, count, needed=True):
        total = np.zeros(count)
        for m in members:
            if (m.module, m.axis) not in per_axis and not needed:
                return np.full(count, np.nan)
            total += _group_sums(m, per_axis[(m.module, m.axis)])
        return total

    heads, kv, channels = [], [], []
    for layer in plan.layers:
        a, mlp = layer.attention, layer.mlp
        if layer.index in skip:
            heads.append(np.full(a.num_heads if a is not None else 0, np.nan))
            kv.append(np.full(a.num_kv_heads if a is not None else 0, np.nan))
            channels.append(np.full(mlp.channels if mlp is not None else 0, np.nan))
            continue
        if a is not None:
            h = block_scores(a.query, a.num_heads)
            g = block_scores(a.kv, a.num_kv_heads, needed=a.mha)
            if a.mha:  # an MHA head owns its k/v rows; a GQA head is scored from q rows and o columns only
                h = h + g[list(a.kv_of_head)]
            heads.append(h)
            kv.append(g)
        else:
            heads.append(np.zeros(0))
            kv.append(np.zeros(0))
        channels.append(block_scores(mlp.members, mlp.channels) if mlp is not None else np.zeros(0))
    if not all(np.isfinite(x).all() for lp, h, c in zip(plan.layers, heads, channels) if lp.index not in skip
               for x in (h, c)):
        raise FloatingPointError("importance scores are not finite")
    return Scores(tuple(heads), tuple(kv), tuple(channels), loss)


def score(model: nn.Module, plan: GroupPlan, calib: Calibration, progress: bool = True,
          desc: str = "gradients", *, loss_chunk: int = LOSS_CHUNK, checkpoint: bool = False,
          skip: frozenset[int] = frozenset()) -> Scores:
    """Importance of every group of `plan` on `model` for the calibration objective; the layers in `skip` (the
    protected ones, which no selection reads) are not scored: NaN."""
    grads, loss = average_gradients(model, plan, calib, progress, desc, loss_chunk=loss_chunk, checkpoint=checkpoint,
                                    skip=skip)
    if not math.isfinite(loss):
        raise FloatingPointError(f"calibration loss is {loss}")
    return score_from_gradients(model, plan, grads, loss, skip)
