"""Flags of `gisp-fx compile`, `materialize` and `eval`: parsed into configs, then handed to the pipeline."""

from __future__ import annotations

import argparse
import os

from gisp_fx.config import (CHECKPOINT, DTYPES, METHODS, NORMALIZE, OBJECTIVES, REPAIR_AT, REPAIR_MODES, BOS_MODES,
                            Checkpoint, Method, Objective)
from gisp_fx.errors import GispError


def parse_windows(value: str) -> int | None:
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got '{value}'") from exc
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got '{value}'")
    return n


# flags whose argparse default is None, so that a flag the user gave can be told from one left at its default
PG_FLAGS = ("pg_iters", "pg_samples", "pg_lr", "pg_init", "pg_groups", "pg_budget", "pg_penalty")
OPTIONAL_FLAGS = ("tasks", "calib", "calib_samples", "seq_len", "batch_size", "steps", "normalize", *PG_FLAGS,
                  "repair", "repair_at", "repair_samples")


def add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="the weights' dtype (default float32); gradients are summed and scores kept in fp32/fp64")


def _compile(args: argparse.Namespace) -> None:
    import os
    import sys
    from dataclasses import fields

    from gisp_fx.compile import compile_model
    from gisp_fx.config import CompileConfig

    method = "oneshot" if args.oneshot and args.method == "gisp" else args.method
    name = args.model.rstrip("/").split("/")[-1].removesuffix(".gguf")
    output = args.output or f"runs/{name}-{method}-{round(100 * args.sparsity)}"
    defaults = {f.name: f.default for f in fields(CompileConfig)}
    given = {k for k in OPTIONAL_FLAGS if getattr(args, k) is not None} | ({"oneshot"} if args.oneshot else set())
    given |= {"shard"} if args.shard else set()
    given |= {"repair_aware"} if args.repair_aware else set()
    given |= {"memory_budget_gb"} if args.memory_budget_gb is not None else set()
    flag = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in OPTIONAL_FLAGS}
    config = CompileConfig(
        model=args.model, sparsity=args.sparsity, output=output, method=args.method, objective=args.objective,
        tasks=tuple(t for t in (args.tasks or "").split(",") if t), calib=args.calib,
        calib_samples=flag["calib_samples"], seq_len=flag["seq_len"], batch_size=flag["batch_size"],
        steps=flag["steps"], oneshot=args.oneshot, normalize=flag["normalize"], protect=args.protect, seed=args.seed,
        eval_windows=args.eval_windows, bos=args.bos, **{k: flag[k] for k in PG_FLAGS},
        checkpoint=args.checkpoint, memory_budget_gb=args.memory_budget_gb, device=args.device, dtype=args.dtype, shard=args.shard,
        repair=flag["repair"], repair_at=flag["repair_at"], repair_samples=flag["repair_samples"],
        repair_aware=args.repair_aware,
    )
    config.validate(frozenset(given))
    if args.recover_tokens is not None and args.recover_tokens < 1:
        raise GispError(f"--recover-tokens must be at least 1, got {args.recover_tokens}")
    if args.recover_tokens is not None and args.nproc != 1:
        raise GispError("--recover-tokens runs in one process; drop --nproc, or run `gisp-fx recover` after the "
                        "compile")
    if args.nproc != 1 and "WORLD_SIZE" not in os.environ:
        from gisp_fx.distributed import launch, strip_nproc

        return launch(args.nproc, strip_nproc(sys.argv[1:]), config.output)
    result = compile_model(config, overwrite=args.overwrite, resume=args.resume,
                           discard_partial=args.discard_partial)
    r = result.report
    print(f"\npruned {r['model']}: {r['params']['before']:,} -> {r['params']['after']:,} parameters, "
          f"{100 * r['sparsity']['measured']:.2f} % decoder sparsity; WikiText-2 ppl "
          f"{r['perplexity']['before']:.2f} -> {r['perplexity']['after']:.2f} ({r['perplexity']['windows']} windows)")
    print(f"model, trajectory and report: {result.output}/  (report: {result.output}/report.md)")
    if args.recover_tokens is not None:  # distil the pruned model from the dense one: OUTPUT/recovered
        from gisp_fx.passes.recover import RecoverConfig
        from gisp_fx.recover_run import recover_run

        done = recover_run(str(result.output), str(result.output / "recovered"),
                           RecoverConfig(tokens=args.recover_tokens, seq_len=config.seq_len, seed=config.seed),
                           bos=config.bos, device=config.device, eval_windows=config.eval_windows, overwrite=True)
        p = done.report["perplexity"]
        print(f"recovered ({done.result.tokens:,} tokens): WikiText-2 ppl {p['before']:.2f} -> {p['after']:.2f}; "
              f"{done.output}/")
    if args.export == "onnx":
        from gisp_fx.exporters.export import export_model
        from gisp_fx.loading import load_model

        onnx = export_model(load_model(str(result.output)), result.output / "onnx", with_past=True, overwrite=True,
                            source=str(result.output))
        print(f"ONNX with KV cache: {onnx.path}/model.onnx (parity vs torch: max |logit diff| {onnx.parity.logits:.1e})")


