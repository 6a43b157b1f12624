"""The chunked LM-head loss equals the model's own loss, and every gradient equals the unchunked one (fp32,
<= 1e-6 relative), on families with soft-capping (Gemma 2) and tied embeddings; checkpointing changes nothing."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, tokens
from gisp_fx.errors import GispError
from gisp_fx.passes.lm_loss import check_head_, checkpointed, chunked_lm_loss


def _loss_and_grads(model, ids, chunk, checkpoint=False):
    model.zero_grad(set_to_none=True)
    with checkpointed(model, checkpoint):
        loss = chunked_lm_loss(model, ids, chunk)
        (loss * 3.0).backward()  # the scoring loop backpropagates size * mean loss
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("arch,tied", [("llama-gqa", False), ("gemma2", True), ("qwen3", True), ("phi3", False)])
@pytest.mark.parametrize("chunk", [96 * 5, 96 * 7 + 13, 1])  # 5 positions, 7 (ragged last chunk), 1 position
def test_chunked_loss_and_every_gradient_equal_the_full_logits(arch, tied, chunk):
    model = tiny_model(arch, tie_word_embeddings=tied, **({"final_logit_softcapping": 3.0} if arch == "gemma2" else {}))
    model.requires_grad_(True)
    ids = tokens(batch=3, seq=11)
    ref_loss, ref = _loss_and_grads(model, ids, 0)
    assert ref_loss == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-7)
    loss, got = _loss_and_grads(model, ids, chunk)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert got.keys() == ref.keys() and len(ref) == len(list(model.parameters()))
    head = model.get_output_embeddings().weight
    assert (head is model.get_input_embeddings().weight) is tied
    # relative error of each gradient tensor as a whole (the norm of the difference over the norm): single
    # elements near zero of a norm weight's gradient (a sum with cancellation) differ by a few fp32 ulps
    errs = {name: ((got[name] - g).norm() / g.norm()).item() for name, g in ref.items()}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 1e-6, (worst, errs[worst])


def test_softcapping_is_applied():
    """Without the cap the loss differs: the chunked path really takes the model's post-processing."""
    model = tiny_model("gemma2", final_logit_softcapping=0.5)
    ids = tokens(batch=2, seq=9)
    capped = chunked_lm_loss(model, ids, 96 * 4).item()
    assert capped == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-6)
    model.config.final_logit_softcapping = None
    assert abs(chunked_lm_loss(model, ids, 96 * 4).item() - capped) > 1e-3


def test_checkpointing_gives_the_same_gradients():
    model = tiny_model("llama-gqa")
    model.requires_grad_(True)
    ids = tokens(batch=2, seq=10)
    loss, ref = _loss_and_grads(model, ids, 96 * 3)
    loss_ckpt, got = _loss_and_grads(model, ids, 96 * 3, checkpoint=True)
    assert loss_ckpt == loss
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-9)
    assert "forward" not in vars(model.model.layers[0])  # the patch is undone


def test_an_unknown_head_transform_is_refused():
    model = tiny_model("llama-gqa")
    check_head_(model, tokens(batch=1, seq=8))  # the known path passes
    model.config.model_type = "cohere"  # now head_fn multiplies by logit_scale, which this model does not
    model.config.logit_scale = 2.0
    with pytest.raises(GispError, match="not its LM head applied"):
        check_head_(model, tokens(batch=1, seq=8))


def test_half_precision_gradients_are_summed_in_fp32():
    """A bf16 model's averaged gradient comes back in fp32 and matches the fp32 model's to bf16 accuracy."""
    from gisp_fx.passes.importance import LmCalibration, average_gradients
    from gisp_fx.passes.analyse import analyse

    model = tiny_model("llama-gqa")
    plan = analyse(model)
    calib = LmCalibration(tokens(batch=6, seq=12), batch_size=2)
    ref, ref_loss = average_gradients(model, plan, calib, progress=False)
    half, half_loss = average_gradients(model.to(torch.bfloat16), plan, calib, progress=False)
    assert half_loss == pytest.approx(ref_loss, rel=2e-2)
    for name, (w, b) in half.items():
        assert w.dtype == torch.float32 and b is None
        assert ((w - ref[name][0]).norm() / ref[name][0].norm()).item() < 0.05, name


@pytest.mark.parametrize("arch", ["gemma2", "qwen2"])
def test_chunked_token_nll_equals_the_full_logits(arch):
    from gisp_fx.passes.lm_loss import token_nll

    model = tiny_model(arch)
    ids = tokens(batch=3, seq=13)
    with torch.inference_mode():
        full = token_nll(model, ids, chunk=0)
        chunked = token_nll(model, ids, chunk=96 * 5)
    assert chunked.shape == (3, 12)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
