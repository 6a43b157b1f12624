"""Issue 35, in process: bad and unusual input ends in one clear line (a GispError, nothing half-written) or is
handled correctly, never in a traceback, a silent wrong result or a lost output. The CLI-only cases (two
concurrent runs, a real Ctrl-C) are in test_reliability_cli.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model, tiny_tokenizer
from gisp_fx.cli import main
from gisp_fx.config import CompileConfig
from gisp_fx.errors import GispError
from gisp_fx.loading import LoadedModel, load_model
from gisp_fx.passes.select import parse_protect
from gisp_fx.compile import compile_model
from gisp_fx.rebuild import save_materialized as materialize
from test_compile import _calib, _config, _loaded
from test_errors import _cli_error

MAGNITUDE = ["--method", "magnitude", "--protect", "none", "--eval-windows", "2"]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny model folder and a finished magnitude run compiled from it (the run records the folder)."""
    tmp = tmp_path_factory.mktemp("rel")
    folder = tmp / "dense"
    tiny_model("llama-gqa", num_hidden_layers=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    cfg = CompileConfig(model=str(folder), sparsity=0.3, output=str(tmp / "run"), method="magnitude",
                        protect="none", eval_windows=2)
    return folder, compile_model(cfg, progress=False).output


# 1: outputs that two runs (or a run and its own input) can break -------------------------------------------------
def test_a_held_output_fails_at_once_naming_the_holder(tmp_path):
    from gisp_fx.outputs import hold_output_lock

    with hold_output_lock(tmp_path / "run"):
        t0 = time.perf_counter()
        with pytest.raises(GispError, match=rf"'.*run' is being written by pid {os.getpid()} \(gisp-fx compile\)"):
            compile_model(_config(tmp_path, "run"), calibration=_calib(), loaded=_loaded(), progress=False)
        assert time.perf_counter() - t0 < 1.0
    assert _files(tmp_path) == []  # nothing written, the lock file gone with its release
    with hold_output_lock(tmp_path / "runs" / "new" / "run") as lock:  # a parent folder not made yet
        assert lock.path.read_text() == f"pid {os.getpid()} (gisp-fx compile)\n"
    assert _files(tmp_path) == ["runs", "runs/new"]


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_over_the_input_model_is_refused_even_with_overwrite(source, tmp_path, capsys, where):
    folder, run = source
    copy = tmp_path / "dense"
    shutil.copytree(folder, copy)
    out = {"same": copy, "inside": copy / "pruned", "parent": tmp_path}[where]
    before = _files(tmp_path)
    _cli_error(capsys, ["compile", str(copy), "--sparsity", "0.3", *MAGNITUDE, "--output", str(out), "--overwrite"],
               "writing there would replace what this command reads")
    _cli_error(capsys, ["export", str(copy), "--output", str(out), "--overwrite"], "--output")
    assert _files(tmp_path) == before


def test_materialize_over_its_run_or_source_is_refused(source, tmp_path, capsys):
    folder, run = _copies(source, tmp_path)
    for out in (run, folder, run / "m"):
        _cli_error(capsys, ["materialize", str(run), "--step", "1", "--output", str(out), "--overwrite"],
                   "would replace what this command reads")
    assert (run / "trajectory" / "trajectory.json").is_file() and (folder / "model.safetensors").is_file()


def _copies(source, tmp_path) -> tuple[Path, Path]:
    """Copies of the source folder and its run, the run naming the copied folder (tests that may write over them)."""
    folder, run = tmp_path / "dense", tmp_path / "run"
    shutil.copytree(source[0], folder)
    shutil.copytree(source[1], run)
    file = run / "trajectory" / "trajectory.json"
    doc = json.loads(file.read_text())
    doc["config"]["model"] = str(folder)
    file.write_text(json.dumps(doc))
    return folder, run


@pytest.mark.parametrize("output", ["/proc/gisp-fx-out/run", "/sys/gisp-fx-out"])
def test_unwritable_output_is_refused_before_loading(source, output, capsys):
    # 'no/such/model' would fail at load: the output must be refused first
    _cli_error(capsys, ["compile", "no/such-model", "--sparsity", "0.3", *MAGNITUDE, "--output", output],
               f"--output '{output}' cannot be written")
    _cli_error(capsys, ["materialize", str(source[1]), "--step", "1", "--output", output], "cannot be written")
    _cli_error(capsys, ["export", "no/such-model", "--output", output], "cannot be written")


def test_full_disk_is_refused_before_loading(source, tmp_path, monkeypatch):
    import gisp_fx.outputs

    folder, _ = source
    monkeypatch.setattr(gisp_fx.outputs.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1024))
    cfg = CompileConfig(model=str(folder), sparsity=0.3, output=str(tmp_path / "o"), method="magnitude",
                        protect="none", eval_windows=2)
    with pytest.raises(GispError, match=r"MiB free on its disk, the model's weights take"):
        compile_model(cfg, progress=False)
    assert _files(tmp_path) == []


