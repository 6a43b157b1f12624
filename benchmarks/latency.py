"""The latency table of the README: dense vs pruned SmolLM2 along one GISP trajectory, onnxruntime vs torch eager.

    python benchmarks/latency.py                     # what `make latency` runs (needs runs/smollm2-gisp-50)
    python benchmarks/latency.py --provider cuda     # on a machine with onnxruntime-gpu and a GPU

Steps: materialize each sparsity of the trajectory (no gradients), export dense and pruned models to ONNX with a
KV cache (parity-checked; int8 variants of the dense and the sparsest one), time them all interleaved with
`gisp-fx bench`'s engine (onnxruntime at graph optimisation 'all' and 'disable', int8, torch eager), then state
what the optimisation and int8 cost in quality: WikiText-2 perplexity of each variant on the same windows.
Exports are cached under --runs and reused when complete.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gisp_fx.bench import BenchSettings, environment, run_bench, summarise, write_report
from gisp_fx.evaluate import wikitext2_perplexity
from gisp_fx.exporters.onnx import INT8_FILE, META_FILE, export_model
from gisp_fx.exporters.ort import OrtCausalLM
from gisp_fx.loading import load_model, load_tokenizer
from gisp_fx.pipeline import load_trajectory, materialize


def exports(args) -> list[Path]:
    traj = load_trajectory(args.run_dir)
    sparsities = [float(x) for x in args.sparsities.split(",")]
    runs = Path(args.runs)
    out = []
    for s in [0.0, *sparsities]:
        tag = f"{round(100 * s)}"
        onnx_dir = runs / f"onnx-{tag}"
        out.append(onnx_dir)
        if (onnx_dir / META_FILE).is_file() and (s not in (0.0, max(sparsities)) or (onnx_dir / INT8_FILE).is_file()):
            continue
        if s == 0.0:
            loaded = load_model(traj.config["model"])
        else:
            folder = runs / f"model-{tag}"
            materialize(args.run_dir, s, str(folder), overwrite=True)
            loaded = load_model(str(folder))
        quantize = "int8" if s in (0.0, max(sparsities)) else None
        result = export_model(loaded, onnx_dir, with_past=True, overwrite=True, quantize=quantize,
                              source=f"{traj.config['model']} at {100 * s:.0f} %")
        print(f"exported {100 * s:.0f} %: parity {result.parity.logits:.1e}", flush=True)
    return out


def quality_cost(onnx_dirs: list[Path], windows: int) -> list[dict]:
    """WikiText-2 perplexity of the plain export (both optimisation levels) and its int8 variant, same windows."""
    rows = []
    for folder in (onnx_dirs[0], onnx_dirs[-1]):
        meta = json.loads((folder / META_FILE).read_text())
        tokenizer = load_tokenizer(str(folder))
        for label, file, opt in (("fp32, opt all", "model.onnx", "all"), ("fp32, opt disable", "model.onnx", "disable"),
                                 ("int8, opt all", INT8_FILE, "all")):
            model = OrtCausalLM(folder / file, graph_optimization=opt)
            ppl = wikitext2_perplexity(model, tokenizer, windows=windows, desc=f"{folder.name} {label}")
            parity = meta["parity"]["logits"] if file == "model.onnx" else meta["int8"]["parity"]["logits"]
            rows.append({"model": folder.name, "variant": label, "ppl": ppl.ppl, "windows": ppl.subset,
                         "parity_logits": parity if opt == "all" else None})
            print(f"{folder.name} {label}: ppl {ppl.ppl:.2f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", default="runs/smollm2-gisp-50")
    ap.add_argument("--sparsities", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--runs", default="runs/latency", help="where materialized models and exports go (reused)")
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--windows", type=int, default=64, help="WikiText-2 windows for the quality cost")
    ap.add_argument("--output", default="benchmarks/results/latency")
    args = ap.parse_args()

    onnx_dirs = exports(args)
    settings = BenchSettings(repeats=args.repeats, provider=args.provider)
    torch_models = [load_trajectory(args.run_dir).config["model"]]
    torch_models += [str(Path(args.runs) / f"model-{round(100 * float(s))}") for s in args.sparsities.split(",")]
    rows = run_bench([str(d) for d in onnx_dirs] + torch_models, settings, engines=["ort", "ort-int8", "torch"],
                     opts=["all", "disable"])
    summary = summarise(rows, settings)
    cost = quality_cost(onnx_dirs, args.windows)
    out = write_report(summary, settings, args.output, f"{torch_models[0]}: latency along one GISP trajectory",
                       extra={"quality_cost": cost})
    lines = ["", "## What graph optimisation and int8 cost", "",
             f"WikiText-2 perplexity through onnxruntime ({cost[0]['windows']} windows); parity: max |logit diff| "
             "against torch on a padded batch of 2 with cached positions.", "",
             "| export | variant | ppl | parity |", "|---|---|---:|---:|"]
    for r in cost:
        par = "" if r["parity_logits"] is None else f"{r['parity_logits']:.1e}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['ppl']:.2f} | {par} |")
    with open(out / "bench.md", "a") as f:
        f.write("\n".join(lines) + "\n\nCommand: `make latency` (`python benchmarks/latency.py`).\n")
    print((out / "bench.md").read_text())
    print(f"report: {out}/bench.md ({environment(settings)['threads']} threads)")


if __name__ == "__main__":
    main()
