"""The importance pass against an independent brute-force computation of spec §2 and §5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model, tokens
from gisp_fx.passes.importance import LmCalibration, MarginCalibration, McSequence, score
from gisp_fx.passes.analyse import analyse


def _brute_gbar(model, losses_fn):
    """d(mean over samples of the per-sample loss)/dW for every projection weight, by one autograd.grad call."""
    names = [n for n, _ in model.named_parameters() if "_proj" in n]
    params = [p for n, p in model.named_parameters() if "_proj" in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(losses_fn(), params)
    return {n: g for n, g in zip(names, grads)}


def _expected(model, g, layer: int, head: int, channel: int, mha: bool, group: int):
    w = lambda name: dict(model.named_parameters())[f"model.layers.{layer}.{name}.weight"].detach()
    s = lambda name: (w(name) * g[f"model.layers.{layer}.{name}.weight"]).abs()
    d = model.config.head_dim
    rows = slice(head * d, (head + 1) * d)
    head_score = s("self_attn.q_proj")[rows].sum() + s("self_attn.o_proj")[:, rows].sum()
    if mha:
        kv = slice(group * d, (group + 1) * d)
        head_score += s("self_attn.k_proj")[kv].sum() + s("self_attn.v_proj")[kv].sum()
    ch = s("mlp.gate_proj")[channel].sum() + s("mlp.up_proj")[channel].sum() + s("mlp.down_proj")[:, channel].sum()
    return head_score.item(), ch.item()


@pytest.mark.parametrize("arch", ["llama-gqa", "llama-mha"])
def test_lm_scores_equal_brute_force(arch):
    model = tiny_model(arch)
    plan = analyse(model)
    ids = tokens(6, 10, seed=3)
    scores = score(model, plan, LmCalibration(ids, batch_size=4), progress=False)  # batches of 4 and 2

    def mean_of_sample_losses():
        return torch.stack([model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss for i in range(6)]).mean()

    g = _brute_gbar(model, mean_of_sample_losses)
    a = plan.layers[1].attention
    for head, channel in [(0, 0), (3, 17), (2, 40)]:
        eh, ec = _expected(model, g, 1, head, channel, a.mha, a.kv_of_head[head])
        assert scores.heads[1][head] == pytest.approx(eh, rel=1e-4)
        assert scores.channels[1][channel] == pytest.approx(ec, rel=1e-4)


def test_margin_scores_equal_brute_force():
    model = tiny_model("llama-gqa")
    plan = analyse(model)
    rng = np.random.default_rng(0)
    seqs = tuple(McSequence(tuple(int(x) for x in rng.integers(3, 90, size=n)), k, correct)
                 for n, k, correct in [(7, 2, True), (9, 3, False), (6, 1, False), (8, 4, True), (5, 2, False)])
    scores = score(model, plan, MarginCalibration(seqs, pad_id=0, batch_size=2), progress=False)

    def option_loss(s: McSequence):
        ids = torch.tensor([s.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        return nll[-s.option_tokens :].mean()

    def margin():
        pos = torch.stack([option_loss(s) for s in seqs if s.correct]).mean()
        neg = torch.stack([option_loss(s) for s in seqs if not s.correct]).mean()
        return pos - neg  # its gradient is g_pos - g_neg

    g = _brute_gbar(model, margin)
    a = plan.layers[2].attention
    eh, ec = _expected(model, g, 2, 1, 5, a.mha, a.kv_of_head[1])
    assert scores.heads[2][1] == pytest.approx(eh, rel=1e-4)
    assert scores.channels[2][5] == pytest.approx(ec, rel=1e-4)


def test_skipped_layers_are_not_scored_and_leave_the_others_unchanged():
    """Protected layers get no gradient (no fp32 sum of their weights, backward stops above them): their scores
    are NaN and every other layer's scores are exactly those of a pass that scores all layers."""
    from gisp_fx.passes import importance

    model = tiny_model("llama-gqa")
    plan = analyse(model)
    calib = LmCalibration(tokens(6, 10, seed=4), batch_size=4)
    skip = frozenset({0, len(plan.layers) - 1})
    assert set(importance._prunable_linears(model, plan, skip)) == {
        n for n in importance._prunable_linears(model, plan) if not any(n.startswith(f"model.layers.{i}.") for i in skip)}
    full = score(model, plan, calib, progress=False)
    part = score(model, plan, calib, progress=False, skip=skip)
    assert part.loss == full.loss
    for i in range(len(plan.layers)):
        for got, want in ((part.heads[i], full.heads[i]), (part.channels[i], full.channels[i])):
            assert got.shape == want.shape
            if i in skip:
                assert np.isnan(got).all()
            else:
                np.testing.assert_array_equal(got, want)
    with pytest.raises(Exception, match="every layer with prunable groups is protected"):
        score(model, plan, calib, progress=False, skip=frozenset(range(len(plan.layers))))


@pytest.mark.parametrize("arch", ["llama-gqa", "llama-mha"])
def test_gqa_scores_take_no_kv_gradient(arch):
    """A GQA head's score reads its q rows and o columns only, so k_proj / v_proj get no gradient (their fp32 sums
    are not held) and the K/V groups' scores are NaN; under MHA the k/v rows belong to the head and are scored."""
    from gisp_fx.passes import importance

    model = tiny_model(arch)
    plan = analyse(model)
    names = set(importance._prunable_linears(model, plan))
    gqa = not plan.layers[0].attention.mha
    assert any("k_proj" in n for n in names) is not gqa and any("v_proj" in n for n in names) is not gqa
    scores = score(model, plan, LmCalibration(tokens(4, 8, seed=5), batch_size=4), progress=False)
    assert all(bool(np.isnan(k).all()) is gqa and np.isfinite(h).all() for k, h in zip(scores.kv, scores.heads))
