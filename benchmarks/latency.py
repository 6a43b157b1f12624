"""The latency table of the README: gisp-fx's fused exports (dense and pruned, fp32 and int4) against the dense
model built by onnxruntime-genai's model builder (fp32 and int4), timed in one interleaved loop.

    python benchmarks/latency.py                     # what `make latency` runs (needs runs/smollm2-gisp-50)
    python benchmarks/latency.py --provider cuda     # on a machine with onnxruntime-gpu (+ onnxruntime-genai-cuda)
                                                     # and a GPU: fp16 exports against genai's fp16 and int4 cuda builds

Steps: materialize each sparsity of the trajectory, export dense and pruned models with the fused graph (parity-
checked; int4 variants of the dense and the sparsest one), build genai fp32 and int4 from the dense HF folder
(`python -m onnxruntime_genai.models.builder`), time everything interleaved with `gisp-fx bench`'s engine at each
thread count, report every row against the genai rows as paired ratios (per repeat, then the median), and the
WikiText-2 perplexity of the fp32 and int4 exports. Exports and builds are cached under --runs and reused.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from gisp_fx.bench import BenchSettings, environment, run_bench, summarise, write_report
from gisp_fx.evaluate import wikitext2_perplexity
from gisp_fx.exporters.onnx import META_FILE
from gisp_fx.exporters.export import INT4_FILE, export_model
from gisp_fx.exporters.ort import OrtCausalLM
from gisp_fx.loading import load_model, load_tokenizer, param_counts
from gisp_fx.rebuild import load_trajectory, save_materialized as materialize


def exports(args) -> list[Path]:
    traj = load_trajectory(args.run_dir)
    sparsities = [float(x) for x in args.sparsities.split(",")]
    runs = Path(args.runs)
    out = []
    for s in [0.0, *sparsities]:
        tag = f"{round(100 * s)}"
        onnx_dir = runs / f"onnx-{tag}"
        out.append(onnx_dir)
        int4 = s in (0.0, max(sparsities))
        if (onnx_dir / META_FILE).is_file() and (not int4 or (onnx_dir / INT4_FILE).is_file()):
            continue
        if s == 0.0:
            loaded = load_model(traj.config["model"])
        else:
            folder = runs / f"model-{tag}"
            materialize(args.run_dir, s, str(folder), overwrite=True)
            loaded = load_model(str(folder))
        result = export_model(loaded, onnx_dir, with_past=True, overwrite=True, quantize="int4" if int4 else None,
                              source=f"{traj.config['model']} at {100 * s:.0f} %", dtype=args.dtype)
        print(f"exported {100 * s:.0f} %: {result.export_s:.1f} s, parity {result.parity.logits:.1e}", flush=True)
    return out


def genai_builds(args) -> list[Path]:
    """genai fp32 and int4 of the dense model, built by onnxruntime-genai's own builder (timed)."""
    runs = Path(args.runs)
    hf = runs / "hf-dense"
    loaded = None
    if not (hf / "config.json").is_file():
        loaded = load_model(load_trajectory(args.run_dir).config["model"])
        loaded.model.save_pretrained(hf)
        loaded.tokenizer.save_pretrained(hf)
    out = []
    engine = "cuda" if args.provider == "cuda" else "cpu"
    for precision in ("fp16" if engine == "cuda" else "fp32", "int4"):
        folder = runs / f"genai-{precision}" if engine == "cpu" else runs / f"genai-{precision}-cuda"
        out.append(folder)
        if (folder / "gisp_params.json").is_file():
            continue
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(folder),
                        "-p", precision, "-e", engine, "-c", str(runs / "genai-cache")], check=True)
        seconds = time.perf_counter() - t0
        loaded = loaded or load_model(str(hf))
        (folder / "gisp_params.json").write_text(json.dumps(param_counts(loaded.model)))
        (folder / "build_s.txt").write_text(f"{seconds:.1f}\n")
        print(f"genai {precision}: built in {seconds:.1f} s", flush=True)
    return out


def paired(rows, settings) -> list[dict]:
    """Each row against each genai row: per repeat anchor/row (>1: faster than genai), then the median."""
    anchors = [r for r in rows if r.target.engine == "genai"]
    out = []
    for row in rows:
        entry = {"model": Path(row.target.label).name, "engine": row.target.name, "vs": {}}
        for a in anchors:
            entry["vs"][Path(a.target.label).name] = {
                m: statistics.median(x / y for x, y in zip(a.samples[m], row.samples[m])) for m in settings.metrics()}
        out.append(entry)
    return out


