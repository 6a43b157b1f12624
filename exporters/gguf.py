"""Model (dense or pruned, Llama-style) -> GGUF file for llama.cpp's `deci` architecture, optionally quantised with
llama.cpp's own quantiser.

`deci` reads head_count, head_count_kv and feed_forward_length as per-layer arrays, so every layer keeps the widths
pruning left. What its graph (llama.cpp src/models/deci.cpp) cannot say directly is written exactly another way:
- uneven query groups (a K/V head serving 2 query heads, its neighbour 1): groups filled with zero query heads
  (exporters/fused.py `even_groups`, mode pad): a zero query row attends uniformly and its o_proj columns are
  zero, so it adds nothing; recorded per layer in `gisp.zero_query_heads` and `gisp.query_order.<layer>`;
- an emptied MLP where the attention is kept: deci skips the residual update of a layer with
  feed_forward_length 0 (`continue` before `inpL = cur`), dropping the attention's output, so such a layer gets
  one zero channel (`gisp.stub_mlp`); a layer with neither block stays 0/0 (an identity), except the last one,
  whose output rows deci only selects inside the MLP path;
- an emptied attention in layer 0: llama.cpp reads the head size only when layer 0 has heads, so layer 0 keeps
  one zero head (`gisp.stub_attention`); elsewhere an emptied attention is head_count 0.
q and k rows are permuted per head from Hugging Face's rotate-half layout to the consecutive pairs that llama.cpp's
llama rope rotates. Rope scaling is written as llama.cpp's per-frequency divisors (`rope_freqs`), taken from the
model's own inv_freq, so default, linear and llama3 scaling are all exact.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gisp_fx.errors import GispError
from gisp_fx.exporters.fused import attention_shape
from gisp_fx.exporters.gguf_vocab import Vocab, from_gguf, from_hf

FAMILIES = ("llama", "mistral", "qwen2")  # model_type values whose computation deci's graph reproduces exactly
QUANTIZE = ("f32", "f16", "q8_0", "q4_k_m")
LLAMA_FTYPE = {"q8_0": 7, "q4_k_m": 15}  # llama.cpp's llama_ftype values (LLAMA_FTYPE_MOSTLY_*)
# Every MLP width is rounded up to a multiple of 32 with zero channels (exact: silu(0) * 0 adds nothing; at most 31
# per layer; `gisp.zero_channels`) in the f16 and quantised files (f32, the parity format, keeps the widths as pruned):
# - llama.cpp quantises a tensor row by row in blocks of 32 (q8_0, q5_0) or 256 (k-quants) along its input width, and
#   falls back to f16 where the width is no multiple of 32: a pruned ffn_down (input width = the layer's channels,
#   e.g. 593) would stay f16 in a q4_k_m file, larger and slower than the dense model's;
# - its CPU matmul for prompts (llamafile's sgemm) takes f16/f32 weights only at aligned inner widths and otherwise
#   runs the generic dot-product loop: the 20 % SmolLM2 f16 file prefilled at 0.91x of the dense f16 file with its
#   widths as pruned (1,534, 1,250, ...) and at 1.26x / 1.14x (128 / 512 tokens) rounded to 32, same run, 2 threads.
# Rounding further, to 256 (k-quant blocks in ffn_down), changed no q4_k_m row beyond the noise of that run.
QUANT_BLOCK = 32
ARCH = "deci"
WHY_NOT = {  # what llama.cpp's deci graph lacks for the families gisp-fx prunes but this writer refuses
    "qwen3": "per-head q/k RMS norms",
    "gemma2": "embedding scaling, logit soft-capping, sliding-window layers and (1 + weight) norms",
    "gemma3": "per-head q/k norms, sliding-window layers and (1 + weight) norms",
    "gemma3_text": "per-head q/k norms, sliding-window layers and (1 + weight) norms",
    "phi3": "its sliding-window attention and LongRoPE scaling",
    "olmo2": "q/k norms over all heads and post-block norms",
    "cohere": "interleaved rotary, LayerNorm and parallel blocks",
    "opt": "learned positions, LayerNorm and ReLU",
    "gpt2": "learned positions, LayerNorm and GELU",
    "gpt_neox": "partial rotary, LayerNorm and parallel blocks",
    "falcon": "LayerNorm, GELU and parallel blocks",
}


@dataclass(frozen=True)
class GgufLayer:
    """One decoder layer as written: deci's widths, and what was added to make it exact."""

    heads: int
    kv_heads: int
    ff: int
    zero_query_heads: int = 0
    stub_attention: bool = False
    stub_mlp: bool = False
    zero_channels: int = 0  # MLP channels of zeros that round `ff` up to a multiple of QUANT_BLOCK


