"""Bundled data (checksummed) -> token tensors: LM calibration windows, WikiText-2 test text, MC items."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from gisp_fx.errors import GispError

DATA_DIR = Path(__file__).parent / "data"


@lru_cache(maxsize=None)
def _checksums() -> dict[str, str]:
    sums = {}
    for line in (DATA_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.removeprefix("./")] = digest
    return sums


@lru_cache(maxsize=None)
def data_file(relative: str) -> Path:
    """Path of a bundled data file after checking it against SHA256SUMS."""
    path = DATA_DIR / relative
    expected = _checksums().get(relative)
    if expected is None or not path.is_file():
        raise GispError(f"data: bundled file '{relative}' is missing from {DATA_DIR}; reinstall gisp-fx")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise GispError(f"data: '{path}' fails its checksum (sha256 {digest[:12]}..., expected {expected[:12]}...); "
                        "the file was changed or damaged: reinstall gisp-fx or restore it with git")
    return path


def wikitext2_test_text() -> str:
    """The Hugging Face wikitext-2-raw-v1 test split joined with blank lines, as pruning papers evaluate it."""
    rows = [json.loads(line)["text"] for line in data_file("wikitext2/wiki.test.hf_rows.jsonl").open()]
    return "\n\n".join(rows)


def wikitext2_train_text() -> str:
    """The bundled 1 MB prefix of WikiText-2 train, its cut-off last line dropped."""
    text = data_file("wikitext2/wiki.train.raw.head1M.txt").read_text(encoding="utf-8")
    return text[: text.rstrip("\n").rfind("\n") + 1]


def gsm8k_rows(split: str) -> list[dict]:
    """The bundled GSM8K rows of `split` (train | test): id, question, answer (worked, ending in '#### N'),
    final_answer."""
    if split not in ("train", "test"):
        raise GispError(f"gsm8k: split must be train or test, got '{split}'")
    with data_file(f"gsm8k/{split}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def gsm8k_example(row: dict) -> str:
    """One GSM8K row as lm-evaluation-harness's gsm8k prompt writes a solved example."""
    return f"Question: {row['question']}\nAnswer: {row['answer']}"


def gsm8k_train_text() -> str:
    """GSM8K's train split as one text: every question with its worked answer, separated by blank lines (the test
    split, which is evaluated, is never part of it)."""
    return "\n\n".join(gsm8k_example(row) for row in gsm8k_rows("train"))


# bundled texts a calibration (--calib) or a recovery (--data) can name instead of a file: name -> (loader, what)
TEXT_SOURCES = {
    "wikitext2": (wikitext2_train_text, "WikiText-2 train (bundled 1 MB prefix; the test split is evaluated)"),
    "gsm8k": (gsm8k_train_text,
              "GSM8K train, question + worked answer (bundled, 7,473 problems; the test split is evaluated)"),
}


def named_text(name: str) -> tuple[str, str] | None:
    """(text, description) of a bundled text source, or None when `name` names none."""
    if name not in TEXT_SOURCES:
        return None
    loader, what = TEXT_SOURCES[name]
    return loader(), what


BOS_MODES = ("auto", "always", "never")


def window_bos(tokenizer, mode: str) -> int | None:
    """The token every window starts with, or None.

    auto: the BOS token when the tokenizer adds one to a plain encode (Llama-2/3, Mistral, Gemma), nothing otherwise
    (SmolLM2, GPT-2, Qwen); always: the BOS token in every case; never: the papers' protocol, one token stream cut
    into windows, so only the first window starts with whatever the tokenizer put first.
    """
    if mode not in BOS_MODES:
        raise GispError(f"--bos must be one of {', '.join(BOS_MODES)}, got '{mode}'")
    bos = tokenizer.bos_token_id
    if mode == "never":
        return None
    if mode == "always":
        if bos is None:
            raise GispError("--bos always: this tokenizer has no BOS token; use --bos auto or never")
        return bos
    first = tokenizer("a").input_ids[:1]
    return bos if bos is not None and first == [bos] else None


