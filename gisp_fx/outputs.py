"""An output folder a run owns: one writer at a time, never over its own input, probed before the expensive work.

`compile` writes OUTPUT.partial and renames it to OUTPUT at the end. A lock file beside them (`.OUTPUT.lock`, an
fcntl.flock released by the kernel when the process dies, so a killed run never leaves a stale lock) is held from
before OUTPUT.partial is looked at until after the rename: a second run on the same output fails at once, naming
the process that holds it.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from gisp_fx.config import CompileConfig
from gisp_fx.errors import GispError
from gisp_fx.preflight import check_vocabulary, require_types

TRAJECTORY_FILE = Path("trajectory") / "trajectory.json"


def partial_of(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def lock_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.lock")


class OutputLock:
    """An exclusive flock on `.OUTPUT.lock`; `release()` (or process exit) frees it."""

    def __init__(self, final: Path, fd: int):
        self.final, self.path, self._fd = final, lock_path(final), fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: a waiter re-checks the inode (see hold_output_lock)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or "another process"


def hold_output_lock(output: str | os.PathLike, command: str = "compile") -> OutputLock:
    """Take the output's lock, or fail at once with a GispError naming the process that holds it."""
    final = Path(output).absolute()
    path = lock_path(final)
    probe_writable(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)  # where OUTPUT.partial goes anyway
    except OSError as exc:
        raise _write_error(final, exc) from exc
    for _ in range(8):  # the holder unlinks the file on release: lock the file that is still at `path`
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _write_error(final, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GispError(f"--output '{final}' is being written by {_holder(path)} (lock '{path}'); wait for it "
                            "to finish or stop it, or choose another --output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} (gisp-fx {command})\n".encode())
            return OutputLock(final, fd)
        os.close(fd)
    raise GispError(f"--output '{final}': could not take the lock '{path}' (it kept changing); retry")


def probe_writable(final: Path) -> None:
    """Refuse, before any model is loaded, an output whose folder cannot be created or written: the nearest
    existing ancestor must take a new folder (a read-only file system, /proc, a full disk refuse that)."""
    base = next((p for p in (final.parent, *final.parent.parents) if p.exists()), None)
    if base is None or not base.is_dir():
        raise GispError(f"--output '{final}': '{base}' is not a folder; choose a folder path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".gisp-probe-", dir=base))
    except OSError as exc:
        raise _write_error(final, exc) from exc


def _write_error(final: Path, exc: OSError) -> GispError:
    why = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full",
           errno.EDQUOT: "the disk quota is used up", errno.EACCES: "permission denied",
           errno.EPERM: "the operation is not permitted"}.get(exc.errno, exc.strerror or str(exc))
    return GispError(f"--output '{final}' cannot be written ({why}: {exc.filename or final}); choose an --output "
                     "on a writable disk with space")


def refuse_overlap(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse an --output that is, lies inside, or contains one of `inputs` (label -> path): --overwrite would
    delete what the command reads (the dense weights `materialize` rebuilds from, a run's trajectory)."""
    out = Path(output).resolve()
    for label, path in inputs.items():
        if path is None or not os.path.isdir(path):
            continue
        src = Path(path).resolve()
        if out == src or src in out.parents or out in src.parents:
            where = "is" if out == src else "lies inside" if src in out.parents else "contains"
            raise GispError(f"--output '{output}' {where} {label} '{path}'; writing there would replace what this "
                            "command reads (even with --overwrite): choose an --output outside it")


def partial_state(partial: Path) -> str:
    """'none', 'resumable' (a trajectory to continue) or 'empty' (a folder that holds nothing to continue)."""
    if not partial.exists():
        return "none"
    return "resumable" if (partial / TRAJECTORY_FILE).is_file() else "empty"


def check_partial(output: str | os.PathLike, resume: bool, discard_partial: bool) -> None:
    """An unfinished run that stopped before its first step holds nothing to resume: say so, and name the flag that
    clears it (rather than a --resume that then says there is nothing to continue)."""
    partial = partial_of(Path(output))
    if partial_state(partial) == "empty" and not discard_partial:
        raise GispError(f"an unfinished run of this --output in '{partial}' stopped before its first step and holds "
                        "nothing to resume; pass --discard-partial to delete it and start afresh")


def owned_output(compile_fn):
    """Wrap `compile_model(config, *, overwrite, resume, discard_partial, ...)`: refuse an output over the input
    model, probe it, check the unfinished run, and hold the output's lock for the whole run and the final rename.
    A write failure becomes a GispError that says whether OUTPUT.partial can be resumed; an interrupt carries a
    note with the flag that continues it (gisp_fx.cli prints it)."""

    @functools.wraps(compile_fn)
    def run(config, *args, **kwargs):
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun's other ranks write a scratch copy (gisp_fx.compile)
            return compile_fn(config, *args, **kwargs)
        require_types("compile_model", config=(config, CompileConfig))
        loaded = kwargs.get("loaded")
        if loaded is not None:  # an in-memory model skips load_model's check of its tokenizer
            check_vocabulary(config.model, loaded.model, loaded.tokenizer)
        refuse_overlap(config.output, {"the input model folder": config.model})
        check_partial(config.output, kwargs.get("resume", False), kwargs.get("discard_partial", False))
        final = Path(config.output)
        check_space(final, config.model)
        with hold_output_lock(final):
            try:
                return compile_fn(config, *args, **kwargs)
            except KeyboardInterrupt as exc:
                exc.add_note(_resume_hint(partial_of(final)))
                raise
            except OSError as exc:
                if not _under(exc, final):
                    raise
                raise GispError(f"writing '{exc.filename}' failed ({exc.strerror or exc}); "
                                f"{_resume_hint(partial_of(final))}") from exc
            except SafetensorError as exc:  # save_file's I/O errors (a full disk) are not OSErrors
                raise GispError(f"writing the weights in '{partial_of(final)}' failed ({exc}); "
                                f"{_resume_hint(partial_of(final))}") from exc

    return run


def _under(exc: OSError, final: Path) -> bool:
    names = [n for n in (exc.filename, exc.filename2) if n]
    roots = (final.absolute(), partial_of(final.absolute()))
    return any(r == Path(n).absolute() or r in Path(n).absolute().parents for n in names for r in roots)


def _resume_hint(partial: Path) -> str:
    if partial_state(partial) == "resumable":
        return f"the unfinished run is kept in '{partial}': resume with the same command and --resume"
    if partial.exists():
        return f"'{partial}' holds nothing to resume: rerun with --discard-partial"
    return "nothing was written: rerun the same command"


def disk_need(model_spec: str) -> int:
    """Bytes the weights of a model folder take (what a pruned copy needs at most); 0 when unknown."""
    if not os.path.isdir(model_spec):
        return 0
    return sum(p.stat().st_size for p in Path(model_spec).glob("*.safetensors"))


def check_space(output: str | os.PathLike, model_spec: str) -> None:
    final = Path(output).absolute()
    base = next((p for p in (final.parent, *final.parent.parents) if p.exists()), final.anchor)
    need, free = disk_need(model_spec), shutil.disk_usage(base).free
    if need > free:
        raise GispError(f"--output '{final}': {free / 2**20:,.0f} MiB free on its disk, the model's weights take "
                        f"{need / 2**20:,.0f} MiB; free some space or choose an --output on another disk")
