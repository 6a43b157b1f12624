"""Model -> fused ONNX decoder, written op by op from the eager model's weights (no tracing): onnxruntime's contrib
ops per layer, as onnxruntime-genai's model builder writes them, but with every layer's own widths.

Per decoder layer: `SkipSimplifiedLayerNormalization` (RMSNorm with the residual add fused), one QKV `MatMul`,
one `GroupQueryAttention` on the packed QKV (rotary at HF's `position_ids`, exact on left-padded rows; cache append
and attention; its `num_heads`/`kv_num_heads` are per node, so each layer keeps the widths pruning left), the MLP as two `MatMul`s with `QuickGelu` (alpha 1 = SiLU), and the LM head on
`logits_positions` only. The interface is exporters/onnx.py's, so `OrtCausalLM` runs it unchanged.

Uneven query groups (pruning may leave a K/V head 2 query heads and its neighbour 1): GroupQueryAttention needs
`num_heads / kv_num_heads` consecutive query heads per K/V head. The builder reorders query heads by their K/V head
(exact: rows of q_proj and columns of o_proj move together) and duplicates each K/V head `count / g` times, with `g`
the gcd of the group sizes, so every group has `g` heads. That is exact without retraining; what it costs is
cache bytes, reported per layer as `kv_index` (graph K/V head -> model K/V head) in gisp_onnx.json.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from gisp_fx.errors import GispError
from gisp_fx.exporters.int4 import Int4Config, matmul_nbits
from gisp_fx.exporters.layout import CacheLayout

FAMILIES = ("llama", "qwen2")  # model_type values the fused builder covers; others take --graph traced
GQA_HEAD_MULTIPLE = 16  # onnxruntime's CPU GroupQueryAttention takes head sizes that are multiples of 16 only
MS = "com.microsoft"
DEFAULT_POSITIONS = -(2 ** 62)  # logits_positions' default: every position (its only negative value below -1)
DTYPES = {"float32": np.float32, "float16": np.float16}  # the graph's float type: weights, activations, cache


@dataclass(frozen=True)
class AttentionShape:
    """One layer's attention as the graph runs it: query order and, per graph K/V head, its model K/V head."""

    num_heads: int  # graph query heads (zero-filled ones included)
    head_dim: int
    query_order: tuple[int, ...]  # graph query head -> model query head, -1: a zero head (gqa 'pad')
    kv_index: tuple[int, ...]  # graph K/V head -> model K/V head

    @property
    def kv_heads(self) -> int:
        return len(self.kv_index)


GQA_MODES = ("pad", "dup")


