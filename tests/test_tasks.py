"""Task scoring: batched log-likelihoods equal a naive per-sequence computation; subsets; GSM8K extraction."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from gisp_fx.errors import GispError
from gisp_fx.tasks import (GSM8K_UNTIL, MC_EVAL_TASKS, check_tasks, extract_number, gsm8k_exact_match,
                           loglikelihoods, mc_accuracy, stop_at_text, subset)


def _naive(model, tok, context, continuation):
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2", "gemma2", "phi3"])
def test_batched_loglikelihood_equals_naive(arch):
    model, tok = tiny_model(arch), tiny_tokenizer()
    pairs = [("w5 w6 w7", " w8"), ("w9", " w10 w11 w12"), ("w13 w14 w15 w16 w17 w18", " w19 w20"),
             ("w21 w22", " w23")]
    got = loglikelihoods(model, tok, pairs, batch_size=3, progress=False)
    for (c, x), value in zip(pairs, got):
        assert value == pytest.approx(_naive(model, tok, c, x), abs=1e-4)


def test_subset_is_seeded_and_checked():
    assert subset(100, 10, 0) == subset(100, 10, 0) != subset(100, 10, 1)
    assert subset(5, None, 0) == list(range(5)) == subset(5, 50, 3)
    with pytest.raises(GispError, match="--limit must be positive"):
        subset(100, 0, 0)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(GispError, match="unknown task.*known tasks: wikitext2, boolq"):
        check_tasks(["wikitext2", "mmlu"])


@pytest.mark.parametrize("task", MC_EVAL_TASKS)
def test_every_task_scores(task):
    result = mc_accuracy(tiny_model("llama-gqa"), tiny_tokenizer(), task, limit=3, progress=False)
    assert result.n == 3 and 0.0 <= result.value <= 1.0
    assert result.metric in ("acc", "acc_norm")


@pytest.mark.parametrize("text, number", [
    ("She makes 9 * 2 = $18.\n#### 18", "18"), ("so the total is 1,250 dollars.", "1250"),
    ("The answer is $3.50.", "3.50"), ("no digits here", None), ("-4 degrees then 7", "7"),
])
def test_gsm8k_number_extraction(text, number):
    assert extract_number(text) == number


# lm-evaluation-harness 0.4.9, tasks/gsm8k/gsm8k.yaml (version 3.0), as data: its two filters and exact_match's
# regexes_to_ignore (ignore_case; the reference answer goes through the same regexes)
LM_STRICT = r"#### (\-?[0-9\.\,]+)"  # strict-match: regex, take_first
LM_FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"  # flexible-extract: regex with group_select -1, take_first
LM_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


def _lm_eval_filter(text: str, pattern: str, group_select: int) -> str:
    import re

    found = re.findall(pattern, text)
    if not found:
        return "[invalid]"
    pick = found[group_select]
    if isinstance(pick, tuple):
        pick = next((m for m in pick if m), "[invalid]")
    return pick.strip()


def _lm_eval_exact_match(prediction: str, reference: str) -> bool:
    import re

    for rx in LM_IGNORE:
        prediction, reference = re.sub(rx, "", prediction), re.sub(rx, "", reference)
    return prediction.lower() == reference.lower()


OUTPUTS = [  # (a model's generation, the reference's worked answer)
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72", "48/2 = 24\n#### 72"),
    ("The answer is 72.", "#### 72"), ("She earns $1,250 per month.", "#### 1,250"), ("#### 1,000", "#### 1,000"),
    ("It costs 3.50 dollars", "#### 3.5"), ("-4 degrees then 7", "#### 7"), ("So 5 + 6 = 11 apples. So 11.", "#### 11"),
    ("#### 5\nThen she had 7 left.", "#### 5"), ("#### 5\nThen she had 7 left.", "#### 7"), ("no number", "#### 3"),
    ("The answer is 42..", "#### 42"), ("#### $18.", "#### 18"), ("He pays 3 * 4 = $12.00", "#### 12"),
    ("Total: -15", "#### -15"), ("#### -15", "#### 15"), ("The result is 0.5 of 10, which is 5", "#### 5"),
    ("1,450,000 people", "#### 1,450,000"), ("#### 2,125.", "#### 2,125"),
]


@pytest.mark.parametrize("text, reference", OUTPUTS)
def test_gsm8k_scoring_agrees_with_lm_eval(text, reference):
    """Ours is lm-eval's strict match where the output has '#### N', its flexible match otherwise: the verdict on
    each fixed output equals lm-eval's for that filter (answer extraction and exact_match's normalisation)."""
    strict = _lm_eval_filter(text, LM_STRICT, 0)
    chosen = strict if strict != "[invalid]" else _lm_eval_filter(text, LM_FLEXIBLE, -1)
    final = reference.split("#### ")[-1].replace(",", "")  # the bundled rows' final_answer
    assert (extract_number(text) == final) == _lm_eval_exact_match(chosen, reference)


def test_gsm8k_scoring_fixture_has_both_verdicts_and_both_filters():
    verdicts = {extract_number(t) == r.split("#### ")[-1].replace(",", "") for t, r in OUTPUTS}
    strict = {_lm_eval_filter(t, LM_STRICT, 0) != "[invalid]" for t, _ in OUTPUTS}
    assert verdicts == {True, False} and strict == {True, False}


def test_gsm8k_generation_stops_where_the_next_question_starts():
    """lm-eval's `until`: the criterion fires on the step whose new text first holds 'Question:', not before."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "Answer": 2, "is": 3, "18.": 4, "Question:": 5, "How": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    criterion = stop_at_text(tok, 2, GSM8K_UNTIL)[0]
    prompt = [5, 6]  # the prompt itself ends a question: it does not count
    fired = [bool(criterion(torch.tensor([prompt + new]), None)[0]) for new in ([2], [2, 3, 4], [2, 3, 4, 5])]
    assert fired == [False, False, True]
    # per row in a batch: the row that began a question is done, the other goes on; a row once done is not decoded
    # again (generate pads it with the pad token from then on)
    decoded = []
    tok.decode = lambda ids, _decode=tok.decode, **kw: decoded.append(len(ids)) or _decode(ids, **kw)
    batch = stop_at_text(tok, 2, GSM8K_UNTIL)[0]
    assert batch(torch.tensor([prompt + [2, 5], prompt + [2, 3]]), None).tolist() == [True, False]
    assert batch(torch.tensor([prompt + [2, 5, 0], prompt + [2, 3, 5]]), None).tolist() == [True, True]
    assert decoded == [2, 2, 3]


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
def test_gsm8k_batched_generation_equals_one_prompt_at_a_time(arch):
    """Left-padded batches (sorted by length) give each prompt the tokens it gets alone, in the prompts' order;
    the tokenizer's padding side and pad token are as they were after."""
    from gisp_fx.tasks import gsm8k_generations

    model, tok = tiny_model(arch), tiny_tokenizer()
    g = torch.Generator().manual_seed(5)  # prompts in the tiny vocabulary, of 3 to 20 words: the batches pad
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(4, 96, (n,), generator=g)) for n in (3, 20, 7, 12, 5)]
    side, pad = tok.padding_side, tok.pad_token
    one = gsm8k_generations(model, tok, prompts, max_new_tokens=10, batch_size=1)
    together = gsm8k_generations(model, tok, prompts, max_new_tokens=10, batch_size=4)
    assert together == one and len(set(one)) > 1
    assert (tok.padding_side, tok.pad_token) == (side, pad)


