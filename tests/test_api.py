"""The public Python API (gisp_fx): prune_ works in place and in memory, the builders and entry points check their
arguments, and the pieces chain: analyse -> prune_ -> save_pretrained -> from_pretrained -> materialize."""

from __future__ import annotations

import os

import pytest
import torch

import gisp_fx as gx
from conftest import tiny_model, tiny_tokenizer, tokens
from gisp_fx.compile import compile_model
from gisp_fx.config import CompileConfig
from gisp_fx.loading import LoadedModel

PROBE = tokens(2, 10, seed=9)


def _calib():
    return gx.lm_windows(tiny_tokenizer(), " ".join(f"w{4 + i % 90}" for i in range(4000)), windows=12, seq_len=16,
                         batch_size=4)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def test_prune_works_in_place_without_files_or_process_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model("llama-gqa", num_hidden_layers=4)
    dense = _logits(model)
    threads, env = torch.get_num_threads(), dict(os.environ)
    result = gx.prune_(model, gx.GispConfig(sparsity=0.4, steps=2, protect="none"), _calib(), progress=False)
    assert list(tmp_path.iterdir()) == []  # no I/O
    assert torch.get_num_threads() == threads and dict(os.environ) == env
    assert 0.4 <= result.sparsity <= 0.405
    assert gx.analyse(model) == result.plan  # the argument is the pruned model
    assert sum(p.numel() for p in model.parameters()) == result.plan.total_params
    assert len(result.trajectory.steps) >= 2 and result.scores is not None  # 2 steps, and a last small one if short
    assert not torch.allclose(_logits(model), dense)
    assert model.training is False


def test_prune_with_repair_leaves_the_callers_model_repaired_as_compile_saves_it(tmp_path):
    """The in-place model after prune_ with --repair lsq is the model compile writes (not pruned-but-unrepaired)."""
    cfg = gx.GispConfig(sparsity=0.4, steps=2, protect="none", repair="lsq")
    model = tiny_model("llama-gqa", num_hidden_layers=4)
    calib = _calib()
    gx.prune_(model, cfg, calib, progress=False)
    run = CompileConfig.from_gisp(cfg, model="tiny", output=str(tmp_path / "run"))
    run = CompileConfig(**{**run.to_json(), "tasks": (), "eval_windows": 2})
    result = compile_model(run, calibration=calib, progress=False,
                           loaded=LoadedModel(tiny_model("llama-gqa", num_hidden_layers=4), tiny_tokenizer(), "tiny"))
    saved = gx.load_model(str(result.output)).model
    torch.testing.assert_close(_logits(model), _logits(saved), rtol=0, atol=1e-5)
    unrepaired = tiny_model("llama-gqa", num_hidden_layers=4)
    gx.prune_(unrepaired, gx.GispConfig(sparsity=0.4, steps=2, protect="none"), calib, progress=False)
    assert not torch.allclose(_logits(model), _logits(unrepaired), atol=1e-4)


def test_calibration_as_a_tensor_equals_lm_windows():
    calib = _calib()
    a, b = tiny_model("llama-gqa", num_hidden_layers=4), tiny_model("llama-gqa", num_hidden_layers=4)
    cfg = gx.GispConfig(sparsity=0.3, method="oneshot", protect="none")
    ra = gx.prune_(a, cfg, calib, progress=False)
    rb = gx.prune_(b, cfg, gx.lm_windows(tiny_tokenizer(), " ".join(f"w{4 + i % 90}" for i in range(4000)),
                                         windows=12, seq_len=16, batch_size=8), progress=False)
    rc = gx.prune_(tiny_model("llama-gqa", num_hidden_layers=4), cfg, calib.input_ids, progress=False)
    assert ra.trajectory.steps[0].removed == rb.trajectory.steps[0].removed == rc.trajectory.steps[0].removed


def test_save_load_and_materialize_chain(tmp_path):
    model, tok = tiny_model("llama-gqa", num_hidden_layers=4), tiny_tokenizer()
    result = gx.prune_(model, gx.GispConfig(sparsity=0.4, steps=2, protect="none"), _calib(), progress=False)
    out = gx.save_pretrained(model, tok, tmp_path / "pruned")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    torch.testing.assert_close(_logits(back), _logits(model), rtol=0, atol=1e-5)
    with pytest.raises(gx.GispError, match="exists"):
        gx.save_pretrained(model, tok, out)
    # the trajectory in memory rebuilds the same model from a fresh dense copy, at the end and at step 1
    again = gx.materialize(result.trajectory, result.sparsity, model=tiny_model("llama-gqa", num_hidden_layers=4))
    torch.testing.assert_close(_logits(again.model), _logits(model), rtol=0, atol=1e-5)
    first = gx.materialize(result.trajectory, step=1, model=tiny_model("llama-gqa", num_hidden_layers=4))
    assert gx.analyse(first.model).decoder_params > result.plan.decoder_params


@pytest.mark.parametrize("call, match", [
    (lambda: gx.prune_("not a model", gx.GispConfig(sparsity=0.5), None), "model must be a torch.nn.Module"),
    (lambda: gx.prune_(tiny_model("llama-gqa"), {"sparsity": 0.5}, None), "config must be a GispConfig"),
    (lambda: gx.prune_(tiny_model("llama-gqa"), gx.GispConfig(sparsity=0.5), None), "needs calibration data"),
    (lambda: gx.prune_(tiny_model("llama-gqa"), gx.GispConfig(sparsity=0.5), [1, 2, 3]), "token-id windows"),
    (lambda: gx.prune_(tiny_model("llama-gqa"), gx.GispConfig(sparsity=0.5), torch.zeros(4, 8)), "int64"),
    (lambda: gx.prune_(tiny_model("llama-gqa"), gx.GispConfig(sparsity="0.5"), tokens(4, 8)), "sparsity must be"),
    (lambda: gx.prune_(tiny_model("llama-gqa"), gx.GispConfig(sparsity=0.5, method="x"), tokens(4, 8)), "--method"),
    (lambda: gx.lm_windows(tiny_tokenizer(), 42), "text must be a str"),
    (lambda: gx.lm_windows(tiny_tokenizer(), windows=0), "windows must be a positive int"),
    (lambda: gx.analyse("model"), "must be a torch.nn.Module"),
    (lambda: gx.save_pretrained(None, None, "x"), "must be a torch.nn.Module"),
    (lambda: gx.export_onnx(42, "x"), "expected a model folder"),
    (lambda: gx.export_onnx("x", "y", colour="red"), "unknown options colour"),
    (lambda: gx.materialize(3.5, 0.2), "expected a run folder or a Trajectory"),
    (lambda: gx.custom_objective([1], "loss"), "loss_fn must be callable"),
])
def test_wrong_arguments_get_one_clear_error(call, match):
    with pytest.raises(gx.GispError, match=match):
        call()


def test_importing_the_package_stays_light():
    import subprocess
    import sys

    code = "import sys, gisp_fx; print(' '.join(m for m in ('torch', 'onnxruntime', 'matplotlib', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == ""
