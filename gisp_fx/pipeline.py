"""The orchestrator: load -> capture -> analyse -> score -> select -> shrink (repeat) -> verify -> save -> report."""

from __future__ import annotations

import copy
import json
import math
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gisp_fx.config import CompileConfig
from gisp_fx.errors import GispError
from gisp_fx.fingerprint import require_same_weights, weights_fingerprint
from gisp_fx.outputs import owned_output, refuse_overlap
from gisp_fx.plan import GroupPlan, GroupRef, Kind, Selection
from gisp_fx.preflight import check_calibration_positions, require_types

TRAJECTORY_DIR = "trajectory"
TOLERANCE = 0.004  # the run stops within this fraction of decoder parameters above the target sparsity


def analyse(model) -> GroupPlan:
    """capture + find_groups on an in-memory model."""
    from gisp_fx.passes.capture import capture
    from gisp_fx.passes.groups import find_groups
    from gisp_fx.passes.normalize import normalize_

    normalize_(model)  # refuses declared unsupported configs; Conv1D / custom linears -> nn.Linear, in place
    return find_groups(capture(model))


def inspect_model(spec: str, as_json: bool = False) -> str:
    from gisp_fx.inspect import format_plan
    from gisp_fx.loading import load_model

    plan = analyse(load_model(spec).model)
    return plan.dumps() if as_json else format_plan(plan)


# -- calibration ---------------------------------------------------------------------------------------------
def build_calibration(config: CompileConfig, tokenizer):
    from gisp_fx.datasets import lm_windows, wikitext2_train_text, window_bos
    from gisp_fx.passes.importance import LmCalibration

    bos = window_bos(tokenizer, config.bos)
    if config.objective == "margin":
        return _margin_calibration(config, tokenizer, bos)
    if config.calib:
        path = Path(config.calib)
        if not path.is_file():
            raise GispError(f"--calib: no such file '{path}'")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise GispError(f"--calib: '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}); give a plain "
                            "UTF-8 text file (convert it with e.g. `iconv -t utf-8`)") from exc
        source = f"calibration file '{path}'"
    else:
        text, source = wikitext2_train_text(), "the bundled WikiText-2 train text"
    ids = lm_windows(tokenizer, text, config.calib_samples, config.seq_len, config.seed, source, bos)
    return LmCalibration(ids, config.batch_size)


def _margin_calibration(config: CompileConfig, tokenizer, bos: int | None):
    """`calib_samples` questions drawn evenly across the tasks' training splits; one sequence per option, each
    starting with `bos` when given (the prompt is kept, the oldest context tokens go when it is too long)."""
    import random

    from gisp_fx.datasets import mc_train_items
    from gisp_fx.passes.importance import MarginCalibration, McSequence

    per_task = {t: mc_train_items(t) for t in config.tasks}
    rng = random.Random(config.seed)
    share = [config.calib_samples // len(per_task) + (i < config.calib_samples % len(per_task))
             for i in range(len(per_task))]
    sequences = []
    for (task, items), n in zip(per_task.items(), share):
        if n > len(items):
            raise GispError(f"calibration: task '{task}' has {len(items)} training questions, {n} were requested")
        for item in rng.sample(items, n):
            for i, (ctx, cont) in enumerate(zip(item.contexts, item.continuations)):
                ctx_ids = tokenizer(ctx, add_special_tokens=False).input_ids
                whole = tokenizer(ctx + cont, add_special_tokens=False).input_ids
                option = len(whole) - len(ctx_ids)
                if option < 1:
                    continue
                start = [bos] if bos is not None else []
                whole = start + whole[-(config.seq_len - len(start)):]
                sequences.append(McSequence(tuple(whole), min(option, len(whole) - 1), i == item.label))
    return MarginCalibration(tuple(sequences), tokenizer.pad_token_id, config.batch_size)


# -- the run ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompileResult:
    output: Path
    report: dict


