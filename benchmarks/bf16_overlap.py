"""bf16 against fp32 at the default compile: how many of the groups an fp32 `make compile` (SmolLM2 to 50 %, 8 steps,
64 windows) removes does the same compile in bfloat16 remove too?

Runs `gisp-fx compile smollm2 --sparsity 0.5` in each dtype (a run folder that already holds a finished compile of the
same settings is reused: `make compile` writes the fp32 one) and writes benchmarks/results/bf16-overlap.json:
the groups removed by each, shared / union and shared / fp32's, per kind (query heads, MLP channels), and each run's
perplexity, wall time and peak memory. The issue's bar: at least 90 % shared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from scaling import removed  # benchmarks/scaling.py: the groups a finished run removed

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "bf16-overlap.json"
RUNS = {"float32": ROOT / "runs" / "smollm2-gisp-50", "bfloat16": ROOT / "runs" / "smollm2-gisp-50-bf16"}
SETTINGS = {"model": "smollm2", "sparsity": 0.5}  # everything else at compile's defaults


def _finished(output: Path, dtype: str) -> bool:
    """`output` holds a finished compile of SETTINGS in `dtype` with every other setting at its default."""
    from gisp_fx.config import CompileConfig

    report = output / "report.json"
    if not report.is_file():
        return False
    cfg = json.loads(report.read_text())["config"]
    defaults = CompileConfig(**SETTINGS, output=str(output), dtype=dtype).to_json()
    differ = {k for k in defaults if k != "output" and cfg.get(k) != defaults[k]}
    if differ:
        print(f"{output}: a compile with other settings ({', '.join(sorted(differ))}); compiling again")
    return not differ


def overlap(a: set[tuple], b: set[tuple]) -> dict:
    shared = len(a & b)
    return {"first": len(a), "second": len(b), "shared": shared,
            "shared_over_union": shared / max(1, len(a | b)), "shared_over_first": shared / max(1, len(a))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="compile again even where a finished run folder exists")
    args = ap.parse_args()
    reports = {}
    for dtype, folder in RUNS.items():
        if args.force or not _finished(folder, dtype):
            cmd = [sys.executable, "-m", "gisp_fx", "compile", SETTINGS["model"], "--sparsity",
                   str(SETTINGS["sparsity"]), "--dtype", dtype, "--output", str(folder), "--overwrite"]
            print("$ gisp-fx", " ".join(cmd[3:]), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
        reports[dtype] = json.loads((folder / "report.json").read_text())
    sets = {d: removed(f) for d, f in RUNS.items()}
    kinds = sorted({ref[1] for s in sets.values() for ref in s})
    result = {
        "settings": {**SETTINGS, "steps": reports["float32"]["config"].get("steps"),
                     "calib_samples": reports["float32"]["config"].get("calib_samples")},
        "all": overlap(sets["float32"], sets["bfloat16"]),
        "per_kind": {k: overlap({r for r in sets["float32"] if r[1] == k}, {r for r in sets["bfloat16"] if r[1] == k})
                     for k in kinds},
        "runs": {d: {"folder": str(RUNS[d].relative_to(ROOT)), "sparsity": r["sparsity"]["measured"],
                     "steps": len(r["steps"]), "ppl_before": r["perplexity"]["before"],
                     "ppl_after": r["perplexity"]["after"], "ppl_windows": r["perplexity"]["windows"],
                     "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
                     "peak_over_fp32_weights": r["peak_rss_over_fp32_weights"]} for d, r in reports.items()},
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    a = result["all"]
    print(f"fp32 removes {a['first']:,} groups, bf16 {a['second']:,}; shared {a['shared']:,}: "
          f"{100 * a['shared_over_union']:.1f} % of the union, {100 * a['shared_over_first']:.1f} % of fp32's")
    for k, o in result["per_kind"].items():
        print(f"  {k}: fp32 {o['first']:,}, bf16 {o['second']:,}, shared {o['shared']:,} "
              f"({100 * o['shared_over_union']:.1f} % of the union)")
    for d, r in result["runs"].items():
        print(f"  {d}: ppl {r['ppl_before']:.2f} -> {r['ppl_after']:.2f} ({r['ppl_windows']}), {r['steps']} steps, "
              f"{r['wall_s']:.0f} s, peak {r['peak_rss_mb']:.0f} MB ({r['peak_over_fp32_weights']:.2f}x)")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
