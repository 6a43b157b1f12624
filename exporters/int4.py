"""Weight [N, K] (+ calibration Gram [K, K]) -> onnxruntime `MatMulNBits` (block-wise int4, or int8 for chosen
linears), the weight-only quantisation behind `export --quantize int4`.

A weight [N, K] (nn.Linear's [out, in]) is cut along K into blocks; each block gets a float scale and a zero point,
each weight the code round(w / scale) + zero in 0 .. 2^bits - 1. int4 codes are packed two per byte, the first in the
low nibble, as MatMulNBits reads them: B [N, blocks, block / 2] uint8, scales [N * blocks], zero points
[N * ceil(blocks / 2)] uint8; int8 codes one per byte. `accuracy_level` 4 lets onnxruntime's CPU kernel run the
product in int8 (the activations are quantised per block on the fly).

How the codes are chosen (`Int4Config`, defaults picked by measurement on SmolLM2, see benchmarks/int4_quality.py):
- `method` 'rtn': round to nearest on the block's min/max range; with `clip` > 0 each block searches that many
  shrunken ranges and keeps the one with the least squared error, weighted by the inputs' mean square when a
  calibration Gram is given.
- `method` 'gptq': error-compensated rounding (Frantar et al., GPTQ): columns are quantised in order and each
  column's rounding error is spread over the columns not yet quantised through the inverse of the calibration
  Gram X^T X, so that the layer's output on the calibration inputs, not its weights, stays close.
- `float_zero` (off by default): int4 zero points as floats, each block's range its own min .. max (MatMulNBits'
  unpacked zero points), rather than integer codes with 0 forced into the range. A block whose weights already sit
  on a uniform 16-level grid (every Q4_1 / Q4_K block of a GGUF checkpoint such as the bundled SmolLM2) is then kept
  exactly, and gptq leaves a linear that rounds without loss as it is (calibrating only the others: after pruning,
  down_proj, whose kept input columns no longer fill the checkpoint's blocks). On SmolLM2 that is +1.8 % perplexity
  instead of +13 %; but onnxruntime 1.32's CPU kernel has no fast path for float zero points at any accuracy
  level: decode is 20x slower (168 ms/token against 7.7), so it stays opt-in (not measured on CUDA).
- `head_bits`: the LM head (SmolLM2 ties it to the embedding; it holds 21 % of the weights and all the logits)
  as int4, int8, or fp32 (0); `head_symmetric` writes it without zero points, absmax / (2^(bits-1) - 1) per block
  (a Q8_0 block exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gisp_fx.errors import GispError
from gisp_fx.passes.calib_loop import run_batches, sequence_losses
from gisp_fx.passes.calib_loop import windows as calibration_windows

BLOCK = 32
BITS = 4
ACCURACY_LEVEL = 4
MIN_K = 16  # MatMulNBits' smallest reduction dimension
METHODS = ("rtn", "gptq")
CALIB_WINDOWS, CALIB_LEN = 64, 128  # gptq's calibration: windows of WikiText-2 train (as `compile` calibrates)
KINDS = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


@dataclass(frozen=True)
class Int4Config:
    """How `--quantize int4` writes each linear; `skip` (an ablation knob) leaves those linear kinds fp32."""

    method: str = "gptq"
    block: int = BLOCK
    symmetric: bool = False
    clip: int = 8  # shrunken ranges searched per block (0: the block's min/max)
    head_bits: int = 4  # the LM head: 4, 8, or 0 (fp32 MatMul)
    accuracy_level: int = ACCURACY_LEVEL
    skip: tuple[str, ...] = field(default_factory=tuple)
    damp: float = 0.01  # gptq: added to the Gram's diagonal, as a fraction of its mean
    float_zero: bool = False  # 4-bit zero points as floats (the block's own min .. max): exact, slow on CPU
    head_symmetric: bool = False  # the LM head symmetric (scale absmax / (2^(bits-1) - 1), no zero points)

    def __post_init__(self):
        if self.method not in METHODS:
            raise GispError(f"int4: method '{self.method}' is not one of {', '.join(METHODS)}")
        if self.block not in (16, 32, 64, 128, 256):
            raise GispError(f"int4: block {self.block}; MatMulNBits takes 16, 32, 64, 128 or 256")
        if self.head_bits not in (0, 4, 8):
            raise GispError(f"int4: head_bits {self.head_bits}; expected 4, 8 or 0 (fp32)")
        if self.float_zero and self.symmetric:
            raise GispError("int4: float_zero is an asymmetric range (the block's min .. max); not with symmetric")
        unknown = set(self.skip) - set(KINDS)
        if unknown:
            raise GispError(f"int4: skip names {sorted(unknown)}; linear kinds are {', '.join(KINDS)}")

    def bits_for(self, kind: str) -> int:
        """Bits of linear kind `kind` ('lm_head', 'down_proj', ...); 0: left fp32."""
        if kind in self.skip:
            return 0
        return self.head_bits if kind == "lm_head" else BITS

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"


def _range(x: np.ndarray, bits: int, symmetric: bool, ratio, float_zero: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Blocks x [..., block] -> (scale, zero) of the range shrunk by `ratio` (scalar or per block). Integer zero
    points need 0 inside the range (it must be a code); a float zero point takes the block's own min .. max, which
    a block already on a uniform 2^bits-level grid (a Q4_1 / Q4_K GGUF block) keeps exactly."""
    top = (1 << bits) - 1
    if symmetric:  # zero fixed mid-range (MatMulNBits' default zero point): codes 1 .. 2^b - 1 around 2^(b-1)
        half = 1 << (bits - 1)
        scale = np.abs(x).max(-1) * ratio / (half - 1)  # absmax -> +-(2^(b-1) - 1): a Q8_0 GGUF block exactly
        zero = np.full(scale.shape, half, np.float32)
    elif float_zero:
        lo, hi = x.min(-1), x.max(-1)
        mid = (lo + hi) / 2
        lo, hi = mid + (lo - mid) * ratio, mid + (hi - mid) * ratio
        scale = (hi - lo) / top
        scale = np.where(scale == 0, np.maximum(np.abs(lo), 1.0), scale)  # a constant block: code 0 is its value
        zero = -lo / scale
    else:
        lo = np.minimum(x.min(-1), 0.0) * ratio
        hi = np.maximum(x.max(-1), 0.0) * ratio
        scale = (hi - lo) / top
        scale = np.where(scale == 0, 1.0, scale)
        zero = np.clip(np.round(-lo / scale), 0, top)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return scale, zero.astype(np.float32)