class _Alive:
    """Original indices of the groups still in the model, per layer: maps current plan indices back.

    Sorted int64 arrays (a 7B model has ~3.5 * 10^5 groups): lookups index them, removal is one mask per layer.
    """

    def __init__(self, plan: GroupPlan):
        self.heads = [np.arange(l.attention.num_heads if l.attention else 0, dtype=np.int64) for l in plan.layers]
        self.channels = [np.arange(l.mlp.channels if l.mlp else 0, dtype=np.int64) for l in plan.layers]

    def original(self, ref: GroupRef) -> GroupRef:
        ids = self.heads if ref.kind is Kind.HEAD else self.channels
        return GroupRef(ref.layer, ref.kind, int(ids[ref.layer][ref.index]))

    def current(self, ref: GroupRef) -> GroupRef:
        ids = (self.heads if ref.kind is Kind.HEAD else self.channels)[ref.layer]
        at = int(np.searchsorted(ids, ref.index))
        if at >= len(ids) or ids[at] != ref.index:
            raise ValueError(f"{ref} is no longer in the model")
        return GroupRef(ref.layer, ref.kind, at)

    def remove(self, refs) -> None:
        gone: dict[tuple[int, Kind], list[int]] = {}
        for ref in refs:
            gone.setdefault((ref.layer, ref.kind), []).append(ref.index)
        for (layer, kind), ids in gone.items():
            table = self.heads if kind is Kind.HEAD else self.channels
            keep = ~np.isin(table[layer], ids)
            if len(table[layer]) - int(keep.sum()) != len(set(ids)):
                raise ValueError(f"layer {layer}: some of the {kind.value}s {sorted(ids)} are not in the model")
            table[layer] = table[layer][keep]


def replay_(model, plan0: GroupPlan, removed: tuple[GroupRef, ...]) -> tuple[GroupPlan, _Alive]:
    """Remove groups given by ORIGINAL indices from a fresh model, in one shrink."""
    from gisp_fx.passes.shrink import shrink_

    alive = _Alive(plan0)
    if not removed:
        return plan0, alive
    plan = shrink_(model, plan0, Selection(tuple(removed)))
    alive.remove(removed)
    return plan, alive


def _prepare_output(config: CompileConfig, overwrite: bool, resume: bool,
                    discard_partial: bool = False) -> tuple[Path, Path]:
    from gisp_fx.save import check_output_folder

    final = check_output_folder(config.output)
    partial = check_output_folder(final.with_name(final.name + ".partial"), "--output's unfinished run")
    if final.exists() and not overwrite:
        raise GispError(f"--output '{final}' exists; pass --overwrite to replace it, or choose another folder")
    if resume and discard_partial:
        raise GispError("--resume continues the unfinished run and --discard-partial deletes it: give one of them")
    if resume:
        if not (partial / TRAJECTORY_DIR / "trajectory.json").is_file():
            raise GispError(f"--resume: no unfinished run at '{partial}' (nothing to continue); run without --resume")
    elif partial.exists() and not discard_partial:
        raise GispError(f"an unfinished run of this --output is kept in '{partial}'; pass --resume to continue it, "
                        "or --discard-partial to delete it and start afresh")
    elif partial.exists():
        tqdm.write(f"discarding the unfinished run in '{partial}' (--discard-partial)")
        shutil.rmtree(partial)
    return final, partial


