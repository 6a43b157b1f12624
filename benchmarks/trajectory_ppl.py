"""Quality along one GISP trajectory: WikiText-2 perplexity and parameters at several sparsities -> md/json/png.

    python benchmarks/trajectory_ppl.py runs/smollm2-gisp-50 --sparsities 0.2,0.3,0.4,0.5 --windows all

Each sparsity is rebuilt from the original weights with `materialize` (no gradients), so one compile run serves
every row. The dense model is evaluated in the same run with the same windows.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from gisp_fx.cli_compile import parse_windows
from gisp_fx.evaluate import wikitext2_perplexity
from gisp_fx.loading import load_model
from gisp_fx.rebuild import load_trajectory, materialize_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--sparsities", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--windows", type=parse_windows, default=None, help="a number of evenly spaced windows, or all")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--output", default=None, help="folder for the report (default: RUN_DIR/quality)")
    args = ap.parse_args()

    traj = load_trajectory(args.run_dir)
    original = load_model(traj.config["model"])
    rows = []
    dense = wikitext2_perplexity(original.model, original.tokenizer, args.seq_len, args.windows, desc="dense")
    params0 = sum(p.numel() for p in original.model.parameters())
    rows.append({"target": 0.0, "sparsity": 0.0, "params": params0, "ppl": dense.ppl, "windows": dense.subset})
    print(f"dense: ppl {dense.ppl:.2f} ({dense.subset} windows), {params0:,} parameters", flush=True)
    for target in [float(x) for x in args.sparsities.split(",")]:
        t0 = time.perf_counter()
        fresh = type(original)(copy.deepcopy(original.model), original.tokenizer, original.source)
        loaded, plan, sparsity = materialize_model(traj, target, loaded=fresh)
        ppl = wikitext2_perplexity(loaded.model, loaded.tokenizer, args.seq_len, args.windows,
                                   desc=f"{100 * target:.0f} %")
        rows.append({"target": target, "sparsity": sparsity, "params": plan.total_params, "ppl": ppl.ppl,
                     "windows": ppl.subset, "wall_s": time.perf_counter() - t0})
        print(f"{100 * sparsity:.2f} % decoder sparsity: ppl {ppl.ppl:.2f}, {plan.total_params:,} parameters",
              flush=True)
    out = Path(args.output or Path(args.run_dir) / "quality")
    out.mkdir(parents=True, exist_ok=True)
    doc = {"run": args.run_dir, "model": traj.config["model"], "config": traj.config, "seq_len": args.seq_len,
           "rows": rows}
    (out / "trajectory_ppl.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# WikiText-2 perplexity along the trajectory of `{args.run_dir}`", "",
             f"Model `{traj.config['model']}`, {args.seq_len}-token windows ({rows[0]['windows']}); "
             f"calibration {traj.config['calib_samples']} x {traj.config['seq_len']} tokens, "
             f"{len(traj.steps)} steps. Command: `python benchmarks/trajectory_ppl.py {args.run_dir} "
             f"--sparsities {args.sparsities} --windows {args.windows or 'all'}`", "",
             "| decoder sparsity | parameters | perplexity |", "|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {100 * r['sparsity']:.1f} % | {r['params']:,} | {r['ppl']:.2f} |")
    (out / "trajectory_ppl.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "trajectory_ppl.png", traj.config["model"])
    print(f"report: {out}/trajectory_ppl.md")


def _plot(rows, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot([100 * r["sparsity"] for r in rows], [r["ppl"] for r in rows], "o-", color="#3b6ea8", label="GISP")
    ax.set_yscale("log")
    ax.set_xlabel("decoder-layer parameter sparsity (%)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(f"{model}: one GISP trajectory", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