def _materialize(args: argparse.Namespace) -> None:
    from gisp_fx.rebuild import save_materialized

    if (args.sparsity is None) == (args.step is None):
        raise GispError("materialize: give exactly one of --sparsity or --step")
    if not os.path.isdir(args.run_dir):
        raise GispError(f"materialize: '{args.run_dir}' is not a folder; give the output folder of `gisp-fx compile`")
    _, plan, sparsity = save_materialized(args.run_dir, args.sparsity, args.output, step=args.step,
                                   overwrite=args.overwrite, device=args.device, dtype=args.dtype,
                                   repair=args.repair, calib=args.calib, repair_samples=args.repair_samples)
    print(f"materialized {100 * sparsity:.2f} % decoder sparsity ({plan.total_params:,} parameters) -> {args.output}")


def _eval(args: argparse.Namespace) -> None:
    import json

    from gisp_fx.loading import LoadedModel, load_model
    from gisp_fx.evaluate import check_eval_settings
    from gisp_fx.tasks import check_tasks, evaluate, format_results

    tasks = check_tasks([t for t in args.tasks.split(",") if t])
    if args.limit is not None and args.limit <= 0:
        raise GispError(f"--limit must be positive, got {args.limit}")
    check_eval_settings(args.seq_len, args.batch_size)
    from gisp_fx.bench import is_onnx_export

    if is_onnx_export(args.model):  # scored in onnxruntime, with the tokenizer the export carries
        from gisp_fx.exporters.ort import OrtCausalLM
        from gisp_fx.loading import load_tokenizer

        model = OrtCausalLM(args.model)
        loaded = LoadedModel(model, load_tokenizer(str(model.path.parent)), args.model)
    else:
        from gisp_fx.device import resolve

        device, dtype = resolve(args.device, args.dtype)
        loaded = load_model(args.model, dtype=dtype, device=str(device))
    results = evaluate(loaded.model, loaded.tokenizer, tasks, args.limit, args.seed, args.seq_len, args.windows,
                       args.batch_size, bos=args.bos)
    if args.json:
        print(json.dumps([vars(r) for r in results], indent=1))
    else:
        print(format_results(results))


def _add_bos(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bos", default="auto", choices=BOS_MODES,
                   help="start every calibration/perplexity window with the BOS token: auto (default: when the "
                        "tokenizer adds one, e.g. Llama-2/3, Mistral, Gemma; SmolLM2 has none), always, or never "
                        "(one token stream cut into windows: the protocol of published WikiText-2 figures)")


