"""(student, teacher, token windows) -> mean KL(teacher || student) of the next-token distributions, temperature 1,
plus `ce_weight` x the student's next-token cross-entropy, computed through both LM heads in sequence chunks.

As in lm_loss.py, each model's decoder runs once over the whole batch; the heads, their logit post-processing and
the loss then run a chunk of positions at a time, the chunk's gradient with respect to the student's hidden states
taken at once and both chunks' logits dropped, so the full-vocabulary logits of the batch are never held (for
SmolLM2, 8 x 128 positions of 49,152 logits are 200 MB per model in fp32, twice that with the softmax for backward).
"""

from __future__ import annotations

import torch
from torch import nn

from gisp_fx.errors import GispError
from gisp_fx.passes.lm_loss import LOSS_CHUNK, chunked_backward, chunked_forward, head_fn


def _chunk_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, targets: torch.Tensor,
                ce_weight: float) -> torch.Tensor:
    """Sum over positions of KL(p_t || p_s) (+ ce_weight x cross-entropy), all in fp32."""
    log_s = torch.log_softmax(s_logits.float(), dim=-1)
    log_t = torch.log_softmax(t_logits.float(), dim=-1)
    loss = (log_t.exp() * (log_t - log_s)).sum()
    if ce_weight:
        loss = loss + ce_weight * nn.functional.nll_loss(log_s, targets, reduction="sum")
    return loss


class _ChunkedHeadKL(torch.autograd.Function):
    """Summed distillation loss through `fn` (student head) and `fn_t` (teacher head, no gradient), in chunks."""

    @staticmethod
    def forward(ctx, hidden, hidden_t, targets, fn, fn_t, rows, ce_weight, *params):
        flat_t = hidden_t.reshape(-1, hidden_t.shape[-1])
        targets = targets.reshape(-1)

        def chunk_loss(h, s):
            with torch.no_grad():
                t_logits = fn_t(flat_t[s : s + len(h)])
            return _chunk_loss(fn(h), t_logits, targets[s : s + len(h)], ce_weight)

        return chunked_forward(ctx, hidden, params, rows, chunk_loss)

    @staticmethod
    def backward(ctx, grad_out):
        return chunked_backward(ctx, grad_out, 6)


def check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """Both models predict over the same vocabulary, or a GispError: KL needs the same next-token space."""
    s, t = student.get_output_embeddings(), teacher.get_output_embeddings()
    if s is None or t is None:
        raise GispError("distill: student and teacher must both be causal LMs with an LM head")
    if s.weight.shape[0] != t.weight.shape[0]:
        raise GispError(f"distill: the student predicts over {s.weight.shape[0]:,} tokens and the teacher over "
                        f"{t.weight.shape[0]:,}; distil from the dense model the student was pruned from")


def teacher_hidden(teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's final hidden states of `ids` [B, L], no gradient (it is never trained)."""
    with torch.no_grad():
        return teacher.base_model(input_ids=ids, use_cache=False).last_hidden_state


def distill_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, ce_weight: float = 0.0,
                 chunk: int = LOSS_CHUNK, hidden_t: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the next-token positions of windows `ids` [B, L] (positions 0..L-2, each predicting the following
    token) of KL(teacher || student) + ce_weight x cross-entropy; differentiable in the student only.
    `hidden_t`: the teacher's hidden states of `ids` when the caller already has them.
    `chunk` <= 0: computed on the full logits of both models (the reference the chunked path is tested against)."""
    targets = ids[:, 1:]
    n = targets.numel()
    if chunk <= 0:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
        s_logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
        flat = s_logits.reshape(n, -1)
        return _chunk_loss(flat, t_logits.reshape(n, -1), targets.reshape(-1), ce_weight) / n
    hidden_t = teacher_hidden(teacher, ids) if hidden_t is None else hidden_t
    hidden = student.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    head = student.get_output_embeddings()
    rows = max(1, chunk // head.weight.shape[0])
    total = _ChunkedHeadKL.apply(hidden, hidden_t[:, :-1], targets, head_fn(student), head_fn(teacher), rows,
                                 float(ce_weight), *head.parameters())
    return total / n