@owned_output  # refuses an output over its input, probes it, holds its lock for the whole run
def compile_model(config: CompileConfig, *, overwrite: bool = False, resume: bool = False, calibration=None,
                  on_step: Callable[[int, torch.nn.Module], None] | None = None, progress: bool = True,
                  loaded=None, discard_partial: bool = False) -> CompileResult:
    """Prune `config.model` to `config.sparsity` with GISP; write the pruned model, trajectory and report.

    An unfinished run of the same output (OUTPUT.partial) is continued with `resume`, deleted first with
    `discard_partial`, and otherwise refused: it is never deleted silently."""
    from gisp_fx.evaluate import wikitext2_perplexity
    from gisp_fx.loading import load_model
    from gisp_fx.passes.select import parse_protect
    from gisp_fx.trajectory import Step, Trajectory, scores_table

    from gisp_fx.device import resolve
    from gisp_fx.distributed import join_
    from gisp_fx.memory import lean_heap_
    from gisp_fx.sharded import require_world

    config.validate()
    lean_heap_()
    rank, world, device_spec = join_(config.device)
    device, dtype = resolve(device_spec, config.dtype)
    if config.shard:
        require_world(world)
    if world > 1 and resume:
        raise GispError("--resume: an unfinished run is resumed in one process; drop --nproc / torchrun to resume")
    if rank != 0:  # the same computation as rank 0, written to a scratch folder removed at exit
        import atexit
        import tempfile

        scratch = tempfile.mkdtemp(prefix=f"gisp-fx-rank{rank}-")
        atexit.register(shutil.rmtree, scratch, True)
        config, overwrite, progress = replace(config, output=str(Path(scratch) / "run")), True, False
    started = time.perf_counter()
    final, partial = _prepare_output(config, overwrite, resume, discard_partial)
    traj_dir = partial / TRAJECTORY_DIR
    resumed = _resumable(traj_dir, config, partial) if resume else None  # checked before any model is loaded
    home = torch.device("cpu") if config.shard else device  # --shard: the full model stays in host memory
    loaded = loaded or load_model(config.model, dtype=dtype, device=str(home))
    model, tokenizer = loaded.model.to(device=home, dtype=dtype), loaded.tokenizer
    plan0 = analyse(model)
    _free_memory()  # the load's and the capture's temporaries, before scoring stacks on them
    protect = parse_protect(config.protect, len(plan0.layers))
    target_removed = math.ceil(config.sparsity * plan0.decoder_params)
    if target_removed > plan0.prunable_params:  # e.g. OLMo-2, whose attention is kept whole
        share = plan0.prunable_params / plan0.decoder_params
        raise GispError(f"--sparsity {config.sparsity}: only {plan0.prunable_params:,} of the model's "
                        f"{plan0.decoder_params:,} decoder-layer parameters are prunable ({100 * share:.1f} %); "
                        f"choose --sparsity below {share:.3f} (`gisp-fx inspect` lists what is kept whole and why)")
    _require_reachable(config, plan0, protect, target_removed)
    check_calibration_positions(model, config.method, config.seq_len)
    calib = calibration if calibration is not None else build_calibration(config, tokenizer)
    _free_memory()  # the tokenizer's temporaries of the whole calibration text
    from gisp_fx.passes.repair import check_calibration, replay_repaired_, shrink_repaired_

    repair = config.repair_settings()
    check_calibration(plan0, calib, repair)
    # repair at the end fits the final removal on the dense model's activations: keep the dense model until then
    dense = copy.deepcopy(model) if repair.mode != "none" and repair.at == "end" else None

    dense_path = partial / "dense_ppl.json"  # measured on the unpruned model, before any replay
    if dense_path.is_file():
        before = json.loads(dense_path.read_text())
    else:
        ppl = wikitext2_perplexity(model, tokenizer, config.seq_len, config.eval_windows, progress=progress,
                                   desc="dense ppl", bos=config.bos)
        before = {"ppl": ppl.ppl, "windows": ppl.subset, "seq_len": ppl.seq_len, "bos": ppl.bos}
        partial.mkdir(parents=True, exist_ok=True)
        dense_path.write_text(json.dumps(before))

    if resumed is not None:
        traj = resumed
        if traj.plan != plan0:
            raise GispError(f"--resume: the model '{config.model}' is not the one the unfinished run started from")
        require_same_weights(traj.fingerprint, model, plan0, config.model, "--resume")
        at_step = repair.at == "step"
        chunks = [s.refs() for s in traj.steps] if at_step else [traj.removed_until(len(traj.steps))]
        plan, alive, _ = replay_repaired_(model, plan0, chunks, calib if at_step else None, repair, progress)
    else:
        traj = Trajectory({**config.to_json(), "groups_per_step": None}, plan0)
        traj.fingerprint = weights_fingerprint(model, plan0)
        plan, alive = plan0, _Alive(plan0)

    removed_params = plan0.decoder_params - plan.decoder_params
    bar = tqdm(total=config.schedule_steps, initial=len(traj.steps), desc="pruning", unit="step",
               disable=not progress)
    while removed_params < target_removed:
        t = len(traj.steps) + 1
        t0 = time.perf_counter()
        try:
            if config.method == "pg":
                scores, selection = _pg_step(config, model, plan, calib, target_removed - removed_params, protect,
                                             traj, progress)
            else:
                scores = _method_scores(config, model, plan, calib, progress, t, protect)
                selection = _choose(config, plan, plan0, scores, traj, target_removed - removed_params, protect, t)
        except FloatingPointError as exc:
            raise GispError(f"step {t}: {exc}; stopped. The last good trajectory ({t - 1} steps) is kept in "
                            f"'{traj_dir}': lower --sparsity or change the calibration data") from exc
        _free_memory()
        original = tuple(alive.original(ref) for ref in selection.removed)
        for name, values in (("heads", scores.heads), ("channels", scores.channels)):
            traj.scores[f"step{t}.{name}"] = scores_table(plan0, list(zip(alive.heads, alive.channels)), values, name)
        plan, record = shrink_repaired_(model, plan, selection, calib if repair.at == "step" else None, repair,
                                        progress)
        if record:
            traj.repair.append({"step": t, **record})
        alive.remove(original)
        removed_params = plan0.decoder_params - plan.decoder_params
        sparsity = removed_params / plan0.decoder_params
        step = Step(t, tuple((r.layer, r.kind.value, r.index) for r in original), sparsity, plan.decoder_params,
                    plan.total_params, scores.loss, time.perf_counter() - t0)
        traj.steps.append(step)
        traj.save(traj_dir)
        heads = sum(r.kind is Kind.HEAD for r in original)
        tqdm.write(f"step {t}: removed {len(original)} groups ({heads} heads, {len(original) - heads} channels), "
                   f"sparsity {100 * sparsity:.1f} %, calibration loss {scores.loss:.3f}, {step.wall_s:.1f} s")
        bar.total = max(bar.total, t)
        bar.update(1)
        if on_step is not None:
            on_step(t, model)
    bar.close()
    if dense is not None:
        plan, _, (record,) = replay_repaired_(dense, plan0, [traj.removed_until(len(traj.steps))], calib, repair,
                                              progress)
        model, dense = dense, None
        traj.repair.append({"step": "end", **record})
        traj.save(traj_dir)

    recaptured = analyse(model)  # the verifier: the shrunk model's own graph must give the predicted plan
    if recaptured != plan:
        raise GispError("verify: the re-captured graph of the pruned model disagrees with the rewrite's plan; "
                        "this is a gisp-fx bug, please report it with the model and settings")
    after = wikitext2_perplexity(model, tokenizer, config.seq_len, config.eval_windows, progress=progress,
                                 desc="pruned ppl", bos=config.bos)
    return _finish(config, model, tokenizer, plan0, plan, traj, before, after, partial, final, started)


