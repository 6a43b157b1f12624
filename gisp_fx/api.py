"""The public Python API, in the style of torchao's `quantize_(model, config)`:

    loaded = load_model("smollm2")
    plan = analyse(loaded.model)
    result = prune_(loaded.model, GispConfig(sparsity=0.5), lm_windows(loaded.tokenizer))
    save_pretrained(loaded.model, loaded.tokenizer, "runs/mine")
    export_onnx("runs/mine", "runs/mine-onnx")

`prune_` works in place and in memory; the functions that write say where."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from gisp_fx.calibration import custom_objective, lm_windows, mc_sequences
from gisp_fx.config import CompileConfig, GispConfig, Method
from gisp_fx.errors import GispError
from gisp_fx.exporters.export import export_model
from gisp_fx.exporters.onnx import OnnxExport
from gisp_fx.loading import LoadedModel, load_model
from gisp_fx.rebuild import materialize
from gisp_fx.passes.analyse import analyse as _analyse
from gisp_fx.passes.pg import PgConfig
from gisp_fx.plan import GroupPlan
from gisp_fx.prune import PruneResult, prune_
from gisp_fx.save import check_output_folder, save_pruned, staged_dir

__all__ = ["CompileConfig", "GispConfig", "GispError", "GroupPlan", "LoadedModel", "Method", "PgConfig", "PruneResult",
           "analyse", "custom_objective", "export_onnx", "lm_windows", "load_model", "materialize", "mc_sequences",
           "prune_", "save_pretrained"]


EXPORT_OPTIONS = frozenset({"with_past", "quantize", "tolerance", "graph", "gqa", "int4", "calibration", "dtype"})


def analyse(model: nn.Module) -> GroupPlan:
    """The model's prunable groups per layer (query heads, K/V groups, MLP channels), found on its captured graph."""
    if not isinstance(model, nn.Module):
        raise GispError(f"analyse: model must be a torch.nn.Module, got {type(model).__name__}")
    return _analyse(model)


def save_pretrained(model: nn.Module, tokenizer, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `model` (pruned or not) and `tokenizer` as a model folder that transformers' `from_pretrained` loads
    (a pruned one with trust_remote_code=True: the folder carries its own modeling file). Nothing is left behind
    on failure."""
    if not isinstance(model, nn.Module):
        raise GispError(f"save_pretrained: model must be a torch.nn.Module, got {type(model).__name__}")
    out = check_output_folder(folder, "save_pretrained: folder")
    if out.exists() and not overwrite:
        raise GispError(f"save_pretrained: '{out}' exists; pass overwrite=True to replace it, or choose another folder")
    with staged_dir(out) as tmp:
        save_pruned(model, tokenizer, tmp)
    return out


def export_onnx(model_or_folder: str | os.PathLike | LoadedModel, output: str | os.PathLike, *,
                overwrite: bool = False, **options) -> OnnxExport:
    """Export a model folder (or a LoadedModel) to ONNX for onnxruntime with its KV cache, checked against torch
    before anything is written. `options` as `gisp-fx export`'s flags: quantize ('int8' | 'int4'), graph
    ('fused' | 'traced'), with_past, dtype ('float32' | 'float16'), gqa."""
    unknown = sorted(set(options) - EXPORT_OPTIONS)
    if unknown:
        raise GispError(f"export_onnx: unknown options {', '.join(unknown)}; expected some of "
                        f"{', '.join(sorted(EXPORT_OPTIONS))}")
    if isinstance(model_or_folder, (str, os.PathLike)):
        loaded, source = load_model(str(model_or_folder)), str(model_or_folder)
    elif isinstance(model_or_folder, LoadedModel):
        loaded, source = model_or_folder, model_or_folder.source
    else:
        raise GispError(f"export_onnx: expected a model folder or a LoadedModel, got {type(model_or_folder).__name__}")
    return export_model(loaded, output, overwrite=overwrite, source=source, **options)
