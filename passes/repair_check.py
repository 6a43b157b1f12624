"""Whether a calibration set can serve a repair, said before the work: an lsq fit needs at least as many tokens as
its widest consumer has input features (else the Gram matrix is singular), and gets a printed note under THIN_FIT
tokens per feature, where it fits the calibration text rather than the model."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from gisp_fx.errors import GispError
from gisp_fx.passes.importance import LmCalibration
from gisp_fx.plan import Axis, GroupPlan

if TYPE_CHECKING:
    from gisp_fx.passes.repair import RepairSettings


def min_tokens(plan: GroupPlan) -> int:
    """Calibration tokens an lsq fit needs: at least the widest consumer's input features (else G is singular)."""
    widths = [plan.linear(m.module).in_features for layer in plan.layers
              for members in ((layer.attention.query if layer.attention else ()), (layer.mlp.members if layer.mlp else ()))
              for m in members if m.axis is Axis.COLS]
    return max(widths, default=0)


# lsq on fewer tokens than THIN_FIT x the widest consumer's inputs fitted the calibration and not the test text: on
# Qwen2.5-Coder-1.5B at 30 % (8,960-wide down_projs) lsq on 64 windows (8,192 tokens) took WikiText-2 perplexity from
# 48.92 to 63.48, on 256 windows (32,768 tokens) to 40.92 (docs/results.md#qwen25-coder-15b); SmolLM2 (1,536) on 64
# windows gains.
THIN_FIT = 4


def fit_windows(plan: GroupPlan, seq_len: int) -> int:
    """Windows of `seq_len` tokens that give an lsq fit THIN_FIT tokens per input feature of the widest consumer
    (lsq's and block's least default, CompileConfig.repair_windows_for)."""
    return -(-THIN_FIT * min_tokens(plan) // seq_len)


def thin_fit_note(plan: GroupPlan, calib, settings: RepairSettings) -> str | None:
    """A note when an lsq fit has fewer than THIN_FIT tokens per input feature of the widest consumer, else None."""
    if not settings.fits or not isinstance(calib, LmCalibration):
        return None
    tokens, need = int(calib.input_ids.numel()), min_tokens(plan)
    if tokens >= THIN_FIT * need:
        return None
    n, L = calib.input_ids.shape
    return (f"note: --repair {settings.mode} fits on {tokens:,} tokens ({n} windows of {L}), fewer than {THIN_FIT}x the "
            f"{need:,} input features of the widest consumer linear; such fits can match the calibration text and "
            f"not the rest: {fit_windows(plan, L)} or more windows (--repair-samples, or leave it out) are safer")


def check_calibration(plan: GroupPlan, calib, settings: RepairSettings) -> None:
    """One GispError when the calibration cannot serve the repair: not language-model windows, or (lsq) fewer
    calibration tokens than the widest consumer has input features; a printed note when the lsq fit is thin."""
    if settings.mode == "none":
        return
    if not isinstance(calib, LmCalibration):
        raise GispError(f"--repair {settings.mode} fits on language-model calibration windows (the ppl objective), "
                        f"got {type(calib).__name__}; use --objective ppl or --repair none")
    tokens, need = int(calib.input_ids.numel()), min_tokens(plan)
    if settings.fits and tokens < need:
        n, L = calib.input_ids.shape
        raise GispError(f"--repair {settings.mode}: the calibration set has {tokens:,} tokens ({n} x {L}), fewer than the "
                        f"{need:,} input features of the widest consumer linear, so its Gram matrix is singular and "
                        "the fit is ill-posed; give more windows (--repair-samples; left out, the fit takes enough) "
                        "or use --repair bias")
    note = thin_fit_note(plan, calib, settings)
    if note:
        print(note, file=sys.stderr)
