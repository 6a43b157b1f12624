"""Recovery by distillation at several token budgets: WikiText-2 perplexity before and after, against the dense model.

For each budget, `gisp-fx recover RUN --tokens N` runs in its own process (so that each one's peak RSS is its own),
writing RUNS/<run>-kd-<N>; then benchmarks/results/recovery/recovery.{json,md,png} gather every measured cell
(cells of earlier invocations are kept, the same cell is replaced): perplexity before / after on the same test
windows, the dense model's on those windows, tokens, tokens/s, wall time, peak RSS against the issue's bound
(4 x the student's fp32 weight bytes + the teacher's).

    python benchmarks/recovery.py --run /tmp/s50 --budgets 50000,200000 --eval-windows 256

WikiText-2 train (the default --data) is in-domain for WikiText-2 test: perplexity alone overstates recovery.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from gisp_fx.evaluate import wikitext2_perplexity
from gisp_fx.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "recovery"


def dense_ppl(model: str, windows: int | None, bos: str) -> float:
    """The dense model's WikiText-2 perplexity on the windows the recoveries are evaluated on."""
    loaded = load_model(model)
    return wikitext2_perplexity(loaded.model, loaded.tokenizer, 128, windows, bos=bos, desc="dense ppl").ppl


def _average(results: dict) -> float:
    """The mean accuracy over the tasks evaluated (the 'cmqa' entry, their own average, left out)."""
    values = [t["value"] for name, t in results.items() if name != "cmqa"]
    return sum(values) / len(values)


def dense_tasks(model: str, tasks: str, limit: int, bos: str) -> dict:
    """The dense model's accuracy on `tasks` (the same questions the recoveries are evaluated on)."""
    from gisp_fx.tasks import evaluate, headlines

    loaded = load_model(model)
    return headlines(evaluate(loaded.model, loaded.tokenizer, tasks.split(","), limit, bos=bos))