@dataclass(frozen=True)
class GgufResult:
    path: Path
    quantize: str
    seconds: float  # the whole export: write and, for q8_0/q4_k_m, quantise
    layers: tuple[GgufLayer, ...]
    tokenizer: str  # where the tokenizer metadata came from
    notes: tuple[str, ...] = field(default_factory=tuple)


def check_family(config) -> None:
    """Refuse, in one line naming what deci lacks, a model whose computation the deci graph does not reproduce."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kind = getattr(cfg, "model_type", "")
    if kind not in FAMILIES:
        lacks = WHY_NOT.get(kind, "its architecture")
        raise GispError(f"export --format gguf: model type '{kind}' is not covered (covers {', '.join(FAMILIES)}): "
                        f"llama.cpp's deci graph, which runs per-layer widths, lacks {lacks}; export it to ONNX")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise GispError(f"export --format gguf: activation '{cfg.hidden_act}'; llama.cpp's deci graph runs SiLU only")
    if kind == "qwen2" and getattr(cfg, "use_sliding_window", False):
        raise GispError("export --format gguf: Qwen2 with use_sliding_window=True; deci has no sliding window")
    if getattr(cfg, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise GispError(f"export --format gguf: partial rotary ({cfg.partial_rotary_factor}); deci rotates whole heads")
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise GispError(f"export --format gguf: rope type '{rope_type}' (its frequencies or scale vary with length); "
                        "written are default, linear and llama3 rope")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _rope_rows(w: np.ndarray, heads: int, d: int) -> np.ndarray:
    """Rows of q or k (or their bias) from rotate-half order (x_0..x_{d/2-1}, y_0..) to pairs (x_0, y_0, x_1, ..)."""
    rest = w.shape[1:]
    return w.reshape(heads, 2, d // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _heads(w: np.ndarray, order, d: int) -> np.ndarray:
    """Rows of w per head in `order`; -1: a zero head."""
    return np.concatenate([w[h * d:(h + 1) * d] if h >= 0 else np.zeros_like(w[:d]) for h in order], axis=0)


def _bias(linear: nn.Linear) -> np.ndarray | None:
    return _np(linear.bias) if getattr(linear, "bias", None) is not None else None


def _out_bias(block: nn.Module) -> np.ndarray | None:
    """An emptied block's output bias (modeling_gisp.EmptyBlock), if it kept a non-zero one."""
    bias = getattr(block, "out_bias", None)
    return _np(bias) if bias is not None and bool(bias.detach().abs().sum()) else None


