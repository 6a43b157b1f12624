"""Families beyond Llama's layout: OPT, GPT-2 (Conv1D), Falcon, GPT-NeoX, Cohere, OLMo-2 — grouped from the graph,
pruned exactly, saved, reloaded and exported; and what cannot be pruned is refused or kept whole, with the reason."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, tiny_model, tiny_tokenizer
from gisp_fx.cli import main
from gisp_fx.errors import GispError
from gisp_fx.loading import LoadedModel
from gisp_fx.passes.analyse import analyse
from gisp_fx.plan import Kind, Selection
from gisp_fx.passes.shrink import shrink_
from gisp_fx.save import save_pruned
from test_rewrite import SELECTION, UNEVEN, mask_, padded_batch, pruned_vs_masked

# family -> (query heads, K/V heads, head dim) per layer, or None where the attention is kept whole; MLP channels
EXPECT = {
    "opt": ((4, 4, 16), 48), "gpt2": ((4, 4, 16), 48), "falcon": ((4, 1, 16), 48), "falcon-mha": ((4, 4, 16), 48),
    "gpt-neox": ((4, 4, 16), 48), "cohere": ((4, 2, 16), 48), "olmo2": (None, 48),
}
HEADS = [f for f in FAMILIES if EXPECT[f][0] is not None]


def _channels_only(selection: Selection) -> Selection:
    return Selection(tuple(r for r in selection.removed if r.kind is Kind.CHANNEL))


def _selection_for(family: str, selection: Selection) -> Selection:
    return selection if EXPECT[family][0] is not None else _channels_only(selection)


def _assert_disjoint(plan) -> None:
    """No row or column belongs to two groups: the plan never claims a parameter twice."""
    seen = defaultdict(set)
    for layer in plan.layers:
        members = []
        if layer.attention:
            members += list(layer.attention.query) + list(layer.attention.kv)
        if layer.mlp:
            members += list(layer.mlp.members)
        for m in members:
            for ix in m.index:
                assert not seen[(m.module, m.axis)] & set(ix), f"{m.module} {m.axis.name} index in two groups"
                seen[(m.module, m.axis)].update(ix)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_groups(family):
    model = tiny_model(family)
    plan = analyse(model)
    attention, channels = EXPECT[family]
    assert len(plan.layers) == 3
    for i, layer in enumerate(plan.layers):
        assert layer.index == i
        a = layer.attention
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == attention if attention else a is None
        assert layer.mlp.channels == channels
    _assert_disjoint(plan)
    assert 0 < plan.prunable_params < plan.decoder_params
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())  # GPT-NeoX 4.57: embed_out
    assert plan.kept[-1] == (head, "output projection: its outputs are the model's outputs")


def test_olmo2_heads_merged_by_the_q_norm_are_kept_whole_with_the_reason(tiny_folder, capsys):
    """OLMo-2's q_norm is one RMSNorm over all heads: one class, so heads are not groups; MLP channels still are."""
    plan = analyse(tiny_model("olmo2"))
    kept = dict(plan.kept)
    for i in range(3):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            why = kept[f"model.layers.{i}.self_attn.{proj}"]
            assert "form one group" in why and f"model.layers.{i}.self_attn.q_norm" in why
    # what the plan claims prunable is exactly the MLP weights (gate/up rows + down columns), no more
    model = tiny_model("olmo2")
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    assert plan.prunable_params == mlp < plan.decoder_params
    assert main(["inspect", tiny_folder("olmo2")]) == 0
    out = capsys.readouterr().out
    assert "not pruned: model.layers.0.self_attn.q_proj (its 4 attention heads form one group" in out


# UNEVEN removes heads only: not for a family whose attention is kept whole
CASES = [(f, s) for f in FAMILIES for s in ("removals", "uneven") if f in HEADS or s == "removals"]


@pytest.mark.parametrize("family, which", CASES)
def test_family_pruned_equals_masked(family, which):
    selection = _selection_for(family, SELECTION if which == "removals" else UNEVEN)
    model = tiny_model(family)
    plan, new_plan, diff = pruned_vs_masked(model, selection)
    assert diff <= 1e-5
    assert analyse(model) == new_plan  # the re-capture is the verifier
    assert sum(p.numel() for p in model.parameters()) == new_plan.total_params < plan.total_params


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_save_reload_and_onnx(family, tmp_path):
    from gisp_fx.exporters.export import export_model

    model = tiny_model(family)
    new_plan = shrink_(model, analyse(model), _selection_for(family, SELECTION))
    save_pruned(model, tiny_tokenizer(), tmp_path / "pruned")
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
        assert type(again).__name__ == "GispForCausalLM"
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, expected)
    assert analyse(again) == new_plan
    result = export_model(LoadedModel(again, None, family), tmp_path / "onnx", with_past=True)
    assert result.parity.logits < 1e-4 and result.parity.present < 1e-4


