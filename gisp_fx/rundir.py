"""A compile's output folder: OUTPUT.partial while the run works (resumable), renamed onto OUTPUT when it ends."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from gisp_fx.config import CompileConfig
from gisp_fx.errors import GispError
from gisp_fx.save import check_output_folder
from gisp_fx.trajectory import Trajectory

TRAJECTORY_DIR = "trajectory"
DENSE_PPL = "dense_ppl.json"  # the unpruned model's perplexity, kept so that a resumed run does not measure it again


def prepare_output(config: CompileConfig, overwrite: bool, resume: bool,
                   discard_partial: bool = False) -> tuple[Path, Path]:
    """(final folder, partial folder), checked: an existing output needs `overwrite`; an unfinished run of the same
    output is continued with `resume`, deleted first with `discard_partial`, and otherwise refused (it is never
    deleted silently)."""
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


def resumable(partial: Path, config: CompileConfig) -> Trajectory:
    """The unfinished run's trajectory, readable and run with the same settings as `config`."""
    traj_dir = partial / TRAJECTORY_DIR
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


def dense_perplexity(partial: Path, measure) -> dict:
    """The dense model's perplexity: as an earlier try of this run recorded it, else `measure()`, then recorded."""
    path = partial / DENSE_PPL
    if path.is_file():
        return json.loads(path.read_text())
    before = measure()
    partial.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(before))
    return before


def publish(partial: Path, final: Path) -> None:
    """The finished run's folder under its final name (replacing an older one, which --overwrite allowed)."""
    (partial / DENSE_PPL).unlink(missing_ok=True)
    if final.exists():
        shutil.rmtree(final)
    partial.replace(final)