def test_gsm8k_runs_greedy():
    result = gsm8k_exact_match(tiny_model("llama-gqa"), tiny_tokenizer(), limit=1, max_new_tokens=3, progress=False)
    assert result.n == 1 and result.value in (0.0, 1.0)


def test_cli_eval(tiny_folder, capsys):
    from gisp_fx.cli import main

    path = tiny_folder("llama-gqa")
    assert main(["eval", path, "--tasks", "wikitext2,arc_easy,boolq", "--limit", "2", "--windows", "2"]) == 0
    out = capsys.readouterr().out
    assert "| wikitext2 | ppl |" in out and "| arc_easy | acc_norm |" in out and "| boolq | acc |" in out
    assert main(["eval", path, "--tasks", "arc_easy", "--limit", "0"]) == 2
    assert "--limit must be positive" in capsys.readouterr().err
    assert main(["eval", path, "--tasks", "mmlu"]) == 2
    assert "known tasks" in capsys.readouterr().err


def test_acc_norm_divides_by_the_choice_without_its_leading_space(monkeypatch):
    """As lm-eval: ' ab' counts 2 characters. Dividing by 3 (with the space) would pick the other option here."""
    import gisp_fx.tasks as tasks
    from gisp_fx.datasets import McItem

    item = McItem(contexts=("Q:", "Q:"), continuations=(" ab", " abcd"), label=1)
    monkeypatch.setattr(tasks, "eval_items", lambda task, limit, seed: [item])
    monkeypatch.setattr(tasks, "loglikelihoods", lambda *a, **k: [-2.0, -3.5])
    result = tasks.mc_accuracy(None, None, "arc_easy")
    assert result.extra == {"acc": 0.0, "acc_norm": 1.0}  # -2/2 < -3.5/4, while -2/3 > -3.5/5
