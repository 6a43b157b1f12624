"""The rewrite pass: physically pruned == masked, re-capture agrees, and the saved folder reloads exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHS, tiny_model, tiny_tokenizer, tokens
from gisp_fx.loading import load_model
from gisp_fx.passes.analyse import analyse
from gisp_fx.plan import Axis, GroupRef, Kind, Selection
from gisp_fx.passes.shrink import shrink_
from gisp_fx.save import save_pruned

H, C = Kind.HEAD, Kind.CHANNEL
# layer 0: heads 0,1,3 go -> one query head left; in GQA its K/V group 0 is removed (uneven: 1 head, 1 group)
# layer 1: every head goes -> the attention block is removed; layer 2: every channel goes -> the MLP is removed
SELECTION = Selection((GroupRef(0, H, 0), GroupRef(0, H, 1), GroupRef(0, H, 3), GroupRef(1, H, 0), GroupRef(1, H, 1),
                       GroupRef(1, H, 2), GroupRef(1, H, 3), GroupRef(0, C, 5), GroupRef(0, C, 7))
                      + tuple(GroupRef(2, C, c) for c in range(48)))
UNEVEN = Selection((GroupRef(0, H, 1), GroupRef(1, H, 0), GroupRef(1, H, 2)))  # groups of 2+1 heads, 1+1 heads


def mask_(model, plan, selection) -> None:
    """The reference's way: zero the output-side columns of every removed group."""
    with torch.no_grad():
        for ref in selection.removed:
            layer = plan.layers[ref.layer]
            members = layer.attention.query if ref.kind is H else layer.mlp.members
            for m in members:
                if m.axis is Axis.COLS:
                    model.get_submodule(m.module).weight[:, list(m.index[ref.index])] = 0


def padded_batch():
    ids = tokens(2, 12, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on the second row
    return ids, mask


def pruned_vs_masked(model, selection):
    """Mask `selection` in `model`, then shrink it: (plan, new plan, max |logit diff| over the real positions of a
    left-padded batch)."""
    plan = analyse(model)
    ids, mask = padded_batch()
    mask_(model, plan, selection)
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask).logits
    new_plan = shrink_(model, plan, selection)
    with torch.no_grad():
        pruned = model(input_ids=ids, attention_mask=mask).logits
    return plan, new_plan, float((pruned - masked)[mask.bool()].abs().max())


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("selection", [SELECTION, UNEVEN], ids=["removals", "uneven"])
def test_pruned_equals_masked(arch, selection):
    model = tiny_model(arch)
    plan, new_plan, diff = pruned_vs_masked(model, selection)
    assert diff <= 1e-5
    assert analyse(model) == new_plan  # the re-capture is the verifier
    assert sum(p.numel() for p in model.parameters()) == new_plan.total_params
    assert new_plan.total_params < plan.total_params


def test_uneven_groups_and_removed_kv():
    model = tiny_model("llama-gqa")
    plan = shrink_(model, analyse(model), SELECTION)
    a0 = plan.layers[0].attention
    assert (a0.num_heads, a0.num_kv_heads, a0.kv_of_head) == (1, 1, (0,))
    assert model.model.layers[0].self_attn.k_proj.out_features == 16  # K/V group 0 went with its last head
    assert plan.layers[1].attention is None and plan.layers[2].mlp is None
    plan2 = shrink_(tiny := tiny_model("llama-gqa"), analyse(tiny), UNEVEN)
    assert plan2.layers[0].attention.kv_of_head == (0, 1, 1)
    assert plan2.layers[1].attention.kv_of_head == (0, 1)


def test_keep_everything_is_bit_identical():
    model = tiny_model("qwen3")
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    shrink_(model, analyse(model), Selection(()))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2", "phi3", "gemma2"])
def test_save_and_from_pretrained_round_trip(arch, tmp_path):
    model = tiny_model(arch)
    shrink_(model, analyse(model), SELECTION)
    save_pruned(model, tiny_tokenizer(), tmp_path)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        again = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
        assert type(again).__name__ == "GispForCausalLM"
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, expected)
        via_loader = load_model(str(tmp_path)).model
        assert torch.equal(via_loader(input_ids=ids, attention_mask=mask).logits, expected)
    assert analyse(again).layers == analyse(model).layers


def test_from_pretrained_refuses_weights_that_do_not_match(tmp_path):
    model = tiny_model("llama-gqa")
    shrink_(model, analyse(model), SELECTION)
    save_pruned(model, tiny_tokenizer(), tmp_path)
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["gisp"]["linears"]["model.layers.0.mlp.gate_proj"][1] += 1  # claim one channel more than was saved
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="wrong shape|missing|mismatched_sizes|size mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
