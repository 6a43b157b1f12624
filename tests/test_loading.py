"""Model loading: every kind of spec, the bundled GGUF, and one clear error for each kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from conftest import ARCHS, tokens
from gisp_fx.cli import main
from gisp_fx.errors import GispError
from gisp_fx.loading import bundled_gguf, load_model


def test_folder_round_trip(tiny_folder):
    path = tiny_folder("qwen2")
    loaded = load_model(path)
    assert loaded.model.config.model_type == "qwen2"
    assert loaded.tokenizer.pad_token == "<pad>"
    assert not loaded.model.training


def test_unknown_spec():
    with pytest.raises(GispError, match="'no-such-model'.*not a bundled model"):
        load_model("no-such-model")


def test_folder_without_config(tmp_path):
    with pytest.raises(GispError, match="no config.json"):
        load_model(str(tmp_path))


def test_not_a_causal_lm(tmp_path):
    transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(GispError, match="'bert' is not a causal language model"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("content", [b"not a gguf at all", None])
def test_corrupt_or_truncated_gguf(tmp_path, content):
    path = tmp_path / "model.gguf"
    if content is None:  # the real file cut short
        with open(bundled_gguf("smollm2"), "rb") as f:
            path.write_bytes(f.read(3_000_000))
    else:
        path.write_bytes(content)
    with pytest.raises(GispError, match="not a readable GGUF file.*corrupt or truncated"):
        load_model(str(path))


def test_cli_reports_errors_once(capsys, tmp_path):
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "no config.json" in err


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cli_inspect_tiny(arch, tiny_folder, capsys):
    path = tiny_folder(arch)
    config = json.loads(open(f"{path}/config.json").read())
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert f"3 layers ({config['model_type']})" in out and "not pruned: lm_head" in out
    assert main(["inspect", path, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [l["attention"]["num_kv_heads"] for l in plan["layers"]] == [config["num_key_value_heads"]] * 3
    assert [l["attention"]["num_heads"] for l in plan["layers"]] == [config["num_attention_heads"]] * 3
    assert [l["mlp"]["channels"] for l in plan["layers"]] == [config["intermediate_size"]] * 3


@pytest.mark.slow
def test_smollm2_inspect_and_save(tmp_path, capsys):
    """The bundled model: 30 layers of 9 q heads, 3 K/V heads, head dim 64, 1536 channels; saveable."""
    assert main(["inspect", "smollm2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["layers"]) == 30
    for layer in plan["layers"]:
        a = layer["attention"]
        assert (a["num_heads"], a["num_kv_heads"], a["head_dim"], layer["mlp"]["channels"]) == (9, 3, 64, 1536)
    loaded = load_model("smollm2")
    model = loaded.model
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = sum(p.numel() for n, p in model.named_parameters()
                   if n.startswith("model.layers.") and any(k in n for k in projections))
    assert plan["prunable_params"] == expected == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    # a GGUF-loaded model saves with save_pretrained and reloads to the same logits
    model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    ids = tokens(vocab=model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again.model(input_ids=ids).logits)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(projections))


def test_gguf_weights_are_asked_for_unpacked(monkeypatch):
    """transformers 5.25+ keeps quantized GGUF blocks packed where the `kernels` package is installed: the loader asks
    for plain tensors; an older transformers (no GgufConfig) always unpacks and gets the kwargs unchanged."""
    import gisp_fx.loading as loading

    assert loading._dequantizing({"token": None}) == {"token": None}  # not a GGUF
    if loading._gguf_config_class() is not None:
        asked = loading._dequantizing({"gguf_file": "m.gguf"})
        assert asked["gguf_file"] == "m.gguf" and asked["quantization_config"].dequantize is True
    monkeypatch.setattr(loading, "_gguf_config_class", lambda: None)  # as before transformers 5.25
    assert loading._dequantizing({"gguf_file": "m.gguf"}) == {"gguf_file": "m.gguf"}


def test_packed_gguf_modules_are_found_by_name_or_by_byte_weights():
    """A module transformers left packed is found by its Gguf* class name, or, whatever it is called, by a parameter
    that is not floating point (quantized blocks stored as bytes); a plain model has none."""
    from conftest import tiny_model
    import gisp_fx.loading as loading

    model = tiny_model("llama-gqa")
    assert loading._packed_modules(model) == []

    class PackedLinear(torch.nn.Module):  # a packed linear under a name that does not say gguf
        def __init__(self):
            super().__init__()
            self.qweight = torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.uint8), requires_grad=False)

    class GgufLinear(torch.nn.Module):
        pass

    model.model.layers[0].mlp.down_proj = PackedLinear()
    model.model.layers[1].mlp.down_proj = GgufLinear()
    assert loading._packed_modules(model) == ["GgufLinear", "PackedLinear"]


def test_missing_tokenizer(tmp_path):
    from conftest import tiny_model

    tiny_model("llama-gqa").save_pretrained(tmp_path)
    with pytest.raises(GispError, match="tokenizer could not be loaded"):
        load_model(str(tmp_path))


def test_data_file_failing_its_checksum(tmp_path, monkeypatch):
    import gisp_fx.datasets as ds

    shutil.copytree(ds.DATA_DIR, tmp_path / "data")
    target = tmp_path / "data" / "winogrande" / "validation.jsonl"
    target.write_bytes(target.read_bytes().replace(b"Sarah", b"Sara", 1))
    monkeypatch.setattr(ds, "DATA_DIR", tmp_path / "data")
    ds.data_file.cache_clear()
    ds._checksums.cache_clear()
    try:
        with pytest.raises(GispError, match="validation.jsonl' fails its checksum"):
            ds.data_file("winogrande/validation.jsonl")
        assert ds.data_file("winogrande/train_m.jsonl").is_file()
    finally:
        ds.data_file.cache_clear()
        ds._checksums.cache_clear()
