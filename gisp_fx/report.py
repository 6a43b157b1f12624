"""A finished run -> report.json, report.md and kept_per_layer.png in its output folder."""

from __future__ import annotations

import json
from pathlib import Path

from gisp_fx.config import CompileConfig
from gisp_fx.passes.select import parse_protect
from gisp_fx.plan import GroupPlan

PNG = "kept_per_layer.png"
HISTORY_PNG = "pg_history.png"


def layer_rows(plan0: GroupPlan, plan: GroupPlan) -> list[dict]:
    rows = []
    for first, now in zip(plan0.layers, plan.layers):
        a0, a, m0, m = first.attention, now.attention, first.mlp, now.mlp
        rows.append({
            "layer": first.index, "module": first.module,
            "heads": [a.num_heads if a else 0, a0.num_heads if a0 else 0],
            "kv_heads": [a.num_kv_heads if a else 0, a0.num_kv_heads if a0 else 0],
            "channels": [m.channels if m else 0, m0.channels if m0 else 0],
            "params": [now.params, first.params],
        })
    return rows


def write_report(folder: Path, config: CompileConfig, plan0: GroupPlan, plan: GroupPlan, traj, before: dict,
                 after: dict, wall_s: float, peak_rss_mb: list[float], checkpoint: bool | None = None) -> dict:
    """report.json's content, written into `folder` with its table; `peak_rss_mb` holds every rank's peak (one
    entry in one process): the report's peak is the largest, what one process (one device) needs."""
    sparsity = (plan0.decoder_params - plan.decoder_params) / plan0.decoder_params
    steps = [{"step": s.step, "groups": len(s.removed), "heads": sum(r[1] == "head" for r in s.removed),
              "channels": sum(r[1] == "channel" for r in s.removed), "sparsity": s.sparsity, "loss": s.loss,
              "wall_s": s.wall_s} for s in traj.steps]
    report = {
        "model": config.model, "method": config.effective_method, "config": config.to_json(),
        "groups_per_step": traj.config.get("groups_per_step"),
        "params": {"before": plan0.total_params, "after": plan.total_params,
                   "decoder_before": plan0.decoder_params, "decoder_after": plan.decoder_params},
        "sparsity": {"target": config.sparsity, "measured": sparsity,
                     "of_all_params": 1 - plan.total_params / plan0.total_params},
        "perplexity": {"dataset": "wikitext2 test", "seq_len": before["seq_len"], "windows": before["windows"],
                       "bos": {"mode": config.bos, "window_starts_with_bos": after.get("bos", False)},
                       "before": before["ppl"], "after": after["ppl"]},
        "protected_layers": sorted(parse_protect(config.protect, len(plan0.layers))),
        "layers": layer_rows(plan0, plan), "steps": steps,
        "wall_s": wall_s, "peak_rss_mb": max(peak_rss_mb), "activation_checkpointing": checkpoint,
        # the memory yardstick: peak resident memory over the original model's weights in fp32
        "fp32_weight_mb": plan0.total_params * 4 / 2**20,
        "peak_rss_over_fp32_weights": max(peak_rss_mb) / (plan0.total_params * 4 / 2**20),
    }
    if len(peak_rss_mb) > 1:  # many processes: each one's peak, and what they held together at most
        report["peak_rss_mb_per_rank"] = list(peak_rss_mb)
        report["peak_rss_mb_all_ranks_at_most"] = sum(peak_rss_mb)
    if traj.repair:  # repair's own time, apart from the compile's (the budget: <= 30 % of the wall time)
        spent = sum(r["wall_s"] for r in traj.repair)
        report["repair"] = {**{k: traj.repair[0][k] for k in ("mode", "at", "inputs", "damping")}, "wall_s": spent,
                            "share_of_wall": spent / wall_s,
                            "bias_params_added": sum(r["bias_params_added"] for r in traj.repair), "runs": traj.repair}
    if traj.history:
        report["history"] = {"iterations": len(traj.history), "first_loss": traj.history[0]["loss"],
                             "last_loss": traj.history[-1]["loss"], "last_entropy": traj.history[-1]["entropy"],
                             "plot": HISTORY_PNG}
        plot_history(traj.history, folder / HISTORY_PNG, f"{config.model}: {config.effective_method}")
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    (folder / "report.md").write_text(_markdown(report))
    plot_kept(report["layers"], folder / PNG, f"{config.model}: {100 * sparsity:.1f} % decoder sparsity")
    return report