def _resumable(traj_dir: Path, config: CompileConfig, partial: Path):
    """The unfinished run's trajectory, readable and run with the same settings as `config`."""
    from gisp_fx.trajectory import Trajectory

    traj = Trajectory.load(traj_dir)
    try:
        differ = CompileConfig.from_json(traj.config).same_run(config)
    except TypeError as exc:  # a config field of the wrong type or name
        raise GispError(f"--resume: the settings recorded in '{traj_dir}' are malformed ({exc}); start afresh "
                        "with --discard-partial") from exc
    if differ:
        raise GispError(f"--resume: the unfinished run in '{partial}' used other settings ({', '.join(differ)}); "
                        "resume with the same settings or start afresh with --discard-partial")
    return traj


def _require_reachable(config: CompileConfig, plan0: GroupPlan, protect: frozenset[int], target: int) -> None:
    """Refuse, before any gradient, a target that removing every group of every unprotected layer cannot reach."""
    from gisp_fx.passes.select import freed_params

    refs = [GroupRef(l.index, Kind.HEAD, h) for l in plan0.layers if l.index not in protect and l.attention
            for h in range(l.attention.num_heads)]
    refs += [GroupRef(l.index, Kind.CHANNEL, c) for l in plan0.layers if l.index not in protect and l.mlp
             for c in range(l.mlp.channels)]
    most = freed_params(plan0, Selection(tuple(refs))) if refs else 0
    if most < target:
        shown = ",".join(map(str, sorted(protect))) or "none"
        raise GispError(f"--sparsity {config.sparsity}: unreachable with protected layers {shown} (--protect "
                        f"{config.protect or 'default: first 10 % and last'}); pruning every group of the other "
                        f"{len(plan0.layers) - len(protect)} layers reaches at most {most / plan0.decoder_params:.4f} "
                        "decoder sparsity: lower --sparsity or protect fewer layers")


