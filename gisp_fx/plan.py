"""GroupPlan: the prunable groups of a model, per layer, as plain data (JSON round-trip, no modules or nodes)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain

import numpy as np

PLAN_VERSION = 1


class Axis(enum.IntEnum):
    ROWS = 0  # output features: weight rows and bias entries
    COLS = 1  # input features: weight columns


@dataclass(frozen=True)
class LinearInfo:
    module: str
    in_features: int
    out_features: int
    bias: bool

    def params(self, axis: Axis, count: int) -> int:
        """Parameters held by `count` rows or columns of this linear."""
        if axis is Axis.ROWS:
            return count * (self.in_features + int(self.bias))
        return count * self.out_features


@dataclass(frozen=True)
class Member:
    """The indices, per group, that one linear contributes on one axis."""

    module: str
    axis: Axis
    index: tuple[tuple[int, ...], ...]

    @cached_property
    def sizes(self) -> np.ndarray:
        """Indices per group, as int64 (computed once: plans of 7B models hold ~10^4 groups per member)."""
        return np.fromiter(map(len, self.index), dtype=np.int64, count=len(self.index))

    @cached_property
    def grid(self) -> np.ndarray | None:
        """The indices as an int64 [groups, width] array when every group has the same width, else None."""
        sizes = self.sizes
        if not len(sizes) or not (sizes == sizes[0]).all():
            return None
        flat = np.fromiter(chain.from_iterable(self.index), dtype=np.int64, count=int(sizes.sum()))
        return flat.reshape(len(sizes), int(sizes[0]))

    def remapped(self, groups, kept) -> "Member":
        """This member restricted to `groups`, its indices renumbered to their positions in `kept` (the
        linear's indices that stay); KeyError when a group holds an index that is not kept."""
        kept = np.fromiter(kept, dtype=np.int64, count=len(kept))
        groups = np.fromiter(groups, dtype=np.int64, count=len(groups))
        grid = self.grid
        if grid is not None:
            old = grid[groups]
        else:
            old = np.fromiter(chain.from_iterable(self.index[g] for g in groups.tolist()), dtype=np.int64,
                              count=int(self.sizes[groups].sum()))
        position = np.full(max(kept.max(initial=-1), old.max(initial=-1)) + 1, -1, dtype=np.int64)
        position[kept] = np.arange(len(kept))
        new = position[old]
        if (new < 0).any():
            raise KeyError(int(old[new < 0][0]))
        if grid is not None:  # zip builds the tuples at C speed; the new grid is kept for the next step
            index = tuple(zip(*new.T.tolist())) if new.shape[1] else tuple(() for _ in groups)
            out = Member(self.module, self.axis, index)
            out.__dict__["grid"] = new
            return out
        vals, ends = new.tolist(), np.cumsum(self.sizes[groups]).tolist()
        return Member(self.module, self.axis,
                      tuple(tuple(vals[e - n : e]) for e, n in zip(ends, self.sizes[groups].tolist())))

    def to_json(self) -> dict:
        out = {"module": self.module, "axis": self.axis.name.lower(), "count": len(self.index)}
        affine = _affine(self.index)
        if affine is not None:
            out.update(start=affine[0], stride=affine[1], width=affine[2])
        else:
            out["index"] = [list(ix) for ix in self.index]
        return out

    @staticmethod
    def from_json(d: dict) -> "Member":
        if "index" in d:
            index = tuple(tuple(ix) for ix in d["index"])
        else:
            index = tuple(
                tuple(range(d["start"] + g * d["stride"], d["start"] + g * d["stride"] + d["width"]))
                for g in range(d["count"])
            )
        return Member(d["module"], Axis[d["axis"].upper()], index)


def _affine(index: tuple[tuple[int, ...], ...]) -> tuple[int, int, int] | None:
    """(start, stride, width) when group g holds start + g*stride + [0, width); None otherwise."""
    if not index or not index[0]:
        return None
    width, start = len(index[0]), index[0][0]
    stride = index[1][0] - start if len(index) > 1 else width
    for g, ix in enumerate(index):
        first = start + g * stride
        if len(ix) != width or ix != tuple(range(first, first + width)):
            return None
    return start, stride, width


@dataclass(frozen=True)
class AttentionBlock:
    """Query heads (q rows + o columns) and K/V groups (k and v rows) of one attention module."""

    module: str
    head_dim: int
    query: tuple[Member, ...]
    kv: tuple[Member, ...]
    kv_of_head: tuple[int, ...]  # query head -> K/V group
    # One query head per K/V group in the *original* model: a head's score then includes its k/v rows. A fact about
    # where the model came from, so it takes no part in comparing structures.
    mha: bool = field(compare=False)
    extra_params: int = 0  # parameters of the block outside every group (e.g. q/k norms): freed with the last head

    @property
    def num_heads(self) -> int:
        return len(self.kv_of_head)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv[0].index) if self.kv else 0

    def to_json(self) -> dict:
        return {
            "module": self.module, "head_dim": self.head_dim, "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads, "mha": self.mha, "kv_of_head": list(self.kv_of_head),
            "query": [m.to_json() for m in self.query], "kv": [m.to_json() for m in self.kv],
            "extra_params": self.extra_params,
        }

    @staticmethod
    def from_json(d: dict) -> "AttentionBlock":
        return AttentionBlock(
            d["module"], d["head_dim"], tuple(Member.from_json(m) for m in d["query"]),
            tuple(Member.from_json(m) for m in d["kv"]), tuple(d["kv_of_head"]), d["mha"], d["extra_params"],
        )


