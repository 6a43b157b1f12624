"""Flags of `gisp-fx export` and `gisp-fx bench`: parsed here, handed to exporters/ and benchmarks code."""

from __future__ import annotations

import argparse

from gisp_fx.errors import GispError
from gisp_fx.outputs import refuse_overlap


def _export(args: argparse.Namespace) -> None:
    from gisp_fx.exporters.export import export_model
    from gisp_fx.loading import load_model
    from gisp_fx.save import check_output_folder

    if args.format == "gguf":
        return _export_gguf(args)
    if args.quantize in GGUF_QUANTIZE:
        raise GispError(f"--quantize {args.quantize} needs --format gguf (ONNX takes int8 or int4)")
    check_output_folder(args.output)
    refuse_overlap(args.output, {"the input model folder": args.model})
    if args.exporter == "optimum":
        from gisp_fx.exporters.optimum import export_optimum

        path = export_optimum(args.model, args.output, with_past=args.with_past, overwrite=args.overwrite)
        print(f"optimum export -> {path}")
        return
    loaded = load_model(args.model)
    result = export_model(loaded, args.output, with_past=args.with_past, overwrite=args.overwrite,
                          quantize=args.quantize, source=args.model, graph=args.graph, gqa=args.gqa,
                          dtype=args.dtype)
    p = result.parity
    present = f", present K/V {p.present:.2e}" if p.present is not None else ""
    layout = result.layout
    heads = (f"; KV cache on {len(layout.layers)}/{layout.num_layers} layers, K/V heads per layer "
             f"{','.join(map(str, layout.kv_heads))}") if layout is not None else " (no KV cache)"
    import json

    graph = json.loads((result.path / "gisp_onnx.json").read_text())["graph"]
    print(f"exported {args.model} -> {result.path}/model.onnx ({graph} graph, {result.export_s:.1f} s){heads}")
    print(f"parity vs torch (padded batch {p.batch}, {p.seq} new + {p.past} cached positions): max |logit diff| "
          f"{p.logits:.2e}{present}")


GGUF_QUANTIZE = ("f32", "f16", "q8_0", "q4_k_m")


def _export_gguf(args: argparse.Namespace) -> None:
    from gisp_fx.exporters.gguf import export_gguf

    if args.quantize not in (None, *GGUF_QUANTIZE):
        raise GispError(f"--quantize {args.quantize} is an ONNX option; --format gguf takes {', '.join(GGUF_QUANTIZE)}")
    r = export_gguf(args.model, args.output, quantize=args.quantize or "f32", overwrite=args.overwrite)
    print(f"exported {args.model} -> {r.path} (llama.cpp deci, {r.quantize}, {r.seconds:.1f} s, tokenizer "
          f"{r.tokenizer}); heads per layer {','.join(str(x.heads) for x in r.layers)}, K/V heads "
          f"{','.join(str(x.kv_heads) for x in r.layers)}, MLP widths {','.join(str(x.ff) for x in r.layers)}"
          + "".join(f"; {note}" for note in r.notes))


