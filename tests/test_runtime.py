"""The pruned model's runtime (modeling_gisp.py): KV cache with emptied attention, broadcast for even groups,
step-0 folders, and the runtime version stamped into saved folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_model, tiny_tokenizer, tokens
from gisp_fx.loading import load_model
from gisp_fx.modeling_gisp import RUNTIME_VERSION, even_groups
from gisp_fx.passes.shrink import shrink_
from gisp_fx.passes.analyse import analyse
from gisp_fx.plan import GroupRef, Kind, Selection
from gisp_fx.save import save_pruned, saved_runtime_version
from test_rewrite import UNEVEN, pruned_vs_masked

H = Kind.HEAD


def _generate(model, ids, mask, use_cache: bool):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                              use_cache=use_cache, output_scores=True, return_dict_in_generate=True)


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen3", "gemma3"])
@pytest.mark.parametrize("layer", [0, 1])
def test_cached_generation_equals_uncached_with_an_emptied_attention(arch, layer):
    model = tiny_model(arch)
    shrink_(model, analyse(model), Selection(tuple(GroupRef(layer, H, h) for h in range(4))))
    ids, mask = tokens(2, 6, seed=3), None
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    cached, uncached = _generate(model, ids, mask, True), _generate(model, ids, mask, False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(cached.scores, uncached.scores)) <= 1e-5


EVEN = Selection(tuple(GroupRef(i, H, h) for i in range(3) for h in (0, 1)))  # K/V group 0 goes whole in each layer


# UNEVEN leaves layer 0 with groups of 1 + 2 query heads, and layer 1 with one query head per K/V head (even)
@pytest.mark.parametrize("arch, selection, layer, groups", [("llama-gqa", EVEN, 1, 2), ("llama-mha", EVEN, 1, 1),
                                                            ("llama-gqa", UNEVEN, 0, None), ("llama-gqa", UNEVEN, 1, 1)])
def test_even_groups_use_the_models_broadcast_and_uneven_ones_gather(arch, selection, layer, groups):
    model = tiny_model(arch)
    _, _, diff = pruned_vs_masked(model, selection)
    attn = model.model.layers[layer].self_attn
    if groups is None:
        assert attn.gisp_kv_map is not None and attn.num_key_value_groups == 1
    else:
        assert attn.gisp_kv_map is None and attn.num_key_value_groups == groups
    assert diff <= 1e-5


def test_even_groups_rule():
    assert even_groups(4, [0, 0, 1, 1]) == 2 and even_groups(3, [0, 1, 2]) == 1
    assert even_groups(3, [0, 0, 1]) is None and even_groups(4, [0, 1, 0, 1]) is None and even_groups(0, []) is None


def test_step_zero_folder_is_the_plain_dense_model(tmp_path):
    model = tiny_model("llama-gqa")
    save_pruned(model, tiny_tokenizer(), tmp_path / "dense")
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "gisp" not in cfg and "auto_map" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert not (tmp_path / "dense" / "modeling_gisp.py").exists()
    ids = tokens()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "dense")(input_ids=ids).logits, expected)
        assert torch.equal(load_model(str(tmp_path / "dense")).model(input_ids=ids).logits, expected)


def test_materialize_step_zero_loads(tmp_path):
    from test_compile import _loaded, _run

    from gisp_fx.rebuild import save_materialized as materialize

    run = _run(tmp_path)
    materialize(str(run.output), None, str(tmp_path / "step0"), step=0, loaded=_loaded())
    again = load_model(str(tmp_path / "step0")).model
    with torch.no_grad():
        assert torch.equal(again(input_ids=tokens()).logits, _loaded().model(input_ids=tokens()).logits)


def test_saved_runtime_is_stamped_and_older_copies_load_with_the_installed_runtime(tmp_path, capsys):
    model = tiny_model("llama-gqa")
    shrink_(model, analyse(model), UNEVEN)
    save_pruned(model, tiny_tokenizer(), tmp_path / "new")
    cfg = json.loads((tmp_path / "new" / "config.json").read_text())
    assert cfg["gisp"]["runtime_version"] == RUNTIME_VERSION == saved_runtime_version(tmp_path / "new")
    assert cfg["gisp"]["base_class"] == "LlamaForCausalLM"
    old = Path(__file__).parent / "fixtures" / "pruned-tf5"
    assert saved_runtime_version(old) == 1
    loaded = load_model(str(old)).model
    assert "carries gisp runtime v1" in capsys.readouterr().err
    assert type(loaded).__module__ == "gisp_fx.loading"  # built from the installed runtime, not the folder's copy
    load_model(str(tmp_path / "new"))
    assert "carries gisp runtime" not in capsys.readouterr().err