def test_opt_mlp_emptied_in_place_is_zero_wide(tmp_path):
    """OPT's fc1/fc2 sit in the decoder layer (no MLP module to replace): an emptied MLP keeps zero-wide linears,
    so the layer adds fc2's bias only, and the folder rebuilds those shapes."""
    model = tiny_model("opt")
    plan = shrink_(model, analyse(model), _channels_only(SELECTION))
    layer = model.model.decoder.layers[2]
    assert (layer.fc1.out_features, layer.fc2.in_features) == (0, 0) and plan.layers[2].mlp is None
    assert plan.layers[2].attention is not None
    save_pruned(model, tiny_tokenizer(), tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert torch.equal(again.model.decoder.layers[2].fc2.bias, layer.fc2.bias)
    assert again.model.decoder.layers[2].fc1.weight.shape == (0, 64)


def test_gpt2_conv1d_becomes_an_equal_linear():
    """Conv1D ([in, out] weight) is replaced by nn.Linear with the transposed weight: same logits, same numbers."""
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    weight = conv.weight.detach().clone()
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    analyse(model)
    linear = model.transformer.h[0].attn.c_attn
    assert type(linear) is torch.nn.Linear and torch.equal(linear.weight, weight.T)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, before, atol=1e-5, rtol=0)


def test_gpt_neox_folder_keeps_the_checkpoint_names(tmp_path):
    """GPT-NeoX's head is `embed_out` in its checkpoints: the folder keeps that name and reloads it as the head."""
    from safetensors import safe_open

    model = tiny_model("gpt-neox")
    shrink_(model, analyse(model), SELECTION)
    save_pruned(model, tiny_tokenizer(), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = f.get_tensor("embed_out.weight") if "embed_out.weight" in f.keys() else f.get_tensor("lm_head.weight")
    again = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert torch.equal(again.get_output_embeddings().weight, saved)
    assert torch.equal(saved, model.get_output_embeddings().weight)


@pytest.mark.parametrize("overrides, message", [
    (dict(alibi=True), "ALiBi slopes"),
    (dict(new_decoder_architecture=True, num_kv_heads=2), "new_decoder_architecture with num_kv_heads > 1"),
])
def test_falcon_layouts_that_cannot_lose_heads_are_refused(overrides, message):
    with pytest.raises(GispError, match=message):
        analyse(tiny_model("falcon", **overrides))


def test_falcon_new_architecture_with_one_kv_head_is_pruned_exactly():
    model = tiny_model("falcon", new_decoder_architecture=True, num_kv_heads=1)
    plan = analyse(model)
    ids, mask = padded_batch()
    mask_(model, plan, UNEVEN)
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask).logits
    new_plan = shrink_(model, plan, UNEVEN)
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).logits - masked)[mask.bool()].abs().max() <= 1e-5
    assert analyse(model) == new_plan


@pytest.mark.parametrize("arch", ["llama-gqa", "opt"])
def test_compile_to_90_percent_keeps_emptied_layers(arch, tmp_path):
    """A layer that loses both attention and MLP stays in the re-captured plan (with its index): the verifier agrees
    and the saved folder reloads with the same logits."""
    from gisp_fx.config import CompileConfig
    from gisp_fx.passes.importance import LmCalibration
    from gisp_fx.compile import compile_model
    from conftest import tokens

    loaded = LoadedModel(tiny_model(arch, num_hidden_layers=4), tiny_tokenizer(), "tiny")
    config = CompileConfig(model="tiny", sparsity=0.9, output=str(tmp_path / "run"), steps=3, protect="none",
                           eval_windows=2)
    result = compile_model(config, calibration=LmCalibration(tokens(12, 16, seed=2), batch_size=4), loaded=loaded,
                           progress=False)
    plan = analyse(loaded.model)
    assert [layer.index for layer in plan.layers] == [0, 1, 2, 3]
    if arch == "llama-gqa":  # this seed empties layer 3 entirely (before the fix it vanished from the re-capture)
        assert plan.layers[3].attention is None and plan.layers[3].mlp is None
    assert result.report["sparsity"]["measured"] >= 0.9
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = loaded.model(input_ids=ids, attention_mask=mask).logits
        again = AutoModelForCausalLM.from_pretrained(result.output, trust_remote_code=True).eval()
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, expected)


def test_mixture_of_experts_is_refused_naming_the_router():
    """Routed experts mix channels through a data-dependent choice: refused, naming each router linear."""
    import transformers

    from conftest import BASE

    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**BASE, num_local_experts=4,
                                                                       num_experts_per_tok=2)).eval()
    with pytest.raises(GispError) as err:
        analyse(model)
    msg = str(err.value)
    if "could not trace" in msg:  # transformers 4.57: its expert routing does not even export
        assert msg.startswith("capture: torch.export could not trace MixtralForCausalLM")
    else:
        assert "could not be placed in a prunable group" in msg
        assert all(f"model.layers.{i}.mlp.gate (64->4)" in msg for i in range(3))


def test_compile_beyond_the_prunable_share_is_refused_up_front(tmp_path):
    """OLMo-2 can lose only MLP channels (42.4 % of its decoder layers here): 0.9 is refused before any work."""
    from gisp_fx.config import CompileConfig
    from gisp_fx.compile import compile_model

    config = CompileConfig(model="tiny", sparsity=0.9, output=str(tmp_path / "run"), steps=3, protect="none",
                           eval_windows=2)
    with pytest.raises(GispError, match=r"only 27,648 of the model's 65,184 decoder-layer parameters are prunable "
                                        r"\(42.4 %\); choose --sparsity below 0.424"):
        compile_model(config, loaded=LoadedModel(tiny_model("olmo2"), tiny_tokenizer(), "tiny"), progress=False)
    assert not (tmp_path / "run").exists()
