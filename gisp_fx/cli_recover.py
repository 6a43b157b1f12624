"""Flags of `gisp-fx recover`: parsed into a RecoverConfig, then handed to recover_run."""

from __future__ import annotations

import argparse

from gisp_fx.datasets import BOS_MODES
from gisp_fx.passes.recover import AUTOCAST, RecoverConfig
from gisp_fx.recover_run import recover_run


def _windows(value: str) -> int | None:
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got '{value}'")
    return int(value)


def _recover(args: argparse.Namespace) -> None:
    config = RecoverConfig(tokens=args.tokens, lr=args.lr, batch_tokens=args.batch_tokens,
                           micro_tokens=args.micro_tokens, seq_len=args.seq_len, train=args.train,
                           lora_rank=args.lora_rank, ce_weight=args.ce_weight, precision=args.dtype,
                           checkpointing=not args.no_checkpointing, seed=args.seed)
    done = recover_run(args.run_dir, args.output, config, data=args.data, bos=args.bos, teacher=args.teacher,
                       device=args.device, eval_windows=args.eval_windows,
                       tasks=tuple(t for t in (args.tasks or "").split(",") if t), task_limit=args.task_limit,
                       checkpoint_every=args.checkpoint_every, resume=args.resume, overwrite=args.overwrite)
    p = done.report["perplexity"]
    print(f"recovered: WikiText-2 perplexity {p['before']:.2f} -> {p['after']:.2f} ({p['windows']} windows) after "
          f"{done.result.tokens:,} tokens at {done.result.tokens_per_s:.1f} tokens/s; wrote {done.output}")


def add_recover_command(sub) -> None:
    p = sub.add_parser("recover", help="distil a pruned run's model from its dense model (knowledge distillation)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `gisp-fx compile`")
    p.add_argument("--output", required=True, help="the recovered model's folder (a normal gisp-fx model folder)")
    p.add_argument("--tokens", type=int, required=True, help="training tokens (rounded up to whole batches)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4; warm-up, cosine)")
    p.add_argument("--batch-tokens", type=int, default=1024, help="tokens per optimizer step (default 1024)")
    p.add_argument("--micro-tokens", type=int, default=512,
                   help="tokens per forward/backward; gradients accumulate to --batch-tokens (default 512)")
    p.add_argument("--seq-len", type=int, default=128, help="training window length in tokens (default 128)")
    p.add_argument("--data", default="wikitext2",
                   help="wikitext2 (bundled WikiText-2 train, default), gsm8k (bundled GSM8K train), or a .txt / "
                        ".jsonl ({\"text\": ...}) file")
    p.add_argument("--bos", default="auto", choices=BOS_MODES, help="windows start with BOS: auto | always | never")
    p.add_argument("--train", default="all", choices=["norms", "linears", "all"],
                   help="what trains: norms, linears or all of the decoder (default); embeddings/head stay frozen")
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: train the linears as LoRA of this rank, merged at "
                   "the end (default 0: full tuning)")
    p.add_argument("--ce-weight", type=float, default=0.0, help="loss = KL + this x next-token loss (default 0)")
    p.add_argument("--teacher", default=None, help="the dense model, when it is no longer where the run recorded it")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints in OUTPUT.partial")
    p.add_argument("--resume", action="store_true", help="continue the unfinished recovery in OUTPUT.partial")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-checkpointing", action="store_true",
                   help="keep every layer's activations (faster, more memory) instead of recomputing them")
    p.add_argument("--eval-windows", type=_windows, default=256,
                   help="WikiText-2 test windows evaluated before and after (default 256; 'all')")
    p.add_argument("--tasks", default=None, help="also evaluate these tasks before and after (comma list)")
    p.add_argument("--task-limit", type=int, default=None, help="questions per task (default all)")
    p.add_argument("--seed", type=int, default=0, help="window order and adapter init (default 0)")
    p.add_argument("--device", default="cpu", help="where both models run: cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=list(AUTOCAST),
                   help="compute dtype: float32 (default) or bfloat16 autocast over fp32 master weights (the teacher "
                   "is held in it)")
    p.set_defaults(func=_recover)