@dataclass(frozen=True)
class MlpBlock:
    """Intermediate channels: producer rows (gate/up) tied to consumer columns (down)."""

    module: str
    members: tuple[Member, ...]
    extra_params: int = 0  # parameters of the block outside every group: freed with the last channel

    @property
    def channels(self) -> int:
        return len(self.members[0].index) if self.members else 0

    def to_json(self) -> dict:
        return {"module": self.module, "channels": self.channels, "members": [m.to_json() for m in self.members],
                "extra_params": self.extra_params}

    @staticmethod
    def from_json(d: dict) -> "MlpBlock":
        return MlpBlock(d["module"], tuple(Member.from_json(m) for m in d["members"]), d["extra_params"])


@dataclass(frozen=True)
class LayerPlan:
    index: int
    module: str
    params: int  # all parameters of the decoder layer, prunable or not
    attention: AttentionBlock | None
    mlp: MlpBlock | None

    def to_json(self) -> dict:
        return {
            "index": self.index, "module": self.module, "params": self.params,
            "attention": self.attention.to_json() if self.attention else None,
            "mlp": self.mlp.to_json() if self.mlp else None,
        }

    @staticmethod
    def from_json(d: dict) -> "LayerPlan":
        return LayerPlan(
            d["index"], d["module"], d["params"],
            AttentionBlock.from_json(d["attention"]) if d["attention"] else None,
            MlpBlock.from_json(d["mlp"]) if d["mlp"] else None,
        )


@dataclass(frozen=True)
class GroupPlan:
    """Everything removable, per decoder layer, plus the linears left alone and why."""

    model_type: str
    hidden_size: int
    total_params: int
    layers: tuple[LayerPlan, ...]
    linears: tuple[LinearInfo, ...]
    kept: tuple[tuple[str, str], ...] = field(default=())  # (linear module, why it is not prunable)
    version: int = PLAN_VERSION

    @cached_property
    def _linear_index(self) -> dict[str, LinearInfo]:
        return {info.module: info for info in self.linears}

    def linear(self, module: str) -> LinearInfo:
        return self._linear_index[module]

    def unit_params(self, member: Member) -> int:
        """Parameters per index of `member` (a row: in_features + bias; a column: out_features)."""
        return self.linear(member.module).params(member.axis, 1)

    # -- parameter accounting -------------------------------------------------------------------------
    def member_params(self, member: Member, group: int) -> int:
        return self.linear(member.module).params(member.axis, len(member.index[group]))

    def head_params(self, block: AttentionBlock, head: int) -> int:
        """Parameters a query head's removal frees on its own (its q rows and o columns)."""
        return sum(self.member_params(m, head) for m in block.query)

    def kv_params(self, block: AttentionBlock, group: int) -> int:
        return sum(self.member_params(m, group) for m in block.kv)

    def channel_params(self, block: MlpBlock, channel: int) -> int:
        return sum(self.member_params(m, channel) for m in block.members)

    def layer_prunable_params(self, layer: LayerPlan) -> int:
        total = 0
        if layer.attention:
            a = layer.attention
            total += sum(self.head_params(a, h) for h in range(a.num_heads))
            total += sum(self.kv_params(a, g) for g in range(a.num_kv_heads))
        if layer.mlp:
            total += sum(self.channel_params(layer.mlp, c) for c in range(layer.mlp.channels))
        return total

    @property
    def decoder_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def prunable_params(self) -> int:
        return sum(self.layer_prunable_params(layer) for layer in self.layers)

    # -- JSON ------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "version": self.version, "model_type": self.model_type, "hidden_size": self.hidden_size,
            "total_params": self.total_params, "decoder_params": self.decoder_params,
            "prunable_params": self.prunable_params,
            "layers": [layer.to_json() for layer in self.layers],
            "linears": [vars(i) for i in self.linears],
            "kept": [{"module": m, "why": why} for m, why in self.kept],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    def summary(self) -> str:
        """One line: layers, heads, K/V heads and MLP channels in all, and the prunable share of the decoder."""
        heads = sum(l.attention.num_heads for l in self.layers if l.attention)
        kv = sum(l.attention.num_kv_heads for l in self.layers if l.attention)
        channels = sum(l.mlp.channels for l in self.layers if l.mlp)
        share = self.prunable_params / self.decoder_params if self.decoder_params else 0.0
        return (f"{self.model_type}: {len(self.layers)} layers, {heads} query heads, {kv} K/V heads, {channels} MLP "
                f"channels; {self.prunable_params:,} of {self.decoder_params:,} decoder parameters prunable "
                f"({100 * share:.1f} %), {self.total_params:,} in the model")

    @staticmethod
    def from_json(d: dict) -> "GroupPlan":
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')} is not {PLAN_VERSION}")
        return GroupPlan(
            d["model_type"], d["hidden_size"], d["total_params"],
            tuple(LayerPlan.from_json(x) for x in d["layers"]),
            tuple(LinearInfo(**x) for x in d["linears"]),
            tuple((k["module"], k["why"]) for k in d["kept"]),
        )


