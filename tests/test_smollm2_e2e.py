"""The bundled SmolLM2 end to end: compile (small settings), reload with from_pretrained, materialize, verify."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gisp_fx.cli import main
from gisp_fx.pipeline import analyse


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
    from gisp_fx.pipeline import materialize

    steps = len(json.loads((run / "report.json").read_text())["steps"])
    return materialize(str(run), None, str(output), step=steps)