def plot_history(history: list[dict], path: Path, title: str) -> None:
    """Sampled loss with its baseline, and the mean entropy of the keep-probabilities, against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [h["iter"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=120)
    ax1.plot(it, [h["loss"] for h in history], lw=0.8, alpha=0.6, label="mean sampled loss")
    ax1.plot(it, [h["baseline"] for h in history], lw=1.5, label="baseline")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("cross-entropy")
    ax1.legend(fontsize=8)
    ax2.plot(it, [h["entropy"] for h in history], color="C2")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("mean entropy of keep-probabilities (nats)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _markdown(r: dict) -> str:
    p, s, ppl = r["params"], r["sparsity"], r["perplexity"]
    lines = [
        f"# gisp-fx report: {r['model']} ({r['method']})", "",
        "| | before | after |", "|---|---:|---:|",
        f"| parameters | {p['before']:,} | {p['after']:,} |",
        f"| decoder-layer parameters | {p['decoder_before']:,} | {p['decoder_after']:,} |",
        f"| WikiText-2 perplexity ({ppl['seq_len']}-token windows, {ppl['windows']}"
        f"{', each starting with BOS' if ppl['bos']['window_starts_with_bos'] else ''}) | {ppl['before']:.2f} | "
        f"{ppl['after']:.2f} |", "",
        f"Measured decoder-layer sparsity **{100 * s['measured']:.2f} %** (target {100 * s['target']:.1f} %; "
        f"{100 * s['of_all_params']:.2f} % of all parameters). {len(r['steps'])} steps, "
        f"{r['groups_per_step'] or 'all'} groups per step; wall time {r['wall_s']:.0f} s, "
        f"peak memory {r['peak_rss_mb']:.0f} MB ({r['peak_rss_over_fp32_weights']:.1f} x the fp32 weights"
        + (f", the largest of {len(r['peak_rss_mb_per_rank'])} processes; "
           f"{r['peak_rss_mb_all_ranks_at_most']:.0f} MB together at most" if "peak_rss_mb_per_rank" in r else "")
        + ").", "",
        *([f"Repair: **{r['repair']['mode']}** at {r['repair']['at']} ({r['repair']['inputs']} inputs, damping "
           f"{r['repair']['damping']}), {len(r['repair']['runs'])} run(s), {r['repair']['wall_s']:.1f} s "
           f"({100 * r['repair']['share_of_wall']:.1f} % of the wall time).", ""] if "repair" in r else []),
        f"Protected layers (never pruned): {', '.join(map(str, r['protected_layers'])) or 'none'} ("
        + (f"--protect {r['config']['protect']})" if r["config"].get("protect") else
           "the default: the first 10 % and the last)") + ".", "",
        f"![kept per layer]({PNG})", "",
        *([f"Policy gradient: {r['history']['iterations']} iterations, sampled loss {r['history']['first_loss']:.3f} "
           f"-> {r['history']['last_loss']:.3f}, mean entropy of the keep-probabilities at the end "
           f"{r['history']['last_entropy']:.3f} nats.", "", f"![pg history]({HISTORY_PNG})", ""]
          if "history" in r else []),
        "## Steps", "", "| step | groups | heads | channels | sparsity after | calibration loss | wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for st in r["steps"]:
        lines.append(f"| {st['step']} | {st['groups']} | {st['heads']} | {st['channels']} | "
                     f"{100 * st['sparsity']:.2f} % | {st['loss']:.3f} | {st['wall_s']:.1f} |")
    lines += ["", "## Kept per layer", "", "| layer | query heads | K/V heads | MLP channels | parameters |",
              "|---:|---:|---:|---:|---:|"]
    for l in r["layers"]:
        lines.append(f"| {l['layer']} | {l['heads'][0]}/{l['heads'][1]} | {l['kv_heads'][0]}/{l['kv_heads'][1]} | "
                     f"{l['channels'][0]}/{l['channels'][1]} | {l['params'][0]:,}/{l['params'][1]:,} |")
    lines.append("")
    return "\n".join(lines)


def plot_kept(layers: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [l["layer"] for l in layers]
    frac = lambda key: [l[key][0] / l[key][1] if l[key][1] else 0 for l in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(x) + 2), 3.6), dpi=120)
    w = 0.27
    ax.bar([i - w for i in x], frac("heads"), w, label="query heads", color="#3b6ea8")
    ax.bar(x, frac("kv_heads"), w, label="K/V heads", color="#8fb3dc")
    ax.bar([i + w for i in x], frac("channels"), w, label="MLP channels", color="#d98c3f")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("fraction kept")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(x)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=10, pad=22)
    ax.legend(ncol=3, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
