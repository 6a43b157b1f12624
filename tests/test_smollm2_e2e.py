"""The bundled SmolLM2 end to end: compile (small settings), reload with from_pretrained, materialize, verify."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from gisp_fx.cli import main
from gisp_fx.passes.analyse import analyse


@pytest.mark.slow
def test_smollm2_compile_reload_materialize(tmp_path):
    out = tmp_path / "smollm2-20"
    assert main(["compile", "smollm2", "--sparsity", "0.2", "--steps", "2", "--calib-samples", "8",
                 "--seq-len", "64", "--eval-windows", "8", "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0.2 <= report["sparsity"]["measured"] <= 0.205
    assert report["perplexity"]["after"] > report["perplexity"]["before"] > 1
    assert report["params"]["before"] == 134_515_008
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == report["params"]["after"]
    plan = analyse(reloaded)
    for row, layer in zip(report["layers"], plan.layers):
        assert row["heads"][0] == (layer.attention.num_heads if layer.attention else 0)
        assert row["channels"][0] == (layer.mlp.channels if layer.mlp else 0)
    # materialize the final step from the original weights: the same logits as the saved model
    model, _, sparsity = materialize_final(out, tmp_path / "again")
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert sparsity == pytest.approx(report["sparsity"]["measured"])


def materialize_final(run, output):
    from gisp_fx.rebuild import save_materialized as materialize

    steps = len(json.loads((run / "report.json").read_text())["steps"])
    return materialize(str(run), None, str(output), step=steps)


@pytest.mark.slow
def test_smollm2_onnx_greedy_equals_torch_dense_and_pruned(tmp_path):
    """ONNX with KV cache of dense and 50 %-pruned SmolLM2: parity, and 32 greedy tokens identical to torch."""
    from gisp_fx.exporters.export import export_model
    from gisp_fx.exporters.ort import OrtCausalLM
    from gisp_fx.loading import load_model

    out = tmp_path / "smollm2-50"
    assert main(["compile", "smollm2", "--sparsity", "0.5", "--steps", "2", "--calib-samples", "8", "--seq-len", "64",
                 "--eval-windows", "4", "--output", str(out), "--export", "onnx"]) == 0
    dense = load_model("smollm2")
    export_model(dense, tmp_path / "dense-onnx", with_past=True)
    tok = dense.tokenizer
    tok.padding_side = "left"
    batch = tok(["The capital of France is", "Once upon a time, in a small village by the sea, there lived"],
                return_tensors="pt", padding=True)
    assert batch.attention_mask[0, 0] == 0  # the first prompt is left-padded
    for model, folder in ((dense.model, tmp_path / "dense-onnx"), (load_model(str(out)).model, out / "onnx")):
        meta = json.loads((folder / "gisp_onnx.json").read_text())
        assert meta["parity"]["logits"] <= 1e-3 and meta["parity"]["present"] <= 1e-3
        with torch.no_grad():
            expected = model.generate(**batch, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        got = OrtCausalLM(folder).generate(batch.input_ids, batch.attention_mask, max_new_tokens=32,
                                           pad_token_id=tok.pad_token_id)
        assert torch.equal(got, expected)
    assert json.loads((out / "onnx" / "gisp_onnx.json").read_text())["params"]["total"] < 100_000_000
    # onnxruntime-genai's runtime on the same exports (its shared past/present buffer, per-layer K/V widths)
    og = pytest.importorskip("onnxruntime_genai")
    prompt = tok(["Once upon a time, in a small village by the sea, there lived"], return_tensors="pt").input_ids
    ran = 0
    for model, folder in ((dense.model, tmp_path / "dense-onnx"), (load_model(str(out)).model, out / "onnx")):
        if not (folder / "genai_config.json").is_file():  # a layer lost its whole attention: said so, not written
            assert json.loads((folder / "gisp_onnx.json").read_text())["genai"].startswith("not written")
            continue
        with torch.no_grad():
            expected = model.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        genai = og.Model(str(folder))
        params = og.GeneratorParams(genai)
        params.set_search_options(max_length=expected.shape[1], do_sample=False)
        gen = og.Generator(genai, params)
        gen.append_tokens(prompt.numpy().astype(np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        assert [int(t) for t in gen.get_sequence(0)] == expected[0].tolist()
        ran += 1
    assert ran >= 1
