"""Process memory: glibc heap settings for a lean compile, and this process's peak resident memory."""

from __future__ import annotations

import gc

MMAP_THRESHOLD = 1 << 20  # allocations of 1 MiB and more get their own mapping, returned to the system when freed


def peak_rss_mb() -> float:
    """This process's peak resident memory: /proc's VmHWM where there is one (it belongs to this process's own
    memory map; ru_maxrss would carry over the peak of a large parent through fork and exec), else ru_maxrss."""
    import re
    import resource

    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def reset_peak_rss() -> bool:
    """Start this process's peak resident memory afresh from what is resident now (Linux: /proc/self/clear_refs,
    5), so that peak_rss_mb() afterwards is the peak of what runs from here on; False where that is not offered
    (peak_rss_mb() then keeps the whole process's peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def lean_heap_() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (and its trim threshold likewise), for the rest of this process.

    By default glibc raises its mmap threshold, up to 32 MiB, every time a large block is freed; from then on the
    activation and gradient temporaries of every batch (1-32 MiB each) are carved from the heap, whose free space is
    kept rather than given back, so each batch's peak stacks on the last one's holes (measured on SmolLM2 with
    --checkpoint: 2,090 MB peak without this, 1,789 MB with it, the same CPU seconds). Returns False where the C
    library is not glibc (macOS, musl), which has no such knob; nothing is changed there."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, MMAP_THRESHOLD))


def free_memory() -> None:
    """Return a step's freed gradients and activations to the system: collect cycles, empty the CUDA cache, and
    ask glibc to give back its free heap (else the next step's peak stacks on this one's leftovers)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_()


def trim_() -> None:
    """Hand glibc's free heap back to the system now (a no-op where the C library is not glibc): called between
    calibration batches, so that one batch's freed activations are not still resident under the next one's."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# Activation floats a decoder layer keeps for backward, per token, without checkpointing: about 12 of the hidden
# size (norms, q/k/v/o inputs and outputs, residuals), 5 of the MLP width (gate, up, their product and activation)
# and 2 attention rows per head. Fitted on SmolLM2 (benchmarks/results/memory.json: a scoring pass without
# checkpointing peaks 2.1 GB above the loaded model for 8 x 128 tokens; this estimate gives 2.6 GB).
HIDDEN_FLOATS, MLP_FLOATS, ATTENTION_ROWS = 12, 5, 2


def scoring_bytes(model, batch_size: int, seq_len: int) -> int:
    """An estimate of what one batch of the gradient scoring pass adds to the loaded model without activation
    checkpointing: the fp32 gradients (as large as the fp32 weights) and every decoder layer's activations."""
    cfg = model.config.get_text_config(decoder=True)
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    mlp = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", 1)
    if isinstance(heads, (list, tuple)):  # a pruned model's per-layer head counts
        heads = max(heads, default=1)
    if isinstance(mlp, (list, tuple)):
        mlp = max(mlp, default=0)
    item = next(model.parameters()).element_size()
    per_token = HIDDEN_FLOATS * hidden + MLP_FLOATS * mlp + ATTENTION_ROWS * heads * seq_len
    activations = batch_size * seq_len * layers * per_token * item
    gradients = 4 * sum(p.numel() for p in model.parameters())
    return int(activations + gradients)


def free_bytes(device) -> int:
    """Memory free for new allocations on `device`: the CUDA device's free memory, or MemAvailable on the host."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
