"""--exporter optimum: runs where optimum-onnx is installed (the transformers 4.57 environment of CI), and gives a
clear error where it is not (the 5.x environment). Each environment runs one half of this file."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from gisp_fx.cli import main
from gisp_fx.errors import GispError
from gisp_fx.passes.shrink import shrink_
from gisp_fx.passes.analyse import analyse
from gisp_fx.plan import GroupRef, Kind, Selection
from gisp_fx.save import save_pruned
from test_rewrite import SELECTION

HAVE_OPTIMUM = importlib.util.find_spec("optimum") is not None and \
    importlib.util.find_spec("optimum.onnxruntime") is not None
# one query head and ten channels per layer go; every layer keeps its 2 K/V heads (uniform, as optimum needs)
UNIFORM = Selection(tuple(GroupRef(i, Kind.HEAD, 1) for i in range(3))
                    + tuple(GroupRef(i, Kind.CHANNEL, c) for i in range(3) for c in range(10)))


def _save(tmp_path, name, selection=None):
    model = tiny_model("llama-gqa")
    if selection is None:
        model.save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    else:
        shrink_(model, analyse(model), selection)
        save_pruned(model, tiny_tokenizer(), tmp_path / name)
    return model, tmp_path / name


@pytest.mark.skipif(not HAVE_OPTIMUM, reason="optimum-onnx is installed in the transformers 4.57 environment only")
@pytest.mark.parametrize("selection", [None, UNIFORM], ids=["dense", "pruned-uniform-kv"])
def test_optimum_export_loads_and_generates_in_ortmodel(tmp_path, selection):
    from optimum.onnxruntime import ORTModelForCausalLM

    model, folder = _save(tmp_path, "model", selection)
    assert main(["export", str(folder), "--output", str(tmp_path / "opt"), "--exporter", "optimum",
                 "--with-past"]) == 0
    ort_model = ORTModelForCausalLM.from_pretrained(tmp_path / "opt")
    import json

    # the transformers class, never gisp's mixin (the ONNX graph holds the pruned shapes itself)
    assert json.loads((tmp_path / "opt" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ort_model.generate(ids, **kwargs), model.generate(ids, **kwargs))


@pytest.mark.skipif(not HAVE_OPTIMUM, reason="optimum-onnx is installed in the transformers 4.57 environment only")
def test_optimum_refuses_per_layer_kv_heads(tmp_path):
    from gisp_fx.exporters.optimum import export_optimum

    _, folder = _save(tmp_path, "model", SELECTION)
    with pytest.raises(GispError, match=r"differ per layer \(0:1, 2:2; layers without attention: \[1\]\).*--with-past"):
        export_optimum(str(folder), tmp_path / "opt")
    assert not (tmp_path / "opt").exists() and [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.skipif(HAVE_OPTIMUM, reason="checks the error where optimum-onnx is absent")
def test_optimum_missing_is_a_clear_error(tmp_path, capsys):
    _, folder = _save(tmp_path, "model")
    assert main(["export", str(folder), "--output", str(tmp_path / "opt"), "--exporter", "optimum"]) == 2
    err = capsys.readouterr().err
    assert "optimum-onnx" in err and "4.57" in err and "--exporter native" in err
    assert not (tmp_path / "opt").exists()
