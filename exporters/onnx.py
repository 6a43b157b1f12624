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
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from gisp_fx.errors import GispError
from gisp_fx.loading import LoadedModel
from gisp_fx.preflight import require_types

OPSET = 18
MODEL_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
META_FILE = "gisp_onnx.json"
TOLERANCE = 1e-3  # max |diff| of logits and of present K/V, torch vs onnxruntime
FP16_TOLERANCE = 0.25  # the same for a float16 fused graph against the float32 torch model (SmolLM2: 0.078)


@dataclass(frozen=True)
class CacheLayout:
    """Which decoder layers keep a KV cache, with their K/V head counts and head dims."""

    num_layers: int
    layers: tuple[int, ...]
    kv_heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    dtype: str = "float32"

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in self.layers for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in self.layers for kind in ("key", "value")]

    def empty_past(self, batch: int, past: int = 0) -> dict[str, torch.Tensor]:
        dtype = getattr(torch, self.dtype)
        return {f"past_key_values.{i}.{kind}": torch.zeros(batch, h, past, d, dtype=dtype)
                for i, h, d in zip(self.layers, self.kv_heads, self.head_dims) for kind in ("key", "value")}


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


def cache_layout(model: nn.Module) -> CacheLayout:
    """Run the model once with a cache and read, per layer, the K/V shapes it stores (empty layers store none)."""
    from transformers import DynamicCache

    n = model.config.get_text_config(decoder=True).num_hidden_layers
    cache = DynamicCache()
    ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    from gisp_fx.modeling_gisp import empty_attention_layers

    emptied = empty_attention_layers(model)  # their cache layer holds only a length-keeping stub
    layers, heads, dims, dtype = [], [], [], "float32"
    for i, layer in enumerate(cache.layers[:n]):
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0 or i in emptied:
            continue
        layers.append(i)
        heads.append(keys.shape[1])
        dims.append(keys.shape[3])
        dtype = str(keys.dtype).removeprefix("torch.")
    return CacheLayout(n, tuple(layers), tuple(heads), tuple(dims), dtype)


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
    from gisp_fx.modeling_gisp import PREFIX, gisp_implementation

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
    from gisp_fx.exporters.ort import OrtCausalLM

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


GRAPHS = ("fused", "traced")
INT4_FILE = "model_int4.onnx"
GENAI_FILE = "model_genai.onnx"  # model.onnx's graph and weights with a default logits_positions, for genai


def choose_graph(model: nn.Module, graph: str | None, with_past: bool) -> str:
    """--graph: 'fused' (the default with --with-past, for the families exporters/fused.py covers) or 'traced'."""
    from gisp_fx.exporters.fused import FAMILIES, unsupported_head

    if graph is not None and graph not in GRAPHS:
        raise GispError(f"--graph: expected one of {', '.join(GRAPHS)}, got '{graph}'")
    kind = getattr(model.config.get_text_config(decoder=True), "model_type", "")
    why = unsupported_head(model) if kind in FAMILIES else None
    if graph is None:
        if with_past and kind in FAMILIES and why:
            print(f"export: the fused graph is not written for this model ({why}); exporting the traced graph")
            return "traced"
        return "fused" if with_past and kind in FAMILIES else "traced"
    if graph == "fused" and not with_past:
        raise GispError("--graph fused: the fused graph always has a KV cache; add --with-past, or use --graph traced")
    if graph == "fused" and why:
        raise GispError(f"--graph fused: {why}; nothing was written: use --graph traced (or leave --graph out)")
    return graph


def _as_fp32_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """The ONNX export and its onnxruntime parity check run on fp32 CPU weights: a half-precision or GPU model is
    cast (in place) with a note, rather than met with onnxruntime's raw type error."""
    p = next(model.parameters())
    if p.dtype != torch.float32 or p.device.type != "cpu":
        print(f"export: the model is {str(p.dtype).removeprefix('torch.')} on {p.device}; casting it to float32 on "
              "cpu for the ONNX export and its parity check (the in-memory model stays float32 on cpu)")
        model.to(device="cpu", dtype=torch.float32)
    return model