def add_export_commands(sub) -> None:
    p = sub.add_parser("export", help="export a model or pruned folder to ONNX (parity-checked against torch)")
    p.add_argument("model", help="a model folder (dense or pruned), 'smollm2', a .gguf file, or a hub id")
    p.add_argument("--output", required=True, help="output folder (model.onnx + weights, tokenizer, gisp_onnx.json)")
    p.add_argument("--with-past", action="store_true",
                   help="KV-cache inputs/outputs (past_key_values.*, present.*) for generation")
    p.add_argument("--format", choices=["onnx", "gguf"], default="onnx",
                   help="onnx (default): a folder for onnxruntime; gguf: one .gguf file for llama.cpp (its deci "
                        "architecture: per-layer head counts and MLP widths), --output names the file")
    p.add_argument("--quantize", choices=["int8", "int4", *GGUF_QUANTIZE],
                   help="gguf: f32 (default), f16, or q8_0 / q4_k_m through llama.cpp's quantiser. onnx: also "
                        "write model_int8.onnx (onnxruntime dynamic int8) or model_int4.onnx (fused graph, "
                        "block-wise int4 MatMulNBits, block 32, LM head int4, GPTQ rounding with a clip search, "
                        "calibrated on 64 WikiText-2 train windows)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="fused graph only: float16 weights, activations and cache (logits float32), the precision "
                        "onnxruntime's CUDA GroupQueryAttention runs in (its CUDA kernel has no float32); parity "
                        "against torch fp32 within 0.25")
    p.add_argument("--gqa", choices=["pad", "dup"], default="pad",
                   help="fused graph, uneven query groups per K/V head: pad (default) fills short groups with zero "
                        "query heads, the cache keeps the model's K/V heads; dup repeats K/V heads (bigger cache)")
    p.add_argument("--graph", choices=["fused", "traced"],
                   help="fused (default with --with-past for llama/qwen2): onnxruntime contrib ops written from the "
                        "weights (GroupQueryAttention, fused norms); traced: torch.export of the HF model (any family)")
    p.add_argument("--exporter", default="native", choices=["native", "optimum"],
                   help="native (default): gisp-fx's exporter, any per-layer K/V heads; optimum: optimum-onnx layout "
                        "for ORTModelForCausalLM (transformers 4.57 line, uniform K/V heads only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_export)
    add_bench_command(sub)


def _ints(value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in value.split(",") if x)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got '{value}'") from exc
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got '{value}'")
    return out


def _bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from gisp_fx.bench import BenchSettings, environment, markdown, run_bench, summarise, write_report
    from gisp_fx.errors import GispError
    from gisp_fx.save import check_output_folder

    if args.output:
        check_output_folder(args.output)
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise GispError(f"--output '{args.output}' exists; pass --overwrite to replace it, or choose another folder")
    for flag, value, least in (("--repeats", args.repeats, 1), ("--prompt", args.prompt, 1),
                               ("--decode", args.decode, 0), ("--warmup", args.warmup, 0),
                               ("--threads", args.threads, 0)):
        if value < least:
            raise GispError(f"{flag} must be at least {least}, got {value}")
    settings = BenchSettings(prefill=args.prefill, prompt=args.prompt, decode=args.decode, repeats=args.repeats,
                             warmup=args.warmup, threads=args.threads, provider=args.provider)
    rows = run_bench(args.models, settings, engines=args.engines.split(","), opts=args.ort_opt.split(","))
    summary = summarise(rows, settings)
    print(markdown(summary, settings, environment(settings)))
    if args.output:
        out = write_report(summary, settings, args.output, args.title)
        print(f"report: {out}/bench.md, bench.json, bench.png")


def add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="latency of dense vs pruned models: onnxruntime exports and torch eager")
    p.add_argument("models", nargs="+",
                   help="ONNX export folders (gisp-fx export --with-past; run in onnxruntime) and/or model folders or "
                        "'smollm2' (run in torch eager); speedups are against the densest of each engine")
    p.add_argument("--engines", default="ort,torch",
                   help="ort (model.onnx), ort-int8 (model_int8.onnx where the export has one), torch (default: ort,torch)")
    p.add_argument("--ort-opt", default="all",
                   help="onnxruntime graph optimisation level(s), comma-separated: disable,basic,extended,all")
    p.add_argument("--provider", default="cpu", help="cpu or cuda (onnxruntime provider; torch device)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: all cores)")
    p.add_argument("--prefill", type=_ints, default=(128, 512), help="prompt lengths timed for prefill (default 128,512)")
    p.add_argument("--prompt", type=int, default=128, help="prompt length before decode (default 128)")
    p.add_argument("--decode", type=int, default=64, help="tokens decoded per timing run (default 64; 0: skip)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--title", default="gisp-fx latency")
    p.add_argument("--output", help="write bench.md, bench.json and bench.png to this folder")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_bench)
