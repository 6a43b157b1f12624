"""Bundled calibration texts by name (--calib wikitext2|gsm8k, recover --data): GSM8K's train split, question +
worked answer, BOS-aware windows, never the evaluated test split."""

from __future__ import annotations

import pytest
import transformers

from conftest import tiny_model
from gisp_fx.calibration import build_calibration
from gisp_fx.compile import compile_model
from gisp_fx.config import CompileConfig
from gisp_fx.datasets import TEXT_SOURCES, gsm8k_rows, gsm8k_train_text, named_text, wikitext2_train_text
from gisp_fx.errors import GispError
from gisp_fx.loading import LoadedModel
from gisp_fx.recover_run import recovery_text
from gisp_fx.tasks import gsm8k_prompt, gsm8k_shots


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def gsm8k_tokenizer():
    """A word-level tokenizer over every word of GSM8K (train and test), so that a window's tokens are its words
    exactly; `<s>` is put before every encoded text, as Llama's tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for split in ("train", "test"):
        for row in gsm8k_rows(split):
            for w in (row["question"] + " " + row["answer"] + " Question: Answer:").split():
                vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def test_gsm8k_train_and_test_share_no_question():
    train, test = gsm8k_rows("train"), gsm8k_rows("test")
    assert (len(train), len(test)) == (7473, 1319)
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in test})
    assert {words(r["question"]) for r in train}.isdisjoint({words(r["question"]) for r in test})
    assert all(r["answer"].rsplit("#### ", 1)[1].replace(",", "").strip() == r["final_answer"] for r in train)


def test_gsm8k_calibration_is_train_question_plus_answer_in_bos_windows(gsm8k_tokenizer):
    text = gsm8k_train_text()
    first = gsm8k_rows("train")[0]
    assert text.startswith(f"Question: {first['question']}\nAnswer: {first['answer']}\n\nQuestion: ")
    config = CompileConfig(model="unused", sparsity=0.3, output="unused", calib="gsm8k", calib_samples=24, seq_len=64)
    calib = build_calibration(config, gsm8k_tokenizer)
    ids = calib.input_ids
    assert ids.shape == (24, 64) and (ids[:, 0] == 1).all() and (ids[:, 1:] > 3).all()  # BOS, then known words
    body, test_questions = words(text), [words(r["question"]) for r in gsm8k_rows("test")]
    for window in ids:
        decoded = " ".join(gsm8k_tokenizer.convert_ids_to_tokens(window[1:].tolist()))
        assert decoded in body  # a run of the train text, in order
        assert not any(q in decoded or decoded in q for q in test_questions)  # never from the test split
    again = build_calibration(config, gsm8k_tokenizer).input_ids
    assert (again == ids).all()  # seeded
    other = build_calibration(CompileConfig(model="unused", sparsity=0.3, output="unused", calib="wikitext2",
                                            calib_samples=24, seq_len=64),
                              gsm8k_tokenizer).input_ids
    assert not (other == ids).all()


def test_named_texts_reach_compile_recover_and_the_gsm8k_shots_come_from_train(tmp_path):
    assert named_text("wikitext2")[0] == wikitext2_train_text() and named_text("c4") is None
    assert set(TEXT_SOURCES) == {"wikitext2", "gsm8k"}
    text, source = recovery_text("gsm8k")
    assert text == gsm8k_train_text() and "GSM8K train" in source
    with pytest.raises(GispError, match=r"--calib: no such file 'gsm8k8'.*\(wikitext2, gsm8k\)"):
        build_calibration(CompileConfig(model="unused", sparsity=0.3, output="unused", calib="gsm8k8"), None)
    train_questions = {r["question"] for r in gsm8k_rows("train")}
    shots = gsm8k_shots()
    assert len(shots) == 5 and all(s["question"] in train_questions for s in shots)
    prompt = gsm8k_prompt(shots, "How many?")
    assert prompt.endswith("\n\nQuestion: How many?\nAnswer:") and shots[0]["answer"] in prompt
    # a compile records the named source and runs on it (a tiny model: the text reaches the scoring pass)
    from conftest import tiny_tokenizer

    loaded = LoadedModel(tiny_model("llama-gqa"), tiny_tokenizer(), "tiny")
    config = CompileConfig(model="tiny", sparsity=0.2, steps=1, protect="none", calib="gsm8k", calib_samples=4,
                           seq_len=32, eval_windows=2, output=str(tmp_path / "out"))
    result = compile_model(config, loaded=loaded, progress=False)
    params = result.report["params"]
    assert result.report["config"]["calib"] == "gsm8k" and params["after"] < params["before"]