def peak_rss_mb() -> float:
    """This process's peak resident memory: /proc's VmHWM where there is one (it belongs to this process's own
    memory map; ru_maxrss would carry over the peak of a large parent through fork and exec), else ru_maxrss."""
    import re

    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _free_memory() -> None:
    """Return the step's freed gradients and activations to the system: collect cycles, empty the CUDA cache,
    and ask glibc to give back its free heap (else the next step's peak stacks on this one's leftovers)."""
    import gc

    from gisp_fx.memory import trim_

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_()


def _choose(config: CompileConfig, plan: GroupPlan, plan0: GroupPlan, scores, traj, needed: int,
            protect: frozenset[int], step: int) -> Selection:
    """This step's removals: a uniform per-layer ratio, or the global ranking in groups of `groups_per_step`."""
    from gisp_fx.config import UNIFORM_METHODS
    from gisp_fx.passes.select import Normalize, groups_to_reach, rank, select, select_uniform

    if config.method in UNIFORM_METHODS:
        return select_uniform(plan, scores, needed, protect)
    normalize = Normalize(config.normalize) if config.method in ("gisp", "oneshot") else Normalize.NONE
    ranked = rank(plan, scores, normalize, plan0, protect)
    if not ranked:
        reached = (plan0.decoder_params - plan.decoder_params) / plan0.decoder_params
        raise GispError(f"step {step}: every unprotected group is gone at sparsity {reached:.3f}; the target "
                        f"{config.sparsity} cannot be reached with these protected layers (see --protect)")
    if traj.config.get("groups_per_step") is None and config.schedule_steps > 1:
        traj.config["groups_per_step"] = math.ceil(groups_to_reach(plan, ranked, needed) / config.schedule_steps)
    cap = needed + math.floor(TOLERANCE * plan0.decoder_params)
    return select(plan, ranked, traj.config.get("groups_per_step"), needed, params_cap=cap)


def _pg_step(config: CompileConfig, model, plan: GroupPlan, calib, needed: int, protect: frozenset[int], traj,
             progress: bool):
    """Policy-gradient pruning: learn keep-probabilities (forward passes only), then drop the least likely."""
    from gisp_fx.passes.pg import pg_prune, select_by_probability

    result = pg_prune(model, plan, calib, needed, protect, config.pg_config(), progress)
    traj.history = result.history
    selection = select_by_probability(plan, result.units, result.probs, needed, config.pg_budget)
    return result.scores(plan), selection


def _method_scores(config: CompileConfig, model, plan: GroupPlan, calib, progress: bool, step: int,
                   protect: frozenset[int] = frozenset()):
    """This step's scores; gradient methods skip the protected layers, whose scores no selection reads (NaN)."""
    from gisp_fx.passes.baselines import magnitude_scores, random_scores, wanda_sp_scores
    from gisp_fx.passes.importance import LmCalibration, score

    if config.method == "magnitude":
        return magnitude_scores(model, plan)
    if config.method == "random":
        return random_scores(plan, config.seed)
    if config.method == "wanda-sp":
        if not isinstance(calib, LmCalibration):
            raise GispError("--method wanda-sp needs language-model calibration windows (the ppl objective)")
        return wanda_sp_scores(model, plan, calib, progress)
    if config.shard:
        from gisp_fx.distributed import rank_device
        from gisp_fx.sharded import sharded_score

        return sharded_score(model, plan, calib, progress=progress, desc=f"step {step} gradients",
                             checkpoint=config.checkpoint, device=torch.device(rank_device(config.device)),
                             skip=protect)
    return score(model, plan, calib, progress=progress, desc=f"step {step} gradients", checkpoint=config.checkpoint,
                 skip=protect)


