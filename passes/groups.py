"""Captured -> GroupPlan: prunable groups found by propagating feature labels through the graph's data flow.

Each linear's output features get fresh integer labels. The graph runs once on its example input while a label
tensor rides beside every value: layout ops (view, transpose, slice, cat, expand, ...) move labels as they move
values, pointwise ops and reductions merge the labels they combine (union-find), and SDPA merges each head slot.
Afterwards a union-find class is a set of output rows and input columns that only make sense together: a query
head (q rows + o columns), a K/V group (k and v rows), an MLP channel (gate/up rows + a down column), or the
residual stream (never pruned). Nothing here knows module names or architectures.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from gisp_fx.errors import GispError
from gisp_fx.plan import AttentionBlock, Axis, GroupPlan, LayerPlan, LinearInfo, Member, MlpBlock
from gisp_fx.passes.capture import LINEAR, Captured

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


class _UnionFind:
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
class _Sdpa:
    node: str
    module: str
    head_dim: int
    query_roots: list[int | None]
    kv_roots: list[int | None]  # per key slot
    head_ids: torch.Tensor
    enable_gqa: bool
    query_ids: list[np.ndarray]  # per query slot: the (unmerged) labels it carries, to name what merges heads


@dataclass
class _Run:
    uf: _UnionFind = field(default_factory=_UnionFind)
    row_ids: dict[str, torch.Tensor] = field(default_factory=dict)  # linear node -> label of each output row
    col_labels: dict[str, torch.Tensor | None] = field(default_factory=dict)  # linear node -> input label
    sdpas: list[_Sdpa] = field(default_factory=list)
    mixed: dict[int, str] = field(default_factory=dict)  # label -> node whose op mixed it beyond analysis
    in_features: dict[str, int] = field(default_factory=dict)  # linear node -> its weight's input width
    reductions: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (op, the labels one output merged)
    outputs: list[torch.Tensor] = field(default_factory=list)  # labels of the graph's outputs


class _LabelInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, run: _Run):
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
        run.sdpas.append(_Sdpa(n.name, module, value.shape[-1], query_roots, kv_roots, head_ids, gqa, query_ids))
        return head_ids.view(1, nq, 1, 1).expand(value.shape)


def find_groups(captured: Captured) -> GroupPlan:
    """Find query heads, K/V groups and MLP channels of every layer from the captured graph's data flow."""
    run = _Run()
    interp = _LabelInterpreter(captured.module, run)
    with torch.no_grad():
        interp.run(*_flat_inputs(captured))
    return _build_plan(captured, run)


def _flat_inputs(captured: Captured):
    """The example inputs in the order of the unlifted graph's placeholders (named after the keyword inputs)."""
    return [captured.example[n.target] for n in captured.module.graph.nodes if n.op == "placeholder"]


