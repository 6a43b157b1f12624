"""(model, tokenizer, task) -> accuracy: log-likelihood multiple choice and GSM8K, lm-evaluation-harness style.

Multiple choice: every option's continuation is scored by the sum of its token log-probabilities given the
context; `acc` takes the argmax, `acc_norm` the argmax of that sum divided by the choice's length in characters,
without the space before it (lm-eval's length normalisation). Prompts are lm-eval's (see datasets.MC_TASKS).
GSM8K: greedy generation after lm-eval's 5-shot prompt (the shots from the train split), exact match of the final
number.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from gisp_fx.datasets import MC_TASKS, McItem, data_file, gsm8k_example, gsm8k_rows
from gisp_fx.errors import GispError
from gisp_fx.evaluate import check_eval_settings
from gisp_fx.exporters.ort import OrtCausalLM
from gisp_fx.preflight import require_types

# task -> bundled evaluation split (lm-eval evaluates these: ARC/OpenBookQA test, the others validation)
EVAL_SPLITS = {
    "boolq": "boolq/validation.jsonl", "piqa": "piqa/validation.jsonl", "hellaswag": "hellaswag/validation.jsonl",
    "winogrande": "winogrande/validation.jsonl", "arc_easy": "arc_easy/test.jsonl",
    "arc_challenge": "arc_challenge/test.jsonl", "openbookqa": "openbookqa/test.jsonl",
}
HAS_ACC_NORM = {"piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa"}
MC_EVAL_TASKS = tuple(EVAL_SPLITS)
ALL_TASKS = ("wikitext2",) + MC_EVAL_TASKS + ("gsm8k",)


@dataclass(frozen=True)
class TaskResult:
    task: str
    metric: str  # the headline metric: acc_norm where lm-eval reports it, else acc; exact_match for GSM8K
    value: float
    n: int
    extra: dict


def headlines(results: list[TaskResult]) -> dict[str, dict]:
    """Task -> its headline metric, value and question count (what reports store)."""
    return {r.task: {"metric": r.metric, "value": r.value, "n": r.n} for r in results}


def check_tasks(tasks: list[str]) -> list[str]:
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise GispError(f"eval: unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(ALL_TASKS)}")
    if not tasks:
        raise GispError(f"eval: no task given; known tasks: {', '.join(ALL_TASKS)}")
    return tasks


def subset(n_total: int, limit: int | None, seed: int) -> list[int]:
    """A seeded subset of item indices (the same for every model evaluated with the same seed)."""
    if limit is not None and limit <= 0:
        raise GispError(f"--limit must be positive, got {limit}")
    if limit is None or limit >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), limit))


def eval_items(task: str, limit: int | None, seed: int) -> list[McItem]:
    fmt, _ = MC_TASKS[task]
    rows = [json.loads(line) for line in data_file(EVAL_SPLITS[task]).open(encoding="utf-8")]
    return [fmt(rows[i]) for i in subset(len(rows), limit, seed)]


def _encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation; tokens of the whole string."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    if not ctx:  # an empty context is conditioned on the end-of-text token, as lm-eval does
        ctx, whole = [tokenizer.eos_token_id], [tokenizer.eos_token_id] + whole
    return ctx, whole[len(ctx):]


def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16, max_len: int = 1024,
                   progress: bool = True, desc: str = "loglikelihood") -> list[float]:
    """Sum of log P(continuation tokens | context) for each (context, continuation)."""
    encoded = [_encode(tokenizer, c, x) for c, x in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))
    out = [0.0] * len(encoded)
    device = model.device  # an HF model, or the onnxruntime runner (exporters/ort.py)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=not progress,
                          unit="batch"):
            idx = order[start : start + batch_size]
            seqs = [(encoded[i][0] + encoded[i][1])[-(max_len + 1):] for i in idx]
            width = max(len(s) for s in seqs) - 1
            keep = max(len(encoded[i][1]) for i in idx)
            # left padding with explicit positions: every continuation ends at the last position, so the LM head
            # runs on the last `keep` positions only, and each row sees the positions it would see unpadded
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, width - (len(s) - 1):] = torch.tensor(s[:-1])
                mask[r, width - (len(s) - 1):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), logits_to_keep=keep).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for r, (i, s) in enumerate(zip(idx, seqs)):
                n = len(encoded[i][1])
                targets = torch.tensor(s[-n:], device=device)
                out[i] = logprobs[r, torch.arange(keep - n, keep, device=device), targets].sum().item()
    return out


def mc_accuracy(model, tokenizer, task: str, limit: int | None = None, seed: int = 0, batch_size: int = 16,
                progress: bool = True) -> TaskResult:
    items = eval_items(task, limit, seed)
    pairs = [(c, x) for item in items for c, x in zip(item.contexts, item.continuations)]
    lls = loglikelihoods(model, tokenizer, pairs, batch_size, progress=progress, desc=task)
    correct = correct_norm = 0
    pos = 0
    for item in items:
        k = len(item.contexts)
        ll = lls[pos : pos + k]
        pos += k
        correct += max(range(k), key=lambda j: ll[j]) == item.label
        # lm-eval divides by the choice's length without the " " it puts before the choice
        normed = [ll[j] / max(1, len(item.continuations[j].removeprefix(" "))) for j in range(k)]
        correct_norm += max(range(k), key=lambda j: normed[j]) == item.label
    acc, acc_norm = correct / len(items), correct_norm / len(items)
    if task in HAS_ACC_NORM:
        return TaskResult(task, "acc_norm", acc_norm, len(items), {"acc": acc, "acc_norm": acc_norm})
    return TaskResult(task, "acc", acc, len(items), {"acc": acc})


# -- GSM8K -----------------------------------------------------------------------------------------------------
GSM8K_SHOTS = 5
ANSWER = re.compile(r"#### (-?[0-9.,]+)")
LAST_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


GSM8K_UNTIL = "Question:"  # lm-eval's gsm8k stops generating here (and at EOS): the model began another question


def stop_at_text(tokenizer, start: int, text: str):
    """A transformers stopping criterion: a row is done once its tokens after position `start` decode to a text
    containing `text` (checked after every step on the rows not yet done; generate pads the rows that are done until
    all are). One criterion serves one `generate` call: it remembers which of that batch's rows are done."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAtText(StoppingCriteria):
        def __init__(self):
            self.done: list[bool] | None = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.done is None:
                self.done = [False] * len(input_ids)
            for r, row in enumerate(input_ids):
                if not self.done[r]:
                    self.done[r] = text in tokenizer.decode(row[start:], skip_special_tokens=True)
            return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopAtText()])


