"""Issue 35, where the command line is the point: two concurrent compiles of one --output, and a real Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_model, tiny_tokenizer

COMPILE = ["--sparsity", "0.3", "--protect", "none", "--eval-windows", "2", "--calib-samples", "4", "--seq-len", "16",
           "--steps", "2"]


def _gisp(*argv: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "gisp_fx", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kwargs)


def _wait_for(check, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.fixture
def folder(tmp_path) -> Path:
    path = tmp_path / "dense"
    tiny_model("llama-gqa").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.slow  # two processes, one full compile
def test_two_concurrent_compiles_one_wins(folder, tmp_path):
    out = tmp_path / "run"
    first = _gisp("compile", str(folder), *COMPILE, "--output", str(out), "--overwrite")
    lock = tmp_path / ".run.lock"
    _wait_for(lambda: lock.is_file() and lock.read_text().startswith("pid"), first)
    os.kill(first.pid, signal.SIGSTOP)  # the first holds the lock, frozen: the second arrives mid-run, every time
    try:
        t0 = time.monotonic()
        second = _gisp("compile", str(folder), *COMPILE, "--output", str(out), "--overwrite")
        _, err = second.communicate(timeout=120)
        waited = time.monotonic() - t0
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("gisp-fx compile: error: ") and f"is being written by pid {first.pid}" in line, err
    assert waited < 60  # it did not wait for the frozen first run (its own start-up is most of this)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert (out / "trajectory" / "trajectory.json").is_file() and (out / "model.safetensors").is_file()
    assert not lock.exists() and not (tmp_path / "run.partial").exists()


@pytest.mark.slow  # a compile interrupted and resumed in processes
def test_ctrl_c_during_compile_then_resume(folder, tmp_path):
    out = tmp_path / "run"
    # six steps (a later --steps wins): after the first step's trajectory appears, five more keep the run busy while
    # SIGINT arrives
    argv = ["compile", str(folder), *COMPILE, "--steps", "6", "--output", str(out)]
    proc = _gisp(*argv)
    _wait_for(lambda: (tmp_path / "run.partial" / "trajectory" / "trajectory.json").is_file(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # the tiny run finished before the signal arrived: nothing to check
        pytest.skip("the run finished before SIGINT arrived")
    assert proc.returncode == 130 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("gisp-fx compile: interrupted; ") and "--resume" in line, err
    assert not (tmp_path / ".run.lock").exists() or not _locked(tmp_path / ".run.lock")
    resumed = _gisp(*argv, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert (out / "report.json").is_file()


def _locked(path: Path) -> bool:
    import fcntl

    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False
