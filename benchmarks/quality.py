"""The quality table: methods x sparsities x (WikiText-2 perplexity, the 7 commonsense tasks, GSM8K) -> md/json/png.

    python benchmarks/quality.py                       # SmolLM2, the default grid (what `make quality` runs)
    python benchmarks/quality.py --limit 100 --windows all --methods gisp,wanda-sp
    python benchmarks/quality.py --model qwen2.5-coder-0.5b --limit 100 --windows 256 --gsm8k 200 \
        --methods gisp,oneshot,wanda-sp,gisp+lsq,wanda-sp+lsq     # -> benchmarks/results/quality-qwen2.5-coder-0.5b/

Every method compiles once, to the highest sparsity, and serves the lower ones from its run (`materialize`):
globally ranked methods (gisp, oneshot, magnitude, random, gisp-margin) by a prefix of their removal order, uniform
per-layer methods (wanda-sp, taylor-local) by re-selecting from their recorded dense scores, which gives exactly
the model a compile to the lower target gives (tests/test_compile.py). `pg` learns for one target, so it compiles
once per sparsity of `--pg-sparsities` and per iteration budget of `--pg-iters` (each a row). Every row is evaluated
on the same seeded subsets: `--limit` questions per QA task, `--windows` WikiText-2 windows.

    python benchmarks/quality.py --append --methods pg --pg-iters 200 --sparsities 0.5   # add rows to the table
    python benchmarks/quality.py --append --methods gisp+lsq,wanda-sp+lsq   # repaired rows (`--repair lsq`, at end)

A method written `METHOD+lsq` (or `+bias`, `+block`) reuses METHOD's run and repairs each sparsity's model at the end,
on the run's own calibration text, as `gisp-fx materialize RUN --repair lsq` does (on the run's windows, raised to 4
tokens per input feature of the widest consumer; block on at least 256), and records the windows in the row;
`--repair-samples N` fits every repair of the invocation on N windows of that text instead, and labels its rows so.
`gisp-ra` is gisp with `--repair-aware` scores (each group's score weighted by what an lsq repair could not rebuild),
so `gisp-ra+lsq` is the selection made for the repair that follows it.

`--calib gsm8k` (or a text file) calibrates every method of the invocation on that text instead of WikiText-2; its
rows are labelled with it and kept apart from the WikiText-calibrated ones (the runs too), so `--append` puts both in
one table. `--gsm8k N` adds GSM8K exact match (5-shot, greedy, N problems, batched torch generation) to every row
(`--gsm8k-up-to S`: to the rows up to sparsity S). A run compiled to a higher target serves a later invocation's lower
sparsities, so `--sparsities 0.4,0.5` and then `--append --sparsities 0.2,0.3` compile each method once.
The 7-task average is printed with its standard error (of a mean of 7 binomial proportions); every row records the
compile's wall time (of the run it is served from) and its own (rebuild, repair and evaluation).

`--append` keeps the rows of the existing quality.json that this invocation does not measure (and its dense row,
after checking that it was measured on the same subsets).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch

from gisp_fx.config import CALIBRATION_FREE, CompileConfig
from gisp_fx.loading import LoadedModel, load_model
from gisp_fx.compile import compile_model
from gisp_fx.rebuild import load_trajectory, materialize_model, materialize_repair
from gisp_fx.tasks import MC_EVAL_TASKS, evaluate, gsm8k_exact_match

REPAIRS = ("bias", "lsq", "block")  # `--methods gisp+lsq`: the method's run, repaired (at the end) on its calibration
MARGIN_TASKS = ("arc_easy", "arc_challenge", "openbookqa", "winogrande")


def _config(method: str, model: str, sparsity: float, out: Path, args, pg_iters: int | None = None
            ) -> CompileConfig:
    margin, aware = method == "gisp-margin", method == "gisp-ra"  # gisp-ra: gisp with --repair-aware scores
    base = "gisp" if margin or aware else method
    extra = {"steps": args.steps} if base == "gisp" else {}  # the settings a method ignores are refused
    if aware:
        extra["repair_aware"] = True
    if base == "pg":
        extra["pg_iters"] = pg_iters
    if base not in CALIBRATION_FREE:
        extra["calib_samples"] = args.calib_samples
        if args.calib and not margin:
            extra["calib"] = args.calib
    return CompileConfig(model=model, sparsity=sparsity, output=str(out), method=base,
                         objective="margin" if margin else "ppl", tasks=MARGIN_TASKS if margin else (),
                         seed=args.seed, eval_windows=16,  # the report's own check; the table evaluates every row
                         dtype=args.dtype, **extra)


def _slug(model: str) -> str:
    """A folder-name form of a model spec: a bundled name as it is, a folder by its name, a hub id
    'Qwen/Qwen2.5-0.5B' as 'qwen-qwen2.5-0.5b'."""
    if Path(model).exists():
        return Path(model).resolve().name.lower()
    return "-".join(part for part in model.strip("/").lower().split("/")[-2:] if part)


def _run_dir(runs: Path, method: str, target: float, calib: str = "") -> Path:
    """Where METHOD's run for `target` is: the finished run of the lowest target at or above it (every run serves
    its lower sparsities exactly, see the docstring), else a new `METHOD-PCT[-CALIB]` for a compile to `target`."""
    suffix = f"-{calib}" if calib else ""
    done = sorted((int(m.group(1)), p) for p in runs.glob(f"{method}-*{suffix}")
                  if (m := re.fullmatch(rf"{re.escape(method)}-(\d+){re.escape(suffix)}", p.name))
                  and (p / "report.json").is_file())
    return next((p for pct, p in done if pct >= round(100 * target)), runs / f"{method}-{round(100 * target)}{suffix}")


# the settings a reused run must share with this invocation (its target may be higher: it serves lower sparsities)
SHARED_SETTINGS = ("model", "method", "objective", "tasks", "steps", "calib", "calib_samples", "seq_len",
                   "batch_size", "seed", "dtype", "normalize", "protect", "bos", "repair_aware")


def _check_settings(run: Path, stored: dict, wanted: CompileConfig) -> None:
    """Refuse a finished run in --runs that was compiled with other settings than this invocation's (another
    --steps, --calib-samples, --dtype or --seed): its rows would be labelled with settings they were not made with."""
    mine = dataclasses.asdict(wanted)
    default = {f.name: f.default for f in dataclasses.fields(CompileConfig)}  # a run recorded before a setting existed
    differ = {k: (stored.get(k, default[k]), mine[k]) for k in SHARED_SETTINGS
              if _comparable(stored.get(k, default[k])) != _comparable(mine[k])}
    if differ:
        said = ", ".join(f"{k} {theirs!r} (this invocation {ours!r})" for k, (theirs, ours) in differ.items())
        raise SystemExit(f"--runs: {run} was compiled with {said}; pass a new --runs folder, or remove {run} "
                         "to compile it again")


def _comparable(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _windows(text: str) -> int | None:
    return None if text == "all" else int(text)


def cmqa_se(row: dict, limit: int) -> float:
    """The standard error of the 7-task average: sqrt(sum p(1-p)/n) / 7, n the questions of each task."""
    n = row.get("task_n") or {t: limit for t in MC_EVAL_TASKS}
    return sum(row[t] * (1 - row[t]) / n[t] for t in MC_EVAL_TASKS) ** 0.5 / len(MC_EVAL_TASKS)


def _fresh(original: LoadedModel) -> LoadedModel:
    return LoadedModel(copy.deepcopy(original.model), original.tokenizer, original.source)


def _key(row: dict) -> tuple:
    return row["method"], row.get("pg_iters"), row.get("calib"), row.get("repair_samples"), row["target"]


def _label(row: dict) -> str:
    label = f"{row['method']} ({row['pg_iters']} it)" if row.get("pg_iters") is not None else row["method"]
    label += f" [{row['repair_samples']} repair windows]" if row.get("repair_samples") else ""
    return label + (f" [{Path(row['calib']).name} calib]" if row.get("calib") else "")


def _previous(args) -> tuple[list[dict], float]:
    """The rows of the existing table that --append keeps and its wall time; refuses a table measured on other
    subsets."""
    path = Path(args.output) / "quality.json"
    if not args.append or not path.is_file():
        return [], 0.0
    doc = json.loads(path.read_text())
    mine = {"model": args.model, "limit": args.limit, "windows": args.windows, "seed": args.seed, "gsm8k": args.gsm8k}
    theirs = {k: doc.get(k, 0 if k == "gsm8k" else None) for k in mine}
    if theirs != mine:
        raise SystemExit(f"--append: {path} was measured with {theirs}, this run with {mine}; pass the same "
                         "--model/--limit/--windows/--seed/--gsm8k or a new --output")
    first = [f"python benchmarks/quality.py --limit {doc['limit']} --windows {doc['windows']}"]  # before commands
    args.commands = list(dict.fromkeys([*doc.get("commands", first), *args.commands]))  # a re-run is listed once
    return doc["rows"], float(doc["wall_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--methods", default="gisp,oneshot,wanda-sp,magnitude,taylor-local,random,gisp-margin,pg")
    ap.add_argument("--sparsities", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--pg-sparsities", default="0.3,0.5", help="the sparsities pg compiles to (one run each)")
    ap.add_argument("--pg-iters", default="30", help="pg iteration budgets, comma-separated (one run each; 100 "
                    "iterations take about 6 minutes on SmolLM2 on 2 idle CPU cores)")
    ap.add_argument("--limit", type=int, default=40, help="questions per QA task (seeded subset)")
    ap.add_argument("--windows", type=_windows, default=128, help="WikiText-2 test windows (evenly spaced; 'all')")
    ap.add_argument("--gsm8k", type=int, default=0, help="GSM8K problems per row (5-shot exact match; 0: not measured)")
    ap.add_argument("--gsm8k-up-to", type=float, default=1.0, help="measure GSM8K only on the rows whose target "
                    "sparsity is at most this (the dense row always); the others show '-'")
    ap.add_argument("--calib", default=None, help="calibration text of every method here: gsm8k, wikitext2 or a file "
                    "(default wikitext2; rows of another text are labelled with it)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--repair-samples", type=int, default=None, help="the windows every METHOD+repair row of this "
                    "invocation fits on (default: the run's own, as materialize)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", help="the weights' dtype of the dense model and every compile "
                    "(bfloat16 for the larger models)")
    ap.add_argument("--runs", default=None, help="where the compiled runs go (reused if complete; default "
                    "runs/quality, or runs/quality-MODEL for another model than smollm2)")
    ap.add_argument("--output", default=None, help="default benchmarks/results/quality, or "
                    "benchmarks/results/quality-MODEL for another model than smollm2")
    ap.add_argument("--append", action="store_true", help="keep the existing table's other rows (see above)")
    args = ap.parse_args()
    args.commands = ["python benchmarks/quality.py " + " ".join(sys.argv[1:])]
    named = "" if args.model == "smollm2" else f"-{_slug(args.model)}"
    args.runs = args.runs or f"runs/quality{named}"
    args.output = args.output or f"benchmarks/results/quality{named}"
    args.calib = None if args.calib == "wikitext2" else args.calib
    if args.gsm8k < 0:
        raise SystemExit(f"--gsm8k: {args.gsm8k}; give a number of problems (0: not measured)")
    if not 0.0 <= args.gsm8k_up_to <= 1.0:
        raise SystemExit(f"--gsm8k-up-to: {args.gsm8k_up_to}; give a sparsity between 0 and 1")

    methods = args.methods.split(",")
    if args.repair_samples is not None and (args.repair_samples < 1 or not any("+" in m for m in methods)):
        raise SystemExit(f"--repair-samples: {args.repair_samples}; give a positive number of windows, with at least "
                         "one METHOD+repair in --methods (the unrepaired rows fit nothing)")
    sparsities = sorted(float(x) for x in args.sparsities.split(","))
    tasks = ["wikitext2", *MC_EVAL_TASKS]
    previous, earlier_s = _previous(args)
    original = load_model(args.model, dtype=getattr(torch, args.dtype))
    started = time.perf_counter() - earlier_s  # an appended table's wall time is the sum of its invocations

    def measure(label: str, method: str, target: float, loaded: LoadedModel, sparsity: float, **extra) -> dict:
        t0 = time.perf_counter()
        results = evaluate(loaded.model, loaded.tokenizer, tasks, args.limit, args.seed, windows=args.windows)
        if args.gsm8k and target <= args.gsm8k_up_to + 1e-9:
            results.append(gsm8k_exact_match(loaded.model, loaded.tokenizer, args.gsm8k, args.seed))
        row = {"method": method, "target": target, "sparsity": sparsity, **extra,
               "params": sum(p.numel() for p in loaded.model.parameters()),
               **{r.task: r.value for r in results}, "task_n": {r.task: r.n for r in results},
               "eval_s": time.perf_counter() - t0}
        if args.calib and method != "dense":
            row["calib"] = args.calib
        gsm = f", gsm8k {100 * row['gsm8k']:.1f} %" if "gsm8k" in row else ""
        print(f"{label}: ppl {row['wikitext2']:.2f}, cmqa {100 * row['cmqa']:.2f} ± {100 * cmqa_se(row, args.limit):.2f}"
              f" %{gsm}", flush=True)
        return row

    dense = [r for r in previous if r["method"] == "dense"]
    rows = dense or [measure("dense", "dense", 0.0, original, 0.0)]
    runs = Path(args.runs)
    fresh: list[dict] = []

    def add(row: dict) -> None:
        fresh.append(row)
        kept = [r for r in previous if r["method"] != "dense" and _key(r) not in {_key(f) for f in fresh}]
        write(rows + kept + fresh, args, time.perf_counter() - started, final=False)  # a long run leaves what it has

    for method in methods:
        if method == "pg":  # learns for one target: a run per sparsity and budget
            for iters in (int(x) for x in args.pg_iters.split(",")):
                for s in sorted(float(x) for x in args.pg_sparsities.split(",")):
                    out = runs / f"pg-i{iters}-{round(100 * s)}"
                    if not (out / "report.json").is_file():
                        compile_model(_config(method, args.model, s, out, args, iters), overwrite=True,
                                      discard_partial=True, loaded=_fresh(original))
                    report = json.loads((out / "report.json").read_text())
                    loaded, _, measured = materialize_model(load_trajectory(str(out)), s, loaded=_fresh(original))
                    add(measure(f"pg {100 * s:.0f} % ({iters} it)", method, s, loaded, measured, pg_iters=iters,
                                compile_s=report["wall_s"]))
            continue
        base, _, repair = method.partition("+")  # gisp+lsq: gisp's run, each sparsity repaired at the end
        if repair and repair not in REPAIRS:
            raise SystemExit(f"--methods: '{method}': the repair after '+' must be one of {REPAIRS}")
        calibrated = args.calib and base not in CALIBRATION_FREE
        out = _run_dir(runs, base, max(sparsities), Path(args.calib).stem if calibrated else "")
        wanted = _config(base, args.model, max(sparsities), out, args)
        if not (out / "report.json").is_file():
            compile_model(wanted, overwrite=True, discard_partial=True, loaded=_fresh(original))
        traj = load_trajectory(str(out))
        _check_settings(out, traj.config, wanted)
        compile_s = json.loads((out / "report.json").read_text())["wall_s"]
        for s in sparsities:
            t0 = time.perf_counter()
            samples = args.repair_samples if repair else None  # the unrepaired rows fit nothing
            loaded, _, measured = materialize_model(traj, s, loaded=_fresh(original), dtype=args.dtype,
                                                    repair=repair or None, repair_samples=samples)
            extra = {"repair": repair, "repair_s": time.perf_counter() - t0} if repair else {}
            if repair:  # the windows it fitted on, as materialize decided them
                extra["repair_windows"] = materialize_repair(traj, repair, None, samples)[1].repair_windows_for(traj.plan)
            if samples is not None:
                extra["repair_samples"] = samples
            add(measure(f"{method} {100 * s:.0f} %", method, s, loaded, measured, compile_s=compile_s,
                        rebuild_s=time.perf_counter() - t0, **extra))
    kept = [r for r in previous if r["method"] != "dense" and _key(r) not in {_key(f) for f in fresh}]
    write(rows + kept + fresh, args, time.perf_counter() - started)


def _ordered(rows: list[dict]) -> list[dict]:
    """The table's order: each label's rows together (labels in the order they were first measured), by sparsity."""
    first = {label: i for i, label in reversed(list(enumerate(_label(r) for r in rows)))}
    return sorted(rows, key=lambda r: (first[_label(r)], r["sparsity"]))


def write(rows: list[dict], args, wall_s: float, final: bool = True) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": args.model, "limit": args.limit, "windows": args.windows, "seed": args.seed,
           "gsm8k": args.gsm8k, "calib_samples": args.calib_samples, "steps": args.steps, "dtype": args.dtype,
           "wall_s": wall_s, "complete": final, "commands": args.commands, "rows": rows}
    (out / "quality.json").write_text(json.dumps(doc, indent=1))
    gsm = ["gsm8k EM"] if args.gsm8k else []
    head = ["method", "sparsity", "params", "wikitext2 ppl", "cmqa avg ± se", *gsm, *MC_EVAL_TASKS,
            "compile min", "row min"]
    windows = "all" if args.windows is None else args.windows
    lines = [f"# Quality on {args.model}", "",
             f"WikiText-2 test perplexity on {windows} evenly spaced 128-token windows; accuracy (acc_norm where "
             f"lm-eval reports it, else acc) on a seeded subset of {args.limit} questions per task (seed {args.seed}), "
             f"the same subset for every row"
             + (f"; GSM8K exact match (5-shot, greedy, lm-eval's answer extraction) on {args.gsm8k} problems"
                if args.gsm8k else "")
             + f"; weights in {args.dtype}. 'compile min' is the wall time of the run a row is served from (one run "
             "serves every sparsity of a method), 'row min' the row's own (rebuild, repair, evaluation). Wall time "
             f"{wall_s / 60:.0f} min. Commands: " + "; ".join(f"`{c.strip()}`" for c in args.commands) + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in _ordered(rows):
        own = r.get("rebuild_s", 0.0) + r["eval_s"]
        cells = [_label(r), f"{100 * r['sparsity']:.1f} %", f"{r['params'] / 1e6:.1f} M", f"{r['wikitext2']:.1f}",
                 f"{100 * r['cmqa']:.1f} ± {100 * cmqa_se(r, args.limit):.1f}",
                 *([f"{100 * r['gsm8k']:.1f}" if "gsm8k" in r else "-"] if args.gsm8k else []),
                 *(f"{100 * r[t]:.1f}" for t in MC_EVAL_TASKS),
                 f"{r['compile_s'] / 60:.1f}" if r.get("compile_s") else "-", f"{own / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "quality.png", args.model)
    if final:
        print(f"report: {out}/quality.md")


def plot(rows: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in rows if r["method"] == "dense")
    gsm = "gsm8k" in dense
    fig, axes = plt.subplots(1, 3 if gsm else 2, figsize=(15 if gsm else 10, 3.8), dpi=120)
    ax1, ax2 = axes[0], axes[1]
    for method in dict.fromkeys(_label(r) for r in rows if r["method"] != "dense"):
        pts = sorted([(0.0, dense)] + [(r["sparsity"], r) for r in rows if _label(r) == method],
                     key=lambda p: p[0])
        xs = [100 * s for s, _ in pts]
        style = dict(marker="o", lw=2.2 if method.startswith("gisp") else 1.2, label=method)
        ax1.plot(xs, [r["wikitext2"] for _, r in pts], **style)
        ax2.plot(xs, [100 * r["cmqa"] for _, r in pts], **style)
        if gsm:
            axes[2].plot(xs, [100 * r.get("gsm8k", float("nan")) for _, r in pts], **style)
    ax1.set_yscale("log")
    ax1.set_ylabel("WikiText-2 perplexity (log)")
    ax2.set_ylabel("7-task commonsense average (%)")
    if gsm:
        axes[2].set_ylabel("GSM8K exact match (%, 5-shot)")
    for ax in axes:
        ax.set_xlabel("decoder-layer parameter sparsity (%)")
        ax.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{model}: quality vs sparsity", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