def run_cell(run: Path, tokens: int, work: Path, args: argparse.Namespace) -> dict:
    tag = f"{run.name}-kd-{tokens}" + (f"-lora{args.lora_rank}" if args.lora_rank else "") + (
        f"-{args.train}" if args.train != "all" else "")
    out = work / tag
    cmd = [sys.executable, "-m", "gisp_fx", "recover", str(run), "--output", str(out), "--tokens", str(tokens),
           "--lr", str(args.lr), "--batch-tokens", str(args.batch_tokens), "--seq-len", str(args.seq_len),
           "--train", args.train, "--lora-rank", str(args.lora_rank), "--data", args.data, "--bos", args.bos,
           "--micro-tokens", str(args.micro_tokens), "--eval-windows", str(args.eval_windows), "--dtype", args.dtype,
           "--overwrite"] + (["--no-checkpointing"] if args.no_checkpointing else []) + (
        ["--tasks", args.tasks, "--task-limit", str(args.task_limit)] if args.tasks else [])
    print("$ gisp-fx", " ".join(cmd[3:]), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - started
    report = json.loads((out / "report.json").read_text())
    compiled = json.loads((run / "report.json").read_text())
    student_mb = compiled["params"]["after"] * 4 / 2**20
    teacher_mb = compiled["params"]["before"] * 4 / 2**20
    p = report["perplexity"]
    tasks = report.get("tasks") or {}
    task_avg = {k: _average(tasks[k]) if tasks.get(k) else None for k in ("before", "after")}
    return {"cell": tag, "run": str(run), "method": compiled.get("method"),
            "sparsity": compiled["sparsity"]["measured"],
            "repair": compiled.get("repair", {}).get("mode", "none"), "tokens": report["tokens"],
            "steps": report["steps"], "lr": args.lr, "batch_tokens": args.batch_tokens, "train": args.train,
            "lora_rank": args.lora_rank, "data": args.data, "dtype": args.dtype,
            "ppl_before": p["before"], "ppl_after": p["after"], "ppl_windows": p["windows"],
            "tasks": tasks or None, "task_avg_before": task_avg["before"], "task_avg_after": task_avg["after"],
            "task_limit": args.task_limit if args.tasks else None,
            "tokens_per_s": report["tokens_per_s"], "train_wall_s": report["train_wall_s"], "wall_s": wall,
            "peak_rss_mb": report["peak_rss_mb"], "train_peak_rss_mb": report.get("train_peak_rss_mb"),
            "rss_bound_mb": 4 * student_mb + teacher_mb,
            "first_loss": report["losses"][0], "last_loss": report["losses"][-1], "output": str(out),
            "command": "gisp-fx " + " ".join(_shown(c) for c in cmd[3:])}


def _shown(arg: str) -> str:
    """A path under the repository as the repository sees it (the recorded commands run from its root)."""
    path = Path(arg)
    if path.is_absolute() and path.resolve().is_relative_to(ROOT):
        return str(path.resolve().relative_to(ROOT))
    return arg


def _train_peak(cell: dict) -> str:
    """The training's own peak RSS; cells measured before it was recorded apart show '-'."""
    return f"{cell['train_peak_rss_mb']:,.0f}" if cell.get("train_peak_rss_mb") else "-"


def write(doc: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recovery.json").write_text(json.dumps(doc, indent=1) + "\n")
    dense = doc["dense_ppl"]
    lines = [f"# Recovery by distillation (WikiText-2 perplexity on {doc['eval_windows']} test windows of 128 tokens)",
             "", f"Dense {doc['model']}: {dense:.2f} ({doc.get('dense_source', 'measured')}). WikiText-2 train is "
             "in-domain for WikiText-2 test: perplexity alone overstates recovery.", ""] + _dense_tasks_line(doc) + [
             "",
             "| run | repair | tokens | train | before | after | after / dense | task avg before → after | tokens/s | "
             "train wall | wall | peak RSS: training / whole command | RSS bound |",
             "|---|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for c in sorted(doc["cells"], key=lambda c: (c["run"], c["tokens"])):
        train = c["train"] + (f", LoRA {c['lora_rank']}" if c["lora_rank"] else "")
        lines.append(f"| {Path(c['run']).name} ({c['method']} {100 * c['sparsity']:.0f} %) | {c['repair']} | "
                     f"{c['tokens']:,} | {train} | {c['ppl_before']:.2f} | {c['ppl_after']:.2f} | "
                     f"{c['ppl_after'] / dense:.2f}x | {_tasks(c)} | {c['tokens_per_s']:.0f} | {c['train_wall_s'] / 60:.1f} min | "
                     f"{c['wall_s'] / 60:.1f} min | {_train_peak(c)} / {c['peak_rss_mb']:,.0f} MiB | "
                     f"{c['rss_bound_mb']:,.0f} MiB |")
    lines += ["", "Commands:", "", "```"] + [c["command"] for c in doc["cells"]] + ["```", "",
                                                                                      "![perplexity](recovery.png)", ""]
    (folder / "recovery.md").write_text("\n".join(lines))
    plot(doc, folder / "recovery.png")


def _dense_tasks_line(doc: dict) -> list[str]:
    if not doc.get("dense_tasks"):
        return []
    each = ", ".join(f"{k} {100 * v['value']:.1f}" for k, v in doc["dense_tasks"].items() if k != "cmqa")
    avg = 100 * _average(doc["dense_tasks"])
    return [f"Dense task average {avg:.1f} ({each}; ≤ {doc['task_limit']} questions each)."]


def _tasks(cell: dict) -> str:
    """The mean accuracy over the evaluated tasks before and after, in points, with the questions per task."""
    if cell.get("task_avg_before") is None:
        return "not evaluated"
    n = len([t for t in cell["tasks"]["before"] if t != "cmqa"])
    return (f"{100 * cell['task_avg_before']:.1f} → {100 * cell['task_avg_after']:.1f} ({n} tasks, "
            f"≤ {cell['task_limit']} q each)")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    series: dict[str, list] = {}
    for c in doc["cells"]:
        key = f"{Path(c['run']).name}, {c['train']}" + (f" LoRA {c['lora_rank']}" if c["lora_rank"] else "")
        series.setdefault(key, [(0, c["ppl_before"])]).append((c["tokens"], c["ppl_after"]))
    for key, points in series.items():
        points = sorted(set(points))
        ax.plot([t for t, _ in points], [p for _, p in points], marker="o", label=key)
    ax.axhline(doc["dense_ppl"], color="k", lw=1, ls="--", label="dense")
    ax.axhline(1.5 * doc["dense_ppl"], color="grey", lw=1, ls=":", label="1.5x dense (target)")
    ax.set_xscale("symlog", linthresh=10_000)  # budgets from 10^4 to 10^6 tokens, and the start at 0
    ax.set_xlabel("recovery tokens (log above 10k)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished `gisp-fx compile` folder")
    ap.add_argument("--budgets", default="50000,200000", help="recovery tokens, comma list")
    ap.add_argument("--work", default=str(ROOT / "runs" / "recovery"), help="where the recovered folders go")
    ap.add_argument("--output", default=str(OUT), help="results folder (recovery.json, .md, .png)")
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--micro-tokens", type=int, default=512)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--tasks", default=None, help="also evaluate these tasks before and after (comma list)")
    ap.add_argument("--task-limit", type=int, default=100, help="questions per task with --tasks (default 100)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--train", default="all")
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--data", default="wikitext2")
    ap.add_argument("--bos", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dense-ppl", type=float, default=None,
                    help="the dense model's perplexity on the same windows, where already measured (SmolLM2 on 256 "
                    "windows: 58.64, benchmarks/results/calib-budget.json); measured here otherwise")
    args = ap.parse_args()
    run, folder = Path(args.run), Path(args.output)
    model = json.loads((run / "report.json").read_text())["model"]
    existing = folder / "recovery.json"
    doc = json.loads(existing.read_text()) if existing.is_file() else {}
    if doc.get("model") != model or doc.get("eval_windows") != args.eval_windows:
        doc = {"model": model, "eval_windows": args.eval_windows, "dense_ppl": None, "cells": []}
    compiled = json.loads((run / "report.json").read_text())["perplexity"]
    if doc["dense_ppl"] is None and compiled["windows"].split(" ")[0] in (str(args.eval_windows), "all") \
            and compiled["seq_len"] == 128 and compiled["bos"]["mode"] == args.bos:
        # the compile evaluated its dense model on the very windows the recoveries are evaluated on
        doc["dense_ppl"], doc["dense_source"] = compiled["before"], f"the compile's report ({compiled['windows']})"
    if args.dense_ppl is not None:
        doc["dense_ppl"], doc["dense_source"] = args.dense_ppl, "given (--dense-ppl)"
    if doc["dense_ppl"] is None:
        doc["dense_ppl"], doc["dense_source"] = dense_ppl(model, args.eval_windows, args.bos), "measured"
        print(f"dense {model}: perplexity {doc['dense_ppl']:.2f} on {args.eval_windows} windows", flush=True)
    if args.tasks and (doc.get("dense_tasks") is None or sorted(doc["dense_tasks"]) != sorted(args.tasks.split(","))
                       or doc.get("task_limit") != args.task_limit):
        doc["dense_tasks"], doc["task_limit"] = dense_tasks(model, args.tasks, args.task_limit, args.bos), args.task_limit
        avg = _average(doc["dense_tasks"])
        print(f"dense {model}: task average {100 * avg:.1f} on {args.tasks}", flush=True)
    for tokens in (int(b) for b in args.budgets.split(",")):
        cell = run_cell(run, tokens, Path(args.work), args)
        doc["cells"] = [c for c in doc["cells"] if c["cell"] != cell["cell"]] + [cell]
        write(doc, folder)  # after every cell: a long sweep's finished cells are kept if it is stopped
        print(f"{cell['cell']}: {cell['ppl_before']:.2f} -> {cell['ppl_after']:.2f} (dense {doc['dense_ppl']:.2f}), "
              f"{cell['tokens_per_s']:.0f} tokens/s, {cell['wall_s'] / 60:.1f} min, peak {cell['peak_rss_mb']:.0f} MiB",
              flush=True)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