def tensors(model: nn.Module, pad_ff: int = 1) -> tuple[dict, list[dict[str, np.ndarray]], list[GgufLayer],
                                                        np.ndarray | None]:
    """The model's weights in deci's names and layout: (global tensors, per-layer tensors, layers, rope divisors).
    pad_ff: MLP widths rounded up to a multiple of it with zero channels (see QUANT_BLOCK)."""
    cfg = model.config.get_text_config(decoder=True)
    base = model.model
    hidden = cfg.hidden_size
    d = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    eps_ones = np.ones(hidden, np.float32)
    n = len(base.layers)
    blocks, layers = [], []
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        t: dict[str, np.ndarray] = {}
        heads = kv = ff = zero = 0
        stub_attn = stub_mlp = False
        attn_bias = None
        if hasattr(attn, "q_proj"):
            s = attention_shape(attn, d, "pad")
            heads, kv, zero = s.num_heads, s.kv_heads, s.query_order.count(-1)
            t["attn_norm.weight"] = _np(layer.input_layernorm.weight)
            t["attn_q.weight"] = _rope_rows(_heads(_np(attn.q_proj.weight), s.query_order, d), heads, d)
            t["attn_k.weight"] = _rope_rows(_heads(_np(attn.k_proj.weight), s.kv_index, d), kv, d)
            t["attn_v.weight"] = _heads(_np(attn.v_proj.weight), s.kv_index, d)
            for name, proj, order, rope in (("attn_q", attn.q_proj, s.query_order, heads),
                                            ("attn_k", attn.k_proj, s.kv_index, kv),
                                            ("attn_v", attn.v_proj, s.kv_index, 0)):
                b = _bias(proj)
                if b is not None:
                    b = _heads(b, order, d)
                    t[f"{name}.bias"] = _rope_rows(b, rope, d) if rope else b
            wo = _np(attn.o_proj.weight)
            t["attn_output.weight"] = np.concatenate(
                [wo[:, h * d:(h + 1) * d] if h >= 0 else np.zeros_like(wo[:, :d]) for h in s.query_order], axis=1)
            attn_bias = _bias(attn.o_proj)
        else:
            attn_bias = _out_bias(attn)
            if i == 0 or attn_bias is not None:  # see the module docstring; a stub also carries an output bias
                stub_attn, heads, kv = True, 1, 1
                t["attn_norm.weight"] = eps_ones
                for name in ("attn_q", "attn_k", "attn_v"):
                    t[f"{name}.weight"] = np.zeros((d, hidden), np.float32)
                t["attn_output.weight"] = np.zeros((hidden, d), np.float32)
        if attn_bias is not None:
            t["attn_output.bias"] = attn_bias
        mlp_bias = None
        if hasattr(mlp, "gate_proj"):
            ff = mlp.gate_proj.out_features
            t["ffn_norm.weight"] = _np(layer.post_attention_layernorm.weight)
            for name, proj in (("ffn_gate", mlp.gate_proj), ("ffn_up", mlp.up_proj), ("ffn_down", mlp.down_proj)):
                t[f"{name}.weight"] = _np(proj.weight)
                b = _bias(proj)
                if b is not None:
                    t[f"{name}.bias"] = b
        else:
            mlp_bias = _out_bias(mlp)
            if heads or i == n - 1 or mlp_bias is not None:
                stub_mlp, ff = True, 1
                t["ffn_norm.weight"] = eps_ones
                t["ffn_gate.weight"] = np.zeros((1, hidden), np.float32)
                t["ffn_up.weight"] = np.zeros((1, hidden), np.float32)
                t["ffn_down.weight"] = np.zeros((hidden, 1), np.float32)
                if mlp_bias is not None:
                    t["ffn_down.bias"] = mlp_bias
        extra = -ff % pad_ff if ff else 0
        if extra:  # zero channels: gate/up rows and down columns of zeros add silu(0) * 0 = 0
            for name in ("ffn_gate", "ffn_up"):
                t[f"{name}.weight"] = np.pad(t[f"{name}.weight"], ((0, extra), (0, 0)))
                if f"{name}.bias" in t:
                    t[f"{name}.bias"] = np.pad(t[f"{name}.bias"], (0, extra))
            t["ffn_down.weight"] = np.pad(t["ffn_down.weight"], ((0, 0), (0, extra)))
        blocks.append(t)
        layers.append(GgufLayer(heads, kv, ff + extra, zero, stub_attn, stub_mlp, extra))

    glob = {"token_embd.weight": _np(base.embed_tokens.weight), "output_norm.weight": _np(base.norm.weight)}
    head = model.get_output_embeddings()
    if head.weight is not base.embed_tokens.weight:
        glob["output.weight"] = _np(head.weight)
    if getattr(head, "bias", None) is not None:
        raise GispError("export --format gguf: the LM head has a bias; llama.cpp's deci graph has none for it")
    return glob, blocks, layers, _rope_divisors(base, cfg, d)


