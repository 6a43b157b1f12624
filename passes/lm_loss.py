"""(causal LM, token windows) -> mean next-token loss, computed through the LM head in sequence chunks.

`model(input_ids, labels=ids).loss` keeps the fp32 logits of the whole batch ([B, L, vocab]: 1 GB for 8 x 128
tokens of a 262k vocabulary) and their softmax for backward. Here the decoder runs once; the head, the logit
post-processing (Gemma's soft-capping, Cohere's and Granite's scales) and the cross-entropy run one chunk of
positions at a time, each chunk's gradient with respect to the hidden states taken at once and the chunk's
logits dropped; backward only multiplies that stored gradient (the size of the hidden states) by the upstream one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gisp_fx.errors import GispError

# logit elements per head chunk: 8 MB in fp32, 42 positions of a 49k vocabulary, 8 of 262k. 2^24 gave SmolLM2's
# scoring pass a 150 MB higher peak (3.49x against 3.19x its fp32 weights) and 2^22 11 MB more than 2^21, all for
# bit-identical scores
LOSS_CHUNK = 2**21
IGNORE = -100


def head_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden states -> logits exactly as the model's own forward computes them after its decoder."""
    head = model.get_output_embeddings()
    if head is None:
        raise GispError(f"loss: {type(model).__name__} has no output embeddings (LM head); gisp-fx prunes causal LMs")
    cfg = model.config
    mul = getattr(cfg, "logit_scale", None) if cfg.model_type == "cohere" else None
    div = getattr(cfg, "logits_scaling", None) if cfg.model_type == "granite" else None
    cap = getattr(cfg, "final_logit_softcapping", None)

    def logits(h: torch.Tensor) -> torch.Tensor:
        out = head(h)
        if mul is not None:
            out = out * mul
        if div is not None:
            out = out / div
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out

    return logits


def check_head_(model: nn.Module, ids: torch.Tensor) -> None:
    """The chunked path's logits equal the model's own on a short prefix, or a GispError: a family whose forward
    does more between its decoder and its logits than `head_fn` knows must not be scored with a silently wrong loss."""
    probe = ids[:1, : min(ids.shape[1], 16)]
    with torch.no_grad():
        ref = model(input_ids=probe, use_cache=False).logits.float()
        got = head_fn(model)(model.base_model(input_ids=probe, use_cache=False).last_hidden_state).float()
    err = (ref - got).abs().max().item()
    if not err <= 1e-3 * ref.abs().max().item() + 1e-5:
        raise GispError(f"loss: {type(model).__name__}'s logits are not its LM head applied to its decoder's output "
                        f"(max difference {err:.3g}); the chunked loss does not know this family, please report it")


def chunked_forward(ctx, hidden: torch.Tensor, params, rows: int,
                    chunk_loss: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """The forward of a head loss taken in chunks: `chunk_loss(h, s)` (a scalar summed over the hidden states `h`
    of positions s, s + 1, ...) for every chunk of `rows` positions, each chunk's gradients with respect to `h` and
    to the head's `params` taken at once and kept on `ctx` for `chunked_backward`; returns the total."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    need = [p for p in params if p.requires_grad]
    grad_h = torch.zeros_like(flat) if hidden.requires_grad else None
    grad_p = [torch.zeros_like(p, dtype=torch.float32) for p in need]
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for s in range(0, flat.shape[0], rows):
        with torch.enable_grad():
            h = flat[s : s + rows].detach().requires_grad_(grad_h is not None)
            loss = chunk_loss(h, s)
            wrt = ([h] if grad_h is not None else []) + need
            grads = torch.autograd.grad(loss, wrt) if wrt else ()
        total += loss.detach().double()
        if grad_h is not None:
            grad_h[s : s + rows] = grads[0]
            grads = grads[1:]
        for acc, g in zip(grad_p, grads):
            acc += g.float()
    ctx.shape = hidden.shape
    ctx.dtypes = [p.dtype for p in params]
    ctx.mask = [p.requires_grad for p in params]
    ctx.save_for_backward(*([grad_h] if grad_h is not None else []), *grad_p)
    ctx.has_h = grad_h is not None
    return total.float()


def chunked_backward(ctx, grad_out: torch.Tensor, others: int) -> tuple:
    """The backward that goes with `chunked_forward`: the stored gradients times the upstream one, for the hidden
    states and the head's parameters (None for the `others` arguments between them)."""
    saved = iter(ctx.saved_tensors)
    grad_h = (next(saved) * grad_out).reshape(ctx.shape) if ctx.has_h else None
    params = [(next(saved) * grad_out).to(dt) if need else None for need, dt in zip(ctx.mask, ctx.dtypes)]
    return (grad_h, *([None] * others), *params)


class _ChunkedHeadLoss(torch.autograd.Function):
    """Sum of token cross-entropies through `fn` in chunks; gradients taken chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, labels, fn, chunk, *params):
        targets = labels.reshape(-1)

        def chunk_loss(h, s):
            return nn.functional.cross_entropy(fn(h).float(), targets[s : s + len(h)], ignore_index=IGNORE,
                                               reduction="sum")

        return chunked_forward(ctx, hidden, params, chunk, chunk_loss)

    @staticmethod
    def backward(ctx, grad_out):
        return chunked_backward(ctx, grad_out, 3)


def chunked_lm_loss(model: nn.Module, ids: torch.Tensor, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Mean next-token cross-entropy of windows `ids` [B, L] (what `model(ids, labels=ids).loss` gives), with
    the head's logits never held for more than `chunk` elements (positions x vocabulary) at a time.
    `chunk` <= 0: the model's own loss, full logits and all."""
    if chunk <= 0:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    labels = ids[:, 1:]
    head = model.get_output_embeddings()
    positions = max(1, chunk // head.weight.shape[0])
    total = _ChunkedHeadLoss.apply(hidden, labels, head_fn(model), positions, *head.parameters())
    return total / (labels != IGNORE).sum()


@contextlib.contextmanager
def checkpointed(model: nn.Module, enabled: bool = True):
    """Activation checkpointing of every decoder layer for the duration: each layer's activations are
    recomputed in backward instead of kept (about one more forward of compute; independent of train/eval mode,
    unlike transformers' gradient_checkpointing_enable, which only acts in training mode)."""
    if not enabled:
        yield
        return
    from gisp_fx.passes.capture import decoder_layers

    layers = [model.get_submodule(name) for name in decoder_layers(model)]
    originals = [layer.forward for layer in layers]
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        if config is not None:  # a cache filled in forward would be filled again by the recomputation
            config.use_cache = False
        for layer, forward in zip(layers, originals):
            layer.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(forward)
        yield
    finally:
        if config is not None:
            config.use_cache = use_cache
        for layer in layers:
            del layer.forward  # the instance attribute: the class's forward shows through again


def token_nll(model: nn.Module, ids: torch.Tensor, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Next-token NLL [B, L-1] of windows `ids` (no gradient), the head's logits taken `chunk` elements at a time.
    A model without a decoder/head split (the onnxruntime runner) is scored on its full logits."""
    if chunk <= 0 or not isinstance(model, nn.Module) or model.get_output_embeddings() is None:
        logits = model(input_ids=ids).logits[:, :-1].float()
        return nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    fn = head_fn(model)
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1)
    rows = max(1, chunk // model.get_output_embeddings().weight.shape[0])
    out = torch.cat([nn.functional.cross_entropy(fn(flat[s : s + rows]).float(), targets[s : s + rows],
                                                 reduction="none") for s in range(0, flat.shape[0], rows)])
    return out.view(ids.shape[0], ids.shape[1] - 1)
