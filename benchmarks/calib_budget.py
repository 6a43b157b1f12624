"""Calibration budget (issue 14): WikiText-2 perplexity of GISP at one sparsity against calibration windows x steps,
with and without least-squares repair -> benchmarks/results/calib-budget.{json,md,png}

    # the grid (each cell one compile without repair, then lsq repair once at the end on its removals):
    python benchmarks/calib_budget.py run --cells 64x8,256x8,1024x8,64x32,256x32,1024x32 --eval all
    # also whole compiles that repair after every step (the next step scores the repaired model):
    python benchmarks/calib_budget.py run --cells 64x8 --step-repair
    # the table and plot from every row recorded so far:
    python benchmarks/calib_budget.py table

A cell is WINDOWSxSTEPS: WINDOWS calibration sequences of 128 tokens (WikiText-2 train), STEPS iterative steps. The
repaired row replays the cell's removals on the original weights with `lsq` at the end, at the current defaults
(`RepairSettings`: sequential inputs, damping 0.0001) on the same calibration windows (what `gisp-fx materialize RUN
--repair lsq` does), so it shares the cell's selection; its key names the inputs and damping, so rows fitted under
older defaults stay beside the new ones. A cell whose run folder already holds a finished compile of the same settings
is not compiled again (its recorded wall time is used): copy `make compile`'s run to runs/calib-budget/w64-s8 to reuse
it. Rows accumulate in the JSON (`--json`, default results/calib-budget.json; a row with the same key replaces the
older one), each with the device it ran on and its wall times; `table` writes the markdown and the PNG beside the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
JSON = RESULTS / "calib-budget.json"


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def _record(path: Path, row: dict) -> None:
    rows = [r for r in _rows(path) if r["key"] != row["key"]] + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=1))
    tmp.replace(path)
    print(json.dumps(row), flush=True)


def _cells(text: str) -> list[tuple[int, int]]:
    try:
        cells = [tuple(int(v) for v in cell.split("x")) for cell in text.split(",")]
    except ValueError:
        cells = []
    if not cells or any(len(c) != 2 or min(c) < 1 for c in cells):
        raise argparse.ArgumentTypeError(f"--cells: expected WINDOWSxSTEPS[,...] with positive integers, e.g. "
                                         f"64x8,256x32; got {text!r}")
    return cells


def _where(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"


def run(args) -> None:
    import torch

    from gisp_fx.config import CompileConfig
    from gisp_fx.evaluate import wikitext2_perplexity
    from gisp_fx.loading import load_model
    from gisp_fx.passes.repair import RepairSettings, replay_repaired_
    from gisp_fx.rebuild import removals_for, load_trajectory
    from gisp_fx.passes.analyse import analyse
    from gisp_fx.calibration import build_calibration
    from gisp_fx.compile import compile_model

    dtype = getattr(torch, args.dtype)
    where, windows = _where(args.device), args.eval
    common = {"model": args.model, "target": args.sparsity, "device": args.device, "where": where,
              "batch_size": args.batch_size, "checkpoint": args.checkpoint, "dtype": args.dtype}
    original = load_model(args.model, device=args.device, dtype=dtype)
    tag = "all" if windows is None else str(windows)
    dense_key = f"dense|{args.model}|{tag}"
    if not any(r["key"] == dense_key for r in _rows(args.json)):
        ppl = wikitext2_perplexity(original.model, original.tokenizer, 128, windows, progress=False)
        _record(args.json, {"key": dense_key, "kind": "dense", **common, "ppl": ppl.ppl, "windows": ppl.subset})

    def compile_cell(calib_samples: int, steps: int, repair: str, repair_at: str):
        out = f"{args.runs}/w{calib_samples}-s{steps}" + (f"-{repair}-{repair_at}" if repair != "none" else "")
        config = CompileConfig(model=args.model, sparsity=args.sparsity, output=out, calib_samples=calib_samples,
                               steps=steps, eval_windows=windows, device=args.device, dtype=args.dtype,
                               batch_size=args.batch_size, checkpoint=args.checkpoint, repair=repair,
                               repair_at=repair_at)
        done = Path(out) / "report.json"
        if done.is_file():  # a finished compile of the same settings (e.g. `make compile`'s run copied here) is reused
            report = json.loads(done.read_text())
            theirs = CompileConfig.from_json(report["config"])
            if replace(theirs, output=out) == config:
                print(f"{out}: reusing its finished compile ({report['wall_s']:.0f} s)", flush=True)
                return out, config, report, report["wall_s"]
        report = compile_model(config, overwrite=True, discard_partial=True, progress=False,
                               loaded=copy.deepcopy(original)).report
        return out, config, report, report["wall_s"]  # the compile's own wall time, as a reused run records it

    for calib_samples, steps in args.cells:
        cell = {**common, "windows_calib": calib_samples, "steps": steps}
        out, config, report, wall = compile_cell(calib_samples, steps, "none", "end")
        _record(args.json, {"key": f"cell|{calib_samples}x{steps}|none|{tag}", "kind": "cell", **cell,
                            "repair": "none", "ppl": report["perplexity"]["after"],
                            "windows": report["perplexity"]["windows"], "sparsity": report["sparsity"]["measured"],
                            "compile_wall_s": wall, "repair_wall_s": 0.0})
        if args.repair != "none":  # once at the end, on this cell's removals and calibration windows
            traj = load_trajectory(out)
            removed = removals_for(traj, args.sparsity, None)
            calib = build_calibration(config, original.tokenizer)
            model = copy.deepcopy(original.model)
            t0 = time.perf_counter()
            settings = RepairSettings(args.repair, "end")
            _, _, records = replay_repaired_(model, analyse(model), [removed], calib, settings, progress=False)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            repair_wall = time.perf_counter() - t0
            ppl = wikitext2_perplexity(model, original.tokenizer, 128, windows, progress=False)
            fit = f"{settings.inputs}|{settings.damping:g}"  # a row per fit, so older defaults' rows stay comparable
            _record(args.json, {"key": f"cell|{calib_samples}x{steps}|{args.repair}-end|{tag}|{fit}", "kind": "cell",
                                **cell, "repair": f"{args.repair}-end", "ppl": ppl.ppl, "windows": ppl.subset,
                                "sparsity": report["sparsity"]["measured"], "compile_wall_s": wall,
                                "repair_wall_s": repair_wall, "inputs": settings.inputs, "damping": settings.damping})
            del model, calib
        if args.step_repair:
            out, _, report, wall = compile_cell(calib_samples, steps, args.repair, "step")
            _record(args.json, {"key": f"cell|{calib_samples}x{steps}|{args.repair}-step|{tag}", "kind": "cell",
                                **cell, "repair": f"{args.repair}-step", "ppl": report["perplexity"]["after"],
                                "windows": report["perplexity"]["windows"],
                                "sparsity": report["sparsity"]["measured"], "compile_wall_s": wall,
                                "repair_wall_s": report.get("repair", {}).get("wall_s", 0.0)})


INPUTS = {"pruned": "sequential", "dense": "parallel"}  # RepairSettings.inputs as the README names it


def _fit_label(r: dict) -> str:
    """The row's repair and, for a replayed fit, its inputs (sequential or parallel) and damping."""
    return r["repair"] + (f" ({INPUTS.get(r['inputs'], r['inputs'])}, {r['damping']:g})" if "inputs" in r else "")