def _finish(config, model, tokenizer, plan0, plan, traj, before, after, partial, final, started) -> CompileResult:
    from gisp_fx.distributed import peaks_mb
    from gisp_fx.report import write_report
    from gisp_fx.save import save_pruned

    save_pruned(model, tokenizer, partial)
    (partial / "dense_ppl.json").unlink(missing_ok=True)
    report = write_report(partial, config, plan0, plan, traj, before,
                          {"ppl": after.ppl, "windows": after.subset, "seq_len": after.seq_len, "bos": after.bos},
                          wall_s=time.perf_counter() - started,
                          peak_rss_mb=peaks_mb(peak_rss_mb()))
    if final.exists():
        shutil.rmtree(final)
    partial.replace(final)
    return CompileResult(final, report)


# -- materialize -------------------------------------------------------------------------------------------------
def load_trajectory(run_dir: str):
    from gisp_fx.trajectory import Trajectory

    run = Path(run_dir)
    if not (run / TRAJECTORY_DIR / "trajectory.json").is_file():
        raise GispError(f"materialize: '{run}' holds no {TRAJECTORY_DIR}/trajectory.json; give a folder written by "
                        "`gisp-fx compile`")
    return Trajectory.load(run / TRAJECTORY_DIR)


def materialize_model(traj, sparsity: float | None, *, step: int | None = None, loaded=None, device: str = "cpu",
                      dtype: str = "float32", repair: str | None = None, calib: str | None = None):
    """The model at `sparsity` (or after `step`) of a trajectory, rebuilt in memory from the original weights,
    repaired as the run was (or as `repair` says) on the run's calibration (or the text file `calib`)."""
    from gisp_fx.device import resolve
    from gisp_fx.loading import load_model
    from gisp_fx.passes.repair import materialize_repair, replay_repaired_

    removed = _removals_for(traj, sparsity, step)
    settings, calib_config = materialize_repair(traj, repair, calib)
    dev, dt = resolve(device, dtype)
    loaded = loaded or load_model(traj.config["model"], dtype=dt, device=str(dev))
    plan0 = analyse(loaded.model)
    if plan0 != traj.plan:
        raise GispError(f"materialize: the model '{traj.config['model']}' is not the one this trajectory pruned")
    require_same_weights(traj.fingerprint, loaded.model, plan0, traj.config["model"], "materialize")
    calibration = build_calibration(calib_config, loaded.tokenizer) if calib_config else None
    chunks = [removed]
    if settings.at == "step" and settings.mode != "none":  # repaired after every recorded step, as the run was
        chunks = [tuple(r for r in removed if r in refs) for refs in (set(s.refs()) for s in traj.steps)]
    plan, _, _ = replay_repaired_(loaded.model, plan0, chunks, calibration, settings)
    return loaded, plan, (plan0.decoder_params - plan.decoder_params) / plan0.decoder_params


def materialize(run_dir: str, sparsity: float | None, output: str, *, step: int | None = None,
                overwrite: bool = False, loaded=None, device: str = "cpu", dtype: str = "float32",
                repair: str | None = None, calib: str | None = None):
    """Rebuild the model at a sparsity (or step) of a run's trajectory and save it as a model folder."""
    from gisp_fx.save import save_pruned, staged_dir

    from gisp_fx.save import check_output_folder

    require_types("materialize", run_dir=(run_dir, (str, Path)), sparsity=(sparsity, (float, int, type(None))),
                  output=(output, (str, Path)), step=(step, (int, type(None))))
    out = check_output_folder(output)
    refuse_overlap(out, {"the run folder": run_dir, "its model": load_trajectory(run_dir).config["model"]})
    if out.exists() and not overwrite:
        raise GispError(f"--output '{out}' exists; pass --overwrite to replace it")
    loaded, plan, sparsity = materialize_model(load_trajectory(run_dir), sparsity, step=step, loaded=loaded,
                                               device=device, dtype=dtype, repair=repair, calib=calib)
    with staged_dir(out) as tmp:
        save_pruned(loaded.model, loaded.tokenizer, tmp)
    return loaded.model, plan, sparsity