def even_groups(kv_map: tuple[int, ...], mode: str = "pad") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Query head -> K/V head map -> (query order, K/V index) with equal, consecutive groups.

    pad: groups of the largest size, short groups filled with zero query heads (-1 in the order; their q_proj rows
    and o_proj columns are zero), so the cache keeps the model's K/V heads. dup: groups of gcd(group sizes), each
    K/V head repeated count/gcd times (more cache, no extra query heads).
    """
    if mode not in GQA_MODES:
        raise GispError(f"--gqa: expected one of {', '.join(GQA_MODES)}, got '{mode}'")
    kv_ids = sorted(set(kv_map))
    members = {j: [h for h, k in enumerate(kv_map) if k == j] for j in kv_ids}
    sizes = [len(m) for m in members.values()]
    order, index = [], []
    if mode == "pad":
        g = max(sizes)
        for j in kv_ids:
            order += members[j] + [-1] * (g - len(members[j]))
            index.append(j)
        return tuple(order), tuple(index)
    g = math.gcd(*sizes)
    for j in kv_ids:
        order += members[j]
        index += [j] * (len(members[j]) // g)
    return tuple(order), tuple(index)


def _check_family(model: nn.Module) -> nn.Module:
    cfg = model.config.get_text_config(decoder=True)
    kind = getattr(cfg, "model_type", "")
    if kind not in FAMILIES:
        raise GispError(f"export --graph fused: model type '{kind}' is not covered by the fused builder (covers "
                        f"{', '.join(FAMILIES)}); export it with --graph traced")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise GispError(f"export --graph fused: activation '{cfg.hidden_act}' (the builder writes SiLU); use --graph traced")
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        raise GispError("export --graph fused: sliding-window attention is not built; use --graph traced")
    rope = getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", "llama3", "linear"):
        raise GispError(f"export --graph fused: rope type '{rope_type}' varies with length; use --graph traced")
    return model.model


class _Graph:
    """Nodes, initializers and unique names; float initializers are stored in `dtype` (the graph's float type)."""

    def __init__(self, dtype=np.float32):
        from onnx import helper

        self.helper = helper
        self.dtype = np.dtype(dtype)
        self.nodes, self.inits, self.counter = [], [], 0

    def name(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}_{self.counter}"

    def const(self, stem: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = array.astype(self.dtype)
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def op(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", stem: str | None = None,
           outputs: list[str] | None = None, **attrs) -> list[str] | str:
        outs = outputs or [self.name(stem or op.lower()) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op, inputs, outs, name=self.name(op), domain=domain, **attrs))
        return outs if len(outs) > 1 else outs[0]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _linear(g: _Graph, x: str, weight: np.ndarray, bias: np.ndarray | None, stem: str, quantize,
            gram: np.ndarray | None = None) -> str:
    """x @ weight.T (+ bias); weight [out, in] as nn.Linear stores it. int4 (an Int4Config): MatMulNBits, or a
    MatMul where the config leaves this linear kind fp32; `gram` [in, in]: its calibration inputs' X^T X."""
    if quantize is not None:

        y = matmul_nbits(g, x, weight, bias, stem, quantize, gram)
        if y is not None:
            return y
    y = g.op("MatMul", [x, g.const(stem + ".weight", weight.T)], stem=stem)
    if bias is not None and np.any(bias):
        y = g.op("Add", [y, g.const(stem + ".bias", bias)], stem=stem + "_b")
    return y


def attention_shape(attn: nn.Module, head_dim: int, gqa: str = "pad") -> AttentionShape:
    nq = attn.q_proj.out_features // head_dim
    nkv = attn.k_proj.out_features // head_dim
    kv_map = getattr(attn, "gisp_kv_map", None) or tuple(h // (nq // nkv) for h in range(nq))
    order, index = even_groups(tuple(kv_map), gqa)
    return AttentionShape(len(order), head_dim, order, index)


def _rows(w: np.ndarray, heads: tuple[int, ...], d: int) -> np.ndarray:
    return np.concatenate([w[h * d:(h + 1) * d] if h >= 0 else np.zeros_like(w[:d]) for h in heads], axis=0)


def _gram_heads(gram: np.ndarray | None, heads: tuple[int, ...], d: int) -> np.ndarray | None:
    """A Gram over the model's attention-output columns -> over the graph's (reordered, zero heads: zero rows)."""
    if gram is None:
        return None
    padded = np.pad(gram, ((0, 1), (0, 1)))
    zero = gram.shape[0]
    idx = np.concatenate([np.arange(h * d, (h + 1) * d) if h >= 0 else np.full(d, zero) for h in heads])
    return padded[np.ix_(idx, idx)]


def build(model: nn.Module, quantize=None, gqa: str = "pad", grams: dict[str, np.ndarray] | None = None,
          dtype: str = "float32"):
    """The fused decoder as an onnx.ModelProto, and per layer (None where attention is gone) its AttentionShape.
    `quantize`: None, or an int4.Int4Config; `grams`: calibration X^T X per input of a linear, by module name
    (int4.input_grams), for the configs that use them; `dtype`: 'float32', or 'float16' (weights, activations and
    cache; the logits stay float32), the precision onnxruntime's CUDA kernels of GroupQueryAttention need."""
    from onnx import TensorProto, helper

    if quantize == "int4":

        quantize = Int4Config()
    names = {m: n for n, m in model.named_modules()}
    gram_of = (lambda module: grams.get(names[module]) if grams else None)
    base = _check_family(model)
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if dtype not in DTYPES:
        raise GispError(f"export --dtype: expected one of {', '.join(DTYPES)} for the fused graph, got '{dtype}'")
    g = _Graph(DTYPES[dtype])
    T = TensorProto
    F = T.FLOAT16 if dtype == "float16" else T.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", T.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", T.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("logits_positions", T.INT64, ["n"])]
    outputs = [helper.make_tensor_value_info("logits", T.FLOAT, ["batch", "n", cfg.vocab_size])]

    # shared: GQA's lengths (every row has the full length: padding is masked by the bias, not by seqlens_k)
    shape = g.op("Shape", ["attention_mask"])
    total64 = g.op("Gather", [shape, g.const("one", np.array(1, np.int64))], axis=0)
    total = g.op("Cast", [total64], to=T.INT32, stem="total_sequence_length")
    batch = g.op("Gather", [shape, g.const("zero", np.array([0], np.int64))], axis=0)
    last = g.op("Sub", [total, g.const("one32", np.array(1, np.int32))])
    seqlens = g.op("Expand", [last, batch], stem="seqlens_k")
    # additive bias [batch, 1, seq, total]: 0 on real keys, float min on padded ones
    # (the most negative finite value of the graph's type: finite, so an all-padded row cannot NaN)
    maskf = g.op("Cast", ["attention_mask"], to=F)
    bias = g.op("Mul", [g.op("Sub", [maskf, g.const("onef", np.array(1, np.float32))]),
                        g.const("neg", np.array(np.finfo(g.dtype).max, np.float32))])
    bias = g.op("Unsqueeze", [bias, g.const("axes12", np.array([1, 2], np.int64))])
    seq = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const("one_", np.array([1], np.int64))], axis=0)
    # every new row is real for GQA (query_seqlens = seq): it lets a batch of several rows append several tokens
    query_seqlens = g.op("Expand", [g.op("Cast", [seq], to=T.INT32), batch], stem="query_seqlens")
    bias_shape = g.op("Concat", [batch, g.const("one1", np.array([1], np.int64)), seq,
                                 g.op("Unsqueeze", [total64, g.const("axis0", np.array([0], np.int64))])], axis=0)
    bias = g.op("Expand", [bias, bias_shape], stem="attention_bias")

    # rotary tables from the model's own inv_freq and scaling (llama3/linear scaling is folded into inv_freq)
    rot = base.rotary_emb
    inv_freq = _np(rot.inv_freq)
    positions = np.arange(cfg.max_position_embeddings, dtype=np.float32)[:, None] * inv_freq[None]
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    cos = g.const("cos_cache", (np.cos(positions) * scaling).astype(np.float32))
    sin = g.const("sin_cache", (np.sin(positions) * scaling).astype(np.float32))

    embed = _np(base.embed_tokens.weight)
    embed_name = g.const("embed_tokens", embed)
    resid = g.op("Gather", [embed_name, "input_ids"], stem="embeddings")
    pending: list[str | None] = [None]  # a block output not yet added to the residual stream

    def norm(module: nn.Module, stem: str) -> str:
        nonlocal resid
        gamma = g.const(stem + ".weight", _np(module.weight))
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        if pending[0] is None:
            return g.op("SimplifiedLayerNormalization", [resid, gamma], epsilon=eps, axis=-1, stash_type=1, stem=stem)
        # outputs 1 and 2 (mean, inverse std) left unnamed: onnxruntime then neither computes nor allocates them
        out, summed = g.name(stem), g.name(stem + "_residual")
        g.op("SkipSimplifiedLayerNormalization", [pending[0], resid, gamma], domain=MS, epsilon=eps,
             outputs=[out, "", "", summed])
        resid = summed
        pending[0] = None
        return out

    def empty(block: nn.Module) -> None:  # an emptied block adds its output bias, if it kept one
        nonlocal resid
        if getattr(block, "out_bias", None) is not None and bool(block.out_bias.detach().abs().sum()):
            resid = g.op("Add", [resid, g.const("empty.bias", _np(block.out_bias))])

    shapes: list[AttentionShape | None] = []
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "q_proj"):
            s = attention_shape(attn, head_dim, gqa)
            shapes.append(s)
            x = norm(layer.input_layernorm, f"layers.{i}.input_layernorm")
            d = head_dim
            w = np.concatenate([_rows(_np(attn.q_proj.weight), s.query_order, d),
                                _rows(_np(attn.k_proj.weight), s.kv_index, d),
                                _rows(_np(attn.v_proj.weight), s.kv_index, d)])
            b = None
            if attn.q_proj.bias is not None:
                b = np.concatenate([_rows(_np(attn.q_proj.bias), s.query_order, d),
                                    _rows(_np(attn.k_proj.bias), s.kv_index, d),
                                    _rows(_np(attn.v_proj.bias), s.kv_index, d)])
            qkv = _linear(g, x, w, b, f"layers.{i}.qkv_proj", quantize, gram_of(attn.q_proj))
            past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
            pres_k, pres_v = f"present.{i}.key", f"present.{i}.value"
            for name in (past_k, past_v):
                inputs.append(helper.make_tensor_value_info(name, F, ["batch", s.kv_heads, "past", d]))
            for name in (pres_k, pres_v):
                outputs.append(helper.make_tensor_value_info(name, F, ["batch", s.kv_heads, "total", d]))
            scale = float(getattr(attn, "scaling", d ** -0.5))
            # packed QKV in, rotary inside (do_rotary) at the given position_ids: with query_seqlens given the op
            # rotates every token at its own position, prompt rows included (without it a prompt would use the
            # first row's first position for every row, wrong on left-padded batches)
            out = g.op("GroupQueryAttention", [qkv, "", "", past_k, past_v, seqlens, total, cos, sin, "position_ids",
                                               bias, "", "", "", "", "", query_seqlens],
                       domain=MS, num_heads=s.num_heads, kv_num_heads=s.kv_heads, scale=scale, do_rotary=1,
                       rotary_interleaved=0, outputs=[g.name(f"layers.{i}.attn"), pres_k, pres_v])[0]
            wo = _np(attn.o_proj.weight)
            wo = np.concatenate([wo[:, h * d:(h + 1) * d] if h >= 0 else np.zeros_like(wo[:, :d])
                                 for h in s.query_order], axis=1)
            bo = _np(attn.o_proj.bias) if attn.o_proj.bias is not None else None
            pending[0] = _linear(g, out, wo, bo, f"layers.{i}.o_proj", quantize,
                                 _gram_heads(gram_of(attn.o_proj), s.query_order, d))
        else:
            shapes.append(None)
            empty(attn)
        if hasattr(mlp, "gate_proj"):
            x = norm(layer.post_attention_layernorm, f"layers.{i}.post_attention_layernorm")
            bias_of = (lambda lin: _np(lin.bias) if lin.bias is not None else None)
            gate = _linear(g, x, _np(mlp.gate_proj.weight), bias_of(mlp.gate_proj), f"layers.{i}.gate_proj", quantize,
                           gram_of(mlp.gate_proj))
            up = _linear(g, x, _np(mlp.up_proj.weight), bias_of(mlp.up_proj), f"layers.{i}.up_proj", quantize,
                         gram_of(mlp.gate_proj))
            act = g.op("Mul", [g.op("QuickGelu", [gate], domain=MS, alpha=1.0), up])
            pending[0] = _linear(g, act, _np(mlp.down_proj.weight), bias_of(mlp.down_proj),
                                 f"layers.{i}.down_proj", quantize, gram_of(mlp.down_proj))
        else:
            empty(mlp)

    # the final norm and the LM head on the requested positions only; logits_positions' default (a runtime that does
    # not feed it, e.g. genai) means every position
    cond = g.op("Less", [g.op("ReduceMin", ["logits_positions"], keepdims=0), g.const("sentinel", np.array(DEFAULT_POSITIONS + 1, np.int64))])
    seq_scalar = g.op("Squeeze", [seq, g.const("axis0s", np.array([0], np.int64))])
    all_pos = g.name("all_positions")
    then_graph = helper.make_graph(
        [helper.make_node("Range", [g.const("zero_s", np.array(0, np.int64)), seq_scalar,
                                    g.const("one_s", np.array(1, np.int64))], [all_pos])],
        "every_position", [], [helper.make_tensor_value_info(all_pos, T.INT64, ["n"])])
    given = g.name("given_positions")
    else_graph = helper.make_graph([helper.make_node("Identity", ["logits_positions"], [given])], "given", [],
                                   [helper.make_tensor_value_info(given, T.INT64, ["n"])])
    pos = g.op("If", [cond], then_branch=then_graph, else_branch=else_graph, stem="positions")
    resid = g.op("Gather", [resid, pos], axis=1)
    if pending[0] is not None:
        pending[0] = g.op("Gather", [pending[0], pos], axis=1)
    x = norm(base.norm, "norm")
    head = model.get_output_embeddings()
    head_bias = _np(head.bias) if getattr(head, "bias", None) is not None else None
    logits = _linear(g, x, _np(head.weight), head_bias, "lm_head", quantize, gram_of(head))
    g.nodes.append(helper.make_node("Cast", [logits], ["logits"], to=T.FLOAT, name="logits") if F != T.FLOAT
                   else helper.make_node("Identity", [logits], ["logits"], name="logits"))

    graph = helper.make_graph(g.nodes, "gisp_fused_decoder", inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                              producer_name="gisp-fx fused")
    proto.ir_version = 8
    return proto, tuple(shapes)


