"""int4 quality and speed, variant by variant: which linears cost the perplexity, and which way of choosing the codes
gets it back. Every variant is a fused ONNX graph (exporters/fused.py + exporters/int4.py) of the same model, scored on
the same WikiText-2 test windows through onnxruntime, and timed at decode in one interleaved loop beside the fp32
export and onnxruntime-genai's own int4 build of the dense model (its perplexity on the same windows too).

    python benchmarks/int4_quality.py                         # ablation + methods on the dense SmolLM2
    python benchmarks/int4_quality.py --model runs/smollm2-gisp-50 --variants rtn,rtn-h8,gptq-h8 --tag 50

Variants (names: method, then options): `only-KIND` quantises one linear kind and leaves the rest fp32 (the
ablation); `rtn` is the old default (round to nearest, asymmetric, block 32, LM head int4); `-h8` / `-h0` the LM head
as int8 / fp32; `-c8` a clip search of 8 ranges per block (squared error weighted by the calibration inputs' mean
square); `-sym` symmetric; `-fz` float zero points (each block's own min .. max; int4 linears); `-hs` the LM head
symmetric; `-b16` block 16; `-a0` accuracy level 0 (fp32 activations); `gptq` error-compensated rounding from
calibration Grams (64 windows of WikiText-2 train).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from gisp_fx.bench import GenaiTimer, OrtTimer
from gisp_fx.datasets import lm_windows, wikitext2_train_text
from gisp_fx.evaluate import wikitext2_perplexity
from gisp_fx.exporters.int4 import KINDS, Int4Config, input_grams
from gisp_fx.exporters.onnx import META_FILE
from gisp_fx.exporters.export import export_model
from gisp_fx.exporters.ort import OrtCausalLM
from gisp_fx.loading import load_model

ALL_KINDS = tuple(k for k in KINDS)


def variant(name: str) -> Int4Config:
    """'gptq-h8-c8' -> Int4Config(method='gptq', head_bits=8, clip=8)."""
    head, *opts = name.split("-")
    if head == "only":  # only-down_proj: that kind int4 (the head int4 when it is lm_head), the rest fp32
        kind = "-".join(opts)
        return Int4Config(method="rtn", head_bits=4, skip=tuple(k for k in ALL_KINDS if k != kind))
    kw: dict = {"method": head, "head_bits": 4}  # names say every choice: not Int4Config's defaults
    for o in opts:
        if o == "fz":
            kw["float_zero"] = True
        elif o == "hs":
            kw["head_symmetric"] = True
        elif o.startswith("h"):
            kw["head_bits"] = int(o[1:])
        elif o.startswith("c"):
            kw["clip"] = int(o[1:])
        elif o.startswith("b"):
            kw["block"] = int(o[1:])
        elif o.startswith("a"):
            kw["accuracy_level"] = int(o[1:])
        elif o == "sym":
            kw["symmetric"] = True
        else:
            raise SystemExit(f"variant '{name}': unknown option '{o}'")
    return Int4Config(**kw)


class GenaiLogits:
    """An onnxruntime-genai build's decoder run by onnxruntime directly (no cache), as the perplexity scorer calls a
    model: model(input_ids=ids).logits."""

    def __init__(self, folder: Path, threads: int = 0):
        import onnxruntime as ort
        import torch

        self.torch = torch
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.past = [(i.name, i.shape[1], i.shape[3]) for i in self.session.get_inputs() if i.name.startswith("past")]
        self.head_size = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
        self.device = torch.device("cpu")

    def eval(self):
        return self

    def __call__(self, input_ids, **_):
        ids = input_ids.numpy().astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for name, heads, _dim in self.past:
            feed[name] = np.zeros((ids.shape[0], heads, 0, self.head_size), np.float32)
        logits = self.session.run(["logits"], feed)[0]
        return type("Out", (), {"logits": self.torch.from_numpy(logits)})()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tag", default="0", help="names the export folder runs/int4/onnx-TAG and the result files")
    ap.add_argument("--variants", default="rtn,gptq-h8,rtn-fz,rtn-fz-h8-hs,gptq-fz,gptq-fz-h8-hs")
    ap.add_argument("--windows", type=int, default=64, help="WikiText-2 test windows (evenly spaced)")
    ap.add_argument("--calib", type=int, default=64, help="calibration windows of WikiText-2 train (gptq)")
    ap.add_argument("--genai", default="runs/latency/genai-int4",
                    help="genai builds of the same model to score (comma-separated; '' for none)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved decode timing repeats (0: no timing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="runs/int4")
    ap.add_argument("--output", default="benchmarks/results/int4")
    ap.add_argument("--timed", default="", help="variants timed (after --variants) without a perplexity")
    ap.add_argument("--later", default="", help="variants scored after the timing and genai's perplexity")
    ap.add_argument("--ref-ppl", type=float, default=0.0, help="the fp32 export's ppl on these windows, if known")
    ap.add_argument("--name", default="", help="suffix of the result files (int4_TAG[-NAME].json/.md)")
    args = ap.parse_args()

    loaded = load_model(args.model)
    folder = Path(args.runs) / f"onnx-{args.tag}"
    if not (folder / META_FILE).is_file():
        export_model(loaded, folder, with_past=True, overwrite=True, source=args.model)
    names = [v for v in args.variants.split(",") if v]
    for v in names + args.timed.split(",") + args.later.split(","):
        v and variant(v)  # a misspelt variant fails now, not after an hour
    grams: dict | None = None

    def grams_for(config: Int4Config) -> dict | None:  # computed once, when a variant first needs them; cached
        nonlocal grams
        if grams is None and (config.needs_calibration or config.clip):
            cache = Path(args.runs) / f"grams-{args.tag}-{args.calib}.npz"
            t0 = time.process_time()
            if cache.is_file():
                grams = dict(np.load(cache))
            else:
                calib = lm_windows(loaded.tokenizer, wikitext2_train_text(), args.calib, 128, 0, "wikitext2 train")
                grams = input_grams(loaded.model, calib)
                np.savez(cache, **grams)
            print(f"calibration Grams: {args.calib} windows, {time.process_time() - t0:.1f} CPU s", flush=True)
        return grams

    import os

    from gisp_fx.exporters.fused import write_fused

    rows: list[dict] = []
    timing: dict = {}
    genai = [Path(p) for p in args.genai.split(",") if p and Path(p).is_dir()]
    stem = args.tag + (f"-{args.name}" if args.name else "")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every row, so an interrupted sweep keeps what it measured
        base = next((k for k in ("genai:genai-int4", "fp32") if k in timing), None)
        doc = {"model": args.model, "windows": args.windows, "calib_windows": args.calib, "threads": args.threads,
               "load_average": os.getloadavg(), "timing_base": base, "rows": rows, "timing": timing}
        (out / f"int4_{stem}.json").write_text(json.dumps(doc, indent=1))
        lines = [f"# int4 variants of {args.model}: WikiText-2 perplexity ({args.windows} test windows) and decode",
                 "", f"Load average when written: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (2 cores); "
                 f"decode ms/token over 32 tokens after a 128-token prompt, median of {args.repeats} interleaved "
                 f"repeats at {args.threads} threads; the ratio is paired per repeat against {base} (>1: faster).",
                 "", f"| variant | ppl | vs fp32 export | decode ms | decode vs {base} | file MB |",
                 "|---|---:|---:|---:|---:|---:|"]
        seen = [r["variant"] for r in rows] + [k for k in timing if k not in {r["variant"] for r in rows}]
        by = {r["variant"]: r for r in rows}
        for v in seen:
            r, t = by.get(v, {}), timing.get(v, {})
            ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
            lines.append(f"| {v} | {ppl} | {r['ppl'] / ref.ppl if 'ppl' in r else float('nan'):.3f} | "
                         f"{t.get('decode_ms', float('nan')):.1f} | {t.get('vs', float('nan')):.2f}x | "
                         f"{r.get('bytes', 0) / 1e6:.0f} |")
        (out / f"int4_{stem}.md").write_text("\n".join(lines) + "\n\nCommand: `python benchmarks/int4_quality.py "
                                            + " ".join(os.sys.argv[1:]) + "`\n")

    if args.ref_ppl:  # the fp32 export's perplexity on the same windows, measured by an earlier sweep
        ref = type("Ref", (), {"ppl": args.ref_ppl})()
    else:
        ref = wikitext2_perplexity(OrtCausalLM(folder / "model.onnx", threads=args.threads), loaded.tokenizer,
                                   windows=args.windows, progress=False)
    rows.append({"variant": "fp32", "ppl": ref.ppl, "file": "model.onnx"})
    print(f"fp32: ppl {ref.ppl:.2f} ({args.windows} windows)", flush=True)

    def export(name: str) -> str:
        file = f"model_int4_{name}.onnx"
        if not (folder / file).is_file():
            t0 = time.process_time()
            config = variant(name)
            write_fused(loaded.model, folder / file, quantize=config, gqa="pad", grams=grams_for(config))
            print(f"{name}: exported in {time.process_time() - t0:.1f} CPU s", flush=True)
        return file

    def score(name: str) -> None:
        file = export(name)
        ppl = wikitext2_perplexity(OrtCausalLM(folder / file, threads=args.threads), loaded.tokenizer,
                                   windows=args.windows, progress=False)
        config = variant(name)
        rows.append({"variant": name, "config": config.__dict__ | {"skip": list(config.skip)}, "ppl": ppl.ppl,
                     "vs_fp32": ppl.ppl / ref.ppl, "file": file,
                     "bytes": sum(p.stat().st_size for p in folder.glob(file + "*"))})
        print(f"{name}: ppl {ppl.ppl:.2f} ({ppl.ppl / ref.ppl - 1:+.1%})", flush=True)
        write()

    for name in names:
        score(name)
    if args.repeats:
        timed = [r["variant"] for r in rows if "file" in r and not r["variant"].startswith("only-")]
        timed += [v for v in args.timed.split(",") if v and v not in timed]
        timers = {v: OrtTimer(folder / ("model.onnx" if v == "fp32" else export(v)), "cpu", args.threads, "all")
                  for v in timed}
        timers |= {f"genai:{g.name}": GenaiTimer(g, args.threads, "cpu", 256) for g in genai}
        ids = np.random.default_rng(0).integers(100, 40000, (1, 128)).astype(np.int64)
        samples = {k: [] for k in timers}
        keys = list(timers)
        for t in keys:
            timers[t].decode(ids, 4)  # warm-up
        for r in range(args.repeats):
            for t in keys[r % len(keys):] + keys[:r % len(keys)]:
                samples[t].append(timers[t].decode(ids, 32) * 1000)
        base = "genai:genai-int4" if "genai:genai-int4" in samples else "fp32"
        for k, v in samples.items():
            timing[k] = {"decode_ms": statistics.median(v), "samples": v,
                         "vs": statistics.median(b / x for b, x in zip(samples[base], v))}
        del timers
        print(f"decode ms: { {k: round(v['decode_ms'], 1) for k, v in timing.items()} }", flush=True)
        write()
    for g in genai:
        ppl = wikitext2_perplexity(GenaiLogits(g, args.threads), loaded.tokenizer, windows=args.windows,
                                   progress=False)
        rows.append({"variant": f"genai:{g.name}", "ppl": ppl.ppl, "vs_fp32": ppl.ppl / ref.ppl})
        print(f"genai {g.name}: ppl {ppl.ppl:.2f}", flush=True)
        write()
    for name in [v for v in args.later.split(",") if v]:
        score(name)
    write()
    print((out / f"int4_{stem}.md").read_text())

if __name__ == "__main__":
    main()
