"""Cost against model size: `gisp-fx compile` to 30 % with a small fixed budget (2 steps, 32 calibration windows of
128 tokens, WikiText-2 perplexity on 32 evenly spaced test windows before and after) on SmolLM2-135M,
Qwen2.5-Coder-0.5B and Qwen2.5-Coder-1.5B; fp32 against bf16, 1 process against 2 (torchrun, gloo).

Every run is a fresh `gisp-fx compile` process (the Qwen ones under `flock /tmp/gisp-bigmem.lock`, so that no two
large jobs overlap on the shared machine), watched from here: the resident memory and CPU time of its whole process
tree are sampled every 0.25 s, and a tree that passes the memory budget is stopped and recorded as not fitting,
with the memory it had reached. Rows are appended to scaling.json as they finish (a finished row is not run again
unless --force); the Markdown table, the 7B/70B extrapolation and the plot are rebuilt from the JSON.

    python benchmarks/scaling.py [--only KEY,KEY] [--force] [--budget-gb 16] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LOCK = "/tmp/gisp-bigmem.lock"
RUNS_DIR = ROOT / "runs" / "scaling"
FLOOR_MB = 768  # a run is stopped when the machine's available memory falls below this (others share it)
BUDGET = dict(sparsity=0.3, steps=2, calib_samples=32, seq_len=128, batch_size=8, eval_windows=32)
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    model: str
    dtype: str = "float32"
    nproc: int = 1
    checkpoint: bool = False
    calib_samples: int = BUDGET["calib_samples"]  # a probe: fewer windows (the peak comes in the first batch)
    steps: int = BUDGET["steps"]
    eval_windows: int = BUDGET["eval_windows"]

    @property
    def budget(self) -> dict:
        return {**BUDGET, "calib_samples": self.calib_samples, "steps": self.steps, "eval_windows": self.eval_windows}

    @property
    def key(self) -> str:
        probe = self.budget != BUDGET
        return (f"{self.model}/{self.dtype}/{self.nproc}p" + ("/ckpt" if self.checkpoint else "")
                + (f"/probe{self.calib_samples}" if probe else ""))

    @property
    def big(self) -> bool:  # over 5 GB resident: the real Qwen models, and two copies of any model
        return self.model.startswith("qwen") or self.nproc > 1


RUNS = [  # in order of priority (a run takes 5-60 minutes on the shared machine); 2 processes hold 2 copies, so the
    # 0.5B pair is compared in bf16
    Run("smollm2"), Run("qwen2.5-coder-0.5b"), Run("qwen2.5-coder-1.5b", "bfloat16", checkpoint=True),
    Run("qwen2.5-coder-0.5b", "bfloat16"), Run("smollm2", "bfloat16"), Run("smollm2", nproc=2),
    Run("qwen2.5-coder-0.5b", "bfloat16", nproc=2), Run("qwen2.5-coder-1.5b", "float32", checkpoint=True),
    # probes: one step on one batch of 8 windows, 1 perplexity window; the peak memory comes in the first batch
    Run("qwen2.5-coder-1.5b", "bfloat16", checkpoint=True, calib_samples=8, steps=1, eval_windows=1),
    Run("qwen2.5-coder-1.5b", "float32", checkpoint=True, calib_samples=8, steps=1, eval_windows=1),
    # a cheaper 1-against-2-process pair (one step on 16 windows)
    Run("smollm2", calib_samples=16, steps=1, eval_windows=4),
    Run("smollm2", nproc=2, calib_samples=16, steps=1, eval_windows=4),
]


def _tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc (children files)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def _kill_tree(root: int) -> None:
    """SIGKILL `root` and every descendant, by pid: torchrun starts its workers in sessions of their own, so
    killing the run's process group would leave them running."""
    for pid in reversed(_tree(root)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _sample(pids: list[int]) -> tuple[float, float]:
    """(resident MB, CPU seconds user+system) summed over `pids` that still exist."""
    rss, cpu = 0.0, 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, IndexError, ValueError):
            continue
    return rss, cpu


def _available_mb() -> float:
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1)) / 1024


def command(run: Run, output: Path) -> list[str]:
    b = run.budget
    cmd = [sys.executable, "-m", "gisp_fx", "compile", run.model, "--sparsity", str(b["sparsity"]),
           "--steps", str(b["steps"]), "--calib-samples", str(b["calib_samples"]),
           "--seq-len", str(b["seq_len"]), "--batch-size", str(b["batch_size"]),
           "--eval-windows", str(b["eval_windows"]), "--dtype", run.dtype, "--nproc", str(run.nproc),
           "--output", str(output), "--overwrite", "--discard-partial"] + (["--checkpoint"] if run.checkpoint else [])
    return (["flock", LOCK] if run.big else []) + cmd