def quality(onnx_dirs: list[Path], genai: list[Path], windows: int) -> list[dict]:
    """WikiText-2 perplexity of the fp32 and int4 exports of the densest and the sparsest model, and of genai's
    own builds (their decoder run by onnxruntime directly, on the same windows)."""
    from int4_quality import GenaiLogits

    rows = []
    tokenizer = load_tokenizer(str(onnx_dirs[0]))
    for folder in genai:
        ppl = wikitext2_perplexity(GenaiLogits(folder), tokenizer, windows=windows, desc=folder.name)
        rows.append({"model": folder.name, "variant": "genai", "ppl": ppl.ppl, "windows": ppl.subset})
        print(f"{folder.name}: ppl {ppl.ppl:.2f}", flush=True)
    for folder in (onnx_dirs[0], onnx_dirs[-1]):
        tokenizer = load_tokenizer(str(folder))
        for label, file in (("fp32", "model.onnx"), ("int4", INT4_FILE)):
            ppl = wikitext2_perplexity(OrtCausalLM(folder / file), tokenizer, windows=windows,
                                       desc=f"{folder.name} {label}")
            rows.append({"model": folder.name, "variant": label, "ppl": ppl.ppl, "windows": ppl.subset})
            print(f"{folder.name} {label}: ppl {ppl.ppl:.2f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", default="runs/smollm2-gisp-50")
    ap.add_argument("--sparsities", default="0.2,0.5")
    ap.add_argument("--runs", default="runs/latency", help="where materialized models and exports go (reused)")
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float16"], default=None,
                    help="the exports' float type (default float32 on cpu, float16 on cuda)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="2,1", help="thread counts, each a full interleaved run")
    ap.add_argument("--windows", type=int, default=256, help="WikiText-2 test windows (evenly spaced) for the int4 quality figures")
    ap.add_argument("--output", default="benchmarks/results/latency")
    ap.add_argument("--extra", default="", help="comma-separated further export folders to time alongside")
    args = ap.parse_args()
    args.dtype = args.dtype or ("float16" if args.provider == "cuda" else "float32")

    onnx_dirs = exports(args)
    genai = genai_builds(args)
    specs = [str(d) for d in genai + onnx_dirs] + [x for x in args.extra.split(",") if x]
    doc, lines = {"runs": []}, []
    for threads in [int(t) for t in args.threads.split(",")]:
        settings = BenchSettings(repeats=args.repeats, provider=args.provider, threads=threads)
        rows = run_bench(specs, settings, engines=["genai", "ort", "ort-int4"], opts=["all"])
        summary = summarise(rows, settings)
        ratios = paired(rows, settings)
        doc["runs"].append({"threads": threads, "summary": summary, "paired": ratios})
        lines += [f"## {threads} thread(s): medians (ms) and paired ratios against genai (>1: faster than genai)", "",
                  "| model | engine | " + " | ".join(f"{m} ms" for m in settings.metrics()) + " | "
                  + " | ".join(f"{m} vs {Path(g).name}" for g in genai for m in settings.metrics()) + " |",
                  "|---|---|" + "---:|" * (len(settings.metrics()) * (1 + len(genai)))]
        for e, p in zip(summary, ratios):
            cells = [f"{e['metrics'][m]['median_ms']:.1f}" for m in settings.metrics()]
            cells += [f"{p['vs'][Path(g).name][m]:.2f}x" for g in genai for m in settings.metrics()]
            lines.append(f"| {p['model']} | {p['engine']} | " + " | ".join(cells) + " |")
        lines.append("")
        print("\n".join(lines), flush=True)
    cost = quality(onnx_dirs, genai, args.windows)
    lines += ["## int4 against fp32: WikiText-2 perplexity", "", "| export | variant | ppl |", "|---|---|---:|"]
    lines += [f"| {r['model']} | {r['variant']} | {r['ppl']:.2f} |" for r in cost]
    builds = {g.name: (g / "build_s.txt").read_text().strip() for g in genai if (g / "build_s.txt").is_file()}
    exports_s = {d.name: json.loads((d / META_FILE).read_text())["export_s"] for d in onnx_dirs}
    lines += ["", f"Build/export seconds: genai {builds}; gisp-fx fused fp32 {exports_s}."]
    settings = BenchSettings(repeats=args.repeats, provider=args.provider, threads=int(args.threads.split(",")[0]))
    last = doc["runs"][0]
    out = write_report(last["summary"], settings, args.output, "SmolLM2: gisp-fx fused exports against onnxruntime-genai",
                       extra={"anchor": doc["runs"], "quality_int4": cost, "genai_build_s": builds,
                              "export_s": exports_s})
    with open(out / "bench.md", "a") as f:
        command = shlex.join(["python", "benchmarks/latency.py", *sys.argv[1:]])
        f.write("\n" + "\n".join(lines) + f"\n\nCommand: `{command}` (`make latency` runs it with the defaults).\n")
    print((out / "bench.md").read_text())
    print(f"report: {out}/bench.md ({environment(replace(settings))['threads']} threads)")


if __name__ == "__main__":
    main()
