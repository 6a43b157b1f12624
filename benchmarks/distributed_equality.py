"""One process against two (gloo, spawned here), with and without --shard (FSDP2 decoder layers): the scores of
one GISP scoring pass and the first step's removals, as compile would choose them; on a random 8-layer Llama
with grouped K/V heads built in-process (default, seconds) or on the bundled SmolLM2 (minutes).

    python benchmarks/distributed_equality.py [--model tiny|smollm2] [--windows 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

import numpy as np
import torch


def _build(name: str, windows: int):
    if name == "smollm2":
        from gisp_fx.datasets import lm_windows, wikitext2_train_text
        from gisp_fx.loading import load_model

        loaded = load_model("smollm2")
        return loaded.model, lm_windows(loaded.tokenizer, wikitext2_train_text(), windows, 128, 0, "WikiText-2")
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random init leaves norms at 1: perturb every parameter so that no structure hides
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model, torch.randint(0, cfg.vocab_size, (windows, 64), generator=torch.Generator().manual_seed(0))


def _run(name: str, windows: int, shard: bool, out: str) -> None:
    """Score the model once in this process (its rank's share of the windows) and save scores and removals."""
    from gisp_fx.passes.importance import LmCalibration, score
    from gisp_fx.passes.select import Normalize, parse_protect, rank, select
    from gisp_fx.passes.analyse import analyse

    model, ids = _build(name, windows)
    plan = analyse(model)
    calib = LmCalibration(ids, 8)
    if shard:
        from gisp_fx.sharded import sharded_score

        scores = sharded_score(model, plan, calib, progress=False, desc="g", checkpoint=True,
                               device=torch.device("cpu"))
    else:
        scores = score(model, plan, calib, progress=False, checkpoint=True)
    ranked = rank(plan, scores, Normalize.REFERENCE, plan, parse_protect(None, len(plan.layers)))
    removed = select(plan, ranked, None, math.ceil(0.5 * plan.decoder_params / 8)).removed
    torch.save({"scores": np.concatenate([*scores.heads, *scores.channels]), "loss": scores.loss,
                "removed": removed}, out)


def _worker(rank: int, world: int, init: str, name: str, windows: int, shard: bool, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        _run(name, windows, shard, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--windows", type=int, default=19, help="calibration windows (default 19: uneven shares)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gisp-dist-")
    _run(args.model, args.windows, False, os.path.join(tmp, "one"))
    one = torch.load(os.path.join(tmp, "one"), weights_only=False)
    rows = []
    for shard in (False, True):
        out = os.path.join(tmp, f"two-{shard}")
        mp.spawn(_worker, args=(2, f"file://{out}.rendezvous", args.model, args.windows, shard, out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
        ref = one["scores"]
        rel = [float(np.max(np.abs(r["scores"] - ref) / np.maximum(np.abs(ref), 1e-300))) for r in ranks]
        rows.append({"model": args.model, "processes": 2, "shard": shard, "windows": args.windows, "max_rel_score_diff": max(rel),
                     "ranks_bitwise_equal": bool(np.array_equal(ranks[0]["scores"], ranks[1]["scores"])),
                     "first_step_removals_equal": all(r["removed"] == one["removed"] for r in ranks),
                     "first_step_removals": len(one["removed"]),
                     "loss_rel_diff": abs(ranks[0]["loss"] - one["loss"]) / abs(one["loss"])})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"note": f"{args.model}, one scoring pass (checkpointing on, batches of 8) in one process "
                               "against two gloo processes; scores compared element by element over every head and "
                               "channel; removals: the reference-normalised ranking cut at an eighth of the 50 % "
                               "target (about the default compile's first step)", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
