"""Peak resident memory of one GISP scoring pass (the default compile's 64 windows x 128 tokens, batches of 8),
over the model's fp32 weight bytes: full-vocabulary logits (the model's own loss) against the chunked LM-head
loss, with and without activation checkpointing. Each configuration runs in a fresh process (VmHWM is a
high-water mark), on the bundled SmolLM2-135M and on a random 274M-parameter Gemma-3-shaped model with a
262,144-token vocabulary (built in-process: no download).

    python benchmarks/memory.py [--models smollm2,vocab262k] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# "default" is what `gisp-fx compile` does: chunked head loss, checkpointing, glibc's mmap threshold fixed
# (gisp_fx.memory.lean_heap_); "before" what it did before: head chunks of 2^24 logits, no checkpointing, glibc's
# own heap settings
MODES = {"full-logits": dict(loss_chunk=0), "before": dict(loss_chunk=2**24), "chunked": {},
         "chunked+checkpoint": dict(checkpoint=True), "default": dict(checkpoint=True, lean_heap=True)}


def _rss_mb() -> float:
    from gisp_fx.memory import peak_rss_mb

    return peak_rss_mb()


def build(name: str, windows: int):
    import torch

    if name == "smollm2":
        from gisp_fx.datasets import lm_windows, wikitext2_train_text
        from gisp_fx.loading import load_model

        loaded = load_model("smollm2")
        ids = lm_windows(loaded.tokenizer, wikitext2_train_text(), windows, 128, 0, "WikiText-2 train")
        return loaded.model, ids
    import transformers

    cfg = transformers.Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=256, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (windows, 128), generator=torch.Generator().manual_seed(0))
    return model, ids


def _first_step(plan, scores):
    """What the default compile removes at its first step, about: the reference-normalised global ranking cut at
    an eighth of the 50 % target (default protected layers)."""
    import math

    from gisp_fx.passes.select import Normalize, parse_protect, rank, select

    ranked = rank(plan, scores, Normalize.REFERENCE, plan, parse_protect(None, len(plan.layers)))
    return select(plan, ranked, None, math.ceil(0.5 * plan.decoder_params / 8)).removed


def run_one(name: str, mode: str, windows: int, save: str | None = None) -> dict:
    """In this process: build, capture, score once; the peak RSS of each phase (scores and the first step's
    removals saved to `save` for the comparison across modes)."""
    from gisp_fx.passes.importance import LmCalibration, score
    from gisp_fx.memory import lean_heap_
    from gisp_fx.memory import free_memory
    from gisp_fx.passes.analyse import analyse

    options = dict(MODES[mode])
    if options.pop("lean_heap", False):
        lean_heap_()
    model, ids = build(name, windows)
    weights = sum(p.numel() for p in model.parameters())
    loaded_mb = _rss_mb()
    plan = analyse(model)
    free_memory()  # as compile_model does after its capture
    analysed_mb = _rss_mb()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    scores = score(model, plan, LmCalibration(ids, 8), progress=False, **options)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = _rss_mb()
    fp32_mb = weights * 4 / 2**20
    if save:
        import numpy as np
        import torch

        torch.save({"scores": np.concatenate([*scores.heads, *scores.channels]),
                    "removed": _first_step(plan, scores)}, save)
    return {"model": name, "mode": mode, "windows": windows, "params": weights, "fp32_weight_mb": fp32_mb, "rss_after_load_mb": loaded_mb,
            "rss_after_capture_mb": analysed_mb, "peak_rss_mb": peak, "ratio": peak / fp32_mb, "score_s": wall,
            "score_cpu_s": cpu, "loss": scores.loss, "load_avg": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,vocab262k")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--windows", type=int, default=64,
                    help="calibration windows of 128 tokens (default 64, as compile; the peak is reached in the first "
                         "batches of 8, so 16 measures the same peak in a quarter of the time)")
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "MODE", "SAVE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one[:2], args.windows, args.one[2])))
        return
    import tempfile

    import numpy as np
    import torch

    rows, tmp = [], tempfile.mkdtemp(prefix="gisp-memory-")
    for name in args.models.split(","):
        first = None
        for mode in args.modes.split(","):
            save = os.path.join(tmp, f"{name}-{mode}.pt")
            out = subprocess.run([sys.executable, __file__, "--one", name, mode, save, "--windows",
                                  str(args.windows)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{name} / {mode} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            got = torch.load(save, weights_only=False)
            first = first or (mode, got)
            ref = first[1]["scores"]  # the scores of this model's first mode, to which the others must agree
            row["vs_mode"] = first[0]
            row["max_rel_score_diff"] = float(np.max(np.abs(got["scores"] - ref) / np.maximum(np.abs(ref), 1e-300)))
            row["first_step_removals_equal"] = got["removed"] == first[1]["removed"]
            rows.append(row)
            print(f"{name:10s} {mode:20s} weights {row['fp32_weight_mb']:7.0f} MB  peak {row['peak_rss_mb']:7.0f} MB"
                  f"  ratio {row['ratio']:5.2f}  (load {row['rss_after_load_mb']:.0f}, capture "
                  f"{row['rss_after_capture_mb']:.0f})  score {row['score_cpu_s']:.0f} CPU s  loss {row['loss']:.4f}  "
                  f"scores vs {first[0]}: max rel diff {row['max_rel_score_diff']:.1e}, first-step removals "
                  f"{'equal' if row['first_step_removals_equal'] else 'DIFFER'}",
                  flush=True)
            if args.json:  # after every row: a stopped run keeps what it measured
                note = (f"one scoring pass ({args.windows} windows x 128 tokens, batches of 8) after load and "
                        "capture, each row a fresh process; peak = VmHWM; 2-core machine shared with other jobs "
                        "(load_avg per row), so compare CPU seconds, not wall seconds")
                with open(args.json, "w") as f:
                    json.dump({"note": note, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
