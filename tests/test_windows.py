"""BOS-aware calibration and evaluation windows: every window starts with BOS where the tokenizer adds one."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from gisp_fx.config import CompileConfig
from gisp_fx.datasets import lm_windows, token_windows, window_bos
from gisp_fx.errors import GispError
from gisp_fx.evaluate import wikitext2_perplexity, window_ids
from gisp_fx.loading import LoadedModel
from gisp_fx.calibration import build_calibration
from gisp_fx.compile import compile_model

TEXT = " ".join(f"w{4 + (i * 7) % 90}" for i in range(400))


def test_window_bos_follows_the_tokenizer():
    with_bos, without = tiny_tokenizer(adds_bos=True), tiny_tokenizer()
    assert with_bos("w5").input_ids == [1, 5] and without("w5").input_ids == [5]
    assert window_bos(with_bos, "auto") == 1 and window_bos(without, "auto") is None
    assert window_bos(with_bos, "never") is None and window_bos(without, "always") == 1
    with pytest.raises(GispError, match="--bos must be one of"):
        window_bos(without, "sometimes")


def test_every_window_starts_with_bos_and_carries_seq_len_minus_one_text_tokens():
    tok = tiny_tokenizer(adds_bos=True)
    text_ids = tok(TEXT, add_special_tokens=False).input_ids
    windows = token_windows(tok, TEXT, 16, window_bos(tok, "auto"))
    assert windows.shape == (len(text_ids) // 15, 16)
    assert (windows[:, 0] == 1).all()
    assert windows[:, 1:].reshape(-1).tolist() == text_ids[: len(windows) * 15]  # the text, in order, nothing lost
    # never: the papers' protocol, one stream (the tokenizer's single BOS first) cut into windows
    stream = token_windows(tok, TEXT, 16, window_bos(tok, "never"))
    assert stream[0, 0] == 1 and (stream[1:, 0] != 1).all()
    assert stream.reshape(-1).tolist() == ([1] + text_ids)[: stream.numel()]


def test_a_tokenizer_without_bos_is_unchanged():
    tok = tiny_tokenizer()
    auto, never = token_windows(tok, TEXT, 16, window_bos(tok, "auto")), token_windows(tok, TEXT, 16, None)
    assert torch.equal(auto, never)
    assert auto.reshape(-1).tolist() == tok(TEXT).input_ids[: auto.numel()]
    picked = lm_windows(tok, TEXT, 5, 16, seed=0, source="text", bos=window_bos(tok, "auto"))
    assert all(any(torch.equal(row, w) for w in auto) for row in picked)


def test_wikitext2_windows_and_perplexity_record_bos():
    tok = tiny_tokenizer(adds_bos=True)
    ids = window_ids(tok, 32, window_bos(tok, "auto"))
    assert (ids[:, 0] == 1).all()
    model = tiny_model("llama-gqa")
    on = wikitext2_perplexity(model, tok, 32, windows=4, progress=False, bos="auto")
    off = wikitext2_perplexity(model, tok, 32, windows=4, progress=False, bos="never")
    assert on.bos and not off.bos and on.ppl != off.ppl
    with pytest.raises(GispError, match="--batch-size must be at least 1"):
        wikitext2_perplexity(model, tok, 32, windows=4, batch_size=-1, progress=False)
    with pytest.raises(GispError, match="--seq-len must be at least 2"):
        wikitext2_perplexity(model, tok, 1, windows=4, progress=False)


@pytest.mark.parametrize("bos", ["auto", "never"])
def test_compile_calibrates_with_bos_and_records_the_choice(tmp_path, bos):
    tok = tiny_tokenizer(adds_bos=True)
    config = CompileConfig(model="tiny", sparsity=0.3, output=str(tmp_path / bos), steps=1, protect="none",
                           eval_windows=2, calib_samples=4, seq_len=16, bos=bos)
    calib = build_calibration(config, tok)
    assert bool((calib.input_ids[:, 0] == 1).all()) == (bos == "auto")
    result = compile_model(config, loaded=LoadedModel(tiny_model("llama-gqa"), tok, "tiny"), progress=False)
    report = json.loads((result.output / "report.json").read_text())
    assert report["config"]["bos"] == bos
    assert report["perplexity"]["bos"] == {"mode": bos, "window_starts_with_bos": bos == "auto"}


def test_margin_sequences_start_with_bos():
    tok = tiny_tokenizer(adds_bos=True)
    config = CompileConfig(model="tiny", sparsity=0.3, output="unused", objective="margin", tasks=("arc_easy",),
                           calib_samples=3, seq_len=24)
    calib = build_calibration(config, tok)
    assert all(s.input_ids[0] == 1 and len(s.input_ids) <= 24 for s in calib.sequences)
    never = build_calibration(CompileConfig(**{**config.to_json(), "tasks": ("arc_easy",), "bos": "never"}), tok)
    assert all(s.input_ids[0] != 1 for s in never.sequences)
