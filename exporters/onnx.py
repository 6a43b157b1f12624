"""Model -> ONNX: a decoder with (optional) KV cache, dynamic batch/sequence/past, per-layer K/V head counts.

The graph's interface (what `OrtCausalLM` reads back from it):

    inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64, position_ids [batch, seq] int64,
             logits_positions [n] int64 (which sequence positions get logits: all for scoring, the last for
             generation), and with past: past_key_values.{i}.key / .value [batch, kv_heads_i, past, head_dim_i]
    outputs  logits [batch, n, vocab], and with past: present.{i}.key / .value [batch, kv_heads_i, past + seq, head_dim_i]

`i` runs over the decoder layers that keep attention; a pruned layer whose attention is gone has no cache at all.
Per-layer head counts are whatever pruning left: they are read from the graph's input shapes, not from the config.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from gisp_fx.errors import GispError
from gisp_fx.exporters.ort import OrtCausalLM
from gisp_fx.modeling_gisp import PREFIX, gisp_implementation
from gisp_fx.exporters.layout import CacheLayout, cache_layout  # noqa: F401  (part of this module's interface)

OPSET = 18
MODEL_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
META_FILE = "gisp_onnx.json"
TOLERANCE = 1e-3  # max |diff| of logits and of present K/V, torch vs onnxruntime
FP16_TOLERANCE = 0.25  # the same for a float16 fused graph against the float32 torch model (SmolLM2: 0.078)


@dataclass(frozen=True)
class Parity:
    """Torch vs onnxruntime on the same padded batch: max |diff| of logits and of present K/V (past ones)."""

    logits: float
    present: float | None
    batch: int
    seq: int
    past: int

    def ok(self, tolerance: float = TOLERANCE) -> bool:
        return self.logits <= tolerance and (self.present is None or self.present <= tolerance)


@dataclass(frozen=True)
class OnnxExport:
    path: Path  # the output folder
    layout: CacheLayout | None  # None: exported without past
    parity: Parity | None
    opset: int
    export_s: float


class DecoderGraph(nn.Module):
    """The traced interface: flat tensors in, flat tensors out; builds the HF cache from the past tensors."""

    def __init__(self, model: nn.Module, layout: CacheLayout | None):
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(self, input_ids, attention_mask, position_ids, logits_positions, *past):
        seq = input_ids.shape[1]
        past_len = attention_mask.shape[1] - seq
        cache_position = torch.arange(seq, device=input_ids.device) + past_len
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      cache_position=cache_position, logits_to_keep=logits_positions)
        if self.layout is None:
            return self.model(**kwargs, use_cache=False).logits
        from transformers import DynamicCache

        given = dict(zip(self.layout.layers, zip(past[0::2], past[1::2])))
        data = []
        for i in range(self.layout.num_layers):
            if i in given:
                data.append(given[i])
            else:  # no attention left in this layer: a stand-in with the right length, never read or returned
                stub = attention_mask.new_zeros((input_ids.shape[0], 1, past_len, 1), dtype=past[0].dtype)
                data.append((stub, stub))
        cache = DynamicCache(ddp_cache_data=data)
        out = self.model(**kwargs, past_key_values=cache, use_cache=True)
        present = []
        for i in self.layout.layers:
            present += [out.past_key_values.layers[i].keys, out.past_key_values.layers[i].values]
        return (out.logits, *present)


def example_feed(layout: CacheLayout | None, vocab: int, batch: int = 2, seq: int = 5, past: int = 3,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch (row 0 has its first position padded) with `past` cached positions."""
    gen = torch.Generator().manual_seed(seed)
    past = past if layout is not None else 0
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[0, 0] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "logits_positions": torch.arange(seq)}
    if layout is not None:
        for name, t in layout.empty_past(batch, past).items():
            feed[name] = torch.randn(t.shape, generator=gen).to(t.dtype)
    return feed


@contextlib.contextmanager
def _export_mode(model: nn.Module):
    """SDPA attention (a pruned model: its gisp_ wrapper over SDPA) and attributes SDPA cannot express rejected."""
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    saved = [(c, c._attn_implementation) for c in configs]
    try:
        for c in configs:
            pruned = (c._attn_implementation or "").startswith(PREFIX)
            c._attn_implementation = gisp_implementation("sdpa") if pruned else "sdpa"
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation = impl


def _check_exportable(model: nn.Module) -> None:
    capped = [n for n, m in model.named_modules() if getattr(m, "attn_logit_softcapping", None) is not None]
    if capped:
        raise GispError(
            f"export: {type(model).__name__} caps attention logits ({capped[0]}.attn_logit_softcapping), which "
            "SDPA attention cannot express; the ONNX export would compute a different model"
        )