def write_fused(model: nn.Module, path, quantize=None, genai_file: str | None = None,
                gqa: str = "pad", grams: dict[str, np.ndarray] | None = None, dtype: str = "float32"):
    """Build and save the fused graph at `path` (+ `path`.data); returns (model's CacheLayout, seconds, report)."""
    import time
    from pathlib import Path

    import onnx

    t0 = time.perf_counter()
    with torch.no_grad():
        proto, shapes = build(model, quantize, gqa, grams, dtype)
    path = Path(path)
    path.with_name(path.name + ".data").unlink(missing_ok=True)  # onnx appends to an existing weight file
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    if genai_file:  # the same graph and weight file, with a default for logits_positions (genai does not feed it)
        from onnx import numpy_helper

        proto.graph.initializer.append(numpy_helper.from_array(np.array([DEFAULT_POSITIONS], np.int64),
                                                               "logits_positions"))
        onnx.save_model(proto, str(path.with_name(genai_file)))
    seconds = time.perf_counter() - t0
    cfg = model.config.get_text_config(decoder=True)
    kept = [(i, s) for i, s in enumerate(shapes) if s is not None]
    model_heads = [len(set(s.kv_index)) for _, s in kept]
    layout = CacheLayout(cfg.num_hidden_layers, tuple(i for i, _ in kept), tuple(model_heads),
                         tuple(s.head_dim for _, s in kept))  # the torch model's cache (fp32), as parity feeds it
    item = np.dtype(DTYPES[dtype]).itemsize
    model_bytes = sum(2 * h * s.head_dim * item for h, (_, s) in zip(model_heads, kept))
    graph_bytes = sum(2 * s.kv_heads * s.head_dim * item for _, s in kept)
    report = {"kv_index": {str(i): list(s.kv_index) for i, s in kept},
              "query_order": {str(i): list(s.query_order) for i, s in kept},
              "graph_kv_heads": [s.kv_heads for _, s in kept], "num_heads": [s.num_heads for _, s in kept],
              "cache_bytes_per_token": graph_bytes, "model_cache_bytes_per_token": model_bytes,
              "nodes": len(proto.graph.node), "gqa": gqa, "dtype": dtype,
              "quantize": quantize if quantize is None or isinstance(quantize, str) else asdict(quantize),
              "zero_query_heads": sum(s.query_order.count(-1) for _, s in kept)}
    return layout, seconds, report


def unsupported_head(model) -> str | None:
    """Why onnxruntime's GroupQueryAttention cannot run this model's heads, or None: pruning removes whole heads,
    so the head size is the dense model's."""
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim % GQA_HEAD_MULTIPLE:
        return (f"head size {head_dim} is not a multiple of {GQA_HEAD_MULTIPLE}, which onnxruntime's "
                "GroupQueryAttention kernel requires")
    return None