@pytest.mark.slow  # two compiles
def test_write_failure_keeps_the_run_resumable(tmp_path, monkeypatch):
    import gisp_fx.compile

    real = gisp_fx.compile.save_pruned  # patched where compile calls it

    def full(model, tokenizer, folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(gisp_fx.compile, "save_pruned", full)
    with pytest.raises(GispError, match=r"No space left on device.*kept in '.*run.partial': resume with the same "
                                        r"command and --resume"):
        compile_model(_config(tmp_path), calibration=_calib(), loaded=_loaded(), progress=False)
    assert (tmp_path / "run.partial" / "trajectory" / "trajectory.json").is_file()
    monkeypatch.setattr(gisp_fx.compile, "save_pruned", real)
    result = compile_model(_config(tmp_path), calibration=_calib(), loaded=_loaded(), progress=False, resume=True)
    assert (result.output / "model.safetensors").is_file() and not (tmp_path / "run.partial").exists()


@pytest.mark.slow  # a compile
def test_partial_with_nothing_resumable_names_the_flag_that_clears_it(tmp_path):
    partial = tmp_path / "run.partial"
    partial.mkdir()
    (partial / "dense_ppl.json").write_text("{}")  # stopped before its first step
    for resume in (False, True):
        with pytest.raises(GispError, match=r"holds nothing to resume; pass --discard-partial"):
            compile_model(_config(tmp_path), calibration=_calib(), loaded=_loaded(), progress=False, resume=resume)
    result = compile_model(_config(tmp_path), calibration=_calib(), loaded=_loaded(), progress=False,
                           discard_partial=True)
    assert (result.output / "report.json").is_file()


# 2: silent wrong results ---------------------------------------------------------------------------------------
def _edit_steps(doc, kind):
    steps = doc["steps"]
    if kind == "twice":
        steps[1]["removed"].append(steps[0]["removed"][0])
    elif kind == "missing":
        del steps[1]
    elif kind == "order":
        steps[0], steps[1] = steps[1], steps[0]
    elif kind == "sparsity":
        steps[0]["removed"] = steps[0]["removed"][: len(steps[0]["removed"]) // 2]
    elif kind == "id":
        steps[0]["removed"][0][2] = 10_000
    elif kind == "layer":
        steps[0]["removed"][0][0] = 99
    elif kind == "negative":
        steps[0]["removed"][0][2] = -1


@pytest.mark.parametrize("kind, message", [
    ("twice", r"step 2: .* is listed twice \(first at step 1\)"),
    ("missing", r"step 2 is missing or out of order"),
    ("order", r"step 1 is missing or out of order"),
    ("sparsity", r"step 1: recorded sparsity .* does not match its removals"),
    ("id", r"step 1: (head|channel) 10000 of layer \d+ does not exist"),
    ("layer", r"step 1: (head|channel) \d+ of layer 99: the model has layers 0..3"),
    ("negative", r"step 1: (head|channel) -1 of layer \d+ does not exist"),
])
def test_inconsistent_trajectory_is_refused(gisp_run, tmp_path, capsys, kind, message):
    run = tmp_path / "run"
    shutil.copytree(gisp_run, run)
    file = run / "trajectory" / "trajectory.json"
    doc = json.loads(file.read_text())
    _edit_steps(doc, kind)
    file.write_text(json.dumps(doc))
    with pytest.raises(GispError, match=message):
        materialize(str(run), None, str(tmp_path / "m"), step=1, loaded=_loaded())
    _cli_error(capsys, ["materialize", str(run), "--step", "1", "--output", str(tmp_path / "m")], "damaged")
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def gisp_run(tmp_path_factory) -> Path:
    """A finished 3-step gisp run on a tiny model."""
    tmp = tmp_path_factory.mktemp("gisp")
    return compile_model(_config(tmp), calibration=_calib(), loaded=_loaded(), progress=False).output


def test_materialize_refuses_a_source_with_other_weights(source, tmp_path):
    folder, run = _copies(source, tmp_path)
    # the recorded weights in another precision are the same model
    model, _, _ = materialize(str(run), None, str(tmp_path / "bf16"), step=1, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    tiny_model("llama-gqa", seed=7, num_hidden_layers=4).save_pretrained(folder)  # re-saved: same shapes
    with pytest.raises(GispError, match=r"materialize: the model '.*dense' has the shapes of the one this run "
                                        r"pruned but other weights"):
        materialize(str(run), None, str(tmp_path / "m"), step=1)
    assert not (tmp_path / "m").exists()


def test_config_with_fewer_layers_than_the_checkpoint_is_refused(tiny_folder):
    folder = Path(tiny_folder())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GispError, match=r"holds 9 weight tensor\(s\) its config.json has no place for: "
                                        r"model.layers.2"):
        load_model(str(folder))


def test_empty_protect_is_an_error(tiny_folder, tmp_path, capsys):
    folder = tiny_folder()
    for empty in ("", " , "):
        _cli_error(capsys, ["compile", folder, "--sparsity", "0.3", "--method", "magnitude", "--protect", empty,
                            "--output", str(tmp_path / "o")], f"--protect: got '{empty}', an empty list")
    with pytest.raises(GispError, match="--protect: got '', an empty list"):
        parse_protect("", 4)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # a compile
def test_report_lists_protected_layers_and_measures_at_the_run_seq_len(tmp_path):
    result = compile_model(_config(tmp_path, protect="0,3", sparsity=0.2, seq_len=16), calibration=_calib(),
                           loaded=_loaded(), progress=False)
    assert result.report["perplexity"]["seq_len"] == 16  # the run's --seq-len, not a fixed 128
    report = (result.output / "report.md").read_text()
    assert "Protected layers (never pruned): 0, 3 (--protect 0,3)" in report
    assert json.loads((result.output / "report.json").read_text())["protected_layers"] == [0, 3]


def test_calibration_longer_than_the_model_positions_is_refused(tmp_path):
    loaded = LoadedModel(tiny_model("gpt2", n_positions=32), tiny_tokenizer(), "tiny")
    with pytest.raises(GispError, match=r"--seq-len 64: the model has 32 positions .*pass --seq-len 32 or less"):
        compile_model(_config(tmp_path, seq_len=64, calib_samples=4), loaded=loaded, progress=False)
    assert _files(tmp_path) == []


def test_report_perplexity_uses_the_run_seq_len_within_the_model_limit(tmp_path, capsys):
    loaded = LoadedModel(tiny_model("gpt2", n_positions=64), tiny_tokenizer(), "tiny")
    cfg = CompileConfig(model="tiny", sparsity=0.3, output=str(tmp_path / "o"), method="magnitude", protect="none",
                        eval_windows=2)  # --seq-len left at 128, beyond the model's 64 positions
    result = compile_model(cfg, loaded=loaded, progress=False)
    assert result.report["perplexity"]["seq_len"] == 64
    assert "max_position_embeddings 64; using 64-token windows" in capsys.readouterr().err


def test_eval_windows_beyond_the_model_positions_are_clamped(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    tiny_model("gpt2", n_positions=64).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    capsys.readouterr()
    assert main(["eval", str(folder), "--windows", "2", "--seq-len", "128", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)[0]["extra"]["seq_len"] == 64 and "using 64-token windows" in out.err


# 3: tracebacks --------------------------------------------------------------------------------------------------
def test_tokenizer_beyond_the_model_vocabulary(tmp_path, capsys):
    folder = tmp_path / "small-vocab"
    tiny_model("llama-gqa", vocab_size=64).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)  # 96 tokens
    with pytest.raises(GispError, match=r"tokenizer has 96 tokens \(ids up to 95\) but the model's embedding has 64"):
        load_model(str(folder))
    _cli_error(capsys, ["eval", str(folder), "--windows", "2"], "embedding has 64 rows")
    loaded = LoadedModel(tiny_model("llama-gqa", vocab_size=64), tiny_tokenizer(), "tiny")
    with pytest.raises(GispError, match=r"model 'tiny': its tokenizer has 96 tokens"):
        compile_model(_config(tmp_path, "o"), calibration=_calib(), loaded=loaded, progress=False)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    from gisp_fx.evaluate import wikitext2_perplexity

    # WikiText-2 through the tiny word-level tokenizer is mostly <unk> (id 3): a 3-row embedding has no row for it
    with pytest.raises(GispError, match=r"WikiText-2 windows: token id 3 is beyond the model's vocabulary of 3"):
        wikitext2_perplexity(tiny_model("llama-gqa", vocab_size=3), tiny_tokenizer(), 16, 2, progress=False)


@pytest.mark.slow  # a traced export
def test_fused_export_with_an_unsupported_head_size(tmp_path, capsys):
    from gisp_fx.exporters.export import export_model

    loaded = LoadedModel(tiny_model("llama-gqa", head_dim=12), tiny_tokenizer(), "tiny")
    with pytest.raises(GispError, match=r"--graph fused: head size 12 .* multiple of 16.*--graph traced"):
        export_model(loaded, tmp_path / "fused", with_past=True, graph="fused")
    assert not (tmp_path / "fused").exists()
    result = export_model(loaded, tmp_path / "auto", with_past=True)  # the default picks the traced graph
    assert json.loads((result.path / "gisp_onnx.json").read_text())["graph"] == "traced"
    assert "head size 12" in capsys.readouterr().out


@pytest.mark.parametrize("command", [pytest.param("compile", marks=pytest.mark.slow), "eval", "materialize"])
def test_ctrl_c_is_one_line_and_exit_130(source, tmp_path, capsys, monkeypatch, command):
    import gisp_fx.compile
    import gisp_fx.rebuild
    import gisp_fx.tasks

    folder, run = source
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == (2 if command == "compile" else 1):  # compile: the pruned perplexity, after the step
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    # patched where the command calls it
    module, name = {"compile": (gisp_fx.compile, "wikitext2_perplexity"), "eval": (gisp_fx.tasks, "evaluate"),
                    "materialize": (gisp_fx.rebuild, "save_pruned")}[command]
    real = getattr(module, name)
    monkeypatch.setattr(module, name, interrupt)
    argv = {"compile": ["compile", str(folder), "--sparsity", "0.3", *MAGNITUDE, "--output", str(tmp_path / "o")],
            "eval": ["eval", str(folder), "--windows", "2"],
            "materialize": ["materialize", str(run), "--step", "1", "--output", str(tmp_path / "m")]}[command]
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"gisp-fx {command}: interrupted; "), err
    if command == "compile":
        assert "resume with the same command and --resume" in line
        assert main([*argv, "--resume"]) == 0 and (tmp_path / "o" / "report.md").is_file()
    else:
        assert "nothing was written" in line and not (tmp_path / "m").exists()


@pytest.mark.parametrize("call, message", [
    (lambda: load_model(123), r"load_model: argument 'spec' must be str or PathLike, got int"),
    (lambda: load_model("x", dtype="float32"), r"load_model: argument 'dtype' must be dtype, got str"),
    (lambda: compile_model("tiny"), r"compile_model: argument 'config' must be CompileConfig, got str"),
    (lambda: materialize(123, 0.3, "out"), r"materialize: argument 'run_dir' must be str or Path, got int"),
    (lambda: materialize("run", "0.3", "out"), r"materialize: argument 'sparsity' must be float or int or None"),
    (lambda: _export(123, "out"), r"export_model: argument 'loaded' must be LoadedModel, got int"),
    (lambda: _evaluate("wikitext2"), r"evaluate: argument 'tasks' must be list or tuple, got str"),
])
def test_public_entry_points_check_argument_types(tmp_path, call, message):
    with pytest.raises(GispError, match=message):
        call()


def _export(loaded, output):
    from gisp_fx.exporters.export import export_model

    return export_model(loaded, output)


def _evaluate(tasks):
    from gisp_fx.tasks import evaluate

    return evaluate(tiny_model("llama-gqa"), tiny_tokenizer(), tasks, windows=2)


# 4: misleading messages -----------------------------------------------------------------------------------------
def test_random_bytes_in_the_weights_say_corrupt(tiny_folder, capsys):
    weights = Path(tiny_folder()) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header:] = os.urandom(len(data) - 8 - header)  # a valid header over random tensor bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(GispError, match=r"holds NaN or infinite values; the weights file is corrupt"):
        load_model(str(weights.parent))
    last = _cli_error(capsys, ["eval", str(weights.parent), "--windows", "2"], "corrupt")
    assert "chunked loss" not in last


def test_missing_tokenizer_files_are_named(tiny_folder, capsys):
    folder = Path(tiny_folder())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    _cli_error(capsys, ["eval", str(folder), "--windows", "2"],
               "missing tokenizer_config.json, a vocabulary file (tokenizer.json")


def test_missing_model_onnx_is_named(tmp_path, capsys):
    from gisp_fx.exporters.export import export_model

    result = export_model(LoadedModel(tiny_model("llama-gqa"), tiny_tokenizer(), "tiny"), tmp_path / "e",
                          with_past=True)
    (result.path / "model.onnx").unlink()
    for argv in (["eval", str(result.path), "--windows", "2"],
                 ["bench", str(result.path), "--engines", "ort", "--repeats", "1"]):
        last = _cli_error(capsys, argv, "model.onnx is missing", "export it again")
        assert "safetensors" not in last
