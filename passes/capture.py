"""nn.Module -> Captured: a torch.export program (dynamic batch and sequence) with every linear tied to its module."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.export import Dim, ExportedProgram

from gisp_fx.errors import GispError
from gisp_fx.modeling_gisp import PREFIX, gisp_implementation

LINEAR = torch.ops.aten.linear.default


@dataclass(frozen=True)
class LinearNode:
    node: str  # node name in `Captured.module` (the unlifted graph)
    module: str  # dotted name of the nn.Linear that ran it
    weight: str  # dotted name of its weight parameter (differs from module when weights are tied)
    bias: str | None


@dataclass
class Captured:
    """The exported program plus the facts later passes need about the model it came from."""

    program: ExportedProgram
    module: torch.fx.GraphModule  # program.module(): parameters as attributes, linears as aten.linear
    linears: tuple[LinearNode, ...]
    model_type: str
    hidden_size: int
    param_numel: dict[str, int]  # every parameter (tied ones once), by dotted name
    example: dict[str, torch.Tensor]
    layers: tuple[str, ...] = ()  # dotted names of the decoder layers, in order (the model's own layer list)


def example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids and a mask with one padded position: batch 2 so export does not pin batch to 1."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    mask[-1, -1] = 0
    return {"input_ids": ids, "attention_mask": mask}


# Module attributes SDPA cannot express, switched off while tracing. Each is a scalar op on attention scores
# inside one head, so no feature moves between heads or channels because of it: the groups do not change.
TRACE_OFF = ("attn_logit_softcapping",)


@contextlib.contextmanager
def capture_mode(model: torch.nn.Module):
    """No KV cache and torch SDPA attention while tracing; both restored afterwards."""
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    saved = [(c, c.use_cache if hasattr(c, "use_cache") else None, c._attn_implementation) for c in configs]
    switched = [(m, a, getattr(m, a)) for m in model.modules() for a in TRACE_OFF if getattr(m, a, None) is not None]
    try:
        for m, a, _ in switched:
            setattr(m, a, None)
        for c in configs:
            if hasattr(c, "use_cache"):
                c.use_cache = False
            # a pruned model's attention gathers K/V and then runs its base: trace it over SDPA
            pruned = (c._attn_implementation or "").startswith(PREFIX)
            c._attn_implementation = gisp_implementation("sdpa") if pruned else "sdpa"
        yield
    finally:
        for m, a, v in switched:
            setattr(m, a, v)
        for c, use_cache, impl in saved:
            if use_cache is not None:
                c.use_cache = use_cache
            c._attn_implementation = impl


def capture(model: torch.nn.Module, example: dict[str, torch.Tensor] | None = None) -> Captured:
    """Export `model` (non-strict, dynamic batch and sequence) and tie each linear node to its module."""
    example = example if example is not None else example_inputs(model)
    batch, seq = Dim("batch", min=1), Dim("seq", min=1)
    dynamic = {name: {0: batch, 1: seq} for name in example}
    was_training = model.training
    model.eval()
    try:
        with capture_mode(model), torch.no_grad():
            program = torch.export.export(model, (), dict(example), dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # torch.export raises many types; all mean the same thing to the user
        raise GispError(
            f"capture: torch.export could not trace {type(model).__name__} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); gisp-fx needs a model that exports "
            "non-strict with use_cache=False and SDPA attention"
        ) from exc
    finally:
        model.train(was_training)
        _forget_export_proxies()
    gm = program.module()
    linears = tuple(_linear_nodes(gm))
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), name)
    param_numel = {name: p.numel() for name, p in model.named_parameters() if seen[id(p)] == name}
    return Captured(
        program=program, module=gm, linears=linears, model_type=model.config.model_type,
        hidden_size=model.config.hidden_size, param_numel=param_numel, example=example,
        layers=decoder_layers(model),
    )


def _forget_export_proxies() -> None:
    """torch.export (2.13) leaves a module-level map from fake-tensor ids to the nodes of the last trace, which keeps
    that whole traced graph (about 2,700 nodes and their fake tensors on SmolLM2) alive until the next export
    clears it; clear it now. Nothing reads it between exports (torch empties it before filling it)."""
    from torch.fx.experimental import proxy_tensor

    leftover = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(leftover, dict):
        leftover.clear()


def decoder_layers(model: torch.nn.Module) -> tuple[str, ...]:
    """The model's decoder layers: the one nn.ModuleList of config.num_hidden_layers modules (its own layer list)."""
    count = getattr(model.config, "num_hidden_layers", None)
    lists = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and count is not None and len(m) == count
             and all(any(True for _ in x.parameters()) for x in m)]
    lists = [n for n in lists if not any(n.startswith(other + ".") for other in lists)]  # outermost only
    if len(lists) != 1:
        raise GispError(
            f"capture: cannot tell the decoder layers of {type(model).__name__}: expected one nn.ModuleList of "
            f"config.num_hidden_layers={count} layers with weights, found {len(lists)} ({', '.join(lists)}); "
            "gisp-fx needs a decoder-only model with one list of layers"
        )
    return tuple(f"{lists[0]}.{i}" if lists[0] else str(i) for i in range(count))


def _linear_nodes(gm: torch.fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not LINEAR:
            continue
        stack = node.meta.get("nn_module_stack")
        if not stack:
            raise GispError(f"capture: linear node '{node.name}' carries no nn_module_stack; cannot name its module")
        module = list(stack.values())[-1][0]
        weight = node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        yield LinearNode(
            node=node.name, module=module, weight=str(weight.target),
            bias=str(bias.target) if isinstance(bias, torch.fx.Node) else None,
        )
