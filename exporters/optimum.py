"""Model -> an optimum-layout ONNX folder that optimum's `ORTModelForCausalLM` loads and generates with.

optimum-onnx runs on the transformers 4.57 line (it pins transformers < 4.58), and `ORTModelForCausalLM` sizes the
KV cache from one `config.num_key_value_heads` for every layer. So this exporter takes dense models and pruned
models whose K/V heads stayed uniform; a pruned model with per-layer K/V heads (or a layer without attention) gets
an error that points to the native exporter, which handles any per-layer layout.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from gisp_fx.errors import GispError

TOLERANCE = 1e-3


def require_optimum():
    try:
        from optimum.exporters.onnx import onnx_export_from_model
        from optimum.onnxruntime import ORTModelForCausalLM
    except ImportError as exc:
        import transformers

        raise GispError(
            f"--exporter optimum needs optimum-onnx, which is not importable here ({exc}); it runs on the "
            f"transformers 4.57 line (this environment has {transformers.__version__}): "
            "pip install 'transformers==4.57.6' 'optimum-onnx[onnxruntime]'. The native exporter "
            "(--exporter native) needs neither."
        ) from exc
    return onnx_export_from_model, ORTModelForCausalLM


def uniform_kv_heads(model: torch.nn.Module) -> int:
    """The one K/V head count of every layer, or an error naming the per-layer counts."""
    from gisp_fx.exporters.onnx import cache_layout

    layout = cache_layout(model)
    missing = sorted(set(range(layout.num_layers)) - set(layout.layers))
    if missing or len(set(layout.kv_heads)) > 1 or len(set(layout.head_dims)) > 1:
        per_layer = ", ".join(f"{i}:{h}" for i, h in zip(layout.layers, layout.kv_heads))
        gone = f"; layers without attention: {missing}" if missing else ""
        raise GispError(
            f"--exporter optimum: this model's K/V heads differ per layer ({per_layer}{gone}), and optimum's "
            "ORTModelForCausalLM assumes one count for every layer; export it with the native exporter instead: "
            "gisp-fx export DIR --output OUT --with-past (its OrtCausalLM reads the per-layer shapes)"
        )
    return layout.kv_heads[0]


def _plain_config(folder: Path, base_class: str) -> None:
    """The exported config without gisp's auto_map/structure: the ONNX graph holds the pruned shapes itself."""
    file = folder / "config.json"
    cfg = json.loads(file.read_text())
    for key in ("auto_map", "gisp"):
        cfg.pop(key, None)
    cfg["architectures"] = [base_class]
    file.write_text(json.dumps(cfg, indent=2))


def export_optimum(spec: str, output: str | os.PathLike, *, with_past: bool = True, overwrite: bool = False,
                   tolerance: float = TOLERANCE) -> Path:
    from gisp_fx.loading import load_model

    onnx_export_from_model, ORTModelForCausalLM = require_optimum()
    out = Path(output)
    if out.exists() and not overwrite:
        raise GispError(f"--output '{out}' exists; pass --overwrite to replace it, or choose another folder")
    loaded = load_model(spec)
    model = loaded.model
    kv = uniform_kv_heads(model)
    # optimum sizes its dummy and runtime caches from the config: give it the count the layers really have
    model.config.num_key_value_heads = kv
    from gisp_fx.save import base_class as transformers_class

    base_class = transformers_class(model)  # the transformers class, not GispForCausalLM's mixin
    from gisp_fx.save import staged_dir

    with staged_dir(out) as tmp:
        task = "text-generation-with-past" if with_past else "text-generation"
        with contextlib.redirect_stdout(open(os.devnull, "w")), _as_base_class(model):
            onnx_export_from_model(model, tmp, task=task, do_validation=False)
        _plain_config(tmp, base_class)
        if loaded.tokenizer is not None:
            from gisp_fx.save import save_tokenizer

            save_tokenizer(loaded.tokenizer, tmp)
        diff = _parity(model, ORTModelForCausalLM.from_pretrained(tmp, use_cache=with_past))
        if diff > tolerance:
            raise GispError(f"--exporter optimum: onnxruntime disagrees with torch beyond {tolerance:g}: max |logit "
                            f"diff| {diff:.3g}; nothing was written")
        (tmp / "gisp_optimum.json").write_text(json.dumps({"source": spec, "kv_heads": kv, "parity_logits": diff,
                                                            "with_past": with_past}, indent=1))
    return out


@contextlib.contextmanager
def _as_base_class(model: torch.nn.Module):
    """optimum tells the library from the class's module: a pruned model built by gisp-fx's loader (GispMixin over
    the transformers class) exports as its transformers base class, whose forward it runs anyway."""
    cls = type(model)
    base = next(c for c in cls.__mro__ if c.__module__.startswith("transformers.models."))
    model.__class__ = base
    try:
        yield
    finally:
        model.__class__ = cls


def _parity(model: torch.nn.Module, ort_model) -> float:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    got = ort_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool().cpu().numpy()
    return float(np.abs(got.detach().float().cpu().numpy() - expected.float().cpu().numpy())[real].max())