def _rope_divisors(base: nn.Module, cfg, d: int) -> np.ndarray | None:
    """llama.cpp divides each rotary frequency theta^(-2i/d) by rope_freqs[i]: the model's own inv_freq gives them."""
    rot = base.rotary_emb
    if abs(float(getattr(rot, "attention_scaling", 1.0)) - 1.0) > 1e-6:
        raise GispError("export --format gguf: the rotary embedding scales attention (yarn/longrope); deci does not")
    inv = _np(rot.inv_freq).astype(np.float64)
    theta = _theta(cfg)
    plain = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    if inv.shape != plain.shape:
        raise GispError(f"export --format gguf: the rotary embedding has {inv.shape[0]} frequencies for head size {d}"
                        f"; deci rotates every pair of a head")
    ratio = plain / inv
    return None if np.allclose(ratio, 1.0, rtol=1e-6) else ratio.astype(np.float32)


def _theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


def write(model: nn.Module, vocab: Vocab, path: Path, *, dtype: str = "f32", source: str = "", pad_ff: int = 1,
          ) -> tuple[GgufLayer, ...]:
    """Write the GGUF at `path` (f32, or f16 for 2-D weights with 1-D tensors kept f32)."""
    import gguf

    cfg = model.config.get_text_config(decoder=True)
    glob, blocks, layers, freqs = tensors(model, pad_ff)
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if glob["token_embd.weight"].shape[0] != vocab.size:
        raise GispError(f"export --format gguf: the tokenizer has {vocab.size} tokens, the embedding "
                        f"{glob['token_embd.weight'].shape[0]} rows")
    ctx = int(cfg.max_position_embeddings)
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "mistral" and window:  # exact up to the window (deci has no sliding window)
        ctx = min(ctx, int(window))
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name(Path(source).name or "gisp-fx model")
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_block_count(len(layers))
    w.add_context_length(ctx)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length([lay.ff for lay in layers])
    w.add_head_count([lay.heads for lay in layers])
    w.add_head_count_kv([lay.kv_heads for lay in layers])
    w.add_key_length(d)
    w.add_value_length(d)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(vocab.size)
    for key, value, vtype, sub in vocab.fields:
        w.add_key_value(key, value, vtype, sub)
    # what was added to make the file exact (module docstring), per layer
    w.add_array("gisp.zero_query_heads", [lay.zero_query_heads for lay in layers])
    w.add_array("gisp.stub_attention", [int(lay.stub_attention) for lay in layers])
    w.add_array("gisp.stub_mlp", [int(lay.stub_mlp) for lay in layers])
    w.add_array("gisp.zero_channels", [lay.zero_channels for lay in layers])
    base = model.model
    for i, layer in enumerate(base.layers):
        if layers[i].zero_query_heads:
            order = attention_shape(layer.self_attn, d, "pad").query_order
            w.add_array(f"gisp.query_order.{i}", [int(h) for h in order])
    w.add_string("gisp.source", str(source))
    if freqs is not None:
        w.add_tensor("rope_freqs.weight", freqs)
    half = np.float16 if dtype == "f16" else np.float32
    for name, array in glob.items():
        w.add_tensor(name, np.ascontiguousarray(array.astype(half if array.ndim == 2 else np.float32)))
    for i, t in enumerate(blocks):
        for name, array in t.items():
            kind = half if array.ndim == 2 else np.float32
            w.add_tensor(f"blk.{i}.{name}", np.ascontiguousarray(array.astype(kind)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tuple(layers)


def quantize_file(src: Path, dst: Path, kind: str, threads: int = 0) -> None:
    """llama.cpp's own quantiser (llama_model_quantize, as the llama-quantize tool runs it) from `src` to `dst`."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise GispError(f"export --quantize {kind}: needs llama-cpp-python (llama.cpp's quantiser); install it with "
                        "`make .venv/.llama-installed` (a portable AVX2 build), or export f32/f16") from exc
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE[kind]
    params.nthread = threads or (os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise GispError(f"export --quantize {kind}: llama.cpp's quantiser failed (code {rc}) on {src}")


def source_gguf(spec: str) -> Path | None:
    """The GGUF a model spec came from: a bundled or fetched model, a .gguf file, or a pruned run folder whose
    trajectory names one of those; None when there is none (a plain Hugging Face folder or hub id)."""
    from gisp_fx.loading import BUNDLED, bundled_gguf
    from gisp_fx.models import REMOTE

    if spec in BUNDLED:
        return bundled_gguf(spec)
    if spec in REMOTE:
        from gisp_fx.models import fetch

        return fetch(spec)
    if spec.endswith(".gguf") and Path(spec).is_file():
        return Path(spec)
    traj = Path(spec) / "trajectory" / "trajectory.json"
    if traj.is_file():
        try:
            model = json.loads(traj.read_text(encoding="utf-8"))["config"]["model"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GispError(f"export --format gguf: '{traj}' does not name the run's model ({exc}); it is damaged"
                            ) from exc
        return source_gguf(model) if isinstance(model, str) and model != spec else None
    return None


def export_gguf(model_or_dir, output: str | os.PathLike, quantize: str = "f32", *, overwrite: bool = False,
                threads: int = 0, tokenizer_gguf: str | os.PathLike | None = None) -> GgufResult:
    """`model_or_dir` (a model spec or folder as `load_model` takes it, or a LoadedModel) -> a GGUF file at `output`
    for llama.cpp. quantize: f32, f16, or q8_0 / q4_k_m through llama.cpp's quantiser (written from f32). The
    tokenizer is copied from `tokenizer_gguf`, else from the GGUF the model came from (`source_gguf`), else written
    from the Hugging Face tokenizer. Nothing is left at `output` (nor beside it) when anything fails."""
    from gisp_fx.loading import LoadedModel, load_model

    if quantize not in QUANTIZE:
        raise GispError(f"export --format gguf --quantize: expected one of {', '.join(QUANTIZE)}, got '{quantize}'")
    out = Path(output)
    if out.suffix != ".gguf":
        raise GispError(f"export --format gguf --output '{out}': expected a file name ending in .gguf")
    if out.is_dir() or (out.exists() and not overwrite):
        raise GispError(f"export --format gguf --output '{out}' exists; pass --overwrite to replace it, or choose "
                        "another file name")
    if not out.parent.is_dir():
        raise GispError(f"export --format gguf --output '{out}': the folder '{out.parent}' does not exist; create it")
    t0 = time.perf_counter()
    if isinstance(model_or_dir, LoadedModel):
        loaded, spec = model_or_dir, model_or_dir.source
    else:
        spec = str(model_or_dir)
        from transformers import AutoConfig

        if os.path.isdir(spec):  # refuse a family before loading its weights
            check_family(AutoConfig.from_pretrained(spec))
        loaded = load_model(spec)
    model = loaded.model
    check_family(model.config)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    src = Path(tokenizer_gguf) if tokenizer_gguf else source_gguf(spec) if isinstance(spec, str) and spec else None
    if src is not None:
        vocab = from_gguf(src, vocab_size)
    elif loaded.tokenizer is not None:
        vocab = from_hf(loaded.tokenizer, vocab_size)
    else:
        raise GispError("export --format gguf: the model has no tokenizer, and no source GGUF to copy one from; "
                        "llama.cpp needs one in the file: load the model with its tokenizer")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    quant_tmp = tmp.with_suffix(".quant")
    try:
        with torch.no_grad():
            layers = write(model, vocab, tmp, dtype="f16" if quantize == "f16" else "f32", source=spec,
                           pad_ff=1 if quantize == "f32" else QUANT_BLOCK)
        if quantize in LLAMA_FTYPE:
            quantize_file(tmp, quant_tmp, quantize, threads)
            os.replace(quant_tmp, out)
        else:
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the published file should not be
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        quant_tmp.unlink(missing_ok=True)
    notes = []
    if any(lay.zero_query_heads for lay in layers):
        notes.append(f"{sum(lay.zero_query_heads for lay in layers)} zero query heads fill uneven groups")
    if any(lay.zero_channels for lay in layers):
        notes.append(f"{sum(lay.zero_channels for lay in layers)} zero MLP channels round widths up to multiples of "
                     f"{QUANT_BLOCK} (llama.cpp's quantiser and matmul)")
    if any(lay.stub_attention or lay.stub_mlp for lay in layers):
        notes.append(f"stubs: attention in layers {[i for i, lay in enumerate(layers) if lay.stub_attention]}, "
                     f"one zero MLP channel in layers {[i for i, lay in enumerate(layers) if lay.stub_mlp]}")
    return GgufResult(out, quantize, time.perf_counter() - t0, layers, vocab.origin, tuple(notes))
