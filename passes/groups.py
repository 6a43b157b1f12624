"""Captured -> GroupPlan: prunable groups found by propagating feature labels through the graph's data flow.

Each linear's output features get fresh integer labels. The graph runs once on its example input while a label
tensor rides beside every value: layout ops (view, transpose, slice, cat, expand, ...) move labels as they move
values, pointwise ops and reductions merge the labels they combine (union-find), and SDPA merges each head slot.
Afterwards a union-find class is a set of output rows and input columns that only make sense together: a query
head (q rows + o columns), a K/V group (k and v rows), an MLP channel (gate/up rows + a down column), or the
residual stream (never pruned). Nothing here knows module names or architectures.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from gisp_fx.errors import GispError
from gisp_fx.plan import AttentionBlock, Axis, GroupPlan, LayerPlan, LinearInfo, Member, MlpBlock
from gisp_fx.passes.capture import Captured
from gisp_fx.passes.labels import LabelInterpreter, LabelRun, SdpaSite


def find_groups(captured: Captured) -> GroupPlan:
    """Find query heads, K/V groups and MLP channels of every layer from the captured graph's data flow."""
    run = LabelRun()
    interp = LabelInterpreter(captured.module, run)
    with torch.no_grad():
        interp.run(*_flat_inputs(captured))
    return _build_plan(captured, run)


def _flat_inputs(captured: Captured):
    """The example inputs in the order of the unlifted graph's placeholders (named after the keyword inputs)."""
    return [captured.example[n.target] for n in captured.module.graph.nodes if n.op == "placeholder"]


def _build_plan(captured: Captured, run: LabelRun) -> GroupPlan:
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


def _merged_heads_reason(sd: SdpaSite, run: LabelRun) -> str:
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
