"""A finished recovery -> report.json, report.md and loss_curve.png in the recovered model's folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gisp_fx.passes.recover import RecoverResult

LOSS_PNG = "loss_curve.png"
COMPILE_REPORT = "compile_report.json"  # the pruned run's own report.json, kept beside the recovery's


def write_recover_report(folder: Path, run_dir: Path, settings: dict, result: RecoverResult, before: dict,
                         after: dict, wall_s: float, peak_rss_mb: float,
                         train_peak_rss_mb: float | None = None) -> dict:
    compiled = {}
    if (run_dir / "report.json").is_file():
        shutil.copyfile(run_dir / "report.json", folder / COMPILE_REPORT)
        compiled = json.loads((run_dir / "report.json").read_text())
    dense = compiled.get("perplexity", {})
    report = {
        "recover": settings,
        "perplexity": {"dataset": "wikitext2 test", "seq_len": before["seq_len"], "windows": before["windows"],
                       "bos": before["bos"], "before": before["ppl"], "after": after["ppl"],
                       # the dense model's, as the compile measured it (on its own --eval-windows)
                       "dense": dense.get("before"), "dense_windows": dense.get("windows")},
        "tasks": {"before": before.get("tasks"), "after": after.get("tasks")} if "tasks" in before else None,
        "steps": result.steps, "tokens": result.tokens, "train_wall_s": result.wall_s,
        "tokens_per_s": result.tokens_per_s, "trained_params": result.trained_params,
        "lora_merged": result.lora_merged, "losses": list(result.losses),
        "wall_s": wall_s, "peak_rss_mb": peak_rss_mb, "train_peak_rss_mb": train_peak_rss_mb, "plot": LOSS_PNG,
    }
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    (folder / "report.md").write_text(_markdown(report))
    plot_losses(list(result.losses), folder / LOSS_PNG, settings)
    return report


def plot_losses(losses: list[float], path: Path, settings: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_per_step = settings["batch_tokens"] // settings["seq_len"] * settings["seq_len"]
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=120)
    ax.plot([(i + 1) * tokens_per_step for i in range(len(losses))], losses, lw=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("KL(teacher || student)" + (" + CE" if settings["ce_weight"] else "") + " per token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(f"recovery: lr {settings['lr']:g}, {settings['train']}"
                 + (f", LoRA r={settings['lora_rank']}" if settings["lora_rank"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _markdown(r: dict) -> str:
    s, p = r["recover"], r["perplexity"]
    dense = f"{p['dense']:.2f} ({p['dense_windows']} windows)" if p["dense"] is not None else "not recorded"
    lines = [
        f"# gisp-fx recovery: {s['from_run']}", "",
        f"Distilled from the dense model `{s['teacher']}` (KL(teacher || student) through the LM head"
        + (f" + {s['ce_weight']} x next-token cross-entropy" if s["ce_weight"] else "") + ").", "",
        f"- data: {s['data_source']}; {s['windows_available']:,} windows of {s['seq_len']} tokens, BOS mode "
        f"`{s['bos']}`; never the evaluation text (WikiText-2 test), which is checked line by line",
        f"- trained: {s['train']}" + (f" as LoRA rank {s['lora_rank']}, merged" if s["lora_rank"] else "")
        + f"; {r['trained_params']:,} parameters",
        f"- {r['tokens']:,} tokens in {r['steps']} steps of {s['batch_tokens']} tokens; lr {s['lr']:g} "
        f"(warm-up {s['warmup']:.0%}, cosine to {s['min_lr']:g} x), clip {s['clip']:g}, precision {s['precision']}, "
        f"seed {s['seed']}",
        f"- training {r['train_wall_s']:.1f} s, {r['tokens_per_s']:.1f} tokens/s; whole command {r['wall_s']:.1f} s; "
        f"peak RSS {r['peak_rss_mb']:.0f} MiB" + (f" (training alone {r['train_peak_rss_mb']:.0f} MiB)"
                                                  if r.get("train_peak_rss_mb") else ""),
        f"- loss: {r['losses'][0]:.4f} at the first step, {r['losses'][-1]:.4f} at the last", "",
        f"## WikiText-2 test perplexity ({p['windows']} windows of {p['seq_len']} tokens)", "",
        "| model | perplexity |", "|---|---:|",
        f"| dense (the compile's report) | {dense} |",
        f"| pruned, before recovery | {p['before']:.2f} |",
        f"| recovered | {p['after']:.2f} |", "",
        "WikiText-2 train is in-domain for WikiText-2 test: perplexity alone overstates what recovery on it buys.",
        "",
    ]
    if r["tasks"]:
        lines += ["## Tasks", "", "| task | metric | before | after | n |", "|---|---|---:|---:|---:|"]
        for task, b in r["tasks"]["before"].items():
            a = r["tasks"]["after"][task]
            fmt = (lambda v: f"{v:.2f}") if b["metric"] == "ppl" else (lambda v: f"{100 * v:.2f} %")
            lines.append(f"| {task} | {b['metric']} | {fmt(b['value'])} | {fmt(a['value'])} | {b['n']} |")
        lines.append("")
    lines += [f"![loss curve]({LOSS_PNG})", ""]
    return "\n".join(lines)
