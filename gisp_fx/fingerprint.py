"""(model, plan) -> a content hash of the prunable weights, so a run is replayed on the weights it pruned.

The hash covers every parameter of the plan's decoder layers, by name, rounded to bfloat16 and recorded with the
dtype the run held them in: the check casts the source model to that dtype first, so a run compiled in float16 and
materialized in float32 (or bfloat16 / float32 either way) hashes alike, while a re-saved model whose weights differ
(fine-tuned, re-initialised, another checkpoint of the same shapes) does not.
"""

from __future__ import annotations

import hashlib

import torch

from gisp_fx.errors import GispError
from gisp_fx.plan import GroupPlan

SCHEME = "sha256/bf16/decoder-layers/v1"


def weights_fingerprint(model: torch.nn.Module, plan: GroupPlan, via: torch.dtype | None = None) -> str:
    """'SCHEME:DTYPE:HEX': the hash of the weights cast to `via` (default: their own dtype), then to bfloat16."""
    digest = hashlib.sha256(SCHEME.encode())
    via = via or next(model.parameters()).dtype
    for layer in plan.layers:
        for name, param in sorted(model.get_submodule(layer.module).named_parameters()):
            digest.update(f"{layer.module}.{name}:{tuple(param.shape)}".encode())
            data = param.detach().to(via).to(torch.bfloat16).contiguous().cpu()
            digest.update(data.view(torch.int16).numpy().tobytes())
    return f"{SCHEME}:{str(via).removeprefix('torch.')}:{digest.hexdigest()}"


def require_same_weights(recorded: str | None, model: torch.nn.Module, plan: GroupPlan, model_spec: str,
                         command: str) -> None:
    """Refuse a source model whose prunable weights are not those the run recorded (old runs record none)."""
    if recorded is None:
        return
    via = getattr(torch, recorded.split(":")[1], None) if recorded.count(":") == 2 else None
    if not isinstance(via, torch.dtype):
        raise GispError(f"{command}: the run's weights hash '{recorded[:60]}' is not one this gisp-fx writes; the "
                        "trajectory is damaged: compile the run again")
    found = weights_fingerprint(model, plan, via)
    if found != recorded:
        raise GispError(f"{command}: the model '{model_spec}' has the shapes of the one this run pruned but other "
                        f"weights (prunable-weight hash {found.rsplit(':', 1)[-1][:12]}, the run recorded "
                        f"{recorded.rsplit(':', 1)[-1][:12]}); it was re-saved or replaced: give the original model "
                        "folder")
