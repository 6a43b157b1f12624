"""The cost of activation checkpointing (on by default) in one process: CPU seconds of a GISP scoring pass on the
bundled SmolLM2 with and without it, alternated (A B A B) so that a busy machine weighs on both alike; and whether
the scores are bit-identical.

    python benchmarks/checkpoint_cost.py [--windows 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    import numpy as np

    from gisp_fx.datasets import lm_windows, wikitext2_train_text
    from gisp_fx.loading import load_model
    from gisp_fx.passes.importance import LmCalibration, score
    from gisp_fx.passes.analyse import analyse

    loaded = load_model("smollm2")
    plan = analyse(loaded.model)
    calib = LmCalibration(lm_windows(loaded.tokenizer, wikitext2_train_text(), args.windows, 128, 0, "WikiText-2"), 8)
    cpu: dict[bool, list[float]] = {False: [], True: []}
    scores = {}
    for _ in range(args.repeats):
        for checkpoint in (False, True):
            t0 = time.process_time()
            s = score(loaded.model, plan, calib, progress=False, checkpoint=checkpoint)
            cpu[checkpoint].append(time.process_time() - t0)
            scores[checkpoint] = np.concatenate([*s.heads, *s.channels])
            print(f"checkpoint={checkpoint}: {cpu[checkpoint][-1]:.1f} CPU s", flush=True)
    row = {"model": "smollm2", "windows": args.windows, "cpu_s_plain": cpu[False], "cpu_s_checkpoint": cpu[True],
           "checkpoint_over_plain": sum(cpu[True]) / sum(cpu[False]),
           "scores_bit_identical": bool(np.array_equal(scores[False], scores[True])), "load_avg": os.getloadavg()[0]}
    print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