def trace(model: nn.Module, layout: CacheLayout | None):
    """torch.onnx.export (dynamo) of DecoderGraph with dynamic batch, sequence and past lengths."""
    _check_exportable(model)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    feed = example_feed(layout, vocab)
    # Dim.DYNAMIC lets export derive the relations (mask length = past + seq) and fails if a size gets pinned
    dyn = Dim.DYNAMIC
    dynamic = [{0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn}]
    if layout is not None:
        dynamic.append(tuple({0: dyn, 2: dyn} for _ in range(2 * len(layout.layers))))  # the *past argument
    wrapper = DecoderGraph(model, layout).eval()
    try:
        with _export_mode(model), torch.no_grad():
            inputs = ["input_ids", "attention_mask", "position_ids", "logits_positions"]
            outputs = ["logits"]
            if layout is not None:
                inputs += layout.past_names()
                outputs += layout.present_names()
            return torch.onnx.export(wrapper, tuple(feed.values()), f=None, input_names=inputs, output_names=outputs,
                                     opset_version=OPSET, dynamo=True, external_data=True, optimize=True,
                                     dynamic_shapes=tuple(dynamic))
    except Exception as exc:
        raise GispError(f"export: torch.export could not trace {type(model).__name__} with a KV cache "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def write_onnx(model: nn.Module, folder: Path, with_past: bool = True, opset: int = OPSET) -> tuple[CacheLayout | None, float]:
    """Trace and write `folder/model.onnx` (+ external weights); returns the cache layout and seconds taken."""
    t0 = time.perf_counter()
    layout = cache_layout(model) if with_past else None
    onnx_program = trace(model, layout)
    onnx_program.save(str(folder / MODEL_FILE), external_data=True)
    return layout, time.perf_counter() - t0


def parity(model: nn.Module, layout: CacheLayout | None, onnx_path: Path, seed: int = 0,
           kv_index: dict[int, tuple[int, ...]] | None = None) -> Parity:
    """Torch vs onnxruntime (CPU) on a left-padded batch of 2; the cached positions hold the model's own K/V.

    `kv_index` (fused graphs): per layer, graph K/V head -> model K/V head, where the graph duplicates K/V heads.
    """
    vocab = model.config.get_text_config(decoder=True).vocab_size
    past = 5 if layout is not None else 0
    feed = example_feed(layout, vocab, batch=2, seq=7, past=past, seed=seed)
    graph = DecoderGraph(model, layout).eval()
    with _export_mode(model), torch.no_grad():
        if layout is not None:  # fill the past with what the model computes for real tokens, not noise
            prefix = torch.randint(3, vocab, (2, past), generator=torch.Generator().manual_seed(seed + 1))
            mask = feed["attention_mask"][:, :past]
            empty = layout.empty_past(2)
            _, *present = graph(
                prefix, mask, (mask.cumsum(-1) - 1).clamp(min=0), torch.arange(past), *empty.values())
            feed.update(zip(layout.past_names(), present))
        expected = graph(*feed.values())
    expected = (expected,) if isinstance(expected, torch.Tensor) else expected
    runner = OrtCausalLM(onnx_path, provider="cpu")
    ort_feed = {k: v.numpy() for k, v in feed.items()}
    if kv_index:  # the graph's cache holds model K/V heads in the order (and with the copies) of kv_index
        ort_feed.update({f"past_key_values.{i}.{kind}": ort_feed[f"past_key_values.{i}.{kind}"][:, list(ix)]
                         for i, ix in kv_index.items() for kind in ("key", "value")})
        per_layer = [kv_index[i] for i in layout.layers for _ in range(2)]
        expected = (expected[0], *(e[:, list(ix)] for e, ix in zip(expected[1:], per_layer)))
    ort_feed = {k: v.astype(runner.cache_dtype) if k.startswith("past_key_values.") else v for k, v in ort_feed.items()}
    got = runner.session.run(runner.output_names, ort_feed)
    diffs = [float(np.abs(g.astype(np.float32) - e.float().numpy()).max()) for g, e in zip(got, expected)]
    # logits where a query is padded attend to nothing: undefined in both engines, so left out of the figure
    real = feed["attention_mask"][:, past:].bool().numpy()
    diffs[0] = float(np.abs(got[0] - expected[0].float().numpy())[real].max())
    return Parity(logits=diffs[0], present=max(diffs[1:]) if len(diffs) > 1 else None, batch=2,
                  seq=feed["input_ids"].shape[1], past=past)


def quantize_int8(folder: Path) -> Path:
    """onnxruntime dynamic quantization (int8 weights of MatMul/Gemm, activations quantized per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = folder / MODEL_FILE, folder / INT8_FILE
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     use_external_data_format=True, extra_options={"MatMulConstBOnly": True,
                                    # contrib ops (the fused graph) leave some types to infer: they are float
                                    "DefaultTensorType": 1})
    return dst
