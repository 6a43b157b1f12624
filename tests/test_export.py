"""ONNX export, the onnxruntime runner and the latency bench on tiny models: parity, generation, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_model, tiny_tokenizer, tokens
from gisp_fx.cli import main
from gisp_fx.errors import GispError
from gisp_fx.exporters.onnx import INT8_FILE, META_FILE
from gisp_fx.exporters.export import export_model
from gisp_fx.exporters.ort import OrtCausalLM, pick_next
from gisp_fx.loading import LoadedModel
from gisp_fx.passes.shrink import shrink_
from gisp_fx.passes.analyse import analyse
from gisp_fx.save import save_pruned
from test_rewrite import SELECTION, UNEVEN


def _pruned(arch="llama-gqa", selection=SELECTION):
    model = tiny_model(arch)
    shrink_(model, analyse(model), selection)
    return model


def assert_runner_matches_torch(runner, model, new_tokens: int) -> None:
    """On a left-padded batch: the runner's logits equal torch's (< 1e-4 where not padded), and its greedy tokens
    equal torch `generate`'s."""
    ids, mask = _batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    got = runner(ids, attention_mask=mask).logits
    assert (got - expected)[mask.bool()].abs().max() < 1e-4
    assert torch.equal(runner.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0), greedy)


def _batch():
    ids = tokens(2, 9, seed=5)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding on the first row
    return ids, mask


@pytest.mark.parametrize("arch,pruned", [("llama-gqa", False), ("llama-gqa", True), ("qwen3", True),
                                         ("phi3", True), ("gemma3", False), ("mistral", True)])
def test_export_parity_and_greedy_equal_torch(arch, pruned, tmp_path):
    model = _pruned(arch) if pruned else tiny_model(arch)
    result = export_model(LoadedModel(model, tiny_tokenizer(), arch), tmp_path / "onnx", with_past=True)
    assert result.parity.ok() and result.parity.logits < 1e-4 and result.parity.present < 1e-4
    meta = json.loads((tmp_path / "onnx" / META_FILE).read_text())
    assert meta["opset"] >= 17 and meta["params"]["total"] == sum(p.numel() for p in model.parameters())
    runner = OrtCausalLM(tmp_path / "onnx")
    if pruned:  # SELECTION removes every head of layer 1 (no cache there) and leaves one K/V head in layer 0
        assert [(s.layer, s.heads) for s in runner.past] == [(0, 1), (2, 2)]
    assert_runner_matches_torch(runner, model, new_tokens=12)


def test_uneven_kv_groups_export(tmp_path):
    model = _pruned("llama-gqa", UNEVEN)
    result = export_model(LoadedModel(model, None, "tiny"), tmp_path / "onnx", with_past=True)
    assert result.parity.ok()
    ids, mask = _batch()
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(OrtCausalLM(tmp_path / "onnx").generate(ids, mask, max_new_tokens=8, pad_token_id=0), greedy)


def test_export_without_past_scores_but_does_not_generate(tmp_path):
    model = tiny_model("qwen2")
    result = export_model(LoadedModel(model, tiny_tokenizer(), "tiny"), tmp_path / "onnx", with_past=False)
    assert result.layout is None and result.parity.present is None
    runner = OrtCausalLM(tmp_path / "onnx")
    ids, mask = _batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits[:, -2:]
    assert (runner(ids, attention_mask=mask, logits_to_keep=2).logits - expected).abs().max() < 1e-4
    with pytest.raises(GispError, match="--with-past"):
        runner.generate(ids, mask)


def test_sampling_is_seeded_and_respects_top_k():
    logits = np.log(np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]]))
    draws = [pick_next(logits, True, 1.0, 2, 1.0, np.random.default_rng(s)) for s in range(40)]
    seen = {tuple(d) for d in draws}
    assert all(d[0] in (0, 1) and d[1] in (3, 0, 1, 2) for d in draws) and len(seen) > 1
    assert np.array_equal(pick_next(logits, True, 1.0, 2, 1.0, np.random.default_rng(3)),
                          pick_next(logits, True, 1.0, 2, 1.0, np.random.default_rng(3)))
    top_p = [pick_next(logits, True, 1.0, 0, 0.5, np.random.default_rng(s)) for s in range(20)]
    assert all(d[0] == 0 and d[1] == 3 for d in top_p)  # nucleus of 0.5: the single most likely token
    assert np.array_equal(pick_next(logits, False, 1.0, 0, 1.0, None), [0, 3])


