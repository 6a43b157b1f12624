"""A compiled run folder -> a recovered model folder: the I/O around passes/recover.py's recover_.

Loads the run's pruned model (the student) and the dense model its trajectory names (the teacher), packs the
recovery text into windows, distils with checkpoints in OUTPUT.partial, evaluates before and after, and writes a
normal gisp-fx model folder with its trajectory (recovery recorded), report.md/json and the loss curve.
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gisp_fx.datasets import TEXT_SOURCES, named_text, token_windows, wikitext2_test_text, window_bos
from gisp_fx.device import resolve
from gisp_fx.errors import GispError
from gisp_fx.evaluate import wikitext2_perplexity
from gisp_fx.loading import LoadedModel, load_model
from gisp_fx.memory import free_memory, peak_rss_mb, reset_peak_rss
from gisp_fx.passes.recover import Recovery, RecoverConfig, RecoverResult, recover_
from gisp_fx.recover_report import write_recover_report
from gisp_fx.save import check_output_folder, save_pruned
from gisp_fx.tasks import evaluate, headlines
from gisp_fx.trajectory import Trajectory

TRAJECTORY_DIR = "trajectory"  # as the compile writes it
CHECKPOINT = "recover_checkpoint.pt"
BEFORE = "recover_before.json"
EVAL_SEQ_LEN = 128  # the compile's evaluation protocol, so that figures compare with its report
# a line of the evaluation text this long that also appears in the recovery text means the two overlap
OVERLAP_MIN_CHARS = 64


@dataclass(frozen=True)
class RecoverRun:
    output: Path
    result: RecoverResult
    report: dict


def recovery_text(data: str) -> tuple[str, str]:
    """`--data` -> (text, description for the report): a bundled text (wikitext2: the 1 MB of WikiText-2 train;
    gsm8k: GSM8K train), a .txt file, or a .jsonl file of objects with a "text" field."""
    named = named_text(data)
    if named is not None:
        return named
    path = Path(data)
    if not path.is_file():
        raise GispError(f"--data '{data}': not a bundled text ({', '.join(TEXT_SOURCES)}) and no such file; give "
                        "one of those, a .txt or a .jsonl file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GispError(f"--data '{data}' could not be read as UTF-8 text ({exc})") from exc
    if path.suffix == ".txt":
        return raw, f"{path.name} (text file)"
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GispError(f"--data '{data}' line {i} is not JSON ({exc}); expected one object per line") from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise GispError(f"--data '{data}' line {i}: expected an object with a string \"text\" field")
            rows.append(row["text"])
        return "\n\n".join(rows), f"{path.name} (jsonl, {len(rows)} texts)"
    raise GispError(f"--data '{data}': expected a .txt or .jsonl file (or 'wikitext2'), got '{path.suffix}'")


def eval_overlap(text: str) -> int:
    """How many lines of the WikiText-2 test split (of at least OVERLAP_MIN_CHARS characters) occur in `text`."""
    test = {line.strip() for line in wikitext2_test_text().splitlines() if len(line.strip()) >= OVERLAP_MIN_CHARS}
    return sum(1 for line in {line.strip() for line in text.splitlines()} if line in test)


def recovery_windows(tokenizer, data: str, seq_len: int, bos: str) -> tuple[torch.Tensor, str]:
    """The recovery windows [n, seq_len] of `--data` and its description; refuses text that overlaps the evaluation
    split, and text shorter than one window."""
    text, source = recovery_text(data)
    overlap = eval_overlap(text)
    if overlap:
        raise GispError(f"--data '{data}' contains {overlap} lines of the WikiText-2 test split that recovery is "
                        "evaluated on; remove them (or recover on other text): training on them overstates recovery")
    windows = token_windows(tokenizer, text, seq_len, window_bos(tokenizer, bos))
    if len(windows) == 0:
        n = len(tokenizer(text).input_ids)
        raise GispError(f"--data '{data}' has {n} tokens, fewer than one window of --seq-len {seq_len}; give "
                        "more text or a shorter --seq-len")
    return windows, source


def load_teacher(run_dir: Path, traj: Trajectory, teacher: str | None, device: torch.device,
                 dtype: torch.dtype) -> LoadedModel:
    """The dense model the run pruned (as its trajectory recorded it, or `teacher`), checked against the run's plan."""
    spec = teacher or traj.config["model"]
    recorded = run_dir / TRAJECTORY_DIR / "trajectory.json"
    where = "--teacher" if teacher else f"the run's dense model (recorded in {recorded})"
    try:
        loaded = load_model(spec, dtype=dtype, device=str(device))
    except GispError as exc:
        raise GispError(f"{where} '{spec}' cannot be loaded ({exc}); give its current location with "
                        "--teacher MODEL") from exc
    total = sum(p.numel() for p in loaded.model.parameters())
    if total != traj.plan.total_params:
        raise GispError(f"{where} '{spec}' has {total:,} parameters; the run pruned a model of "
                        f"{traj.plan.total_params:,}: give the dense model this run started from with --teacher")
    return loaded


