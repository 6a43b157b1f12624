"""GraphModule + example inputs -> label classes: feature labels propagated through the graph's data flow.

The label interpreter of the group analysis (passes/groups.py reads its result): each linear's output features
get fresh integer labels; layout ops move labels as they move values, pointwise ops and reductions merge the labels
they combine (union-find), SDPA merges each head slot, and ops it does not model mix everything they touch.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch

from gisp_fx.passes.capture import LINEAR

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
# Ops that only move elements: applying them to the label tensor moves the labels the same way.
LAYOUT = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default,
    aten.slice.Tensor, aten.select.int, aten.cat.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.unbind.int, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.t.default, aten.index_select.default, aten.flatten.using_ints, aten.unflatten.int, aten.detach.default,
    aten.narrow.default, aten.repeat_interleave.self_int, aten.stack.default, aten.index.Tensor,
    aten.unfold.default, aten.broadcast_to.default,
}
# Ops that change dtype/device only: labels pass unchanged.
IDENTITY = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default,
    aten.dropout.default, aten.lift_fresh_copy.default,
}
NO_VALUE = {aten._assert_tensor_metadata.default}
# Ops whose output does not depend on their input's values.
CONSTANT_LIKE = {aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
                 aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default}


class UnionFind:
    def __init__(self) -> None:
        self.parent = np.zeros(0, dtype=np.int64)

    def fresh(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent = np.concatenate([self.parent, np.arange(start, start + n, dtype=np.int64)])
        return torch.arange(start, start + n, dtype=torch.int64)

    def find(self, ids: np.ndarray) -> np.ndarray:
        roots = self.parent[ids]
        while True:
            up = self.parent[roots]
            if np.array_equal(up, roots):
                return roots
            roots = up

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge a[i] with b[i] for every i (entries < 0 mean 'no label' and are skipped)."""
        keep = (a >= 0) & (b >= 0)
        a, b = a[keep], b[keep]
        while len(a):
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            ra, rb = ra[differ], rb[differ]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            self.parent[hi] = lo  # conflicting writes resolve on the next round
            # compress so that the next find is short
            self.parent[: len(self.parent)] = self.parent[self.parent]
            a, b = lo, hi


@dataclass
class SdpaSite:
    node: str
    module: str
    head_dim: int
    query_roots: list[int | None]
    kv_roots: list[int | None]  # per key slot
    head_ids: torch.Tensor
    enable_gqa: bool
    query_ids: list[np.ndarray]  # per query slot: the (unmerged) labels it carries, to name what merges heads


@dataclass
class LabelRun:
    uf: UnionFind = field(default_factory=UnionFind)
    row_ids: dict[str, torch.Tensor] = field(default_factory=dict)  # linear node -> label of each output row
    col_labels: dict[str, torch.Tensor | None] = field(default_factory=dict)  # linear node -> input label
    sdpas: list[SdpaSite] = field(default_factory=list)
    mixed: dict[int, str] = field(default_factory=dict)  # label -> node whose op mixed it beyond analysis
    in_features: dict[str, int] = field(default_factory=dict)  # linear node -> its weight's input width
    reductions: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (op, the labels one output merged)
    outputs: list[torch.Tensor] = field(default_factory=list)  # labels of the graph's outputs


class LabelInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, run: LabelRun):
        super().__init__(gm)
        self.run_state = run
        self.labels: dict[torch.fx.Node, object] = {}

    def run_node(self, n: torch.fx.Node):
        value = super().run_node(n)
        if n.op == "call_function":
            self.labels[n] = self._label(n, value)
        elif n.op == "output":
            for arg in torch.utils._pytree.tree_leaves(n.args):
                lab = self.labels.get(arg) if isinstance(arg, torch.fx.Node) else None
                if isinstance(lab, torch.Tensor):
                    self.run_state.outputs.append(lab)
        return value

    # -- helpers ----------------------------------------------------------------------------------------
    def _tensor_inputs(self, n: torch.fx.Node):
        out = []
        for arg in list(n.args) + list(n.kwargs.values()):
            for a in arg if isinstance(arg, (list, tuple)) else [arg]:
                if isinstance(a, torch.fx.Node) and isinstance(self.env.get(a), torch.Tensor):
                    out.append((a, self.env[a], self.labels.get(a)))
        return out

    def _swap(self, obj):
        """Replace tensor-valued nodes by their labels (or -1 filled tensors) and others by their values."""
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._swap(o) for o in obj)
        if isinstance(obj, torch.fx.Node):
            value = self.env[obj]
            label = self.labels.get(obj)
            if isinstance(label, torch.Tensor):
                return label
            if isinstance(value, torch.Tensor) and value.is_floating_point():  # unlabelled data
                return torch.full(value.shape, -1, dtype=torch.int64)
            return value  # sizes, and integer tensors used as indices
        return obj

    # -- the rules --------------------------------------------------------------------------------------
    def _label(self, n: torch.fx.Node, value):
        run = self.run_state
        inputs = self._tensor_inputs(n)
        labelled = [(node, v, lab) for node, v, lab in inputs if isinstance(lab, torch.Tensor)]
        if n.target is LINEAR:
            x = n.args[0]
            run.col_labels[n.name] = self.labels.get(x) if isinstance(self.labels.get(x), torch.Tensor) else None
            run.in_features[n.name] = int(self.env[n.args[1]].shape[-1])
            ids = run.uf.fresh(value.shape[-1])
            run.row_ids[n.name] = ids
            return ids.expand(value.shape)
        if n.target is SDPA:
            return self._sdpa(n, value)
        if n.target is operator.getitem:
            source = self.labels.get(n.args[0])
            return source[n.args[1]] if isinstance(source, (list, tuple)) else None
        if not labelled:
            return None
        if n.target in NO_VALUE or n.target in CONSTANT_LIKE:
            return None
        if n.target in IDENTITY:
            return labelled[0][2] if n.args and n.args[0] is labelled[0][0] else None
        if n.target in LAYOUT:
            args = self._swap(n.args)
            kwargs = {k: self._swap(v) for k, v in n.kwargs.items()}
            return n.target(*args, **kwargs)
        tags = getattr(n.target, "tags", ())
        if torch.Tag.pointwise in tags and isinstance(value, torch.Tensor):
            return self._pointwise(labelled, value)
        if torch.Tag.reduction in tags and isinstance(value, torch.Tensor):
            return self._reduction(n, labelled, value)
        self._mix(n, labelled)
        return None

    def _pointwise(self, labelled, value: torch.Tensor) -> torch.Tensor:
        uf = self.run_state.uf
        shaped = [lab.expand(value.shape) for _, _, lab in labelled if lab.dim() <= value.dim()]
        out = shaped[0].clone()
        for other in shaped[1:]:
            a, b = out.reshape(-1).numpy(), other.reshape(-1).numpy()
            uf.union(a.copy(), b.copy())
            out = torch.where(out >= 0, out, other)
        return out

    def _reduction(self, n: torch.fx.Node, labelled, value: torch.Tensor) -> torch.Tensor | None:
        _, source_value, lab = labelled[0]
        dims = n.args[1] if len(n.args) > 1 else None
        if dims is None or dims == []:
            dims = list(range(lab.dim()))
        dims = [d % lab.dim() for d in ([dims] if isinstance(dims, int) else dims)]
        keep = [d for d in range(lab.dim()) if d not in dims]
        moved = lab.permute(*keep, *dims).reshape(*[lab.shape[d] for d in keep], -1)
        first = moved[..., :1].expand(moved.shape)
        self.run_state.uf.union(first.reshape(-1).numpy().copy(), moved.reshape(-1).numpy().copy())
        one = moved.reshape(-1, moved.shape[-1])[0].numpy() if moved.numel() else np.zeros(0, np.int64)
        stack = n.meta.get("nn_module_stack") or {}
        where = list(stack.values())[-1][0] if stack else "?"
        self.run_state.reductions.append((f"{n.target} at node '{n.name}' in '{where}'", np.unique(one[one >= 0])))
        reduced = moved[..., 0]
        if value.dim() == lab.dim():  # keepdim
            for d in sorted(dims):
                reduced = reduced.unsqueeze(d)
        return reduced.expand(value.shape) if reduced.dim() == value.dim() else None

    def _mix(self, n: torch.fx.Node, labelled) -> None:
        """An op this pass does not model: everything it touched is merged and marked unanalysable."""
        ids = np.concatenate([lab.reshape(-1).numpy() for _, _, lab in labelled])
        ids = np.unique(ids[ids >= 0])
        if len(ids):
            self.run_state.uf.union(np.full(len(ids), ids[0]), ids)
            self.run_state.mixed[int(ids[0])] = f"{n.name} ({n.target})"

    def _sdpa(self, n: torch.fx.Node, value: torch.Tensor) -> torch.Tensor:
        run = self.run_state
        q, k, v = (self.labels.get(a) for a in n.args[:3])
        stack = n.meta.get("nn_module_stack") or {}
        module = list(stack.values())[-1][0] if stack else n.name

        def slot_roots(lab, slots):
            roots = []
            for j in range(slots):
                ids = lab[:, j].reshape(-1).numpy() if isinstance(lab, torch.Tensor) else np.zeros(0, np.int64)
                ids = np.unique(ids[ids >= 0])
                if not len(ids):
                    roots.append(None)
                    continue
                run.uf.union(np.full(len(ids), ids[0]), ids)
                roots.append(int(ids[0]))
            return roots

        nq, nk = self.env[n.args[0]].shape[1], self.env[n.args[1]].shape[1]
        query_roots = slot_roots(q, nq)
        key_roots, value_roots = slot_roots(k, nk), slot_roots(v, nk)
        for kr, vr in zip(key_roots, value_roots):
            if kr is not None and vr is not None:
                run.uf.union(np.array([kr]), np.array([vr]))
        kv_roots = [kr if kr is not None else vr for kr, vr in zip(key_roots, value_roots)]
        head_ids = run.uf.fresh(nq)
        for j, r in enumerate(query_roots):
            if r is not None:
                run.uf.union(np.array([int(head_ids[j])]), np.array([r]))
        gqa = bool(n.kwargs.get("enable_gqa", n.args[7] if len(n.args) > 7 else False))
        query_ids = [np.unique(ids[ids >= 0]) for ids in
                     (q[:, j].reshape(-1).numpy() if isinstance(q, torch.Tensor) else np.zeros(0, np.int64)
                      for j in range(nq))]
        run.sdpas.append(SdpaSite(n.name, module, value.shape[-1], query_roots, kv_roots, head_ids, gqa, query_ids))
        return head_ids.view(1, nq, 1, 1).expand(value.shape)