def gsm8k_prompt(shots: list[dict], question: str) -> str:
    """lm-eval's gsm8k format: 'Question: ...\\nAnswer: ...' shots separated by blank lines."""
    parts = [gsm8k_example(s) for s in shots]
    return "\n\n".join(parts + [f"Question: {question}\nAnswer:"])


def extract_number(text: str) -> str | None:
    """lm-eval's strict match ('#### N') first, then its flexible match (the last number in the text)."""
    m = ANSWER.search(text)
    if m:
        return _clean(m.group(1))
    found = LAST_NUMBER.findall(text)
    if not found:
        return None
    last = found[-1]
    return _clean(last[0] or last[1])


def _clean(s: str) -> str:
    """lm-eval's gsm8k `regexes_to_ignore`: commas, dollar signs and one final full stop."""
    return re.sub(r"\.$", "", s.strip().replace(",", "").replace("$", ""))


def gsm8k_shots() -> list[dict]:
    """The prompt's solved examples: GSM8K_SHOTS train rows drawn with seed 1234 (lm-eval's gsm8k draws its shots
    from train, `fewshot_split: train`; here the same shots serve every question)."""
    train = gsm8k_rows("train")
    return [train[i] for i in random.Random(1234).sample(range(len(train)), GSM8K_SHOTS)]


GSM8K_BATCH = 8  # prompts generated together (left-padded) by a torch model