class Kind(enum.Enum):
    HEAD = "head"
    CHANNEL = "channel"


@dataclass(frozen=True)
class GroupRef:
    layer: int
    kind: Kind
    index: int  # in the plan the reference was made against


@dataclass(frozen=True)
class Selection:
    """Groups to remove in one step, weakest first, indexed against the plan they were selected from."""

    removed: tuple[GroupRef, ...]

    @cached_property
    def _by_layer(self) -> dict[tuple[int, Kind], set[int]]:
        out: dict[tuple[int, Kind], set[int]] = {}
        for g in self.removed:
            out.setdefault((g.layer, g.kind), set()).add(g.index)
        return out

    def of(self, layer: int, kind: Kind) -> set[int]:
        return set(self._by_layer.get((layer, kind), ()))


class Alive:
    """Original indices of the groups still in the model, per layer: maps a shrunk plan's indices back to the
    plan the run started from, and forward again.

    Sorted int64 arrays (a 7B model has ~3.5 * 10^5 groups): lookups index them, removal is one mask per layer.
    """

    def __init__(self, plan: GroupPlan):
        self.heads = [np.arange(l.attention.num_heads if l.attention else 0, dtype=np.int64) for l in plan.layers]
        self.channels = [np.arange(l.mlp.channels if l.mlp else 0, dtype=np.int64) for l in plan.layers]

    def original(self, ref: GroupRef) -> GroupRef:
        ids = self.heads if ref.kind is Kind.HEAD else self.channels
        return GroupRef(ref.layer, ref.kind, int(ids[ref.layer][ref.index]))

    def current(self, ref: GroupRef) -> GroupRef:
        ids = (self.heads if ref.kind is Kind.HEAD else self.channels)[ref.layer]
        at = int(np.searchsorted(ids, ref.index))
        if at >= len(ids) or ids[at] != ref.index:
            raise ValueError(f"{ref} is no longer in the model")
        return GroupRef(ref.layer, ref.kind, at)

    def remove(self, refs) -> None:
        gone: dict[tuple[int, Kind], list[int]] = {}
        for ref in refs:
            gone.setdefault((ref.layer, ref.kind), []).append(ref.index)
        for (layer, kind), ids in gone.items():
            table = self.heads if kind is Kind.HEAD else self.channels
            keep = ~np.isin(table[layer], ids)
            if len(table[layer]) - int(keep.sum()) != len(set(ids)):
                raise ValueError(f"layer {layer}: some of the {kind.value}s {sorted(ids)} are not in the model")
            table[layer] = table[layer][keep]


class FreedParams:
    """Parameters freed by removing groups one by one (a K/V group's rows count once its last head goes)."""

    def __init__(self, plan: GroupPlan):
        self.plan = plan
        self.alive_in_kv: dict[tuple[int, int], int] = {}
        for layer in plan.layers:
            if layer.attention is not None:
                for g in layer.attention.kv_of_head:
                    key = (layer.index, g)
                    self.alive_in_kv[key] = self.alive_in_kv.get(key, 0) + 1

    def cost(self, ref: GroupRef) -> int:
        layer = self.plan.layers[ref.layer]
        if ref.kind is Kind.CHANNEL:
            return self.plan.channel_params(layer.mlp, ref.index)
        a = layer.attention
        g = a.kv_of_head[ref.index]
        last = self.alive_in_kv[(ref.layer, g)] == 1
        return self.plan.head_params(a, ref.index) + (self.plan.kv_params(a, g) if last else 0)

    def remove(self, ref: GroupRef) -> int:
        params = self.cost(ref)
        if ref.kind is Kind.HEAD:
            self.alive_in_kv[(ref.layer, self.plan.layers[ref.layer].attention.kv_of_head[ref.index])] -= 1
        return params


def freed_params(plan: GroupPlan, selection: Selection) -> int:
    freed = FreedParams(plan)
    return sum(freed.remove(ref) for ref in selection.removed)
