"""Two processes (gloo, spawned here) split the calibration windows and all-reduce the gradient sums: the same
scores (<= 1e-5 relative) and the same removals as one process; more processes than windows is a clear error."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_model, tokens
from gisp_fx.errors import GispError
from gisp_fx.passes.importance import LmCalibration, score
from gisp_fx.passes.select import Normalize, rank, select
from gisp_fx.passes.analyse import analyse


def _scores(windows: int, shard: bool = False, checkpoint: bool = False):
    model = tiny_model("llama-gqa")
    plan = analyse(model)
    calib = LmCalibration(tokens(windows, 12, seed=4), batch_size=3)
    if shard:
        from gisp_fx.sharded import sharded_score

        scores = sharded_score(model, plan, calib, progress=False, desc="g", checkpoint=checkpoint,
                               device=torch.device("cpu"))
    else:
        scores = score(model, plan, calib, progress=False, checkpoint=checkpoint)
    ranked = rank(plan, scores, Normalize.REFERENCE, plan, frozenset())
    removed = select(plan, ranked, None, math.ceil(0.3 * plan.decoder_params)).removed
    return scores, removed


def _worker(rank: int, world: int, init: str, windows: int, out: str, shard: bool = False,
            checkpoint: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        try:
            scores, removed = _scores(windows, shard, checkpoint)
            result = {"heads": scores.heads, "channels": scores.channels, "loss": scores.loss, "removed": removed}
        except GispError as exc:
            result = {"error": str(exc)}
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, windows: int, world: int = 2, shard: bool = False, checkpoint: bool = False) -> list[dict]:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(world, init, windows, str(tmp_path / "out"), shard, checkpoint), nprocs=world, join=True)
    return [torch.load(f"{tmp_path / 'out'}.{r}", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("shard,checkpoint", [(False, False), (True, False), (True, True)],
                         ids=["replicated", "shard", "shard+checkpoint"])
@pytest.mark.slow  # multi-process
def test_two_processes_give_the_scores_and_removals_of_one(tmp_path, shard, checkpoint):
    """--shard: the decoder layers are FSDP2 units holding half the rows each; the gathered scores are still
    those of one process."""
    single, removed = _scores(7)  # 7 windows: ranks get 4 and 3, in batches of 3 (uneven on purpose)
    results = _spawn(tmp_path, 7, shard=shard, checkpoint=checkpoint)
    for r in results:
        assert r["removed"] == removed
        assert r["loss"] == pytest.approx(single.loss, rel=1e-6)
        for kind in ("heads", "channels"):
            for got, ref in zip(r[kind], getattr(single, kind)):
                np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)
    for kind in ("heads", "channels"):  # every rank holds the same numbers, bit for bit
        assert all(np.array_equal(a, b) for a, b in zip(results[0][kind], results[1][kind]))


@pytest.mark.slow  # multi-process
def test_more_processes_than_windows_is_refused(tmp_path):
    results = _spawn(tmp_path, 1)
    assert all("2 processes but only 1 calibration windows" in r["error"] for r in results)


COMMON = ["--sparsity", "0.3", "--steps", "2", "--calib-samples", "6", "--seq-len", "16", "--batch-size", "2",
          "--eval-windows", "2", "--protect", "none"]


@pytest.mark.slow  # multi-process
@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "shard"])
def test_cli_nproc_2_compiles_what_one_process_compiles(tiny_folder, tmp_path, monkeypatch, shard):
    """`gisp-fx compile --nproc 2 [--shard]` launches torchrun (gloo); rank 0 alone writes, and the run removes
    what a single-process run removes."""
    import json
    import sys

    from gisp_fx.cli import main

    path = tiny_folder("llama-gqa")
    common = ["compile", path, *COMMON]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*common, "--output", str(one)]) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = [*common, "--output", str(two), "--nproc", "2", *(["--shard"] if shard else [])]
    monkeypatch.setattr(sys, "argv", ["gisp-fx", *argv])
    assert main(argv) == 0
    steps = [json.loads((d / "trajectory" / "trajectory.json").read_text())["steps"] for d in (one, two)]
    assert [s["removed"] for s in steps[0]] == [s["removed"] for s in steps[1]]
    assert [s["loss"] for s in steps[1]] == pytest.approx([s["loss"] for s in steps[0]], rel=1e-5)
    assert not list(tmp_path.glob("two.partial")) and (two / "report.json").is_file()
    report = json.loads((two / "report.json").read_text())
    assert len(report["peak_rss_mb_per_rank"]) == 2 and report["peak_rss_mb"] == max(report["peak_rss_mb_per_rank"])
    assert report["peak_rss_mb_all_ranks_at_most"] == pytest.approx(sum(report["peak_rss_mb_per_rank"]))
    assert "peak_rss_mb_per_rank" not in json.loads((one / "report.json").read_text())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow  # multi-process
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_terminating_the_launcher_stops_every_process_it_started(tmp_path):
    """SIGTERM to a `--nproc` launcher takes torchrun's whole session with it (here a stand-in: a shell with a
    background child), instead of leaving workers running."""
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    inner = f"sleep 600 & echo $! > {pids}.tmp; echo $$ >> {pids}.tmp; mv {pids}.tmp {pids}; wait"
    launcher = subprocess.Popen([sys.executable, "-c", "import sys; from gisp_fx.distributed import _run_group; "
                                 f"sys.exit(_run_group(['bash', '-c', {inner!r}], grace_s=5))"])
    deadline = time.monotonic() + 60
    while not pids.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    started = [int(x) for x in pids.read_text().split()]
    assert len(started) == 2 and all(_alive(p) for p in started)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) != 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in started)


@pytest.mark.slow  # multi-process
def test_a_rank_that_dies_while_scoring_is_one_error_and_no_output(tiny_folder, tmp_path, monkeypatch, capsys):
    """Rank 1 exits in the middle of scoring (a sitecustomize on its PYTHONPATH replaces the gradient loop with
    os._exit): torchrun stops rank 0, the launcher reports one GispError naming --nproc, and neither OUTPUT nor
    OUTPUT.partial (which rank 0 had begun) is left behind."""
    import os
    import sys

    from gisp_fx.cli import main

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import gisp_fx.passes.importance as importance\n"
        "    importance._accumulate = lambda *args, **kwargs: os._exit(7)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    argv = ["compile", tiny_folder("llama-gqa"), *COMMON, "--output", str(out), "--nproc", "2"]
    monkeypatch.setattr(sys, "argv", ["gisp-fx", *argv])
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gisp-fx compile: error:")]
    assert len(errors) == 1 and "--nproc 2: a process exited with status" in errors[0]
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_shard_in_one_process_is_refused(tiny_folder, tmp_path, capsys):
    from gisp_fx.cli import main

    out = tmp_path / "run"
    assert main(["compile", tiny_folder("llama-gqa"), *COMMON, "--output", str(out), "--shard"]) == 2
    err = capsys.readouterr().err
    assert "--shard: shards the decoder layers across processes, but this run has one" in err and not out.exists()
    assert main(["compile", tiny_folder("llama-gqa"), "--sparsity", "0.3", "--method", "magnitude", "--output",
                 str(out), "--shard"]) == 2
    assert "--shard shards the gradients of the ppl objective; --method magnitude" in capsys.readouterr().err


def test_checkpointing_is_auto_by_default_and_the_flags_choose_it():
    from gisp_fx.cli import build_parser
    from gisp_fx.config import CompileConfig

    parse = build_parser().parse_args
    assert parse(["compile", "m", "--sparsity", "0.5"]).checkpoint == "auto"
    assert parse(["compile", "m", "--sparsity", "0.5", "--no-checkpoint"]).checkpoint == "off"
    assert parse(["compile", "m", "--sparsity", "0.5", "--checkpoint"]).checkpoint == "on"
    assert parse(["compile", "m", "--sparsity", "0.5", "--checkpoint", "off"]).checkpoint == "off"
    assert CompileConfig("m", 0.5, "out").checkpoint == "auto" and CompileConfig("m", 0.5, "out").shard is False
    # runs recorded before auto read back as what they were
    old = {**CompileConfig("m", 0.5, "out").to_json(), "checkpoint": True}
    assert CompileConfig.from_json(old).checkpoint == "on"


def test_checkpoint_auto_follows_the_estimate_against_the_budget():
    """auto checkpoints exactly when the scoring pass's estimate exceeds the budget: a budget just above the
    estimate keeps activations, one just below recomputes them; on/off ignore the budget."""
    from gisp_fx.config import GispConfig
    from gisp_fx.memory import scoring_bytes
    from gisp_fx.passes.importance import LmCalibration
    from gisp_fx.prune import use_checkpoint

    model = tiny_model("llama-gqa")
    calib = LmCalibration(torch.zeros(16, 32, dtype=torch.long), batch_size=4)
    need = scoring_bytes(model, 4, 32)
    assert need > 4 * sum(p.numel() for p in model.parameters())  # gradients plus some activations
    assert scoring_bytes(model, 8, 32) > need  # a larger batch keeps more activations
    above, below = (need * 1.01) / 1e9, (need * 0.99) / 1e9
    assert use_checkpoint(GispConfig(0.5, memory_budget_gb=above), model, calib) is False
    assert use_checkpoint(GispConfig(0.5, memory_budget_gb=below), model, calib) is True
    assert use_checkpoint(GispConfig(0.5, checkpoint="off", memory_budget_gb=below), model, calib) is False
    assert use_checkpoint(GispConfig(0.5, checkpoint="on", memory_budget_gb=above), model, calib) is True



@pytest.mark.slow  # multi-process
def test_an_interrupted_launcher_leaves_no_partial_output(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) while the workers run: the interruption goes on, and the OUTPUT.partial that rank 0 had
    begun is removed (a run of many processes is never resumed); a partial folder from before is left alone."""
    from gisp_fx import distributed

    out = tmp_path / "run"

    def interrupted(cmd, grace_s=10.0):
        (tmp_path / "run.partial").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "_run_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distributed.launch(2, ["compile", "x", "--output", str(out)], str(out))
    assert not (tmp_path / "run.partial").exists()
    monkeypatch.setattr(distributed, "_run_group", lambda cmd, grace_s=10.0: (_ for _ in ()).throw(KeyboardInterrupt))
    (tmp_path / "run.partial").mkdir()
    with pytest.raises(KeyboardInterrupt):
        distributed.launch(2, ["compile", "x", "--output", str(out)], str(out))
    assert (tmp_path / "run.partial").is_dir()
