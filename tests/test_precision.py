"""Device and precision: bf16 pruning (emptied blocks included) equals the masked bf16 model, a bf16 compile runs
end to end with fp32 gradient sums, and bad --device / --dtype values give one clear error."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer, tokens
from gisp_fx.config import CompileConfig
from gisp_fx.device import resolve, resolve_device
from gisp_fx.errors import GispError
from gisp_fx.loading import LoadedModel
from gisp_fx.passes.importance import LmCalibration
from gisp_fx.passes.shrink import shrink_
from gisp_fx.passes.analyse import analyse
from gisp_fx.compile import compile_model
from test_rewrite import SELECTION, mask_, padded_batch

BIASED = dict(attention_bias=True, mlp_bias=True)  # the emptied blocks' stubs then carry an output bias


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_pruned_equals_masked_with_emptied_blocks(dtype):
    ids, mask = padded_batch()
    masked_model = tiny_model("llama-gqa", **BIASED).to(dtype)
    plan = analyse(masked_model)
    mask_(masked_model, plan, SELECTION)
    model = tiny_model("llama-gqa", **BIASED).to(dtype)
    new_plan = shrink_(model, analyse(model), SELECTION)
    stubs = [m for m in model.modules() if type(m).__name__ == "EmptyBlock"]
    assert len(stubs) == 2 and all(s.out_bias.dtype == dtype for s in stubs)
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        masked = masked_model(input_ids=ids, attention_mask=mask).logits
        pruned = model(input_ids=ids, attention_mask=mask).logits
    assert pruned.dtype == dtype
    real = mask.bool()
    # the same arithmetic up to the order of a few half-precision sums (zeroed columns vs. absent ones)
    err = (pruned.float() - masked.float())[real].abs().max().item()
    assert err <= 0.02 * masked.float()[real].abs().max().item(), err
    assert analyse(model) == new_plan  # the re-capture verifier works on a half-precision model


def test_bf16_compile_end_to_end(tmp_path):
    cfg = CompileConfig(model="tiny", sparsity=0.5, output=str(tmp_path / "bf16"), steps=2, protect="none",
                        eval_windows=2, dtype="bfloat16")
    loaded = LoadedModel(tiny_model("llama-gqa", num_hidden_layers=4, **BIASED), tiny_tokenizer(), "tiny")
    result = compile_model(cfg, calibration=LmCalibration(tokens(12, 16, seed=2), batch_size=4), loaded=loaded,
                           progress=False)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    r = result.report
    assert 0.5 <= r["sparsity"]["measured"] <= 0.5 + 0.004 + 1e-9
    assert r["config"]["dtype"] == "bfloat16" and r["peak_rss_over_fp32_weights"] > 0
    assert all(s["loss"] == s["loss"] for s in r["steps"])  # finite calibration losses (NaN != NaN)


def test_bad_device_and_dtype_are_one_line_errors(tmp_path):
    with pytest.raises(GispError, match="--device must be cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(GispError, match="--dtype must be one of"):
        resolve("cpu", "float64")
    if not torch.cuda.is_available():
        with pytest.raises(GispError, match="--device cuda: CUDA is not available"):
            resolve("cuda", "float32")
        out = tmp_path / "never"
        cfg = CompileConfig(model="tiny", sparsity=0.3, output=str(out), device="cuda:0")
        with pytest.raises(GispError, match="--device cuda:0"):
            compile_model(cfg, loaded=LoadedModel(tiny_model("llama-gqa"), tiny_tokenizer(), "tiny"))
        assert not out.exists() and not out.with_name("never.partial").exists()
    with pytest.raises(GispError, match="--dtype must be one of"):
        CompileConfig(model="tiny", sparsity=0.3, output="x", dtype="int8").validate()


def test_export_casts_a_half_model_to_fp32_with_a_note(capsys):
    from gisp_fx.exporters.export import _as_fp32_cpu

    model = tiny_model("llama-gqa").to(torch.bfloat16)
    assert _as_fp32_cpu(model) is model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert "casting it to float32 on cpu" in capsys.readouterr().out
    _as_fp32_cpu(model)
    assert capsys.readouterr().out == ""  # nothing to say for an fp32 CPU model