def _removals_for(traj, sparsity: float | None, step: int | None) -> tuple[GroupRef, ...]:
    """The removal-order prefix that reaches `sparsity`, or everything up to `step`; for a uniform per-layer
    method, the uniform selection at `sparsity` from the run's scores (see _uniform_removals)."""
    from gisp_fx.config import UNIFORM_METHODS
    from gisp_fx.passes.select import FreedParams

    if step is not None:
        if not 0 <= step <= len(traj.steps):
            raise GispError(f"materialize: --step must be in 0..{len(traj.steps)}, got {step}")
        return traj.removed_until(step)
    for s in traj.steps:
        if sparsity is not None and abs(s.sparsity - sparsity) < 1e-9:
            return traj.removed_until(s.step)
    final = traj.steps[-1].sparsity if traj.steps else 0.0
    if sparsity is None or not 0 <= sparsity <= final + 1e-9:
        raise GispError(f"materialize: --sparsity must be in [0, {final:.4f}] (this trajectory's range), got {sparsity}")
    target = math.ceil(sparsity * traj.plan.decoder_params - 1e-6)
    if traj.config.get("method") in UNIFORM_METHODS:
        return _uniform_removals(traj, target)
    if traj.config.get("method") == "pg":
        return _pg_removals(traj, target)
    # walk the recorded order; parameters freed are counted on the original plan, as the run counted them
    prefix, freed, counter = [], 0, FreedParams(traj.plan)
    for ref in traj.removed_until(len(traj.steps)):
        if freed >= target:
            break
        freed += counter.remove(ref)
        prefix.append(ref)
    return tuple(prefix)


def _uniform_removals(traj, params_needed: int) -> tuple[GroupRef, ...]:
    """A uniform method scores the dense model once and cuts the same ratio from every layer, so a prefix of its
    removal order is not what it would remove at a lower target: re-select from the recorded dense scores, which
    are exactly those a run compiled to this lower target computes (same model, same calibration)."""
    import numpy as np

    from gisp_fx.passes.importance import Scores
    from gisp_fx.passes.select import parse_protect, select_uniform
    from gisp_fx.trajectory import dense_scores

    plan = traj.plan
    if "step1.heads" not in traj.scores or "step1.channels" not in traj.scores:
        raise GispError("materialize: this uniform-method run has no recorded scores (trajectory/scores.safetensors)")
    scores = Scores(dense_scores(plan, traj.scores["step1.heads"], "heads"), tuple(np.zeros(0) for _ in plan.layers),
                    dense_scores(plan, traj.scores["step1.channels"], "channels"), float("nan"))
    protect = parse_protect(traj.config.get("protect"), len(plan.layers))
    return select_uniform(plan, scores, params_needed, protect).removed


def _pg_removals(traj, params_needed: int) -> tuple[GroupRef, ...]:
    """A pg run at a lower sparsity: the least likely structures under the run's learned probabilities (what the
    probabilities rank; a run to that sparsity would learn other probabilities)."""
    import numpy as np

    from gisp_fx.config import CompileConfig
    from gisp_fx.passes.pg import build_units, select_by_probability
    from gisp_fx.passes.select import parse_protect
    from gisp_fx.trajectory import dense_scores

    config = CompileConfig.from_json(traj.config)
    plan = traj.plan
    units = build_units(plan, config.pg_groups, parse_protect(config.protect, len(plan.layers)))
    heads = dense_scores(plan, traj.scores["step1.heads"], "heads")
    channels = dense_scores(plan, traj.scores["step1.channels"], "channels")
    probs = np.array([(heads if refs[0].kind is Kind.HEAD else channels)[refs[0].layer][refs[0].index]
                      for refs in units.groups])
    return select_by_probability(plan, units, probs, params_needed, config.pg_budget).removed
