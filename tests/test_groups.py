"""The analysis pass: groups found from the graph equal what each config implies, and they are closed."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, tiny_model, tokens
from gisp_fx.errors import GispError
from gisp_fx.passes.analyse import analyse
from gisp_fx.plan import Axis, GroupPlan


def _apply(model, member, group: int, fn) -> None:
    """fn(tensor_view) on the rows/columns `member` holds for `group` (bias rows included)."""
    lin = model.get_submodule(member.module)
    idx = torch.tensor(member.index[group])
    with torch.no_grad():
        if member.axis is Axis.ROWS:
            lin.weight[idx] = fn(lin.weight[idx])
            if lin.bias is not None:
                lin.bias[idx] = fn(lin.bias[idx])
        else:
            lin.weight[:, idx] = fn(lin.weight[:, idx])


zero = torch.zeros_like
noise = lambda t: t + torch.randn_like(t)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_groups_match_config(arch):
    model = tiny_model(arch)
    plan = analyse(model)
    cfg = model.config
    nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    assert len(plan.layers) == cfg.num_hidden_layers
    for layer in plan.layers:
        a, m = layer.attention, layer.mlp
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (nq, nkv, d)
        assert a.kv_of_head == tuple(h // (nq // nkv) for h in range(nq))
        assert a.mha == (nq == nkv)
        assert m.channels == cfg.intermediate_size
        # every group has head_dim rows per q/k/v projection and head_dim o columns
        for member in a.query + a.kv:
            width = 2 * d if member.module.endswith("qkv_proj") and member in a.kv else d
            assert all(len(ix) == width for ix in member.index)
    # prunable parameters = numel of the decoder layers' attention and MLP projections (+ their biases)
    expected = sum(
        p.numel() for name, p in model.named_parameters()
        if ".layers." in name and any(k in name for k in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj",
                                                            "gate_proj", "up_proj", "down_proj", "gate_up_proj"))
    )
    assert plan.prunable_params == expected
    assert [m for m, _ in plan.kept] == ["lm_head"]
    assert GroupPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("arch", list(ARCHS))
def test_groups_are_closed(arch):
    """Zero a group's output side; noise on its input side changes nothing, noise on a neighbour does."""
    model = tiny_model(arch)
    plan = analyse(model)
    ids = tokens()
    layer = plan.layers[1]
    a, m = layer.attention, layer.mlp
    out_side = lambda members: [x for x in members if x.axis is Axis.COLS]
    in_side = lambda members: [x for x in members if x.axis is Axis.ROWS]

    def check(zeroed: list[tuple], noised: list[tuple], neighbour: list[tuple]):
        torch.manual_seed(5)
        for member, g in zeroed:
            _apply(model, member, g, zero)
        base = _logits(model, ids)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        for member, g in noised:
            _apply(model, member, g, noise)
        assert torch.allclose(_logits(model, ids), base, atol=1e-6, rtol=0), "noise on a closed group leaked"
        model.load_state_dict(saved)
        for member, g in neighbour:
            _apply(model, member, g, noise)
        assert not torch.allclose(_logits(model, ids), base, atol=1e-4, rtol=0), "neighbour noise had no effect"
        model.load_state_dict(saved)

    # a query head: its q rows (and, for MHA, its own K/V group's rows)
    head, other = 0, a.num_heads - 1
    kv_own = [(x, a.kv_of_head[head]) for x in a.kv] if a.mha else []
    check([(x, head) for x in out_side(a.query)], [(x, head) for x in in_side(a.query)] + kv_own,
          [(x, other) for x in in_side(a.query)])
    # a K/V group once all of its query heads are cut
    g = a.kv_of_head[0]
    heads = [h for h in range(a.num_heads) if a.kv_of_head[h] == g]
    outside = [h for h in range(a.num_heads) if a.kv_of_head[h] != g]
    if outside:
        check([(x, h) for h in heads for x in out_side(a.query)],
              [(x, g) for x in a.kv] + [(x, h) for h in heads for x in in_side(a.query)],
              [(x, a.kv_of_head[outside[0]]) for x in a.kv])
    # an MLP channel
    check([(x, 3) for x in out_side(m.members)], [(x, 3) for x in in_side(m.members)],
          [(x, 4) for x in in_side(m.members)])


def test_ungroupable_linears_are_listed():
    """An MLP that mixes its channels (a flip) cannot be grouped: the error names each linear."""
    model = tiny_model("llama-gqa")
    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.forward = (lambda self: lambda x: self.down_proj(
            torch.flip(self.act_fn(self.gate_proj(x)) * self.up_proj(x), dims=[-1])))(mlp)
    with pytest.raises(GispError) as err:
        analyse(model)
    msg = str(err.value)
    for i in range(model.config.num_hidden_layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{i}.mlp.{name}" in msg
    assert "flip" in msg


def test_analyse_leaves_no_traced_graph_alive():
    """Once `analyse` has returned its plan, nothing of the traced graph stays alive: torch.export's module-level
    map from fake tensors to the last trace's nodes is cleared (it held about 2,700 nodes and their fake tensors
    on SmolLM2 until the next export)."""
    import gc

    def nodes() -> int:
        gc.collect()
        return sum(isinstance(o, torch.fx.Node) for o in gc.get_objects())

    model = tiny_model("llama-gqa")
    before = nodes()
    plan = analyse(model, cache=False)
    assert plan.layers and nodes() == before


def test_a_structure_analysed_before_reuses_its_plan_and_anything_else_captures():
    """The plan of a structure analysed before in the process is reused (another model object, other weights);
    other shapes, a replaced forward, hooks or cache=False capture afresh."""
    from gisp_fx.passes import analyse as module

    calls = []
    real = module.capture
    module.capture = lambda model: calls.append(1) or real(model)
    try:
        first = analyse(tiny_model("llama-gqa", seed=11, num_hidden_layers=2))
        again = analyse(tiny_model("llama-gqa", seed=12, num_hidden_layers=2))  # other weights, same structure
        assert again is first and len(calls) == 1
        assert analyse(tiny_model("llama-gqa", seed=12, num_hidden_layers=2), cache=False) == first
        assert len(calls) == 2
        wider = analyse(tiny_model("llama-gqa", num_hidden_layers=2, intermediate_size=40))
        assert len(calls) == 3 and wider.layers[0].mlp.channels == 40
        hooked = tiny_model("llama-gqa", seed=12, num_hidden_layers=2)
        hooked.model.layers[0].mlp.register_forward_hook(lambda m, i, o: o * 2)
        analyse(hooked)
        patched = tiny_model("llama-gqa", seed=12, num_hidden_layers=2)
        patched.model.layers[0].mlp.forward = patched.model.layers[0].mlp.forward
        analyse(patched)
        assert len(calls) == 5
    finally:
        module.capture = real
