"""scaling.json rows -> scaling.md (the table, measured FLOP and byte rates, the 7B/70B extrapolation with its
arithmetic) and scaling.png (cost against parameters). Pure arithmetic on the recorded rows: rerunnable any time.

    python benchmarks/scaling_report.py [benchmarks/results/scaling.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Targets of the extrapolation: Llama-2 shapes (untied head, 32k vocabulary); decoder = the scored linears' params.
TARGETS = {
    "7B (Llama-2-7B shape)": dict(params=6.738e9, layers=32, hidden=4096, inter=11008, vocab=32000, kv_dim=4096),
    "70B (Llama-2-70B shape)": dict(params=68.977e9, layers=80, hidden=8192, inter=28672, vocab=32000, kv_dim=1024),
}
# A default `gisp-fx compile`: 64 windows x 128 tokens per step, 8 steps (SmolLM2 at 50 % took 9), WikiText-2
# perplexity on 256 windows x 128 tokens before and after, batches of 8 windows.
DEFAULT = dict(calib_tokens=64 * 128, steps=8, eval_tokens=2 * 256 * 128, batch_tokens=8 * 128)
GPUS = {"A100 (bf16 dense 312 TFLOP/s)": 312e12, "H100 SXM (bf16 dense 989 TFLOP/s)": 989e12}
UTILISATION = 0.4  # model-FLOP utilisation assumed for 1k-token batches of forward+backward
GPU_MEMORY_GB = 80


def decoder_params(t: dict) -> float:
    h, i, kv = t["hidden"], t["inter"], t["kv_dim"]
    return t["layers"] * (2 * h * h + 2 * h * kv + 3 * h * i)


def compute_params(row: dict) -> float:
    """Parameters in matmuls per token: all but the input embedding table (a lookup), unless it is the head too."""
    s = row["shape"]
    return row["params"] - (0 if s.get("tie_word_embeddings") else s["vocab_size"] * s["hidden_size"])


def step_flops(row: dict) -> float:
    """Forward + backward of step 1 (the unpruned model): 6 N T, plus one more forward (2 N T) when checkpointing."""
    tokens = row["budget"]["calib_samples"] * row["budget"]["seq_len"]
    return (8 if row["checkpoint"] else 6) * compute_params(row) * tokens


def activation_factor(row: dict) -> float:
    """Measured resident bytes beyond weights and the fp32 gradient sums of the scored linears, per token of one
    batch x layer x hidden unit: an upper bound on activation bytes (it also holds the runtime and allocator slack)."""
    s = row["shape"]
    width = 2 if row["dtype"] == "bfloat16" else 4
    weights = row["params"] * width
    grads = 4 * _decoder_of(row)
    rest = row["tree_peak_rss_mb"] * 2**20 - weights - grads
    return rest / (row["budget"]["batch_size"] * row["budget"]["seq_len"] * s["num_hidden_layers"] * s["hidden_size"])


def _decoder_of(row: dict) -> float:
    s = row["shape"]
    head = s["hidden_size"] // s["num_attention_heads"]
    return decoder_params(dict(layers=s["num_hidden_layers"], hidden=s["hidden_size"], inter=s["intermediate_size"],
                               kv_dim=head * s["num_key_value_heads"]))


def _fmt_s(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def table(rows: list[dict]) -> list[str]:
    out = ["| model | params | dtype | procs | ckpt | windows | step 1 wall s | step 1 CPU s | step 2 wall s | GFLOP per CPU-s "
           "(step 1) | peak RSS, all processes | / fp32 weights | ppl before -> after | sparsity | load avg |",
           "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        params = f"{r['params'] / 1e6:,.0f} M" if "params" in r else "-"
        head = f"| {r['model']} | {params} | {r['dtype']} | {r['nproc']} | " \
               f"{'yes' if r['checkpoint'] else 'no'} |"
        load = f"{r['load_avg_start']:.1f}-{r['load_avg_end']:.1f}"
        if r["status"] != "ok":
            done = r.get("steps_done") or [{}]
            out.append(f"{head} {r['budget']['calib_samples']} | {done[0].get('wall_s', float('nan')):.0f} | "
                       f"{done[0].get('cpu_s', float('nan')):.0f} | - | - | {r['tree_peak_rss_mb'] / 1024:.2f} GB when "
                       f"stopped | | {r['status']}: {r['reason']}"
                       + (f"; finished before: {', '.join(r['log_progress'])}" if r.get("log_progress") else "")
                       + f" | | {load} |")
            continue
        s1, s2 = r["steps"][0], r["steps"][min(1, len(r["steps"]) - 1)]
        rate = step_flops(r) / s1["cpu_s"] / 1e9 if s1["cpu_s"] else float("nan")
        out.append(f"{head} {r['budget']['calib_samples']} | {s1['wall_s']:.0f} | {s1['cpu_s']:.0f} | {s2['wall_s']:.0f} | {rate:.1f} | "
                   f"{r['tree_peak_rss_mb'] / 1024:.2f} GB | {r['ratio_tree']:.2f} | {r['ppl_before']:.2f} -> "
                   f"{r['ppl_after']:.2f} | {100 * r['sparsity']:.1f} % | {load} |")
    return out


def agreement_lines(rows: list[dict]) -> list[str]:
    """Removal sets of runs of one model with other settings (dtype, processes): shared groups."""
    pairs = [(r["key"], k, a) for r in rows for k, a in (r.get("agreement") or {}).items()]
    if not pairs:
        return []
    out = ["Removal sets of the same model under other settings (groups removed over all steps; shared / union):",
           "", "| run | against | removed | shared | shared / union | shared / this run's |",
           "|---|---|---:|---:|---:|---:|"]
    out += [f"| {k} | {o} | {a['this']:,} (other {a['other']:,}) | {a['shared']:,} | {100 * a['jaccard']:.1f} % | "
            f"{100 * a['of_this']:.1f} % |" for k, o, a in pairs]
    return out + [""]


def extrapolation(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if r["status"] == "ok" and r["nproc"] == 1 and r["steps"][0]["cpu_s"]]
    if not ok:
        return ["(no finished one-process run to extrapolate from)"]
    lines = ["Rates of every finished one-process run, step 1 (the unpruned model):", ""]
    for r in sorted(ok, key=lambda r: (r["params"], r["dtype"], r["checkpoint"])):
        n, flops = compute_params(r), step_flops(r)
        lines.append(f"- {r['key']}: {(8 if r['checkpoint'] else 6)} x {n / 1e6:,.0f} M matmul parameters x "
                     f"{r['budget']['calib_samples'] * r['budget']['seq_len']:,} tokens = {flops / 1e12:.1f} TFLOP in "
                     f"{r['steps'][0]['cpu_s']:.0f} CPU s = **{flops / r['steps'][0]['cpu_s'] / 1e9:.1f} GFLOP per "
                     f"CPU-second** ({flops / r['steps'][0]['wall_s'] / 1e9:.1f} GFLOP/s wall at load "
                     f"{r['load_avg_start']:.0f}); peak memory beyond weights and fp32 gradient sums: "
                     f"{activation_factor(r):.0f} bytes per (batch token x layer x hidden unit)")
    # the extrapolation: the rate of the largest model; activation bytes of the largest run without checkpointing,
    # in fp32 (halved below for bf16 activations)
    biggest = max(r["params"] for r in ok)
    rate_row = max((r for r in ok if r["params"] == biggest), key=lambda r: step_flops(r) / r["steps"][0]["cpu_s"])
    rate = step_flops(rate_row) / rate_row["steps"][0]["cpu_s"]
    plain = [r for r in ok if not r["checkpoint"]] or ok
    act_row = max(plain, key=lambda r: (r["params"], r["dtype"] == "float32"))
    act = activation_factor(act_row) * (2 if act_row["dtype"] == "bfloat16" else 1)
    lines += ["", f"Extrapolated with the rate of {rate_row['key']} ({rate / 1e9:.1f} GFLOP per CPU-second) and the "
              f"activation bytes of {act_row['key']} ({act:.0f} per batch token x layer x hidden unit, fp32; an "
              "upper bound: it also holds the Python/torch runtime and allocator slack)."]
    d = DEFAULT
    lines += ["", f"A default run: {d['steps']} steps of {d['calib_tokens']:,} calibration tokens (forward, the "
              "forward recomputed by the default checkpointing, and backward: 8 N T) and WikiText-2 perplexity on {d['eval_tokens']:,} tokens (before + after, forward, 2 N T); "
              f"N = parameters in matmuls (all but the input embedding). GPU time assumes {100 * UTILISATION:.0f} % "
              "of the dense bf16 peak; the time of loading, capture and saving is not included. Memory = bf16 weights "
              "(2 bytes x all parameters) + fp32 gradient sums of the scored linears (4 bytes x decoder parameters: an "
              "upper bound, protected layers and GQA K/V projections get none) + "
              f"activations at the measured {act:.0f} bytes per batch token x layer x hidden unit (fp32 runtime; "
              f"halved for bf16 activations: {act / 2:.0f}), batches of {d['batch_tokens']:,} tokens.", "",
              "| target | N (matmul) | FLOPs of a default run | 2 CPU cores at the measured rate | "
              + " | ".join(f"1 x {g} | 8 x {g.split(' ')[0]}" for g in GPUS) + " |",
              "|---|---:|---:|---:|" + "---:|---:|" * len(GPUS)]
    mem_lines = ["", "| target | bf16 weights | fp32 gradient sums | activations (bf16) | one GPU needs | fits one "
                 f"{GPU_MEMORY_GB} GB GPU | with --checkpoint | 8 GPUs, replicated (each) | 8 GPUs, weights+gradients "
                 "sharded (each; `--shard`) | sharded + --checkpoint (each) |",
                 "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    arithmetic = ["", "Arithmetic:", ""]
    for name, t in TARGETS.items():
        n = t["params"] - t["vocab"] * t["hidden"]
        flops = d["steps"] * 8 * n * d["calib_tokens"] + 2 * n * d["eval_tokens"]
        cpu = flops / (2 * rate)
        gpu = {g: flops / (peak * UTILISATION) for g, peak in GPUS.items()}
        lines.append(f"| {name} | {n / 1e9:.2f} B | {flops:.2e} | {_fmt_s(cpu)} | "
                     + " | ".join(f"{_fmt_s(s)} | {_fmt_s(s / 8)}" for s in gpu.values()) + " |")
        dec = decoder_params(t)
        w, g, a = 2 * t["params"], 4 * dec, act / 2 * d["batch_tokens"] * t["layers"] * t["hidden"]
        one = w + g + a
        # checkpointing keeps each layer's bf16 input and recomputes one layer's activations at a time
        ck = 2 * d["batch_tokens"] * t["layers"] * t["hidden"] + a / t["layers"]
        mem_lines.append(f"| {name} | {w / 1e9:.1f} GB | {g / 1e9:.1f} GB | {a / 1e9:.1f} GB | {one / 1e9:.1f} GB | "
                         f"{'yes' if one < GPU_MEMORY_GB * 1e9 else 'no'} | {(w + g + ck) / 1e9:.1f} GB | "
                         f"{one / 1e9:.1f} GB | {((w + g) / 8 + a) / 1e9:.1f} GB | {((w + g) / 8 + ck) / 1e9:.1f} GB |")
        h100 = list(GPUS.values())[-1]
        arithmetic += [
            f"- {name}: N = {t['params'] / 1e9:.3f} B - {t['vocab']:,} x {t['hidden']:,} (input embedding) = "
            f"{n / 1e9:.3f} B; FLOPs = {d['steps']} x 8 x N x {d['calib_tokens']:,} + 2 x N x {d['eval_tokens']:,} = "
            f"{flops:.3e}; on 2 CPU cores: {flops:.3e} / (2 x {rate / 1e9:.1f} GFLOP/s) = {_fmt_s(cpu)}; one H100: "
            f"{flops:.3e} / ({h100 / 1e12:.0f}e12 x {UTILISATION}) = {flops / (h100 * UTILISATION):.1f} s; 8 GPUs "
            "split the windows (the gradient all-reduce per step moves about 2 x 4 bytes x decoder parameters = "
            f"{8 * dec / 1e9:.0f} GB per GPU, about {8 * dec / 1e9 / 300:.1f} s on 300 GB/s NVLink per step).",
            f"  Memory: 2 x {t['params'] / 1e9:.2f} B + 4 x {dec / 1e9:.2f} B (decoder: {t['layers']} x (2 x "
            f"{t['hidden']}^2 + 2 x {t['hidden']} x {t['kv_dim']} + 3 x {t['hidden']} x {t['inter']})) + "
            f"{act / 2:.0f} x {d['batch_tokens']} x {t['layers']} x {t['hidden']} = {one / 1e9:.1f} GB; with "
            f"--checkpoint the activations become 2 x {d['batch_tokens']} x {t['layers']} x {t['hidden']} (layer "
            f"inputs) + one layer's {a / t['layers'] / 1e9:.2f} GB = {ck / 1e9:.1f} GB."]
    return lines + mem_lines + arithmetic


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    kind = lambda r: (r["dtype"], r["nproc"], r["checkpoint"], r["budget"]["calib_samples"])
    for i, (dtype, nproc, ckpt, windows) in enumerate(sorted({kind(r) for r in ok})):
        pts = sorted((r for r in ok if kind(r) == (dtype, nproc, ckpt, windows)), key=lambda r: r["params"])
        label = f"{dtype}, {nproc} proc" + (", ckpt" if ckpt else "") + f", {windows} windows"
        x = [r["params"] / 1e6 for r in pts]
        # CPU seconds per 32 windows, so that probes with fewer windows sit on the same scale
        ax1.plot(x, [r["steps"][0]["cpu_s"] * 32 / windows for r in pts], "o-", color=f"C{i}", label=label)
        ax2.plot(x, [r["tree_peak_rss_mb"] / 1024 for r in pts], "o-", color=f"C{i}", label=label)
    weights = sorted({(r["params"], r["fp32_weight_mb"]) for r in ok})
    ax2.plot([p / 1e6 for p, _ in weights], [w / 1024 for _, w in weights], "k--", lw=1, label="fp32 weights")
    for r in rows:
        if r["status"] != "ok":
            ax2.plot([], [])
            ax2.annotate(f"{r['key']}: {r['status']}", (0.02, 0.95), xycoords="axes fraction", fontsize=7,
                         va="top")
    ax1.set_ylabel("CPU seconds of step 1 per 32 x 128 tokens")
    ax2.set_ylabel("peak resident GB (all processes)")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (M)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("gisp-fx compile to 30 %, 2 steps: cost against model size (2 shared CPU cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(rows: list[dict], md: Path, png: Path) -> None:
    budget = rows[0]["budget"] if rows else {}
    lines = ["# Scaling: cost against model size", "",
             "Written by `benchmarks/scaling.py` (`make scaling`) from scaling.json; each row one fresh `gisp-fx "
             f"compile` process: sparsity {budget.get('sparsity')}, {budget.get('steps')} steps, "
             f"{budget.get('calib_samples')} calibration windows of {budget.get('seq_len')} tokens (WikiText-2 "
             f"train), batches of {budget.get('batch_size')}, perplexity on {budget.get('eval_windows')} evenly "
             "spaced WikiText-2 test windows of 128 tokens. The machine has 2 CPU cores shared with other jobs: wall "
             "times are inflated by the load shown; CPU seconds (all processes of the run, sampled from /proc every "
             "0.25 s) are the fairer measure. Peak RSS is the largest sampled sum over the run's processes (both "
             "ranks for 2 processes). The Qwen2.5-Coder models are their Q4_K_M GGUF files dequantised (untied LM "
             "head), so their perplexity is that of the quantised checkpoint.", "",
             *table(rows), "", *agreement_lines(rows), "## Extrapolation to 7B and 70B", "", *extrapolation(rows), "", "![cost](scaling.png)", ""]
    md.write_text("\n".join(lines))
    if rows:
        plot(rows, png)


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "scaling.json"
    write_report(json.loads(src.read_text()), src.with_suffix(".md"), src.with_suffix(".png"))