def token_windows(tokenizer, text: str, seq_len: int, bos: int | None) -> torch.Tensor:
    """Every non-overlapping window of `text` as LongTensor [n, seq_len]: BOS + seq_len - 1 text tokens each when
    `bos` is given (as lm-evaluation-harness's rolling windows start), else seq_len tokens of one stream."""
    if bos is None:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        n = ids.numel() // seq_len
        return ids[: n * seq_len].view(n, seq_len)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // (seq_len - 1)
    body = ids[: n * (seq_len - 1)].view(n, seq_len - 1)
    return torch.cat([torch.full((n, 1), bos, dtype=body.dtype), body], dim=1)


def lm_windows(tokenizer, text: str, n: int, seq_len: int, seed: int, source: str,
               bos: int | None = None) -> torch.Tensor:
    """`n` distinct non-overlapping `seq_len`-token windows of `text`, drawn with `seed`: LongTensor [n, seq_len]."""
    if n <= 0 or seq_len <= 1:
        raise GispError(f"calibration: need at least 1 sample of at least 2 tokens, got {n} x {seq_len}")
    windows = token_windows(tokenizer, text, seq_len, bos)
    available = len(windows)
    if available < n:
        raise GispError(
            f"calibration: {source} has {available} windows of {seq_len} tokens; "
            f"{n} were requested. Give fewer --calib-samples, a shorter --seq-len, or a longer --calib file"
        )
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(available, generator=gen)[:n].sort().values
    return windows[pick]


# -- multiple choice: prompt formats of lm-evaluation-harness's tasks ------------------------------------------
@dataclass(frozen=True)
class McItem:
    """One question: per option, the context and the continuation whose log-likelihood is scored."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int


def _arc(row) -> McItem:
    ctx = f"Question: {row['question']}\nAnswer:"
    return McItem((ctx,) * len(row["choices"]), tuple(" " + c for c in row["choices"]), row["label"])


def _openbookqa(row) -> McItem:
    return McItem((row["question"],) * len(row["choices"]), tuple(" " + c for c in row["choices"]), row["label"])


def _winogrande(row) -> McItem:
    # lm-eval "partial evaluation": the option fills the blank in the context, the rest is the scored continuation
    sentence = row["question"]
    cut = sentence.index("_")
    continuation = " " + sentence[cut + 1 :].strip()
    contexts = tuple(sentence[:cut] + option for option in row["choices"])
    return McItem(contexts, (continuation,) * len(contexts), row["label"])


def _piqa(row) -> McItem:
    ctx = f"Question: {row['question']}\nAnswer:"
    return McItem((ctx,) * len(row["choices"]), tuple(" " + c for c in row["choices"]), row["label"])


def _boolq(row) -> McItem:
    ctx = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return McItem((ctx, ctx), (" no", " yes"), row["label"])


def _hellaswag(row) -> McItem:
    return McItem((row["question"],) * len(row["choices"]), tuple(" " + c for c in row["choices"]), row["label"])


# task -> (formatter, bundled training file or None)
MC_TASKS = {
    "arc_easy": (_arc, "arc_easy/train.jsonl"),
    "arc_challenge": (_arc, "arc_challenge/train.jsonl"),
    "openbookqa": (_openbookqa, "openbookqa/train.jsonl"),
    "winogrande": (_winogrande, "winogrande/train_m.jsonl"),
    "piqa": (_piqa, None),
    "boolq": (_boolq, None),
    "hellaswag": (_hellaswag, None),
}


def mc_train_items(task: str) -> list[McItem]:
    """The training split of a multiple-choice task, formatted; only tasks with a bundled training split."""
    if task not in MC_TASKS:
        raise GispError(f"tasks: unknown task '{task}'; known multiple-choice tasks: {', '.join(MC_TASKS)}")
    fmt, train = MC_TASKS[task]
    if train is None:
        have = [t for t, (_, f) in MC_TASKS.items() if f]
        raise GispError(f"tasks: '{task}' has no bundled training split to calibrate on (its public train file "
                        f"could not be obtained offline); calibrate with: {', '.join(have)}")
    return [fmt(json.loads(line)) for line in data_file(train).open(encoding="utf-8")]