def export_model(loaded, output: str | os.PathLike, *, with_past: bool = True, overwrite: bool = False,
                 quantize: str | None = None, tolerance: float = TOLERANCE, source: str = "",
                 graph: str | None = None, gqa: str = "pad", int4=None, calibration=None,
                 dtype: str = "float32") -> OnnxExport:
    """Write `output/` = model.onnx (+ .data), tokenizer, config.json and gisp_onnx.json; fails on parity.
    `int4`: an int4.Int4Config (default: Int4Config()); `calibration`: token windows [n, seq] for the configs that
    calibrate (default: int4.CALIB_WINDOWS windows of WikiText-2 train through the model's tokenizer); `dtype`:
    the fused graph's float type ('float16' for onnxruntime's CUDA kernels, checked against torch fp32 within
    FP16_TOLERANCE)."""
    import onnx

    from gisp_fx.loading import param_counts

    require_types("export_model", loaded=(loaded, LoadedModel), output=(output, (str, os.PathLike)))
    out = Path(output)
    if out.exists() and not overwrite:
        raise GispError(f"--output '{out}' exists; pass --overwrite to replace it, or choose another folder")
    if quantize not in (None, "int8", "int4"):
        raise GispError(f"--quantize: expected 'int8' or 'int4', got '{quantize}'")
    model = _as_fp32_cpu(loaded.model).eval()
    graph = choose_graph(model, graph, with_past)
    if dtype != "float32":
        if graph != "fused":
            raise GispError(f"export --dtype {dtype}: only the fused graph is written in {dtype}; use --graph fused "
                            "(llama / qwen2 with --with-past), or export float32")
        if quantize == "int8":
            raise GispError(f"export --dtype {dtype} --quantize int8: onnxruntime's dynamic int8 quantises float32 "
                            "graphs; use --quantize int4, or --dtype float32")
        if tolerance == TOLERANCE:
            tolerance = FP16_TOLERANCE
    if quantize == "int4" and graph != "fused":
        raise GispError("--quantize int4 writes MatMulNBits into the fused graph; it needs --graph fused "
                        f"(this export is --graph {graph})")
    grams = None
    if quantize == "int4":
        from gisp_fx.exporters.int4 import Int4Config, calibration_grams

        int4 = int4 or Int4Config()
        grams = calibration_grams(model, loaded.tokenizer, int4, calibration)  # before anything is written
    from gisp_fx.save import staged_dir

    with staged_dir(out) as tmp:
        extra: dict = {}
        kv_index = None
        if graph == "fused":
            from gisp_fx.exporters.fused import write_fused

            layout, seconds, extra = write_fused(model, tmp / MODEL_FILE, genai_file=GENAI_FILE, gqa=gqa, dtype=dtype)
            kv_index = {int(k): tuple(v) for k, v in extra["kv_index"].items()}
        else:
            with contextlib.redirect_stdout(open(os.devnull, "w")):  # the exporter prints its own progress lines
                layout, seconds = write_onnx(model, tmp, with_past)
            onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=False)
        check = parity(model, layout, tmp / MODEL_FILE, kv_index=kv_index)
        if not check.ok(tolerance):
            raise GispError(f"export: onnxruntime disagrees with torch beyond {tolerance:g}: max |logit diff| "
                            f"{check.logits:.3g}, present K/V {check.present if check.present is not None else 0:.3g}; "
                            "nothing was written")
        meta = {"source": source, "opset": OPSET, "graph": graph, "with_past": layout is not None,
                "layout": asdict(layout) if layout is not None else None, "parity": asdict(check),
                "tolerance": tolerance, "dtype": dtype, "export_s": seconds, "params": param_counts(model), "torch": torch.__version__,
                "transformers": _version("transformers"), "onnxruntime": _version("onnxruntime")}
        if extra:
            meta["fused"] = extra
            from gisp_fx.exporters.genai import genai_note, write_genai_config

            graph_layout = CacheLayout(layout.num_layers, layout.layers, tuple(extra["graph_kv_heads"]),
                                       layout.head_dims)
            meta["genai"] = genai_note(graph_layout)
            if meta["genai"] == "ok":
                write_genai_config(tmp, model.config, graph_layout, GENAI_FILE)
            else:
                (tmp / GENAI_FILE).unlink()
        if quantize == "int8":
            quantize_int8(tmp)
            q = parity(model, layout, tmp / INT8_FILE, kv_index=kv_index)  # expected to differ: reported, not enforced
            meta["int8"] = {"file": INT8_FILE, "parity": asdict(q)}
        if quantize == "int4":
            from gisp_fx.exporters.fused import write_fused

            _, q_seconds, _ = write_fused(model, tmp / INT4_FILE, quantize=int4, gqa=gqa, grams=grams, dtype=dtype)
            q = parity(model, layout, tmp / INT4_FILE, kv_index=kv_index)  # expected to differ: reported
            meta["int4"] = {"file": INT4_FILE, "parity": asdict(q), "export_s": q_seconds, "config": asdict(int4)}
        if loaded.tokenizer is not None:
            from gisp_fx.save import save_tokenizer

            save_tokenizer(loaded.tokenizer, tmp)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return OnnxExport(out, layout, check, OPSET, seconds)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