def write_table(args) -> None:
    rows = _rows(args.json)
    if not rows:
        raise SystemExit(f"{args.json}: no rows yet; run `python benchmarks/calib_budget.py run` first")
    lines = ["# Calibration budget on SmolLM2-135M: GISP at 50 %, WikiText-2 perplexity (128-token windows)", "",
             "Written by `python benchmarks/calib_budget.py table` from calib-budget.json. Calibration: WINDOWS "
             "sequences of 128 tokens from WikiText-2 train; STEPS iterative steps. `lsq-end` replays the cell's "
             "removals with least-squares repair once at the end (same selection; its inputs and damping in the repair "
             "column); `lsq-step` is a whole compile "
             "that repairs after every step. Wall times are the device's named in each row.", ""]
    for r in rows:
        if r["kind"] == "dense":
            lines.append(f"Dense: perplexity {r['ppl']:.2f} on {r['windows']} windows ({r['where']}).")
    lines += ["", "| windows | steps | repair | ppl | eval windows | compile wall s | repair wall s | repair share "
              "| device | batch |", "|---:|---:|---|---:|---|---:|---:|---:|---|---:|"]
    cells = sorted((r for r in rows if r["kind"] == "cell"),
                   key=lambda r: (str(r["windows"]), r["steps"], r["windows_calib"], r["repair"]))
    for r in cells:
        total = r["compile_wall_s"] + (r["repair_wall_s"] if r["repair"].endswith("-end") else 0.0)
        share = f"{100 * r['repair_wall_s'] / total:.1f} %" if r["repair"] != "none" else "-"
        lines.append(f"| {r['windows_calib']} | {r['steps']} | {_fit_label(r)} | {r['ppl']:.2f} | {r['windows']} | "
                     f"{r['compile_wall_s']:.0f} | {r['repair_wall_s']:.1f} | {share} | {r['where']} | "
                     f"{r['batch_size']} |")
    md = args.json.with_suffix(".md")  # the report sits beside its rows (results/calib-budget.{md,png} by default)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
    print(md.read_text())
    _plot(cells, [r for r in rows if r["kind"] == "dense"], args.json.with_suffix(".png"))


