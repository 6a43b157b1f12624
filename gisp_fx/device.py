"""`--device` / `--dtype` strings -> (torch device, torch dtype), checked against what this machine can run."""

from __future__ import annotations

import re

import torch

from gisp_fx.errors import GispError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' -> a device that exists here, or a GispError naming --device."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", spec):
        raise GispError(f"--device must be cpu, cuda or cuda:N, got '{spec}'")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GispError(f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__}, "
                        f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu")
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise GispError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' -> a dtype the device runs (a small matmul and softmax are tried)."""
    if name not in DTYPES:
        raise GispError(f"--dtype must be one of {', '.join(DTYPES)}, got '{name}'")
    dtype = DTYPES[name]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise GispError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} cannot run bfloat16; "
                        "use --dtype float16 or float32")
    try:
        x = torch.ones(4, 8, device=device, dtype=dtype)
        (x @ x.T).softmax(-1).sum().item()
    except RuntimeError as exc:
        raise GispError(f"--dtype {name}: the device {device} cannot run it ({exc}); use --dtype float32") from exc
    return dtype


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)
