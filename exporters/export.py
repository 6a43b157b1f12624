"""(model, folder) -> an exported ONNX folder: the traced or the fused graph, optional int8/int4, genai config,
tokenizer and gisp_onnx.json, written only once onnxruntime agrees with torch (ExportResult: paths and parity)."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from gisp_fx.errors import GispError
from gisp_fx.exporters.fused import FAMILIES, unsupported_head, write_fused
from gisp_fx.exporters.genai import genai_note, write_genai_config
from gisp_fx.exporters.int4 import Int4Config, calibration_grams
from gisp_fx.exporters.layout import CacheLayout
from gisp_fx.exporters.onnx import (INT8_FILE, META_FILE, MODEL_FILE, OPSET, TOLERANCE, FP16_TOLERANCE, OnnxExport,
                                    parity, quantize_int8, write_onnx)
from gisp_fx.loading import LoadedModel, param_counts
from gisp_fx.preflight import require_types
from gisp_fx.save import save_tokenizer, staged_dir

GRAPHS = ("fused", "traced")
INT4_FILE = "model_int4.onnx"
GENAI_FILE = "model_genai.onnx"  # model.onnx's graph and weights with a default logits_positions, for genai


def choose_graph(model: nn.Module, graph: str | None, with_past: bool) -> str:
    """--graph: 'fused' (the default with --with-past, for the families exporters/fused.py covers) or 'traced'."""
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
        int4 = int4 or Int4Config()
        grams = calibration_grams(model, loaded.tokenizer, int4, calibration)  # before anything is written
    with staged_dir(out) as tmp:
        extra: dict = {}
        kv_index = None
        if graph == "fused":
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
            _, q_seconds, _ = write_fused(model, tmp / INT4_FILE, quantize=int4, gqa=gqa, grams=grams, dtype=dtype)
            q = parity(model, layout, tmp / INT4_FILE, kv_index=kv_index)  # expected to differ: reported
            meta["int4"] = {"file": INT4_FILE, "parity": asdict(q), "export_s": q_seconds, "config": asdict(int4)}
        if loaded.tokenizer is not None:
            save_tokenizer(loaded.tokenizer, tmp)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return OnnxExport(out, layout, check, OPSET, seconds)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