def _prepare(run_dir: Path, output: Path, resume: bool, overwrite: bool) -> Path:
    if not (run_dir / "config.json").is_file() or not (run_dir / TRAJECTORY_DIR / "trajectory.json").is_file():
        raise GispError(f"RUN_DIR '{run_dir}' is not a gisp-fx run folder (expected config.json and "
                        f"{TRAJECTORY_DIR}/trajectory.json, as `gisp-fx compile` writes)")
    final = check_output_folder(output)
    partial = check_output_folder(final.with_name(final.name + ".partial"), "--output's unfinished recovery")
    if final.resolve() == run_dir.resolve():
        raise GispError(f"--output '{output}' is the run folder itself; write the recovered model to another folder")
    if final.exists() and not overwrite:
        raise GispError(f"--output '{final}' exists; pass --overwrite to replace it, or choose another folder")
    if resume and not (partial / CHECKPOINT).is_file():
        raise GispError(f"--resume: no unfinished recovery at '{partial}' (nothing to continue); run without --resume")
    if not resume and partial.exists():
        raise GispError(f"an unfinished recovery of this --output is kept in '{partial}'; pass --resume to continue "
                        "it, or delete that folder to start afresh")
    return partial


def _save_checkpoint(partial: Path, run: Recovery) -> None:
    tmp = partial / (CHECKPOINT + ".tmp")
    torch.save(run.state_dict(), tmp)
    tmp.replace(partial / CHECKPOINT)  # atomic: an interrupt leaves the previous checkpoint whole