def _build_plan(captured: Captured, run: _Run) -> GroupPlan:
    uf = run.uf
    by_node = {ln.node: ln for ln in captured.linears}
    modules_of = {ln.node: ln.module for ln in captured.linears}
    infos: dict[str, LinearInfo] = {}
    for ln in captured.linears:
        out_f = len(run.row_ids[ln.node])
        infos[ln.module] = LinearInfo(ln.module, run.in_features[ln.node], out_f, ln.bias is not None)
    mixed_roots = {int(uf.find(np.array([i]))[0]): where for i, where in run.mixed.items()}

    # Per linear: the class of each output row, and of each input column (None when unlabelled or mixed).
    row_root = {node: uf.find(ids.numpy()) for node, ids in run.row_ids.items()}
    col_root: dict[str, list[int | None]] = {}
    for node, lab in run.col_labels.items():
        if lab is None:
            col_root[node] = [None] * infos[modules_of[node]].in_features
            continue
        flat = lab.reshape(int(np.prod(lab.shape[:-1])), lab.shape[-1]).numpy()
        roots = uf.find(np.where(flat >= 0, flat, 0))
        whole = (flat >= 0).all(axis=0) & (roots == roots[:1]).all(axis=0)
        col_root[node] = [int(r) if ok else None for r, ok in zip(roots[0], whole)]
    rows_by_root: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    cols_by_root: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for node, roots in row_root.items():
        for i, r in enumerate(roots.tolist()):
            rows_by_root[r][node].append(i)
    for node, roots in col_root.items():
        for c, r in enumerate(roots):
            if r is not None:
                cols_by_root[r][node].append(c)

    def rows_in(root: int):
        return [(node, tuple(ix)) for node, ix in rows_by_root.get(root, {}).items()]

    def cols_in(root: int):
        return [(node, tuple(ix)) for node, ix in cols_by_root.get(root, {}).items()]

    covered: dict[str, set[Axis]] = defaultdict(set)
    blocks: list[tuple[int, str, object]] = []  # (graph position, block module, block)
    order = {n.name: i for i, n in enumerate(captured.module.graph.nodes)}
    claimed: set[int] = set()
    kept_why: dict[str, str] = {}  # linear -> why it is kept whole although it sits in a decoder layer

    for sd in run.sdpas:
        if any(r is None for r in sd.query_roots) or any(r is None for r in sd.kv_roots):
            continue  # its linears stay unplaced and are reported below
        head_roots = [int(uf.find(sd.head_ids[j : j + 1].numpy())[0]) for j in range(len(sd.head_ids))]
        kv_unique: list[int] = []
        for r in sd.kv_roots:
            root = int(uf.find(np.array([r]))[0])
            if root not in kv_unique:
                kv_unique.append(root)
        nq, nslots = len(head_roots), len(sd.kv_roots)
        if nslots == nq:
            kv_of_head = [kv_unique.index(int(uf.find(np.array([r]))[0])) for r in sd.kv_roots]
        elif nslots == 1:  # one K/V head broadcast over every query head (multi-query attention)
            kv_of_head = [0] * nq
        elif sd.enable_gqa and nq % nslots == 0:
            kv_of_head = [kv_unique.index(int(uf.find(np.array([sd.kv_roots[j // (nq // nslots)]]))[0]))
                          for j in range(nq)]
        else:
            continue
        if set(head_roots) & mixed_roots.keys() or set(kv_unique) & mixed_roots.keys():
            continue
        if len(set(head_roots)) < nq or set(head_roots) & set(kv_unique):
            # Groups must be disjoint: an op spanning several heads makes them one class, not removable one by one.
            why = _merged_heads_reason(sd, run)
            for r in set(head_roots) | set(kv_unique):
                for node, _ in list(rows_in(r)) + list(cols_in(r)):
                    kept_why.setdefault(modules_of[node], why)
            claimed.update(head_roots, kv_unique)
            continue
        query = _members([list(rows_in(r)) + [(n, c, Axis.COLS) for n, c in cols_in(r)] for r in head_roots],
                         modules_of)
        kv = _members([list(rows_in(r)) for r in kv_unique], modules_of)
        if query is None or kv is None or any(list(cols_in(r)) for r in kv_unique):
            continue
        block = AttentionBlock(sd.module, sd.head_dim, query, kv, tuple(kv_of_head), mha=len(kv_unique) == nq,
                               extra_params=_extra_params(captured, sd.module, query + kv))
        for m in query + kv:
            covered[m.module].add(m.axis)
        claimed.update(head_roots, kv_unique)
        blocks.append((order[sd.node], sd.module, block))

    # MLP: a consumer linear whose every input column is its own class, fed by producer rows only.
    for node, roots in col_root.items():
        if any(r is None for r in roots) or len(set(roots)) != len(roots) or set(roots) & claimed:
            continue
        if set(roots) & mixed_roots.keys():
            continue
        groups = []
        for r in roots:
            rows = list(rows_in(r))
            cols = list(cols_in(r))
            if not rows or len(cols) != 1 or cols[0][0] != node:
                break
            groups.append(rows + [(node, cols[0][1], Axis.COLS)])
        else:
            members = _members(groups, modules_of)
            if members is None:
                continue
            producers = {m.module for m in members if m.axis is Axis.ROWS}
            if any(sum(len(ix) for ix in m.index) != infos[m.module].out_features
                   for m in members if m.axis is Axis.ROWS):
                continue  # a producer with rows outside these channels is not an MLP input
            module = _common_prefix([m.module for m in members])
            for m in members:
                covered[m.module].add(m.axis)
            claimed.update(roots)
            first = min(order[n] for n, ln in by_node.items() if ln.module in producers | {modules_of[node]})
            blocks.append((first, module, MlpBlock(module, members, _extra_params(captured, module, members))))

    kept, unplaced = [], []
    consumed = {r for roots in col_root.values() for r in roots if r is not None}
    graph_out = set()
    for lab in run.outputs:
        ids = lab.reshape(-1).numpy()
        graph_out.update(uf.find(ids[ids >= 0]).tolist())
    for ln in captured.linears:
        info = infos[ln.module]
        if covered[ln.module] or 0 in (info.in_features, info.out_features):
            continue  # grouped, or emptied to zero width by an earlier rewrite (no features left to group)
        if ln.module in kept_why:
            if (ln.module, kept_why[ln.module]) not in kept:
                kept.append((ln.module, kept_why[ln.module]))
            continue
        rows = set(row_root[ln.node].tolist())
        if rows <= graph_out and not rows & consumed and not rows & mixed_roots.keys():
            kept.append((ln.module, "output projection: its outputs are the model's outputs"))
            continue
        unplaced.append(f"{ln.module} ({info.in_features}->{info.out_features})")
    if unplaced:
        mixers = sorted(set(mixed_roots.values()))
        raise GispError(
            "analysis: these linears could not be placed in a prunable group: " + "; ".join(unplaced)
            + (". Their features pass through ops this pass does not model: " + ", ".join(mixers) if mixers else
               ". Their features do not pair up with another linear")
            + ". gisp-fx does not guess: report the architecture, or prune a model whose graph it understands."
        )
    if not blocks:
        raise GispError("analysis: no attention heads or MLP channels found in the captured graph")
    return GroupPlan(
        model_type=captured.model_type, hidden_size=captured.hidden_size,
        total_params=sum(captured.param_numel.values()),
        layers=_layers(blocks, captured), linears=tuple(infos.values()), kept=tuple(kept),
    )


def _extra_params(captured: Captured, block: str, members) -> int:
    """Parameters under `block` that belong to none of its member linears (norms inside attention, say)."""
    if block in captured.layers:
        return 0  # the block has no module of its own (OPT's fc1/fc2 sit in the decoder layer): nothing extra
    linears = {m.module for m in members}
    return sum(n for name, n in captured.param_numel.items()
               if name.startswith(block + ".") and name.rsplit(".", 1)[0] not in linears)


def _members(groups: list[list[tuple]], modules_of: dict[str, str]) -> tuple[Member, ...] | None:
    """Per-group (node, indices[, axis]) lists -> one Member per (linear, axis); None if groups differ in linears."""
    keyed: list[dict[tuple[str, Axis], tuple[int, ...]]] = []
    for g in groups:
        d = {}
        for entry in g:
            node, ix = entry[0], entry[1]
            axis = entry[2] if len(entry) > 2 else Axis.ROWS
            d[(modules_of[node], axis)] = tuple(ix)
        keyed.append(d)
    if not keyed or any(set(d) != set(keyed[0]) for d in keyed):
        return None
    return tuple(Member(mod, axis, tuple(d[(mod, axis)] for d in keyed)) for mod, axis in keyed[0])


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _merged_heads_reason(sd: _Sdpa, run: _Run) -> str:
    """Why the heads of `sd` form one group: the first reduction whose output merged labels of two query heads."""
    for op, ids in run.reductions:
        if sum(bool(np.intersect1d(ids, q).size) for q in sd.query_ids) >= 2:
            return (f"its {len(sd.query_ids)} attention heads form one group: {op} spans more than one head, so "
                    "heads cannot be removed one at a time; the attention is kept whole")
    return (f"its {len(sd.query_ids)} attention heads form one group (an op between the projections and "
            f"'{sd.node}' spans more than one head), so heads cannot be removed one at a time")


def _owner(module: str, layers: tuple[str, ...]) -> str | None:
    return next((name for name in layers if module == name or module.startswith(name + ".")), None)


def _layers(blocks, captured: Captured) -> tuple[LayerPlan, ...]:
    """One LayerPlan per decoder layer of the model, in order, empty ones included (both blocks pruned away)."""
    slots = {name: {"attention": None, "mlp": None} for name in captured.layers}
    for _, module, block in sorted(blocks, key=lambda b: b[0]):
        owner = _owner(module, captured.layers)
        if owner is None:
            raise GispError(f"analysis: block '{module}' lies outside the decoder layers ('{captured.layers[0]}' ..."
                            f" '{captured.layers[-1]}'); gisp-fx prunes heads and channels inside decoder layers only")
        key = "attention" if isinstance(block, AttentionBlock) else "mlp"
        if slots[owner][key] is not None:
            raise GispError(f"analysis: decoder layer '{owner}' holds two {key} blocks ('{slots[owner][key].module}' "
                            f"and '{module}'); one attention and one MLP per layer expected")
        slots[owner][key] = block
    layers = []
    for i, name in enumerate(captured.layers):
        params = sum(n for pname, n in captured.param_numel.items() if pname.startswith(name + "."))
        layers.append(LayerPlan(i, name, params, slots[name]["attention"], slots[name]["mlp"]))
    return tuple(layers)