def _codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round(x / scale[..., None] + zero[..., None]), 0, (1 << bits) - 1)  # zero may be a float


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    n, k = w.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.float32)
    padded[:, :k] = w
    return padded.reshape(n, blocks, block)


def quantize_blocks(w: np.ndarray, block: int = BLOCK, bits: int = BITS, symmetric: bool = False, clip: int = 0,
                    importance: np.ndarray | None = None,
                    float_zero: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [N, K] -> (codes [N, blocks, block] uint8, scales [N, blocks], zero points [N, blocks]: uint8, or float32
    with `float_zero`), round to
    nearest; `clip` > 0 searches ratios 1 .. 1 - 0.025·(clip-1) of the range per block, minimising the squared
    error weighted by `importance` [K] (the inputs' mean square) when given."""
    x = _blocks(np.asarray(w, np.float32), block)
    best_s, best_z = _range(x, bits, symmetric, 1.0, float_zero)
    if clip > 0:
        weight = np.ones(x.shape[1:], np.float32) if importance is None else _blocks(importance[None], block)[0]
        best_err = np.full(x.shape[:2], np.inf, np.float32)
        for ratio in 1.0 - 0.025 * np.arange(clip):
            s, z = _range(x, bits, symmetric, ratio, float_zero)
            err = ((((_codes(x, s, z, bits) - z[..., None]) * s[..., None] - x) ** 2) * weight).sum(-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
    return _codes(x, best_s, best_z, bits).astype(np.uint8), best_s, best_z if float_zero else best_z.astype(np.uint8)


def gptq_blocks(w: np.ndarray, gram: np.ndarray, block: int = BLOCK, bits: int = BITS, symmetric: bool = False,
                clip: int = 0, damp: float = 0.01, float_zero: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [N, K], calibration Gram X^T X [K, K] -> (codes, scales, zero points) as quantize_blocks, each block's
    range taken from the error-updated weights when the block is reached, then GPTQ's column-by-column rounding."""
    import torch

    n, k = w.shape
    if gram.shape != (k, k):
        raise GispError(f"int4 gptq: Gram {gram.shape} does not match weight [out {n}, in {k}]")
    W = torch.tensor(w, dtype=torch.float32)
    H = torch.tensor(gram, dtype=torch.float64).clone()
    dead = torch.diag(H) == 0  # inputs never seen (e.g. a zero-filled query head): weight irrelevant
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    diag = torch.diag(H).clone()
    H += torch.eye(k, dtype=torch.float64) * damp * diag.mean()
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    blocks = -(-k // block)
    codes = np.zeros((n, blocks, block), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, blocks), np.float32 if float_zero else np.uint8)
    chunk = block * max(1, 128 // block)  # lazy batch: columns of a chunk update each other, the rest once
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of vector-sized steps: more threads only spin (10x the CPU, measured)
    try:
        _gptq_columns(W, Hinv, diag, codes, scales, zeros, block, bits, symmetric, clip, chunk, float_zero)
    finally:
        torch.set_num_threads(threads)
    return codes, scales, zeros


def _gptq_columns(W, Hinv, diag, codes, scales, zeros, block, bits, symmetric, clip, chunk, float_zero) -> None:
    import torch

    n, k = W.shape
    for c0 in range(0, k, chunk):
        c1 = min(k, c0 + chunk)
        W1, E1 = W[:, c0:c1].clone(), torch.zeros(n, c1 - c0)
        for j in range(c0, c1):
            if (j - c0) % block == 0:
                b, lo, hi = j // block, j - c0, min(c1, j + block) - c0
                importance = diag[j:j + hi - lo].float().numpy() if clip else None
                _, s, z = quantize_blocks(W1[:, lo:hi].numpy(), hi - lo, bits, symmetric, clip, importance,
                                          float_zero)
                scales[:, b], zeros[:, b] = s[:, 0], z[:, 0]
                st, zt = torch.from_numpy(s[:, 0]), torch.from_numpy(z[:, 0].astype(np.float32))
            col = W1[:, j - c0]
            c = torch.clamp(torch.round(col / st + zt), 0, (1 << bits) - 1)
            codes[:, b, j - b * block] = c.numpy().astype(np.uint8)
            err = (col - (c - zt) * st) / Hinv[j, j]
            W1[:, j - c0:] -= err[:, None] * Hinv[j, j:c1][None]
            E1[:, j - c0] = err
        W[:, c1:] -= E1 @ Hinv[c0:c1, c1:]


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, k: int) -> np.ndarray:
    """The weight [N, K] that MatMulNBits computes with."""
    w = (codes.astype(np.float32) - zero[..., None].astype(np.float32)) * scale[..., None]
    return w.reshape(w.shape[0], -1)[:, :k]


def pack(codes: np.ndarray, zero: np.ndarray, bits: int = BITS) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' layout: int4 two values per byte, the first in the low nibble (B [N, blocks, block/2], zero
    points [N * ceil(blocks/2)]); int8 one per byte (B [N, blocks, block], zero points [N * blocks]). Float zero
    points stay unpacked, [N * blocks] float32 (MatMulNBits tells the two formats apart by type)."""
    if zero.dtype == np.float32:
        return (codes.astype(np.uint8) if bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8),
                zero.reshape(-1))
    if bits == 8:
        return codes.astype(np.uint8), zero.astype(np.uint8).reshape(-1)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    n, blocks = zero.shape
    z = np.zeros((n, blocks + blocks % 2), np.uint8)
    z[:, :blocks] = zero
    zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    return packed, zp.reshape(-1)


def matmul_nbits(g, x: str, weight: np.ndarray, bias: np.ndarray | None, stem: str,
                 config: Int4Config | None = None, gram: np.ndarray | None = None) -> str | None:
    """Write x @ weight.T (+ bias) as one MatMulNBits node of graph builder `g`; weight [N, K]. None: `config`
    leaves this linear kind fp32 (the caller writes a MatMul)."""
    config = config or Int4Config()
    kind = stem.rsplit(".", 1)[-1]
    bits = config.bits_for(kind)
    if bits == 0:
        return None
    symmetric = config.head_symmetric if kind == "lm_head" else config.symmetric
    float_zero = config.float_zero and bits == 4 and not symmetric  # onnxruntime takes float zero points at 4 bits
    n, k = weight.shape
    if k < MIN_K or n < 1:
        raise GispError(f"--quantize int4: {stem} has shape [out {n}, in {k}]; MatMulNBits needs at least {MIN_K} "
                        "input features; export this model without --quantize int4")
    lossless = None
    if config.method == "gptq":  # weights already on a grid (a GGUF's): gptq would change nothing
        codes, scale, zero = quantize_blocks(weight, config.block, bits, symmetric, 0, None, float_zero)
        lossless = _lossless(weight, codes, scale, zero)
    if config.method == "gptq" and not lossless:
        if gram is None:
            raise GispError(f"--quantize int4 (gptq): no calibration Gram for {stem}")
        codes, scale, zero = gptq_blocks(weight, gram, config.block, bits, symmetric, config.clip, config.damp,
                                         float_zero)
    elif config.method != "gptq":
        importance = np.diag(gram).astype(np.float32) if gram is not None else None
        codes, scale, zero = quantize_blocks(weight, config.block, bits, symmetric, config.clip, importance,
                                             float_zero)
    packed, zp = pack(codes, zero, bits)
    inputs = [x, g.const(stem + ".qweight", packed), g.const(stem + ".scales", scale.reshape(-1)),
              "" if symmetric else g.const(stem + ".zero_points", zp)]  # symmetric: the default zero point
    if bias is not None and np.any(bias):
        inputs += ["", g.const(stem + ".bias", bias.astype(np.float32))]
    while inputs[-1] == "":
        inputs.pop()
    return g.op("MatMulNBits", inputs, domain="com.microsoft", K=k, N=n, bits=bits, block_size=config.block,
                accuracy_level=config.accuracy_level, stem=stem)


def _lossless(weight: np.ndarray, codes, scale, zero) -> bool:
    """Whether the codes reproduce `weight` to float rounding (its blocks were on a 2^bits-level grid already)."""
    err = np.abs(dequantize(codes, scale, zero, weight.shape[1]) - weight).max()
    return bool(err <= 1e-6 * max(float(np.abs(weight).max()), 1e-30))


# the linear whose input each Gram is taken at -> the linears of the fused graph that read that input
GRAM_INPUTS = {"q_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",), "gate_proj": ("gate_proj", "up_proj"),
               "down_proj": ("down_proj",)}


def gram_modules(model, config: Int4Config) -> list[str]:
    """Names of the linears (q_proj for QKV, o_proj, gate_proj for gate and up, down_proj, the LM head) whose input
    Gram `config` needs: every one for rtn with a clip search; for gptq those whose weights round to nearest with a
    loss (a linear already on its grid, e.g. a Q4_1 GGUF's untouched blocks, is written as it is)."""
    import torch

    if not config.needs_calibration and not config.clip:
        return []
    head = model.get_output_embeddings()
    modules = dict(model.named_modules())
    out = []
    for name, m in modules.items():
        if not isinstance(m, torch.nn.Linear) or not (m is head or name.rsplit(".", 1)[-1] in GRAM_INPUTS):
            continue
        kind = "lm_head" if m is head else name.rsplit(".", 1)[-1]
        bits = config.bits_for(kind)
        if bits == 0:
            continue
        if config.method != "gptq" or (kind == "o_proj" and _head_dim(model) % config.block):
            out.append(name)  # o_proj's columns move by heads: blocks stay whole only when a head is whole blocks
            continue
        symmetric = config.head_symmetric if kind == "lm_head" else config.symmetric
        float_zero = config.float_zero and bits == 4 and not symmetric
        readers = [m] if kind == "lm_head" else [modules[name.rsplit(".", 1)[0] + "." + r]
                                                 for r in GRAM_INPUTS[kind] if name.rsplit(".", 1)[0] + "." + r in modules]
        for lin in readers:
            w = lin.weight.detach().float().cpu().numpy()
            if w.shape[1] < MIN_K or not _lossless(w, *quantize_blocks(w, config.block, bits, symmetric, 0, None,
                                                                       float_zero)):
                out.append(name)
                break
    return out


def _head_dim(model) -> int:
    cfg = model.config.get_text_config(decoder=True)
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def input_grams(model, windows, batch_size: int = 8, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Calibration windows [n, seq] -> X^T X [in, in] (float32, summed over tokens) of the inputs of the linears
    `names` (default: every linear the fused graph quantises with its own input: q_proj for QKV, o_proj, gate_proj
    for gate and up, down_proj, the LM head), by module name. Each batch's product is fp32, their sum fp64."""
    import torch

    head = model.get_output_embeddings()
    wanted = {name: m for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and (m is head or name.rsplit(".", 1)[-1] in GRAM_INPUTS)}
    if names is not None:
        wanted = {name: m for name, m in wanted.items() if name in set(names)}
    grams: dict[str, torch.Tensor] = {}
    if not wanted:
        return {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            grams[name] = grams.get(name, 0) + (x.T @ x).double()
        return fn

    run_batches(model, calibration_windows(windows, batch_size), sequence_losses,
                hooks={name: hook(name) for name in wanted}, desc="int4 calibration")
    return {name: g.float().numpy() for name, g in grams.items()}


def calibration_grams(model, tokenizer, config: Int4Config, windows=None) -> dict[str, np.ndarray] | None:
    """The Grams `config` needs (None for rtn without a clip search; see gram_modules), from `windows` [n, seq] or
    from CALIB_WINDOWS windows of WikiText-2 train cut by `tokenizer`."""
    if not config.needs_calibration and not config.clip:
        return None
    names = gram_modules(model, config)
    if not names:
        return {}
    if windows is None:
        if tokenizer is None:
            raise GispError(f"--quantize int4 ({config.method}, clip {config.clip}) calibrates on WikiText-2 train "
                            "and needs the model's tokenizer; save the tokenizer with the model, or pass "
                            "calibration windows")
        from gisp_fx.datasets import lm_windows, wikitext2_train_text

        windows = lm_windows(tokenizer, wikitext2_train_text(), CALIB_WINDOWS, CALIB_LEN, 0, "WikiText-2 train")
    return input_grams(model, windows, names=names)
