"""(model, plan) -> a content hash of the prunable weights, so a run is replayed on the weights it pruned.

The hash covers every parameter of the plan's decoder layers, by name, rounded to bfloat16: a run compiled in
float32 and materialized in bfloat16 (or the reverse) hashes alike, while a re-saved model whose weights differ
(fine-tuned, re-initialised, another checkpoint of the same shapes) does not.
"""

from __future__ import annotations

import hashlib

import torch

from gisp_fx.errors import GispError
from gisp_fx.plan import GroupPlan

SCHEME = "sha256/bf16/decoder-layers/v1"


def weights_fingerprint(model: torch.nn.Module, plan: GroupPlan) -> str:
    digest = hashlib.sha256(SCHEME.encode())
    for layer in plan.layers:
        for name, param in sorted(model.get_submodule(layer.module).named_parameters()):
            digest.update(f"{layer.module}.{name}:{tuple(param.shape)}".encode())
            data = param.detach().to(torch.bfloat16).contiguous().cpu()
            digest.update(data.view(torch.int16).numpy().tobytes())
    return f"{SCHEME}:{digest.hexdigest()}"


def require_same_weights(recorded: str | None, model: torch.nn.Module, plan: GroupPlan, model_spec: str,
                         command: str) -> None:
    """Refuse a source model whose prunable weights are not those the run recorded (old runs record none)."""
    if recorded is None:
        return
    found = weights_fingerprint(model, plan)
    if found != recorded:
        raise GispError(f"{command}: the model '{model_spec}' has the shapes of the one this run pruned but other "
                        f"weights (prunable-weight hash {found.rsplit(':', 1)[-1][:12]}, the run recorded "
                        f"{recorded.rsplit(':', 1)[-1][:12]}); it was re-saved or replaced: give the original model "
                        "folder")