def run_one(run: Run, budget_mb: float, log: Path, deadline: float | None = None, out_root: Path | None = None) -> dict:
    """Run one compile in its own process tree; the row of figures, or a row saying why it did not finish."""
    output = (out_root or RUNS_DIR) / _folder(run.key)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.Popen(command(run, output), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    timeline: list[tuple[float, float, float]] = []  # (seconds since start, tree RSS MB, tree CPU s)
    marks: dict[int, float] = {}  # step -> seconds since start when its line was printed
    printed: dict[int, float] = {}  # step -> its wall seconds as printed
    killed: list[str] = []

    def watch() -> None:
        while proc.poll() is None:
            rss, cpu = _sample(_tree(proc.pid))
            timeline.append((time.perf_counter() - started, rss, cpu))
            free = _available_mb()
            if (rss > budget_mb or free < FLOOR_MB) and not killed:
                why = f"budget {budget_mb / 1024:.1f} GB" if rss > budget_mb else \
                    f"the machine had {free / 1024:.2f} GB left, shared with other jobs"
                killed.append(f"stopped at {rss / 1024:.1f} GB resident ({why}) after "
                              f"{time.perf_counter() - started:.0f} s")
                _kill_tree(proc.pid)
            if deadline is not None and time.time() > deadline and not killed:
                killed.append(f"stopped at the deadline after {time.perf_counter() - started:.0f} s, "
                              f"{rss / 1024:.1f} GB resident, {len(marks)} of {run.steps} steps done")
                _kill_tree(proc.pid)
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with open(log, "w") as out:
        for line in proc.stdout:
            out.write(line)
            m = re.match(r"step (\d+): removed .*, ([0-9.]+) s$", line.strip())
            if m:
                marks[int(m.group(1))] = time.perf_counter() - started
                printed[int(m.group(1))] = float(m.group(2))
    proc.wait()
    watcher.join()
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = {"key": run.key, **asdict(run), "budget": run.budget, "wall_s": wall, "load_avg_start": load0,
           "load_avg_end": os.getloadavg()[0],
           "cpu_s": (usage.ru_utime - before.ru_utime) + (usage.ru_stime - before.ru_stime),
           "tree_peak_rss_mb": max((r for _, r, _ in timeline), default=0.0), "log": str(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else str(log)}
    if killed or proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        done = [{"step": t, "wall_s": printed[t],
                 "cpu_s": _cpu_at(timeline, marks[t]) - _cpu_at(timeline, marks[t] - printed[t])} for t in sorted(marks)]
        status = ("stopped at deadline" if "deadline" in killed[0] else "does not fit") if killed else "failed"
        return {**row, "status": status, "steps_done": done, "log_progress": log_progress(log),
                "tree_cpu_s_sampled": timeline[-1][2] if timeline else None,
                "reason": killed[0] if killed else f"exit status {proc.returncode}: {' | '.join(tail)}"}
    report = json.loads((output / "report.json").read_text())
    steps = []
    for st in report["steps"]:
        end = marks.get(st["step"])
        cpu = (_cpu_at(timeline, end) - _cpu_at(timeline, end - st["wall_s"])) if end is not None else None
        steps.append({"step": st["step"], "wall_s": st["wall_s"], "cpu_s": cpu, "groups": st["groups"]})
    return {**row, "status": "ok", "params": report["params"]["before"],
            "params_after": report["params"]["after"], "fp32_weight_mb": report["fp32_weight_mb"],
            "peak_rss_mb_rank0": report["peak_rss_mb"], "ratio_rank0": report["peak_rss_over_fp32_weights"],
            "ratio_tree": row["tree_peak_rss_mb"] / report["fp32_weight_mb"],
            "sparsity": report["sparsity"]["measured"], "ppl_before": report["perplexity"]["before"],
            "ppl_after": report["perplexity"]["after"], "ppl_windows": report["perplexity"]["windows"],
            "steps": steps, "report_wall_s": report["wall_s"], "shape": _shape(output)}


def removed(output: Path) -> set[tuple]:
    """The (layer, kind, original index) groups a finished run removed, over all its steps."""
    doc = json.loads((Path(output) / "trajectory" / "trajectory.json").read_text())
    return {tuple(ref) for step in doc["steps"] for ref in step["removed"]}


def agreement(row: dict, rows: list[dict]) -> dict:
    """Removal-set agreement of `row` with every finished row of the same model whose run folder is still here:
    shared groups over the union (Jaccard) and over each side."""
    out = {}
    if row.get("status") != "ok" or not (RUNS_DIR / _folder(row["key"]) / "trajectory").is_dir():
        return row.get("agreement", {})
    mine = removed(RUNS_DIR / _folder(row["key"]))
    for other in rows:
        if other["key"] == row["key"] or other.get("status") != "ok" or other["model"] != row["model"] \
                or other.get("budget") != row.get("budget") \
                or not (RUNS_DIR / _folder(other["key"]) / "trajectory").is_dir():
            continue
        theirs = removed(RUNS_DIR / _folder(other["key"]))
        shared = len(mine & theirs)
        out[other["key"]] = {"shared": shared, "this": len(mine), "other": len(theirs),
                             "jaccard": shared / len(mine | theirs), "of_this": shared / len(mine)}
    return out


def log_progress(log: Path) -> list[str]:
    """What a stopped run had finished, from its log: the phases whose progress bars reached 100 %, with their
    printed wall time (e.g. 'step 1 gradients 1/1 in 03:40')."""
    if not log.is_file():
        return []
    done = re.findall(r"([A-Za-z][A-Za-z0-9 -]+)[.]*: 100%\|[^|]*\| (\d+/\d+) \[([0-9:]+)<",
                      log.read_text().replace("\r", "\n"))
    return [f"{name.strip()} {count} in {took}" for name, count, took in done
            if not name.strip().lower().startswith(("loading weights", "writing"))]


def _folder(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", key)


def _cpu_at(timeline: list[tuple[float, float, float]], t: float) -> float:
    """Tree CPU seconds at time `t`, linearly interpolated between samples."""
    prev = (0.0, 0.0, 0.0)
    for sample in timeline:
        if sample[0] >= t:
            span = sample[0] - prev[0]
            return prev[2] + (sample[2] - prev[2]) * ((t - prev[0]) / span if span > 0 else 1.0)
        prev = sample
    return prev[2]


def _shape(output: Path) -> dict:
    """Layers, hidden size and vocabulary of the unpruned model, from the saved config."""
    cfg = json.loads((output / "config.json").read_text())
    return {k: cfg.get(k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size",
                                    "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")}


def _deadline(hhmm: str | None) -> float | None:
    """Epoch seconds of the next HH:MM UTC."""
    if not hhmm:
        return None
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    h, m = map(int, hhmm.split(":"))
    at = now.replace(hour=h, minute=m, second=0, microsecond=0)
    return (at if at > now else at + dt.timedelta(days=1)).timestamp()


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated run keys, e.g. smollm2/float32/1p (default: all)")
    ap.add_argument("--force", action="store_true", help="run again rows already in the JSON")
    ap.add_argument("--budget-gb", type=float, default=16.0,
                    help="stop a run whose process tree passes this resident memory (default 16), or when the "
                         "machine's available memory falls under 768 MB")
    ap.add_argument("--deadline", help="UTC time HH:MM at which a running compile is stopped and recorded as such")
    ap.add_argument("--report-only", action="store_true", help="rebuild the .md and .png from the JSON")
    ap.add_argument("--json", type=Path, default=RESULTS / "scaling.json")
    args = ap.parse_args()
    rows = load_rows(args.json)
    if not args.report_only:
        wanted = set(args.only.split(",")) if args.only else None
        unknown = (wanted or set()) - {r.key for r in RUNS}
        if unknown:
            raise SystemExit(f"--only: unknown run keys {sorted(unknown)}; known: {[r.key for r in RUNS]}")
        logs = ROOT / "runs" / "scaling"
        logs.mkdir(parents=True, exist_ok=True)
        for run in RUNS:
            if (wanted and run.key not in wanted) or (not args.force and any(r["key"] == run.key for r in rows)):
                continue
            budget = args.budget_gb * 1024
            print(f"{run.key}: running (memory budget {budget / 1024:.1f} GB, or until the machine has "
                  f"{FLOOR_MB} MB left) ...", flush=True)
            row = run_one(run, budget, logs / f"{run.key.replace('/', '_')}.log", _deadline(args.deadline))
            row["budget_mb"] = budget
            # re-read first: another driver (e.g. small models run beside a large one) may have added rows
            rows = [r for r in load_rows(args.json) if r["key"] != run.key]
            rows.append(row)
            args.json.write_text(json.dumps(rows, indent=1))
            print(f"{run.key}: {row['status']}, {row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} CPU s, tree peak "
                  f"{row['tree_peak_rss_mb']:.0f} MB" + (f" ({row['reason']})" if row["status"] != "ok" else ""),
                  flush=True)
    rows = load_rows(args.json)
    for row in rows:  # removal sets, compared while the run folders (runs/scaling, not committed) are here
        row["agreement"] = agreement(row, rows)
        if row["status"] != "ok" and (ROOT / row["log"]).is_file() and row["key"].replace("/", "_") in row["log"]:
            row["log_progress"] = log_progress(ROOT / row["log"])
    if not args.report_only or any(r["agreement"] for r in rows):
        args.json.write_text(json.dumps(rows, indent=1))
    from scaling_report import write_report

    write_report(rows, args.json.with_suffix(".md"), args.json.with_suffix(".png"))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
