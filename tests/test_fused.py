"""The fused ONNX graph (exporters/fused.py) and int4 weights (exporters/int4.py) against torch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from gisp_fx.errors import GispError
from gisp_fx.exporters.fused import even_groups
from gisp_fx.exporters.int4 import BLOCK, Int4Config, dequantize, gptq_blocks, pack, quantize_blocks
from gisp_fx.exporters.onnx import META_FILE
from gisp_fx.exporters.export import INT4_FILE, choose_graph, export_model
from gisp_fx.exporters.ort import OrtCausalLM
from gisp_fx.loading import LoadedModel
from gisp_fx.passes.shrink import shrink_
from gisp_fx.passes.analyse import analyse
from test_export import _batch, assert_runner_matches_torch
from test_rewrite import SELECTION, UNEVEN


def _model(selection=None, arch="llama-gqa"):
    model = tiny_model(arch)
    if selection is not None:
        shrink_(model, analyse(model), selection)
    return model


@pytest.mark.parametrize("selection,gqa", [(None, "pad"), (SELECTION, "pad"), (UNEVEN, "pad"), (UNEVEN, "dup")],
                         ids=["dense", "emptied", "uneven-pad", "uneven-dup"])
def test_fused_parity_and_greedy_equal_torch(selection, gqa, tmp_path):
    model = _model(selection)
    result = export_model(LoadedModel(model, tiny_tokenizer(), "tiny"), tmp_path / "onnx", with_past=True, gqa=gqa)
    assert result.parity.logits < 1e-4 and result.parity.present < 1e-4 and result.parity.past == 5
    meta = json.loads((tmp_path / "onnx" / META_FILE).read_text())
    assert meta["graph"] == "fused"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "QuickGelu"} <= ops
    assert not ops & {"RotaryEmbedding", "Split"}  # rotary runs inside GroupQueryAttention, on the packed QKV
    runner = OrtCausalLM(tmp_path / "onnx")
    if selection is SELECTION:  # layer 1 lost its attention (no cache), layer 2 its MLP
        assert [(s.layer, s.heads) for s in runner.past] == [(0, 1), (2, 2)]
    if selection is UNEVEN and gqa == "dup":  # layer 0: K/V head 0 has 1 query head, K/V head 1 has 2 -> 1 twice
        assert meta["fused"]["kv_index"]["0"] == [0, 1, 1] and meta["fused"]["kv_index"]["1"] == [0, 1]
        assert meta["fused"]["cache_bytes_per_token"] > meta["fused"]["model_cache_bytes_per_token"]
    if selection is UNEVEN and gqa == "pad":  # the group of 1 gets a zero query head; the cache is the model's
        assert meta["fused"]["query_order"]["0"] == [0, -1, 1, 2] and meta["fused"]["zero_query_heads"] == 1
        assert meta["fused"]["cache_bytes_per_token"] == meta["fused"]["model_cache_bytes_per_token"]
    assert_runner_matches_torch(runner, model, new_tokens=10)


def test_qwen2_biases_fused(tmp_path):
    result = export_model(LoadedModel(_model(SELECTION, "qwen2"), None, "tiny"), tmp_path / "onnx", with_past=True)
    assert result.parity.logits < 1e-4 and result.parity.present < 1e-4


def test_even_groups():
    for mode in ("pad", "dup"):
        assert even_groups((0, 0, 0, 1, 1, 1), mode) == ((0, 1, 2, 3, 4, 5), (0, 1))  # dense GQA: unchanged
        assert even_groups((1, 0, 1, 0), mode) == ((1, 3, 0, 2), (0, 1))  # reordered, no copies
    assert even_groups((0, 1, 1), "dup") == ((0, 1, 2), (0, 1, 1))  # 1 + 2 heads: K/V head 1 twice
    assert even_groups((0, 0, 1, 1, 1, 1), "dup") == ((0, 1, 2, 3, 4, 5), (0, 1, 1))  # gcd 2
    assert even_groups((0, 1, 1), "pad") == ((0, -1, 1, 2), (0, 1))  # a zero query head fills the group of 1
    with pytest.raises(GispError, match="--gqa: expected one of pad, dup"):
        even_groups((0,), "even")


def test_int4_blocks_round_trip():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 70)).astype(np.float32)  # 70: the last block is padded
    codes, scale, zero = quantize_blocks(w)
    assert codes.shape == (5, 3, BLOCK) and codes.max() <= 15
    back = dequantize(codes, scale, zero, 70)
    err = np.abs(back - w).reshape(5, -1)
    # round to nearest: at most half a step per block (plus float slack)
    steps = np.repeat(scale, BLOCK, axis=1)[:, :70]
    assert (err <= steps / 2 + 1e-6).all() and err.max() > 0
    packed, zp = pack(codes, zero)
    assert packed.shape == (5, 3, BLOCK // 2) and zp.shape == (5 * 2,)
    assert (packed[0, 0, 0] & 15) == codes[0, 0, 0] and (packed[0, 0, 0] >> 4) == codes[0, 0, 1]


def test_int4_export_close_to_fp32(tmp_path):
    model = _model(UNEVEN)
    export_model(LoadedModel(model, None, "tiny"), tmp_path / "onnx", with_past=True, quantize="int4",
                 int4=Int4Config(method="rtn", head_bits=4, clip=0))  # round to nearest: needs no calibration
    meta = json.loads((tmp_path / "onnx" / META_FILE).read_text())
    ops = {n.op_type for n in onnx.load(str(tmp_path / "onnx" / INT4_FILE), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops
    # int4 of a random tiny model: logits move, but stay within a stated tolerance of torch fp32
    assert 1e-4 < meta["int4"]["parity"]["logits"] < 0.25  # measured 0.11 (logits of this model span about +-1)
    ids, mask = _batch()
    out = OrtCausalLM(tmp_path / "onnx" / INT4_FILE).generate(ids, mask, max_new_tokens=4)
    assert out.shape == (2, 13)


def test_bad_input(tmp_path):
    gemma = tiny_model("gemma2")
    assert choose_graph(gemma, None, True) == "traced" and choose_graph(_model(), None, True) == "fused"
    assert choose_graph(_model(), None, False) == "traced"
    with pytest.raises(GispError, match="model type 'gemma2' is not covered.*--graph traced"):
        export_model(LoadedModel(gemma, None, "tiny"), tmp_path / "g2", graph="fused")
    with pytest.raises(GispError, match="int4.*needs --graph fused"):
        export_model(LoadedModel(_model(), None, "tiny"), tmp_path / "t", graph="traced", quantize="int4")
    narrow = _model()
    with torch.no_grad():  # an MLP narrowed to 8 channels: down_proj has 8 input features, too few for MatMulNBits
        mlp = narrow.model.layers[0].mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            setattr(mlp, name, torch.nn.Linear(old.in_features, 8, bias=False))
        mlp.down_proj = torch.nn.Linear(8, mlp.down_proj.out_features, bias=False)
    with pytest.raises(GispError, match="down_proj has shape .out 64, in 8.*without --quantize int4"):
        export_model(LoadedModel(narrow, None, "tiny"), tmp_path / "n", quantize="int4", int4=Int4Config(method="rtn", clip=0))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("selection", [None, UNEVEN], ids=["dense", "uneven"])
def test_genai_runs_the_export(selection, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")  # installed by `make latency` (a benchmark-only dependency)
    model = _model(selection)
    export_model(LoadedModel(model, None, "tiny"), tmp_path / "onnx", with_past=True)
    ids = torch.tensor([[5, 9, 13, 22, 7, 40]])
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0].tolist()
    genai = og.Model(str(tmp_path / "onnx"))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=len(greedy), do_sample=False)
    gen = og.Generator(genai, params)
    gen.append_tokens(ids.numpy().astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert [int(t) for t in gen.get_sequence(0)] == greedy


def test_genai_config_refused_without_consecutive_caches(tmp_path):
    export_model(LoadedModel(_model(SELECTION), None, "tiny"), tmp_path / "onnx", with_past=True)
    meta = json.loads((tmp_path / "onnx" / META_FILE).read_text())
    assert meta["genai"].startswith("not written: layers [1] have no attention left")
    assert not (tmp_path / "onnx" / "genai_config.json").exists()


def _correlated(rng, k=96, n=1500):
    """Inputs with correlated features (as a layer's activations are): X [n, k]."""
    return (rng.standard_normal((n, k)) @ rng.standard_normal((k, k)) * 0.3 + rng.standard_normal((n, k))).astype(
        np.float32)


def test_int4_choices_on_a_known_matrix():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    x = _correlated(rng)
    gram = x.T @ x

    def errors(codes, scale, zero):
        d = dequantize(codes, scale, zero, 96)
        return float(((d - w) ** 2).mean()), float(((x @ (d - w).T) ** 2).mean())

    rtn = errors(*quantize_blocks(w))
    # gptq with an identity Gram has nothing to compensate: exactly round to nearest
    assert np.array_equal(gptq_blocks(w, np.eye(96, dtype=np.float32), damp=0.0)[0], quantize_blocks(w)[0])
    # on correlated inputs it trades weight error for output error: measured 0.66x the output error of rtn
    gptq = errors(*gptq_blocks(w, gram))
    assert gptq[1] < 0.75 * rtn[1] and gptq[0] > rtn[0]
    # the clip search keeps a range only where it lowers the block's error: never worse than min/max
    clip = errors(*quantize_blocks(w, clip=8))
    assert clip[0] < 0.97 * rtn[0]  # measured 0.95x
    # symmetric: zero point fixed at 8, codes within 0..15, at most half a step off inside the range
    codes, scale, zero = quantize_blocks(w, symmetric=True)
    assert (zero == 8).all() and codes.max() <= 15
    # int8 blocks: 17x finer steps than int4, measured 290x smaller squared error
    int8 = errors(*quantize_blocks(w, bits=8))
    assert int8[0] < rtn[0] / 100
    packed, zp = pack(*quantize_blocks(w, bits=8)[::2], bits=8)
    assert packed.dtype == np.uint8 and packed.shape == (48, 3, BLOCK) and zp.shape == (48 * 3,)


def test_int4_config_bad_input():
    with pytest.raises(GispError, match="block 20; MatMulNBits takes 16, 32"):
        Int4Config(block=20)
    with pytest.raises(GispError, match="head_bits 3; expected 4, 8 or 0"):
        Int4Config(head_bits=3)
    with pytest.raises(GispError, match="method 'awq' is not one of rtn, gptq"):
        Int4Config(method="awq")
    with pytest.raises(GispError, match=r"skip names \['mlp'\]"):
        Int4Config(skip=("mlp",))
    with pytest.raises(GispError, match="Gram .* does not match weight"):
        gptq_blocks(np.zeros((4, 32), np.float32), np.eye(16, dtype=np.float32))


def test_int4_gptq_export_with_int8_head(tmp_path):
    from conftest import tokens

    model = _model(UNEVEN)
    config = Int4Config(method="gptq", head_bits=8)
    with pytest.raises(GispError, match="calibrates on WikiText-2 train and needs the model's tokenizer"):
        export_model(LoadedModel(model, None, "tiny"), tmp_path / "none", quantize="int4", int4=config)
    assert not (tmp_path / "none").exists()
    export_model(LoadedModel(model, None, "tiny"), tmp_path / "onnx", quantize="int4", int4=config,
                 calibration=tokens(batch=16, seq=24, seed=3))
    meta = json.loads((tmp_path / "onnx" / META_FILE).read_text())
    assert meta["int4"]["config"]["method"] == "gptq"
    nodes = onnx.load(str(tmp_path / "onnx" / INT4_FILE), load_external_data=False).graph.node
    bits = {n.output[0].rsplit("_", 1)[0]: [a.i for a in n.attribute if a.name == "bits"][0]
            for n in nodes if n.op_type == "MatMulNBits"}
    assert bits.pop("lm_head") == 8 and set(bits.values()) == {4} and len(bits) == 3 * 5  # 3 layers x (qkv, o, gate, up, down)
    # int4 body, int8 head: within the tolerance the rtn export keeps (measured below 0.25 as well)
    assert 1e-4 < meta["int4"]["parity"]["logits"] < 0.25


def _snap(w: np.ndarray) -> np.ndarray:
    """w moved onto a per-block 16-level grid, as the weights of a Q4_1 GGUF checkpoint sit when dequantised."""
    return dequantize(*quantize_blocks(w, float_zero=True), w.shape[1])


def _run_nbits(weight: np.ndarray, config: Int4Config, kind: str, x: np.ndarray) -> np.ndarray:
    """x @ weight.T through one MatMulNBits node as the fused builder writes it, in onnxruntime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from gisp_fx.exporters.fused import _Graph
    from gisp_fx.exporters.int4 import matmul_nbits

    g = _Graph()
    y = matmul_nbits(g, "x", weight, None, f"layers.0.{kind}", config)
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, x.shape[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 8
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_float_zero_points_keep_a_checkpoints_grid_and_onnxruntime_reads_them():
    rng = np.random.default_rng(0)
    w = _snap(rng.standard_normal((40, 96)).astype(np.float32))
    exact = dequantize(*quantize_blocks(w, float_zero=True), 96)
    assert np.abs(exact - w).max() < 1e-6
    # integer zero points must put 0 inside each block's range: the same grid is lost (measured 3-4 % of the range)
    lossy = dequantize(*quantize_blocks(w), 96)
    assert np.abs(lossy - w).max() > 0.01 * np.abs(w).max()
    x = rng.standard_normal((3, 96)).astype(np.float32)
    fp32_activations = Int4Config(method="rtn", accuracy_level=0, float_zero=True, clip=0)
    got = _run_nbits(w, fp32_activations, "down_proj", x)
    assert np.abs(got - x @ w.T).max() < 1e-4 * np.abs(x @ w.T).max()
    # a Q8_0 block (absmax code 127, symmetric): the symmetric 8-bit LM head keeps it exactly, with no zero points
    q = rng.integers(-127, 128, (40, 3, BLOCK))
    q[:, :, 0] = 127
    w8 = (q * rng.uniform(0.001, 0.01, (40, 3, 1))).reshape(40, 96).astype(np.float32)
    codes, scale, zero = quantize_blocks(w8, bits=8, symmetric=True)
    assert np.abs(dequantize(codes, scale, zero, 96) - w8).max() < 1e-6
    head = Int4Config(method="rtn", head_bits=8, head_symmetric=True, accuracy_level=0, clip=0)
    assert np.abs(_run_nbits(w8, head, "lm_head", x) - x @ w8.T).max() < 1e-4 * np.abs(x @ w8.T).max()
    with pytest.raises(GispError, match="float_zero is an asymmetric range"):
        Int4Config(symmetric=True, float_zero=True)


def test_gptq_calibrates_only_the_linears_that_round_with_a_loss(tmp_path):
    from gisp_fx.exporters.int4 import gram_modules
    from gisp_fx.plan import GroupRef, Kind, Selection

    model = tiny_model("llama-gqa", head_dim=32)  # heads of whole blocks: reordering heads keeps o_proj's blocks
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.from_numpy(_snap(m.weight.numpy())))
    config = Int4Config(float_zero=True, clip=0)  # gptq, float zero points, LM head int4
    assert gram_modules(model, config) == []
    assert len(gram_modules(model, Int4Config())) == 3 * 4 + 1  # integer zero points cannot hold the grid
    # nothing needs calibrating: no tokenizer, no calibration windows; the body and head are their own grid, so with
    # fp32 activations the int4 graph equals torch
    exact = Int4Config(accuracy_level=0, float_zero=True, clip=0)
    export_model(LoadedModel(model, None, "tiny"), tmp_path / "onnx", quantize="int4", int4=exact)
    meta = json.loads((tmp_path / "onnx" / META_FILE).read_text())
    assert meta["int4"]["parity"]["logits"] < 1e-4 and meta["int4"]["parity"]["present"] < 1e-4
    # two MLP channels of layer 0 go: its down_proj's kept input columns no longer fill the grid's blocks
    shrink_(model, analyse(model), Selection((GroupRef(0, Kind.CHANNEL, 5), GroupRef(0, Kind.CHANNEL, 7))))
    assert gram_modules(model, config) == ["model.layers.0.mlp.down_proj"]
    assert set(gram_modules(model, Int4Config(head_bits=8, float_zero=True, clip=0))) == {
        "model.layers.0.mlp.down_proj", "lm_head"}


@pytest.mark.parametrize("selection", [None, UNEVEN], ids=["dense", "uneven"])
def test_shared_cache_equals_a_growing_cache(selection, tmp_path):
    """The runner's one-buffer cache (GroupQueryAttention writes in place), grown mid-generation, against the graph
    run with a past that it copies into a longer present every step."""
    from gisp_fx.exporters.ort import SharedCache

    export_model(LoadedModel(_model(selection), None, "tiny"), tmp_path / "onnx", with_past=True)
    runner = OrtCausalLM(tmp_path / "onnx")
    assert runner.shares_cache
    ids, mask = _batch()
    ids, mask = ids.numpy(), mask.numpy()
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    last = np.array([ids.shape[1] - 1])
    SharedCache.STEP = 4  # tiny capacities, so that the buffers grow (and copy what they hold) twice below
    try:
        logits, cache = runner.step(ids, mask, positions, last, capacity=ids.shape[1])
        ref, past = runner.run(ids, mask, positions, last)
        capacities = [cache.capacity]
        for _ in range(20):  # 8 + 20 positions in capacities of 4: 12 -> 24 -> 48
            nxt = logits[:, -1].argmax(-1)[:, None]
            mask = np.concatenate([mask, np.ones_like(nxt)], 1)
            positions = positions[:, -1:] + 1
            logits, cache = runner.step(nxt, mask, positions, np.array([0]), cache)
            ref, past = runner.run(nxt, mask, positions, np.array([0]), past)
            assert np.abs(logits - ref).max() < 1e-5
            capacities.append(cache.capacity)
    finally:
        SharedCache.STEP = 64
    assert len(set(capacities)) >= 3  # it grew twice and carried the filled positions over
    filled = cache.numpy()
    assert all(np.abs(filled[k] - past[k]).max() < 1e-5 for k in past)


@pytest.mark.parametrize("selection", [None, UNEVEN], ids=["dense", "uneven"])
def test_float16_fused_graph(selection, tmp_path):
    """--dtype float16 (what onnxruntime's CUDA GroupQueryAttention runs): fp16 weights, activations and cache, fp32
    logits, within FP16_TOLERANCE of torch fp32; tested here on the CPU kernels, which take float16 too."""
    from gisp_fx.exporters.onnx import FP16_TOLERANCE

    model = _model(selection)
    result = export_model(LoadedModel(model, None, "tiny"), tmp_path / "onnx", with_past=True, dtype="float16",
                          quantize="int4", int4=Int4Config(method="rtn", clip=0))
    assert result.parity.logits <= FP16_TOLERANCE and result.parity.logits > 1e-5  # fp16, not a copy of fp32
    meta = json.loads((tmp_path / "onnx" / META_FILE).read_text())
    assert meta["dtype"] == "float16" and meta["fused"]["dtype"] == "float16"
    assert meta["fused"]["cache_bytes_per_token"] == 2 * sum(2 * h * 16 for h in meta["layout"]["kv_heads"])
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    types = {i.name: i.type.tensor_type.elem_type for i in list(graph.input) + list(graph.output)}
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16 and types["logits"] == onnx.TensorProto.FLOAT
    runner = OrtCausalLM(tmp_path / "onnx")
    assert runner.cache_dtype == np.float16
    ids, mask = _batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert (runner(ids, attention_mask=mask).logits - expected)[mask.bool()].abs().max() < FP16_TOLERANCE
    out = runner.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    assert out.shape == (2, 15)
    assert OrtCausalLM(tmp_path / "onnx" / INT4_FILE).generate(ids, attention_mask=mask, max_new_tokens=3).shape == (2, 12)


def test_float16_bad_input(tmp_path):
    with pytest.raises(GispError, match="--dtype float16: only the fused graph"):
        export_model(LoadedModel(tiny_model("gemma2"), None, "tiny"), tmp_path / "g", dtype="float16")
    with pytest.raises(GispError, match="--quantize int8: onnxruntime's dynamic int8 quantises float32"):
        export_model(LoadedModel(_model(), None, "tiny"), tmp_path / "q", dtype="float16", quantize="int8")
    with pytest.raises(GispError, match="expected one of float32, float16 for the fused graph, got 'bfloat16'"):
        export_model(LoadedModel(_model(), None, "tiny"), tmp_path / "b", dtype="bfloat16")
    assert not any(tmp_path.iterdir())
