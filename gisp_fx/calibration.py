"""Calibration builders: token windows of text (the ppl objective), multiple-choice sequences (the margin
objective) and a user's own loss (custom), each a calibration object `prune_` and the passes accept."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gisp_fx import datasets
from gisp_fx.config import CompileConfig
from gisp_fx.errors import GispError
from gisp_fx.passes.importance import Calibration, CustomCalibration, LmCalibration, MarginCalibration, McSequence


def lm_windows(tokenizer, text: str | None = None, *, windows: int = 64, seq_len: int = 128, seed: int = 0,
               bos: str = "auto", batch_size: int = 8, source: str | None = None) -> LmCalibration:
    """`windows` distinct non-overlapping windows of `seq_len` tokens drawn from `text` with `seed` (default text:
    the bundled WikiText-2 train split), each starting with BOS as `bos` says (auto | always | never)."""
    if text is None:
        text, source = datasets.wikitext2_train_text(), source or "the bundled WikiText-2 train text"
    if not isinstance(text, str):
        raise GispError(f"lm_windows: text must be a str (or None for the bundled WikiText-2 train text), got "
                        f"{type(text).__name__}")
    for name, value in (("windows", windows), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise GispError(f"lm_windows: {name} must be a positive int, got {value!r}")
    ids = datasets.lm_windows(tokenizer, text, windows, seq_len, seed, source or "the given text",
                              datasets.window_bos(tokenizer, bos))
    return LmCalibration(ids, batch_size)


def mc_sequences(tokenizer, tasks: Sequence[str], questions: int, *, seq_len: int = 128, seed: int = 0,
                 bos: str = "auto", batch_size: int = 8) -> MarginCalibration:
    """The margin objective's calibration: `questions` questions drawn evenly across the tasks' training splits,
    one sequence per option, each starting with BOS as `bos` says (the prompt is kept, the oldest context tokens
    go when it is too long)."""
    if not tasks:
        raise GispError("margin calibration needs at least one task (e.g. arc_easy,arc_challenge)")
    start = datasets.window_bos(tokenizer, bos)
    per_task = {t: datasets.mc_train_items(t) for t in tasks}
    rng = random.Random(seed)
    share = [questions // len(per_task) + (i < questions % len(per_task)) for i in range(len(per_task))]
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
                head = [start] if start is not None else []
                whole = head + whole[-(seq_len - len(head)):]
                sequences.append(McSequence(tuple(whole), min(option, len(whole) - 1), i == item.label))
    return MarginCalibration(tuple(sequences), tokenizer.pad_token_id, batch_size)


def custom_objective(batches: Sequence[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                     sizes: Sequence[int] | None = None) -> CustomCalibration:
    """A user objective: `loss_fn(model, batch)` returns the batch-mean loss whose gradients score the groups;
    `sizes` weight the batches (default 1 each)."""
    if not callable(loss_fn):
        raise GispError(f"custom_objective: loss_fn must be callable (model, batch) -> loss, got "
                        f"{type(loss_fn).__name__}")
    batches = list(batches)
    sizes = [1] * len(batches) if sizes is None else list(sizes)
    if not batches or len(sizes) != len(batches):
        raise GispError(f"custom_objective: need at least one batch and one size per batch, got {len(batches)} "
                        f"batches and {len(sizes)} sizes")
    return CustomCalibration(batches, sizes, loss_fn)


def as_calibration(calibration) -> Calibration:
    """A calibration object as given, or a LongTensor of token-id windows [batch, seq] as LM windows."""
    if isinstance(calibration, (LmCalibration, MarginCalibration, CustomCalibration)):
        return calibration
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32) or calibration.shape[1] < 2:
            raise GispError(f"calibration: a tensor must hold token ids [windows, seq_len >= 2] (int64), got "
                            f"{calibration.dtype} of shape {tuple(calibration.shape)}")
        return LmCalibration(calibration.long())
    raise GispError(f"calibration: expected token-id windows (a LongTensor [windows, seq]) or an object from "
                    f"lm_windows / mc_sequences / custom_objective, got {type(calibration).__name__}")


def build_calibration(config: CompileConfig, tokenizer, windows: int | None = None) -> Calibration:
    """The calibration a compile's settings name: the margin questions of --tasks, or windows of --calib's text: a
    file, or a bundled text by name (wikitext2, the default; gsm8k: its train split, question + worked answer).
    `windows` of them (sequences, for margin): the compile's --calib-samples unless given (the repair's count)."""
    count = config.calib_samples if windows is None else windows
    if config.objective == "margin":
        return mc_sequences(tokenizer, config.tasks, count, seq_len=config.seq_len, seed=config.seed,
                            bos=config.bos, batch_size=config.batch_size)
    named = datasets.named_text(config.calib or "wikitext2")
    if named is not None:
        text, source = named
        return lm_windows(tokenizer, text, windows=count, seq_len=config.seq_len, seed=config.seed,
                          bos=config.bos, batch_size=config.batch_size, source=source)
    path = Path(config.calib)
    if not path.is_file():
        raise GispError(f"--calib: no such file '{path}'; give a UTF-8 text file or a bundled text "
                        f"({', '.join(datasets.TEXT_SOURCES)})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GispError(f"--calib: '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}); give a plain "
                        "UTF-8 text file (convert it with e.g. `iconv -t utf-8`)") from exc
    return lm_windows(tokenizer, text, windows=count, seq_len=config.seq_len, seed=config.seed,
                      bos=config.bos, batch_size=config.batch_size, source=f"calibration file '{path}'")