def gsm8k_generations(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = GSM8K_BATCH,
                      progress: bool = False) -> list[str]:
    """Greedy continuations of `prompts`, each cut where the model starts the next 'Question:' (lm-eval's `until`).

    A torch model generates `batch_size` prompts at a time, left-padded, in order of length (so a batch pads
    little), and stops a row once it has started the next question; the onnxruntime runner (exporters/ort.py) takes
    one prompt at a time to EOS or `max_new_tokens`, and its text is cut at the same place."""
    batched = isinstance(model, torch.nn.Module)
    size = batch_size if batched else 1
    encoded = tokenizer(prompts).input_ids  # once: the lengths order the batches, the batches pad these ids
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.device  # an HF model, or the onnxruntime runner
    texts: list[str] = [""] * len(prompts)
    with tqdm(total=len(prompts), desc="gsm8k", leave=False, disable=not progress, unit="q") as bar:
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            ids, mask = _left_padded([encoded[i] for i in idx], pad)
            ids, mask = ids.to(device), mask.to(device)
            stop = {"stopping_criteria": stop_at_text(tokenizer, ids.shape[1], GSM8K_UNTIL)} if batched else {}
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad, **stop)
            for row, i in enumerate(idx):
                text = tokenizer.decode(out[row, ids.shape[1]:], skip_special_tokens=True)
                texts[i] = text.split(GSM8K_UNTIL)[0]
            bar.update(len(idx))
    return texts


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows padded on the left to the longest (so every row's last token is the last column), and the
    attention mask that hides the padding."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def gsm8k_exact_match(model, tokenizer, limit: int | None = None, seed: int = 0, max_new_tokens: int = 256,
                      progress: bool = True, batch_size: int = GSM8K_BATCH) -> TaskResult:
    rows = gsm8k_rows("test")
    pick = subset(len(rows), limit, seed)
    shots = gsm8k_shots()
    model.eval()
    texts = gsm8k_generations(model, tokenizer, [gsm8k_prompt(shots, rows[i]["question"]) for i in pick],
                              max_new_tokens, batch_size, progress)
    hits = sum(extract_number(t) == rows[i]["final_answer"] for t, i in zip(texts, pick))
    return TaskResult("gsm8k", "exact_match", hits / len(pick), len(pick), {"batch_size": batch_size})


def evaluate(model, tokenizer, tasks: list[str], limit: int | None = None, seed: int = 0, seq_len: int = 128,
             windows: int | None = None, batch_size: int = 16, progress: bool = True,
             bos: str = "auto") -> list[TaskResult]:
    """Run each task; the 7 commonsense tasks also give their average ('cmqa', the GISP paper's CMQA)."""
    from gisp_fx.evaluate import wikitext2_perplexity

    require_types("evaluate", model=(model, (torch.nn.Module, OrtCausalLM)), tasks=(tasks, (list, tuple)))
    check_tasks(tasks)
    check_eval_settings(seq_len, batch_size)
    results = []
    for task in tasks:
        if task == "wikitext2":
            ppl = wikitext2_perplexity(model, tokenizer, seq_len, windows, batch_size, progress=progress, bos=bos)
            results.append(TaskResult("wikitext2", "ppl", ppl.ppl, ppl.windows,
                                      {"seq_len": ppl.seq_len, "windows": ppl.subset, "bos": ppl.bos}))
        elif task == "gsm8k":
            results.append(gsm8k_exact_match(model, tokenizer, limit, seed, progress=progress))
        else:
            results.append(mc_accuracy(model, tokenizer, task, limit, seed, batch_size, progress))
    mc = [r for r in results if r.task in MC_EVAL_TASKS]
    if len(mc) == len(MC_EVAL_TASKS):
        results.append(TaskResult("cmqa", "mean", sum(r.value for r in mc) / len(mc), sum(r.n for r in mc), {}))
    return results


def format_results(results: list[TaskResult]) -> str:
    lines = ["| task | metric | value | n |", "|---|---|---:|---:|"]
    for r in results:
        value = f"{r.value:.3f}" if r.metric == "ppl" else f"{100 * r.value:.2f} %"
        lines.append(f"| {r.task} | {r.metric} | {value} | {r.n} |")
    return "\n".join(lines)
