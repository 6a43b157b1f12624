"""`gisp-fx compile`: load -> prune_ -> verify -> evaluate -> save -> report, in OUTPUT.partial, then OUTPUT."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gisp_fx.calibration import build_calibration
from gisp_fx.config import CompileConfig
from gisp_fx.device import resolve
from gisp_fx.distributed import join_, peaks_mb
from gisp_fx.errors import GispError
from gisp_fx.evaluate import Perplexity, wikitext2_perplexity
from gisp_fx.loading import load_model
from gisp_fx.memory import lean_heap_, peak_rss_mb
from gisp_fx.outputs import owned_output
from gisp_fx.passes.analyse import analyse
from gisp_fx.preflight import check_calibration_positions
from gisp_fx.passes.repair_check import check_calibration
from gisp_fx.passes.select import parse_protect
from gisp_fx.memory import free_memory
from gisp_fx.prune import StepFailed, check_target, prune_
from gisp_fx.report import write_report
from gisp_fx.rundir import TRAJECTORY_DIR, dense_perplexity, prepare_output, publish, resumable
from gisp_fx.save import save_pruned
from gisp_fx.sharded import require_world

@dataclass(frozen=True)
class CompileResult:
    output: Path
    report: dict


def _ppl(p: Perplexity) -> dict:
    return {"ppl": p.ppl, "windows": p.subset, "seq_len": p.seq_len, "bos": p.bos}


@owned_output  # refuses an output over its input, probes it, holds its lock for the whole run
def compile_model(config: CompileConfig, *, overwrite: bool = False, resume: bool = False, calibration=None,
                  on_step: Callable[[int, torch.nn.Module], None] | None = None, progress: bool = True,
                  loaded=None, discard_partial: bool = False) -> CompileResult:
    """Prune `config.model` to `config.sparsity`; write the pruned model, its trajectory and report to
    `config.output`. The run works in OUTPUT.partial, saving the trajectory after every step: an interrupted run
    is continued with `resume` or deleted first with `discard_partial` (never silently)."""
    config.validate()
    lean_heap_()
    rank, world, device_spec = join_(config.device)
    device, dtype = resolve(device_spec, config.dtype)
    if config.shard:
        require_world(world)
    if world > 1 and resume:
        raise GispError("--resume: an unfinished run is resumed in one process; drop --nproc / torchrun to resume")
    if rank != 0:  # the same computation as rank 0, written to a scratch folder removed at exit
        scratch = tempfile.mkdtemp(prefix=f"gisp-fx-rank{rank}-")
        atexit.register(shutil.rmtree, scratch, True)
        config, overwrite, progress = replace(config, output=str(Path(scratch) / "run")), True, False
    started = time.perf_counter()
    final, partial = prepare_output(config, overwrite, resume, discard_partial)
    traj_dir = partial / TRAJECTORY_DIR
    resumed = resumable(partial, config) if resume else None  # checked before any model is loaded
    home = torch.device("cpu") if config.shard else device  # --shard: the full model stays in host memory
    loaded = loaded or load_model(config.model, dtype=dtype, device=str(home))
    model, tokenizer = loaded.model.to(device=home, dtype=dtype), loaded.tokenizer
    settings = config.gisp()
    plan0 = analyse(model)  # the targets and the calibration are checked before any evaluation or gradient
    check_target(settings, plan0, parse_protect(config.protect, len(plan0.layers)))
    check_calibration_positions(model, config.method, config.seq_len)
    calib = calibration if calibration is not None else build_calibration(config, tokenizer)
    repair_calib, repair_windows = calib, config.repair_windows_for(plan0)
    if calibration is None and config.repair != "none" and repair_windows != config.calib_samples:
        try:
            repair_calib = build_calibration(config, tokenizer, windows=repair_windows)
        except GispError as exc:
            raise GispError(f"--repair {config.repair} fits on {repair_windows} calibration windows "
                            f"(--repair-samples): {exc}") from exc
    check_calibration(plan0, repair_calib, settings.repair_settings())
    free_memory()  # the load's, the capture's and the tokenizer's temporaries
    before = dense_perplexity(partial, lambda: _ppl(wikitext2_perplexity(
        model, tokenizer, config.seq_len, config.eval_windows, progress=progress, desc="dense ppl", bos=config.bos)))

    def saved(traj, pruned) -> None:
        traj.save(traj_dir)
        if on_step is not None:
            on_step(len(traj.steps), pruned)

    try:
        result = prune_(model, settings, calib, progress=progress, on_step=saved, resume=resumed,
                        record=config.to_json(), shard_device=config.device, repair_calibration=repair_calib)
    except StepFailed as exc:
        raise GispError(f"{exc}. The last good trajectory ({exc.step - 1} steps) is kept in '{traj_dir}'") from exc
    result.trajectory.save(traj_dir)  # with the end repair's record
    if analyse(model, cache=False) != result.plan:  # the verifier: the shrunk model's own graph gives the plan
        raise GispError("verify: the re-captured graph of the pruned model disagrees with the rewrite's plan; "
                        "this is a gisp-fx bug, please report it with the model and settings")
    after = _ppl(wikitext2_perplexity(model, tokenizer, config.seq_len, config.eval_windows, progress=progress,
                                      desc="pruned ppl", bos=config.bos))
    save_pruned(model, tokenizer, partial)
    report = write_report(partial, config, result.plan0, result.plan, result.trajectory, before, after,
                          wall_s=time.perf_counter() - started, peak_rss_mb=peaks_mb(peak_rss_mb()),
                          checkpoint=result.checkpoint)
    publish(partial, final)
    return CompileResult(final, report)