def _load_checkpoint(partial: Path) -> dict:
    try:
        return torch.load(partial / CHECKPOINT, weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise GispError(f"--resume: the checkpoint '{partial / CHECKPOINT}' could not be read ({exc}); it is "
                        "damaged: delete that folder and start afresh") from exc


def _evaluate(model, tokenizer, eval_windows, bos, tasks, task_limit, desc) -> dict:
    ppl = wikitext2_perplexity(model, tokenizer, EVAL_SEQ_LEN, eval_windows, desc=desc, bos=bos)
    out = {"ppl": ppl.ppl, "windows": ppl.subset, "seq_len": ppl.seq_len, "bos": ppl.bos}
    if tasks:
        out["tasks"] = headlines(evaluate(model, tokenizer, list(tasks), task_limit, bos=bos))
    return out


def recover_run(run_dir: str, output: str, config: RecoverConfig, *, data: str = "wikitext2", bos: str = "auto",
                teacher: str | None = None, device: str = "cpu", eval_windows: int | None = 256,
                tasks: tuple[str, ...] = (), task_limit: int | None = None, checkpoint_every: int = 50,
                resume: bool = False, overwrite: bool = False, progress: bool = True,
                after_step=None) -> RecoverRun:
    """Distil RUN_DIR's pruned model from its dense model into `output` (see the module docstring).
    `after_step(recovery)`: called after each step and its checkpoint (tests interrupt a run with it)."""
    started = time.perf_counter()
    config.validate()
    if checkpoint_every < 1:
        raise GispError(f"--checkpoint-every must be at least 1 step, got {checkpoint_every}")
    run_path, out = Path(run_dir), Path(output)
    partial = _prepare(run_path, out, resume, overwrite)
    dev, teacher_dtype = resolve(device, config.precision)
    # glibc's default heap, not memory.lean_heap_: a training step frees and re-takes the same large blocks, and
    # mapping them afresh every time cost a third of the CPU in page faults (SmolLM2 50 %, 10,240 tokens: 97.5
    # tokens/s with it, 151.9 without, peak RSS 2,782 against 2,949 MiB)
    traj = Trajectory.load(run_path / TRAJECTORY_DIR)
    student = load_model(str(run_path), dtype=torch.float32, device=str(dev))  # fp32 master weights
    dense = load_teacher(run_path, traj, teacher, dev, teacher_dtype)
    windows, source = recovery_windows(student.tokenizer, data, config.seq_len, bos)
    state = _load_checkpoint(partial) if resume else None
    partial.mkdir(parents=True, exist_ok=True)
    if (partial / BEFORE).is_file():
        before = json.loads((partial / BEFORE).read_text())
    else:
        before = _evaluate(student.model, student.tokenizer, eval_windows, bos, tasks, task_limit, "pruned ppl")
        (partial / BEFORE).write_text(json.dumps(before))

    bar = tqdm(total=config.steps, desc="recover", unit="step", disable=not progress)

    def on_step(run: Recovery) -> None:
        if bar.n == 0 and run.step_index > 1:  # a resumed run: the bar starts where the checkpoint stopped
            bar.update(run.step_index - 1)
        bar.update(1)
        recent = run.losses[-10:]  # the running loss: the mean of the last 10 steps' batches
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", tok_s=f"{run.tokens / max(run.wall_s, 1e-9):.0f}")
        if run.step_index % checkpoint_every == 0 and not run.done:
            _save_checkpoint(partial, run)
        if after_step is not None:
            after_step(run)

    # the training's own peak (student, teacher, optimizer, activations) apart from the evaluations' around it;
    # the loads' and the evaluation's freed temporaries handed back first, so that they do not count in it
    peak_before = peak_rss_mb()
    free_memory()
    fresh = reset_peak_rss()
    result = recover_(student.model, dense.model, config, windows, state=state, on_step=on_step)
    train_peak = peak_rss_mb() if fresh else None
    bar.close()
    teacher_spec = teacher or traj.config["model"]
    del dense
    after = _evaluate(student.model, student.tokenizer, eval_windows, bos, tasks, task_limit, "recovered ppl")
    save_pruned(student.model, student.tokenizer, partial)
    settings = {**config.to_json(), "data": data, "data_source": source, "bos": bos, "teacher": teacher_spec,
                "windows_available": len(windows), "tokens_trained": result.tokens, "steps": result.steps,
                "wall_s": result.wall_s, "tokens_per_s": result.tokens_per_s, "from_run": str(run_path),
                "shared_with_teacher_mb": result.shared_bytes / 2**20}
    traj.recover.append(settings)
    traj.save(partial / TRAJECTORY_DIR)
    report = write_recover_report(partial, run_path, settings, result, before, after,
                                  wall_s=time.perf_counter() - started,
                                  peak_rss_mb=max(peak_before, peak_rss_mb()), train_peak_rss_mb=train_peak)
    for name in (CHECKPOINT, CHECKPOINT + ".tmp", BEFORE):
        (partial / name).unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    partial.replace(out)
    return RecoverRun(out, result, report)
