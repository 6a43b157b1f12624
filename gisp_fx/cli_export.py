"""Flags of `gisp-fx export` and `gisp-fx bench`: parsed here, handed to exporters/ and benchmarks code."""

from __future__ import annotations

import argparse


def _export(args: argparse.Namespace) -> None:
    from gisp_fx.exporters.onnx import export_model
    from gisp_fx.loading import load_model

    if args.exporter == "optimum":
        from gisp_fx.exporters.optimum import export_optimum

        path = export_optimum(args.model, args.output, with_past=args.with_past, overwrite=args.overwrite)
        print(f"optimum export -> {path}")
        return
    loaded = load_model(args.model)
    result = export_model(loaded, args.output, with_past=args.with_past, overwrite=args.overwrite,
                          quantize=args.quantize, source=args.model)
    p = result.parity
    present = f", present K/V {p.present:.2e}" if p.present is not None else ""
    layout = result.layout
    heads = (f"; KV cache on {len(layout.layers)}/{layout.num_layers} layers, K/V heads per layer "
             f"{','.join(map(str, layout.kv_heads))}") if layout is not None else " (no KV cache)"
    print(f"exported {args.model} -> {result.path}/model.onnx (opset {result.opset}, {result.export_s:.0f} s){heads}")
    print(f"parity vs torch (padded batch {p.batch}, {p.seq} new + {p.past} cached positions): max |logit diff| "
          f"{p.logits:.2e}{present}")


def add_export_commands(sub) -> None:
    p = sub.add_parser("export", help="export a model or pruned folder to ONNX (parity-checked against torch)")
    p.add_argument("model", help="a model folder (dense or pruned), 'smollm2', a .gguf file, or a hub id")
    p.add_argument("--output", required=True, help="output folder (model.onnx + weights, tokenizer, gisp_onnx.json)")
    p.add_argument("--with-past", action="store_true",
                   help="KV-cache inputs/outputs (past_key_values.*, present.*) for generation")
    p.add_argument("--quantize", choices=["int8"], help="also write model_int8.onnx (onnxruntime dynamic int8)")
    p.add_argument("--exporter", default="native", choices=["native", "optimum"],
                   help="native (default): gisp-fx's exporter, any per-layer K/V heads; optimum: optimum-onnx layout "
                        "for ORTModelForCausalLM (transformers 4.57 line, uniform K/V heads only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_export)
