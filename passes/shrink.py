"""(model, GroupPlan, Selection) -> the physically smaller model and its GroupPlan; linears sliced in place."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from gisp_fx.modeling_gisp import (
    LINEARIZED_ATTR,
    EmptyBlock,
    _set_module,
    base_implementation,
    configure_attention_,
    set_attention_impl_,
)
from gisp_fx.plan import Axis, GroupPlan, Kind, LayerPlan, LinearInfo, Member, Selection


@dataclass(frozen=True)
class Rewrite:
    """What `shrink_` does, computed without touching a model."""

    plan: GroupPlan  # the plan of the smaller model
    keep: dict[tuple[str, Axis], tuple[int, ...]] = field(default_factory=dict)  # kept indices per linear axis
    attention: dict[str, tuple[int, int, tuple[int, ...]]] = field(default_factory=dict)  # heads, kv heads, kv map
    mlp: dict[str, int] = field(default_factory=dict)  # channels left
    empty: dict[str, str] = field(default_factory=dict)  # block module -> "attention" | "mlp"


def _remap(member: Member, groups: list[int], kept: tuple[int, ...]) -> Member:
    return member.remapped(groups, kept)


def restrict(plan: GroupPlan, selection: Selection) -> Rewrite:
    """The rewrite that removes `selection` from a model described by `plan`."""
    removed_idx: dict[tuple[str, Axis], set[int]] = {}
    layers, rewrite_attention, rewrite_mlp, empty = [], {}, {}, {}
    freed_total = 0

    def drop(members, groups):
        for m in members:
            bucket = removed_idx.setdefault((m.module, m.axis), set())
            for g in groups:
                bucket.update(m.index[g])

    for layer in plan.layers:
        a, mlp = layer.attention, layer.mlp
        heads_out = selection.of(layer.index, Kind.HEAD)
        channels_out = selection.of(layer.index, Kind.CHANNEL)
        freed = 0
        if a is not None and heads_out:
            kept_heads = [h for h in range(a.num_heads) if h not in heads_out]
            kept_kv = sorted({a.kv_of_head[h] for h in kept_heads})
            gone_kv = [g for g in range(a.num_kv_heads) if g not in kept_kv]
            drop(a.query, sorted(heads_out))
            drop(a.kv, gone_kv)
            freed += sum(plan.head_params(a, h) for h in heads_out) + sum(plan.kv_params(a, g) for g in gone_kv)
            freed += a.extra_params if not kept_heads else 0
        if mlp is not None and channels_out:
            drop(mlp.members, sorted(channels_out))
            freed += sum(plan.channel_params(mlp, c) for c in channels_out)
            freed += mlp.extra_params if len(channels_out) == mlp.channels else 0
        layers.append((layer, heads_out, channels_out, freed))
        freed_total += freed

    keep = {}
    for (module, axis), gone in removed_idx.items():
        info = plan.linear(module)
        size = info.out_features if axis is Axis.ROWS else info.in_features
        stays = np.ones(size, dtype=bool)
        stays[np.fromiter(gone, np.int64, len(gone))] = False
        keep[(module, axis)] = tuple(np.flatnonzero(stays).tolist())

    new_layers = []
    for layer, heads_out, channels_out, freed in layers:
        a, mlp = layer.attention, layer.mlp
        if a is not None and heads_out:
            kept_heads = [h for h in range(a.num_heads) if h not in heads_out]
            if not kept_heads:
                empty[a.module] = "attention"
                a = None
            else:
                kept_kv = sorted({a.kv_of_head[h] for h in kept_heads})
                kv_map = tuple(kept_kv.index(a.kv_of_head[h]) for h in kept_heads)
                a = replace(
                    a,
                    query=tuple(_remap(m, kept_heads, keep[(m.module, m.axis)]) for m in a.query),
                    kv=tuple(_remap(m, kept_kv, keep.get((m.module, m.axis), _all(plan, m))) for m in a.kv),
                    kv_of_head=kv_map,
                )
                rewrite_attention[a.module] = (len(kept_heads), len(kept_kv), kv_map)
        if mlp is not None and channels_out:
            kept_channels = [c for c in range(mlp.channels) if c not in channels_out]
            if not kept_channels:
                if mlp.module != layer.module:
                    empty[mlp.module] = "mlp"
                # else the MLP has no module of its own (OPT's fc1/fc2 sit in the decoder layer): its linears stay,
                # zero channels wide; fc2 then adds only its bias, as an emptied MLP should
                mlp = None
            else:
                mlp = replace(mlp, members=tuple(_remap(m, kept_channels, keep[(m.module, m.axis)])
                                                 for m in mlp.members))
                rewrite_mlp[mlp.module] = len(kept_channels)
        new_layers.append(LayerPlan(layer.index, layer.module, layer.params - freed, a, mlp))

    linears = []
    for info in plan.linears:
        if any(info.module.startswith(block + ".") for block in empty):
            continue  # the whole block is replaced by an EmptyBlock: its linears leave the model
        rows = keep.get((info.module, Axis.ROWS))
        cols = keep.get((info.module, Axis.COLS))
        linears.append(LinearInfo(info.module, len(cols) if cols is not None else info.in_features,
                                  len(rows) if rows is not None else info.out_features, info.bias))
    new_plan = replace(plan, layers=tuple(new_layers), linears=tuple(linears),
                       total_params=plan.total_params - freed_total)
    return Rewrite(new_plan, keep, rewrite_attention, rewrite_mlp, empty)


def _all(plan: GroupPlan, m: Member) -> tuple[int, ...]:
    info = plan.linear(m.module)
    return tuple(range(info.out_features if m.axis is Axis.ROWS else info.in_features))


def shrink_(model: nn.Module, plan: GroupPlan, selection: Selection) -> GroupPlan:
    """Physically remove `selection` from `model` (in place); returns the plan of the smaller model."""
    rw = restrict(plan, selection)
    with torch.no_grad():
        for (module, axis), kept in rw.keep.items():
            lin = model.get_submodule(module)
            idx = torch.tensor(kept, dtype=torch.long, device=lin.weight.device)
            lin.weight = nn.Parameter(lin.weight.index_select(int(axis), idx).clone(),
                                      requires_grad=lin.weight.requires_grad)
            if axis is Axis.ROWS:
                lin.out_features = len(kept)
                if lin.bias is not None:
                    lin.bias = nn.Parameter(lin.bias.index_select(0, idx).clone(), requires_grad=lin.bias.requires_grad)
            else:
                lin.in_features = len(kept)
    structure = structure_of(model)
    for name, (heads, kv_heads, kv_map) in rw.attention.items():
        configure_attention_(model.get_submodule(name), heads, kv_heads, list(kv_map))
        structure["attention"][name] = {"num_heads": heads, "num_kv_heads": kv_heads, "kv_map": list(kv_map)}
    for name, channels in rw.mlp.items():
        structure["mlp"][name] = channels
    for name, kind in rw.empty.items():
        block = model.get_submodule(name)
        out_name = _output_linear(plan, name)
        out = model.get_submodule(out_name) if out_name else None
        bias = out.bias.detach().clone() if out is not None and out.bias is not None else None
        hidden = plan.hidden_size
        like = next(block.parameters())  # the stub's bias takes the model's device and dtype (bf16 stays bf16)
        new = EmptyBlock(hidden, bias is not None, kind == "attention", block).to(device=like.device, dtype=like.dtype)
        if bias is not None:
            new.out_bias.data.copy_(bias)
        _set_module(model, name, new)
        structure["empty"][name] = {"kind": kind, "hidden_size": hidden, "bias": bias is not None}
        structure["attention"].pop(name, None)
        structure["mlp"].pop(name, None)
    for name in list(structure["linears"]):
        if any(name.startswith(e + ".") for e in structure["empty"]):
            del structure["linears"][name]
    for (module, _axis) in rw.keep:
        if not any(module.startswith(e + ".") for e in structure["empty"]):
            lin = model.get_submodule(module)
            structure["linears"][module] = [lin.in_features, lin.out_features, lin.bias is not None]
    model.config.gisp = structure
    set_attention_impl_(model, structure["base_attention"])
    return rw.plan


def _output_linear(plan: GroupPlan, block: str) -> str | None:
    """The block's output-side linear (o_proj / down_proj): the one whose columns its groups hold."""
    for layer in plan.layers:
        for b, members in ((layer.attention, layer.attention.query if layer.attention else ()),
                           (layer.mlp, layer.mlp.members if layer.mlp else ())):
            if b is not None and b.module == block:
                return next((m.module for m in members if m.axis is Axis.COLS), None)
    return None


def structure_of(model: nn.Module) -> dict:
    """The model's config.gisp, or a fresh empty structure for a model not yet pruned."""
    existing = getattr(model.config, "gisp", None)
    if existing:
        return existing
    base = base_implementation(model.config._attn_implementation)
    return {"base_attention": base, "linears": {}, "attention": {}, "mlp": {}, "empty": {},
            "linearized": list(getattr(model, LINEARIZED_ATTR, ()))}
