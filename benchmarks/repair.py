"""Repair (passes/repair.py) on a real model: WikiText-2 perplexity and repair cost -> benchmarks/results/repair.*

    # repair once, at the end, on a run's removals (rebuilt from the original weights, as materialize does):
    python benchmarks/repair.py end RUN_DIR --sparsities 0.5,0.2 --variants none,bias,lsq,lsq:pruned --windows 256
    # the same with more calibration windows for the repair than the run scored with (forward passes only):
    python benchmarks/repair.py end RUN_DIR --variants lsq --repair-calib 256,1024
    # a whole compile with repair (e.g. after every step), its report's repair time against its wall time:
    python benchmarks/repair.py compile --sparsity 0.5 --repair lsq --repair-at step --windows 256
    # the table from every row recorded so far:
    python benchmarks/repair.py table

Rows accumulate in benchmarks/results/repair.json (a row with the same key replaces the older one); `table`
writes repair.md. Each row records the load average while it ran: wall times on a shared machine are inflated,
so compare the repair's share of its own run (measured in one process) rather than wall times across rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
JSON, MD = RESULTS / "repair.json", RESULTS / "repair.md"


def _rows() -> list[dict]:
    return json.loads(JSON.read_text())["rows"] if JSON.is_file() else []


def _record(row: dict) -> None:
    rows = [r for r in _rows() if r["key"] != row["key"]] + [row]
    RESULTS.mkdir(parents=True, exist_ok=True)
    JSON.write_text(json.dumps({"rows": rows}, indent=1))
    print(json.dumps(row), flush=True)


def _variant(text: str):
    """'lsq:pruned:0.01' -> RepairSettings(lsq, end, pruned, 0.01); 'lsq:pruned:0.0001:dense' with the dense target,
    'lsq:pruned:0.0001:dense:sub' also by sublayer, 'lsq:pruned:0.0001:layer:affine' with an intercept (flags after
    the target: sub, affine); 'block:8:1e-4' block reconstruction, 8 epochs at lr 1e-4."""
    from gisp_fx.passes.repair import DAMPING, RepairSettings

    mode, *rest = text.split(":")
    if mode == "block":  # 'block:EPOCHS:LR' (sequential inputs, lsq damping as the default)
        kw = {"epochs": int(rest[0])} if rest else {}
        return RepairSettings("block", "end", "pruned", **kw, **({"lr": float(rest[1])} if len(rest) > 1 else {}))
    inputs = rest[0] if rest else "dense"
    damping = float(rest[1]) if len(rest) > 1 else DAMPING
    flags = set(rest[3:])
    if flags - {"sub", "affine"}:
        raise SystemExit(f"variant {text}: unknown flags {sorted(flags - {'sub', 'affine'})} (sub, affine)")
    return RepairSettings(mode, "end", inputs, damping, rest[2] if len(rest) > 2 else "layer",
                          "sub" in flags, "affine" in flags)


def _settings_row(settings) -> dict:
    """The repair settings as row fields; the fit's target is 'fit' (a row's 'target' is its sparsity)."""
    row = settings.to_json()
    row["fit"] = row.pop("target")
    return row


def run_end(args) -> None:
    from gisp_fx.config import CompileConfig
    from gisp_fx.evaluate import wikitext2_perplexity
    from gisp_fx.loading import load_model
    from gisp_fx.passes.repair import replay_repaired_
    from gisp_fx.rebuild import removals_for, load_trajectory
    from gisp_fx.passes.analyse import analyse
    from gisp_fx.calibration import build_calibration

    traj = load_trajectory(args.run_dir)
    config = CompileConfig.from_json(traj.config)
    original = load_model(traj.config["model"])
    sizes = [int(x) for x in args.repair_calib.split(",")] if args.repair_calib else [config.calib_samples]
    for n in sizes:
        calib = build_calibration(replace(config, calib_samples=n), original.tokenizer)
        mine = f"{n} x {config.seq_len}" + (f" (run {config.calib_samples})" if n != config.calib_samples else "")
        for target in [float(x) for x in args.sparsities.split(",")]:
            removed = removals_for(traj, target, None)
            for text in args.variants.split(","):
                settings = _variant(text)
                model = copy.deepcopy(original.model)
                plan0 = analyse(model)
                load0, cpu0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
                plan, _, records = replay_repaired_(model, plan0, [removed], calib if settings.mode != "none" else None,
                                                    settings, progress=False)
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                ppl = wikitext2_perplexity(model, original.tokenizer, 128, args.windows, progress=False, bos=config.bos)
                key = f"end|{args.run_dir}|{target}|{text}|{ppl.subset}" + (f"|c{n}" if n != config.calib_samples else "")
                _record({"key": key, "kind": "end", "run": args.run_dir, "method": traj.config["method"],
                         "steps": len(traj.steps), "target": target,
                         "sparsity": (plan0.decoder_params - plan.decoder_params) / plan0.decoder_params,
                         "calib": mine, **_settings_row(settings), "params": sum(p.numel() for p in model.parameters()),
                         "ppl": ppl.ppl, "windows": ppl.subset, "repair_wall_s": wall, "repair_cpu_s": cpu,
                         **({"block_error": [records[0]["error_before"], records[0]["error_after"]],
                             "block_reverted": records[0]["reverted"],
                             "block_sublayers": records[0]["trained"]} if settings.mode == "block" else {}),
                         "load": [load0, os.getloadavg()[0]],
                         **({"note": ("block, %d epochs at lr %g" % (settings.epochs, settings.lr)
                                      if settings.mode == "block" else "one pass")
                                     + (", dense target" if settings.target == "dense" else "")
                                     + (", by sublayer" if settings.sublayers else "")
                                     + (", with intercept" if settings.intercept else "")}
                            if settings.inputs == "pruned" else {})})
                del model


def run_compile(args) -> None:
    from gisp_fx.config import CompileConfig
    from gisp_fx.evaluate import wikitext2_perplexity
    from gisp_fx.loading import load_model
    from gisp_fx.compile import compile_model

    out = args.output or f"runs/smollm2-gisp-{round(100 * args.sparsity)}-{args.repair}-{args.repair_at}" \
                         f"-c{args.calib_samples}-s{args.steps}"
    config = CompileConfig(model=args.model, sparsity=args.sparsity, output=out, repair=args.repair,
                           repair_at=args.repair_at if args.repair != "none" else "end",
                           calib_samples=args.calib_samples, steps=args.steps, eval_windows=args.windows,
                           checkpoint=args.checkpoint)
    load0 = os.getloadavg()[0]
    result = compile_model(config, overwrite=True, discard_partial=True, progress=False)
    r = result.report
    row = {"key": f"compile|{out}|{r['perplexity']['windows']}", "kind": "compile", "run": out,
           "method": r["method"], "steps": len(r["steps"]), "target": args.sparsity,
           "sparsity": r["sparsity"]["measured"], "calib": f"{args.calib_samples} x 128",
           "mode": args.repair, "at": config.repair_at, "inputs": r.get("repair", {}).get("inputs", "-"),
           "damping": r.get("repair", {}).get("damping"), "params": r["params"]["after"],
           "ppl": r["perplexity"]["after"], "windows": r["perplexity"]["windows"],
           "dense_ppl": r["perplexity"]["before"], "compile_wall_s": r["wall_s"], "checkpoint": args.checkpoint,
           "repair_wall_s": r.get("repair", {}).get("wall_s", 0.0),
           "repair_share": r.get("repair", {}).get("share_of_wall", 0.0),
           "load": [load0, os.getloadavg()[0]]}
    _record(row)
    if args.full:  # the yardstick: every window of the test split
        model = load_model(out)
        ppl = wikitext2_perplexity(model.model, model.tokenizer, 128, None, progress=False)
        _record({**row, "key": f"compile|{out}|all", "ppl": ppl.ppl, "windows": ppl.subset})


def write_table(_args=None) -> None:
    rows = sorted(_rows(), key=lambda r: (r["windows"] != "all", r["kind"], -r["target"], r["calib"],
                                          r["steps"], r["mode"], r.get("at", ""), r.get("inputs", "")))
    lines = ["# Repair on SmolLM2-135M: WikiText-2 perplexity (128-token windows) and cost", "",
             "Written by `python benchmarks/repair.py table` from repair.json. `end` rows re-fit once on a run's "
             "removals, rebuilt from the original weights (what `materialize --repair` does); `compile` rows are "
             "whole compiles. Wall times were taken on a shared 2-core machine (load average in the last column); "
             "the repair's share of its own compile is measured within one process.", "",
             "| kind | method, steps | calibration | sparsity | repair | at | inputs | damping | ppl | windows | "
             "repair wall s | repair CPU s | share of compile | load |",
             "|---|---|---|---:|---|---|---|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        note = f" ({r['note']})" if r.get("note") else ""
        share = f"{100 * r['repair_share']:.1f} % of {r['compile_wall_s']:.0f} s" if r["kind"] == "compile" else "-"
        lines.append(f"| {r['kind']} | {r['method']}, {r['steps']} | {r['calib']} | {100 * r['sparsity']:.1f} % | "
                     f"{r['mode']} | {r.get('at', 'end')} | {r.get('inputs', '-')}{note} | {r.get('damping') or '-'} | "
                     f"{r['ppl']:.2f} | {r['windows']} | {r['repair_wall_s']:.1f} | {r.get('repair_cpu_s', float('nan')):.1f} | "
                     f"{share} | "
                     f"{r['load'][0]:.1f}-{r['load'][1]:.1f} |")
    MD.write_text("\n".join(lines) + "\n")
    print(MD.read_text())


def main() -> None:
    from gisp_fx.cli_compile import parse_windows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(required=True)
    p = sub.add_parser("end")
    p.add_argument("run_dir")
    p.add_argument("--sparsities", default="0.5")
    p.add_argument("--variants", default="none,bias,lsq",
                   help="mode[:dense|pruned[:damping[:layer|dense[:sub]]]] (inputs, damping, target, by sublayer), "
                        "comma-separated")
    p.add_argument("--windows", type=parse_windows, default=256)
    p.add_argument("--repair-calib", default="", help="calibration windows for the repair, comma-separated (default: "
                                                      "the run's own); the same seed, so smaller sets are prefixes")
    p.set_defaults(func=run_end)
    p = sub.add_parser("compile")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--repair", default="lsq")
    p.add_argument("--repair-at", default="end")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--windows", type=parse_windows, default=256)
    p.add_argument("--checkpoint", choices=("auto", "on", "off"), default="auto",
                   help="activation checkpointing while scoring, as compile's --checkpoint (the same scores either way)")
    p.add_argument("--output")
    p.add_argument("--full", action="store_true", help="also evaluate the result on all 2,382 windows")
    p.set_defaults(func=run_compile)
    p = sub.add_parser("table")
    p.set_defaults(func=write_table)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
