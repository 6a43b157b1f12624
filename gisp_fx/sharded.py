"""--shard: (full model, plan, calibration) -> Scores, the gradients taken on an FSDP2 copy whose decoder layers are
sharded across the torchrun processes.

Why a copy: the rewrite after each step slices whole rows and columns of plain `nn.Linear`s, and FSDP2 offers no
way to take a module back out of `fully_shard`. So the full model stays where it was loaded (host memory; it is
the truth for weights, as everywhere in gisp-fx) and every rank rewrites it identically from the same selection;
each step scores on a fresh copy built on the meta device (no second full allocation): its decoder layers become
FSDP2 units holding 1/N of their weights and gradients on --device, while the parameters outside the layers
(embeddings, final norm, LM head: never scored) are the model's own tensors, left out of sharding. Each rank
scores the rows it holds; the row sums are gathered and the column sums added across ranks, so every rank ends
with the same numbers and makes the same selection.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from gisp_fx.errors import GispError
from gisp_fx.plan import Axis, GroupPlan


def require_world(world: int) -> None:
    """--shard splits the decoder layers across processes: refuse it in one process (nothing to shard with)."""
    if world < 2:
        raise GispError("--shard: shards the decoder layers across processes, but this run has one; give --nproc 2 "
                        "or more (or launch under torchrun), or drop --shard")


def sharded_replica(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `model` whose decoder layers are FSDP2 units sharded across the process group, holding this
    rank's rows (dim 0, torch.chunk's split, as FSDP2 shards) of the layers' weights; the rest is shared."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gisp_fx.passes.capture import decoder_layers

    rank, world = dist.get_rank(), dist.get_world_size()
    names = decoder_layers(model)
    in_layers = {id(p) for n in names for p in model.get_submodule(n).parameters()}
    memo: dict = {}
    for p in model.parameters():
        if id(p) in in_layers:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        else:  # the same tensor where it already lives on `device`: no copy of the embeddings
            memo[id(p)] = p if p.device == device else nn.Parameter(p.detach().to(device), requires_grad=False)
    replica = copy.deepcopy(model, memo)
    for module in replica.modules():  # buffers (rotary frequencies) where the replica runs
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(device)
    mesh = init_device_mesh(device.type, (world,))
    outside = {p for p in replica.parameters() if not p.is_meta}
    for n in names:
        layer = replica.get_submodule(n)
        fully_shard(layer, mesh=mesh)
        layer.set_gradient_divide_factor(1.0)  # the windows' gradient sums are added, not averaged over ranks,
        layer.set_force_sum_reduction_for_comms(True)  # with a plain SUM (gloo has no pre-multiplied sum)
        layer.to_empty(device=device)
    # the root unit shards nothing: it makes the layers reshard after their forward (a root keeps its weights)
    fully_shard(replica.base_model, mesh=mesh, ignored_params=outside)
    with torch.no_grad():
        for n in names:
            full, part = model.get_submodule(n), replica.get_submodule(n)
            for name, p in part.named_parameters():
                pieces = torch.chunk(full.get_parameter(name), world, dim=0)
                if rank < len(pieces):
                    p.to_local().copy_(pieces[rank])
            for name, b in part.named_buffers():
                b.copy_(full.get_buffer(name))
    return replica


def _gathered_rows(rows: torch.Tensor, total: int, world: int) -> torch.Tensor:
    """Every rank's row sums [its share of `total` rows] -> all `total` of them, in order, on every rank."""
    import torch.distributed as dist

    lengths = [len(c) for c in torch.chunk(torch.empty(total, device="meta"), world)]
    lengths += [0] * (world - len(lengths))
    width = max(lengths)
    padded = torch.zeros(width, dtype=rows.dtype, device=rows.device)
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, lengths)])


def sharded_score(model: nn.Module, plan: GroupPlan, calib, *, progress: bool, desc: str, checkpoint: bool,
                  device: torch.device, skip: frozenset[int] = frozenset()):
    """Scores of `plan`'s groups on `model`, its gradients taken on a sharded replica (see the module's note);
    the layers in `skip` are not scored (NaN), as in importance.score."""
    import torch.distributed as dist

    from gisp_fx.passes.importance import average_gradients, axis_sums, scores_from_axis_sums

    world = dist.get_world_size()
    replica = sharded_replica(model, device)
    grads, loss = average_gradients(replica, plan, calib, progress, desc, checkpoint=checkpoint,
                                    even_batches=True, skip=skip)
    per_axis: dict[tuple[str, Axis], np.ndarray] = {}
    with torch.no_grad():
        for name, (gw, gb) in grads.items():
            lin = replica.get_submodule(name)
            bias = lin.bias.to_local() if lin.bias is not None else None
            rows, cols = axis_sums(lin.weight.to_local(), bias, gw.to_local(), None if gb is None else gb.to_local())
            dist.all_reduce(cols, op=dist.ReduceOp.SUM)
            per_axis[(name, Axis.ROWS)] = _gathered_rows(rows, lin.weight.shape[0], world).cpu().numpy()
            per_axis[(name, Axis.COLS)] = cols.cpu().numpy()
    del grads, replica
    if not np.isfinite(loss):
        raise FloatingPointError(f"calibration loss is {loss}")
    return scores_from_axis_sums(plan, per_axis, loss, skip)