def add_compile_commands(sub) -> None:
    p = sub.add_parser("compile", help="prune a model with GISP to a target sparsity")
    p.add_argument("model", help="'smollm2' (bundled), a model folder, a .gguf file, or a hub id")
    p.add_argument("--sparsity", type=float, required=True,
                   help="target decoder-layer parameter sparsity in (0, 0.95], measured")
    p.add_argument("--method", default=Method.GISP.value, choices=METHODS,
                   help="gisp (default, iterative); oneshot = GISP in one step; pg = policy-gradient pruning "
                        "(forward passes only, inference memory; the --pg-* flags); baselines: wanda-sp (|W|*||X||, "
                        "uniform per layer), magnitude (global L2), taylor-local (|w*g|, uniform per layer), random")
    p.add_argument("--objective", default=Objective.PPL.value, choices=OBJECTIVES)
    p.add_argument("--tasks", help="margin objective only: comma-separated tasks, e.g. arc_easy,arc_challenge")
    p.add_argument("--calib", help="calibration text (ppl objective only): wikitext2 (default: the bundled WikiText-2 "
                                   "train), gsm8k (GSM8K train, question + worked answer: task-aligned for GSM8K), "
                                   "or a plain-text UTF-8 file")
    p.add_argument("--calib-samples", type=int,
                   help="calibration sequences (default 64; not for magnitude/random)")
    p.add_argument("--seq-len", type=int,
                   help="tokens per calibration sequence (default 128; not for magnitude/random)")
    p.add_argument("--batch-size", type=int,
                   help="sequences per forward/backward (default 8; not for magnitude/random)")
    p.add_argument("--steps", type=int, help="iterative steps (default 8; gisp only: the other methods take one)")
    p.add_argument("--oneshot", action="store_true",
                   help="gisp in one step at the target sparsity (= --method oneshot)")
    p.add_argument("--normalize", choices=NORMALIZE,
                   help="block-wise score normalisation, gisp and oneshot only (default: the reference's constants)")
    p.add_argument("--protect", help="layers never pruned: 'none' or e.g. '0,1,29' (default: first 10 %% and last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=parse_windows, default=256,
                   help="WikiText-2 test windows for the report's perplexity: a number (evenly spaced) or 'all' "
                        "(default 256 of 2,382; 'all' costs about 10 minutes per model on 2 CPU cores)")
    _add_bos(p)
    pg = p.add_argument_group("--method pg (policy gradient; the reference ran 15,000 iterations on a GPU)")
    pg.add_argument("--pg-iters", type=int,
                    help="iterations (default 100: about 6 minutes for SmolLM2 at batch 8 x 128 on 2 idle CPU "
                         "cores); 0 selects by the initial probabilities projected onto the budget, the control "
                         "that shows what the iterations add")
    pg.add_argument("--pg-samples", type=int, help="masks sampled per iteration, K >= 2 (default 2)")
    pg.add_argument("--pg-lr", type=float,
                    help="peak learning rate of the cosine schedule (default 0.05; the reference's 2e-3 suits "
                         "its 15,000 iterations)")
    pg.add_argument("--pg-init", choices=["sigmap", "const", "random"],
                    help="initial probabilities: sigmap of the Wanda-sp metric (default), const, random")
    pg.add_argument("--pg-groups", choices=["kv", "head"],
                    help="attention unit: a K/V group with its query heads (kv, the reference) or one query head")
    pg.add_argument("--pg-budget", choices=["params", "reference"],
                    help="params (default): expected freed decoder parameters = the target; reference: one kept "
                         "ratio of attention units and of channels, as in the paper")
    pg.add_argument("--pg-penalty", type=float, help="push of the probabilities toward 0/1 (default 0)")
    p.add_argument("--output", help="output folder (default runs/<model>-<method>-<percent>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished step")
    p.add_argument("--discard-partial", action="store_true",
                   help="delete an interrupted run of this --output (OUTPUT.partial) and start afresh; without "
                        "this flag or --resume such a run is kept and the command refused")
    add_device_flags(p)
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (torchrun, one machine; gloo on cpu, NCCL on cuda): the calibration windows are "
                        "split across them and their gradient sums all-reduced (default 1)")
    p.add_argument("--checkpoint", nargs="?", const=Checkpoint.ON.value, default=Checkpoint.AUTO.value,
                   choices=CHECKPOINT,
                   help="activation checkpointing while scoring: auto (default: on when the scoring pass's estimated "
                        "memory exceeds --memory-budget), on, or off. On recomputes the decoder's activations in "
                        "backward: the same scores for about 1.26x the CPU time of scoring, measured on SmolLM2")
    p.add_argument("--no-checkpoint", dest="checkpoint", action="store_const", const=Checkpoint.OFF.value,
                   help="= --checkpoint off")
    p.add_argument("--memory-budget", type=float, dest="memory_budget_gb", metavar="GB",
                   help="--checkpoint auto: the memory the scoring pass may take (default: half the memory free "
                        "when the run starts)")
    p.add_argument("--shard", action="store_true",
                   help="with --nproc N / torchrun: score on an FSDP2 copy whose decoder layers are sharded across "
                        "the N processes (each holds 1/N of their weights and gradients on --device; the full "
                        "model stays in host memory for the rewrite), for models that do not fit one device")
    p.add_argument("--repair", choices=REPAIR_MODES,
                   help="re-fit what each pruned layer's output loses on the calibration activations (default none): "
                        "bias (the removed inputs' mean contribution added to o_proj/down_proj biases), lsq (the "
                        "kept input columns re-fitted in closed form) or block (lsq, then each pruned attention and MLP "
                        "trained to the dense sublayer's output); not for magnitude/random or --objective margin")
    p.add_argument("--repair-aware", action="store_true",
                   help="gisp/oneshot: weight each head's and channel's score by the square root of the share of its "
                        "output that a least-squares repair could not rebuild from the groups that stay (duplicated "
                        "groups go first; one extra forward pass per step; see docs/repair.md)")
    p.add_argument("--repair-at", choices=REPAIR_AT,
                   help="iterative gisp with --repair: after every step (the next step scores the repaired model) "
                        "or once at the end (default end)")
    p.add_argument("--repair-samples", type=int, metavar="N",
                   help="calibration windows the repair fits on, drawn from the same text (default: --calib-samples, "
                        "raised for lsq and block to 4 tokens per input feature of the widest consumer linear; block "
                        "at least 256, as it overfits fewer)")
    p.add_argument("--recover-tokens", type=int, metavar="N",
                   help="after pruning, distil the pruned model from the dense one on N tokens of WikiText-2 train "
                        "into OUTPUT/recovered (as `gisp-fx recover OUTPUT --output OUTPUT/recovered --tokens N`; "
                        "see docs/recovery.md)")
    p.add_argument("--export", choices=["onnx"],
                   help="also export the pruned model to OUTPUT/onnx (ONNX with KV cache, parity-checked)")
    p.set_defaults(func=_compile)

    p = sub.add_parser("materialize", help="rebuild the model at any sparsity of a run's trajectory")
    p.add_argument("run_dir")
    p.add_argument("--sparsity", type=float)
    p.add_argument("--step", type=int)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--repair", choices=REPAIR_MODES,
                   help="default: as the run was compiled; bias/lsq/block on an unrepaired run repairs the rebuilt model "
                        "once (needs the run's calibration data)")
    p.add_argument("--calib", help="the run's calibration text file, when a repair needs it and it has moved")
    p.add_argument("--repair-samples", type=int, metavar="N",
                   help="calibration windows the repair fits on, drawn from the run's calibration text (default: as "
                        "the run recorded; a repair the run did not make: as compile's default)")
    add_device_flags(p)
    p.set_defaults(func=_materialize)

    p = sub.add_parser("eval", help="evaluate a model or pruned folder: perplexity, commonsense QA, GSM8K")
    p.add_argument("model")
    p.add_argument("--tasks", default="wikitext2",
                   help="comma-separated: wikitext2,boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,"
                        "openbookqa,gsm8k")
    p.add_argument("--limit", type=int, help="a seeded subset of this many questions per QA task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    add_device_flags(p)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--windows", type=parse_windows, default=None,
                   help="WikiText-2: a number of evenly spaced windows, or all (default)")
    p.add_argument("--batch-size", type=int, default=16)
    _add_bos(p)
    p.set_defaults(func=_eval)
