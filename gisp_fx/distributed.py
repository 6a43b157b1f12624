"""Many processes: join the torchrun group (gloo on CPU, NCCL on CUDA), and launch torchrun for `--nproc N`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from gisp_fx.errors import GispError


def world_from_env() -> tuple[int, int]:
    """(rank, world size) torchrun gave this process; (0, 1) when it was not launched by torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def join_(device: str) -> tuple[int, int, str]:
    """Join the process group torchrun set up (once); returns rank, world size and this rank's device: 'cuda'
    becomes cuda:LOCAL_RANK. Ranks other than 0 print nothing (their stdout goes to /dev/null)."""
    rank, world = world_from_env()
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    device = rank_device(device)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this worker process
    return rank, world, device


def rank_device(device: str) -> str:
    """This process's device for --device `device`: plain 'cuda' is cuda:LOCAL_RANK under torchrun."""
    if device == "cuda" and world_from_env()[1] > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', world_from_env()[0])}"
    return device


def launch(nproc: int, argv: list[str], output: str | None = None) -> None:
    """Run `gisp-fx <argv>` in `nproc` processes under torchrun (one machine) and wait; a failed rank is a
    GispError after torchrun has stopped the others, and the unfinished OUTPUT.partial folder that rank 0 began
    (killed by torchrun, it cannot clean up itself) is removed: a run of many processes is never resumed."""
    if nproc < 1:
        raise GispError(f"--nproc must be at least 1, got {nproc}")
    partial = Path(output).with_name(Path(output).name + ".partial") if output else None
    existed = partial is not None and partial.exists()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "gisp_fx", *argv]

    def discard_partial() -> None:
        if partial is not None and not existed and partial.exists():
            shutil.rmtree(partial)

    try:
        code = _run_group(cmd)
    except BaseException:  # interrupted: the workers are stopped, and their unfinished output goes with them
        discard_partial()
        raise
    if code != 0:
        discard_partial()
        raise GispError(f"--nproc {nproc}: a process exited with status {code} (its error is printed above); "
                        "torchrun stopped the others and no --output was written")


def _run_group(cmd: list[str], grace_s: float = 10.0) -> int:
    """Run `cmd` in a session of its own and wait for it. If this launcher is interrupted (Ctrl-C) or terminated
    (SIGTERM) first, the whole session (torchrun and every worker it started) is sent SIGTERM, then SIGKILL after
    `grace_s`, before the interruption goes on: stopping the launcher never leaves workers running."""
    proc = subprocess.Popen(cmd, start_new_session=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return proc.wait()
    except BaseException:
        _stop_session(proc, grace_s)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_session(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the session, then SIGKILL to whatever of it is left once torchrun exits or `grace_s` passes."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # nothing of the session is left
        pass
    proc.wait()


def peaks_mb(local_mb: float) -> list[float]:
    """Every rank's peak resident memory in MB, in rank order (collective: every rank calls it); [local_mb] in one
    process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [local_mb]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, float(local_mb))
    return [float(x) for x in out]


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without its --nproc flag (the workers must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