def _plot(cells: list[dict], dense: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"none": "-", "lsq-end": "--", "lsq-step": ":", "bias-end": "-."}
    markers = ("o", "s", "^", "D")
    for steps, colour in zip(sorted({r["steps"] for r in cells}), ("tab:blue", "tab:orange", "tab:green")):
        for i, how in enumerate(sorted({_fit_label(r) for r in cells})):
            pts = sorted((r["windows_calib"], r["ppl"]) for r in cells if r["steps"] == steps and _fit_label(r) == how)
            if pts:
                ax.plot(*zip(*pts), styles.get(how.split(" ")[0], "-"), marker=markers[i % len(markers)],
                        color=colour, label=f"{steps} steps, repair {how}")
    for r in dense:
        ax.axhline(r["ppl"], color="grey", lw=0.8)
        ax.text(ax.get_xlim()[0], r["ppl"], f" dense {r['ppl']:.1f}", va="bottom", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("calibration windows (128 tokens each)")
    ax.set_ylabel("WikiText-2 perplexity at 50 %")
    ax.set_title("GISP on SmolLM2-135M: calibration budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main() -> None:
    from gisp_fx.cli_compile import parse_windows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=JSON, help="the rows' file (default results/calib-budget.json)")
    sub = ap.add_subparsers(required=True)
    p = sub.add_parser("run")
    p.add_argument("--model", default="smollm2", help="'smollm2' or a .gguf file / folder of the same model")
    p.add_argument("--cells", type=_cells, default=_cells("64x8,256x8,1024x8,64x32,256x32,1024x32"))
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--repair", default="lsq", choices=("none", "bias", "lsq"))
    p.add_argument("--step-repair", action="store_true", help="also compile each cell repairing after every step")
    p.add_argument("--eval", type=parse_windows, default=256, help="WikiText-2 test windows: a number or 'all'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward/backward")
    p.add_argument("--checkpoint", choices=("auto", "on", "off"), default="auto",
                   help="activation checkpointing while scoring, as compile's --checkpoint (the same scores either way)")
    p.add_argument("--runs", default="runs/calib-budget", help="where the compiled runs go (overwritten)")
    p.set_defaults(func=run)
    p = sub.add_parser("table")
    p.set_defaults(func=write_table)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
