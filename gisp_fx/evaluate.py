"""(model, tokenizer) -> WikiText-2 perplexity: non-overlapping windows of the test split, batched."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from gisp_fx.datasets import token_windows, wikitext2_test_text, window_bos
from gisp_fx.errors import GispError
from gisp_fx.preflight import check_ids, fit_positions


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    windows: int  # windows evaluated
    total_windows: int  # windows in the split
    seq_len: int
    bos: bool = False  # every window started with the BOS token

    @property
    def subset(self) -> str:
        return "all" if self.windows == self.total_windows else f"{self.windows} of {self.total_windows}"


def window_ids(tokenizer, seq_len: int, bos: int | None = None) -> torch.Tensor:
    return token_windows(tokenizer, wikitext2_test_text(), seq_len, bos)


def evenly_spaced(total: int, count: int | None) -> np.ndarray:
    """`count` window indices spread evenly over `total` (all of them when count is None or too large)."""
    if count is None or count >= total:
        return np.arange(total)
    if count <= 0:
        raise GispError(f"perplexity: the number of windows must be positive, got {count}")
    return np.unique(np.linspace(0, total - 1, count).round().astype(np.int64))


def check_eval_settings(seq_len: int, batch_size: int) -> None:
    """Window length and batch size of an evaluation: a next-token loss needs 2 tokens, a batch 1 sequence."""
    if seq_len < 2:
        raise GispError(f"--seq-len must be at least 2 tokens (one to predict from, one to predict), got {seq_len}")
    if batch_size < 1:
        raise GispError(f"--batch-size must be at least 1, got {batch_size}")


def wikitext2_perplexity(model, tokenizer, seq_len: int = 128, windows: int | None = None, batch_size: int = 16,
                         progress: bool = True, desc: str = "wikitext2 ppl", bos: str = "auto") -> Perplexity:
    """exp(mean over windows of the mean next-token NLL): the protocol of the GISP / Wanda / SparseGPT papers, with
    every window starting with BOS where the tokenizer adds one (`bos`: see datasets.window_bos)."""
    check_eval_settings(seq_len, batch_size)
    seq_len = fit_positions(model, seq_len)  # never past the model's positions: clamped, with a note
    start = window_bos(tokenizer, bos)
    all_windows = window_ids(tokenizer, seq_len, start)
    pick = evenly_spaced(len(all_windows), windows)
    data = all_windows[torch.from_numpy(pick)]
    check_ids(model, data, "WikiText-2 windows")
    device = model.device  # an HF model, or the onnxruntime runner (exporters/ort.py)
    from gisp_fx.passes.lm_loss import check_head_, token_nll

    nll_sum = 0.0
    model.eval()
    if isinstance(model, torch.nn.Module):  # the head in chunks: never the whole batch's full-vocabulary logits
        check_head_(model, data[:1].to(device))
    with torch.inference_mode():
        for i in tqdm(range(0, len(data), batch_size), desc=desc, leave=False, disable=not progress, unit="batch"):
            x = data[i : i + batch_size].to(device)
            nll_sum += token_nll(model, x).mean(1).sum().item()
    return Perplexity(math.exp(nll_sum / len(data)), len(data), len(all_windows), seq_len, start is not None)