def test_int8_variant_is_written_and_runs(tmp_path):
    model = tiny_model("llama-gqa")
    export_model(LoadedModel(model, None, "tiny"), tmp_path / "onnx", with_past=True, quantize="int8")
    meta = json.loads((tmp_path / "onnx" / META_FILE).read_text())
    assert meta["int8"]["file"] == INT8_FILE and meta["int8"]["parity"]["logits"] > 0  # reported, not enforced
    ids, mask = _batch()
    out = OrtCausalLM(tmp_path / "onnx" / INT8_FILE).generate(ids, mask, max_new_tokens=4)
    assert out.shape == (2, 13)


def test_bad_input(tmp_path, tiny_folder):
    loaded = LoadedModel(tiny_model("llama-gqa"), None, "tiny")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(GispError, match="exists; pass --overwrite"):
        export_model(loaded, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    # parity above tolerance: loud failure with the figure, nothing left behind
    with pytest.raises(GispError, match=r"max \|logit diff\| [0-9.e-]+.*nothing was written"):
        export_model(loaded, tmp_path / "strict", tolerance=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    # an attention that SDPA cannot express is refused, not exported wrong
    with pytest.raises(GispError, match="attn_logit_softcapping"):
        export_model(LoadedModel(tiny_model("gemma2"), None, "tiny"), tmp_path / "g2")
    export_model(loaded, tmp_path / "ok", with_past=True)
    with pytest.raises(GispError, match="provider 'cuda' is not available.*available: cpu"):
        OrtCausalLM(tmp_path / "ok", provider="cuda")
    with pytest.raises(GispError, match="expected an ONNX export"):
        OrtCausalLM(tmp_path / "taken")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    assert main(["export", str(not_a_model), "--output", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_cli_export_bench_and_eval(tmp_path, tiny_folder, capsys):
    dense = tiny_folder("llama-gqa")
    pruned = tmp_path / "pruned"
    save_pruned(_pruned(), tiny_tokenizer(), pruned)
    for src, dst in ((dense, "dense.onnx"), (pruned, "pruned.onnx")):
        assert main(["export", str(src), "--output", str(tmp_path / dst), "--with-past"]) == 0
        assert "max |logit diff|" in capsys.readouterr().out
    report = tmp_path / "bench"
    args = ["bench", str(tmp_path / "dense.onnx"), str(tmp_path / "pruned.onnx"), dense, str(pruned),
            "--prefill", "8,16", "--prompt", "8", "--decode", "4", "--repeats", "2", "--output", str(report)]
    assert main(args) == 0
    doc = json.loads((report / "bench.json").read_text())
    rows = {(r["model"].split("/")[-1], r["engine"]): r for r in doc["rows"]}
    assert set(rows) == {("dense.onnx", "ort"), ("pruned.onnx", "ort"), ("llama-gqa", "torch"), ("pruned", "torch")}
    for engine, base in (("ort", "dense.onnx"), ("torch", "llama-gqa")):
        assert rows[(base, engine)]["ideal"] == 1.0 and rows[(base, engine)]["sparsity"] == 0.0
    p = rows[("pruned.onnx", "ort")]
    assert p["ideal"] == pytest.approx(rows[("dense.onnx", "ort")]["params"]["touched_per_token"]
                                       / p["params"]["touched_per_token"])
    assert all(len(m["samples_ms"]) == 2 and m["min_ms"] <= m["median_ms"] <= m["max_ms"]
               for m in p["metrics"].values())
    assert (report / "bench.png").stat().st_size > 0 and "decode" in (report / "bench.md").read_text()
    assert main(args) == 2  # the report exists: refused without --overwrite
    assert main(["bench", dense, "--engines", "onnx"]) == 2
    assert "unknown engine" in capsys.readouterr().err
    # eval through onnxruntime scores exactly as torch does
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "pruned.onnx"), "--tasks", "wikitext2,arc_easy", "--limit", "4",
                 "--windows", "4", "--json"]) == 0
    via_ort = json.loads(capsys.readouterr().out)
    assert main(["eval", str(pruned), "--tasks", "wikitext2,arc_easy", "--limit", "4", "--windows", "4",
                 "--json"]) == 0
    via_torch = json.loads(capsys.readouterr().out)
    assert [r["value"] for r in via_ort] == pytest.approx([r["value"] for r in via_torch], rel=1e-4)
