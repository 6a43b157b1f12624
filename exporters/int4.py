"""Block-wise int4 weight-only quantisation to onnxruntime's `MatMulNBits` (round to nearest, asymmetric per block).

A weight [N, K] (nn.Linear's [out, in]) is cut along K into blocks of BLOCK; each block gets a float scale and a
4-bit zero point, each weight the 4-bit code round(w / scale) + zero. Codes are packed two per byte, the first
in the low nibble, as MatMulNBits reads them: B [N, blocks, BLOCK / 2] uint8, scales [N * blocks], zero points
[N * ceil(blocks / 2)] uint8. `accuracy_level` 4 lets onnxruntime's CPU kernel run the product in int8.
"""

from __future__ import annotations

import numpy as np

from gisp_fx.errors import GispError

BLOCK = 32
BITS = 4
ACCURACY_LEVEL = 4
MIN_K = 16  # MatMulNBits' smallest reduction dimension


def quantize_blocks(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [N, K] float -> (codes [N, blocks, block] uint8 in 0..15, scales [N, blocks], zero points [N, blocks])."""
    n, k = w.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.float32)
    padded[:, :k] = w
    x = padded.reshape(n, blocks, block)
    lo = np.minimum(x.min(-1), 0.0)
    hi = np.maximum(x.max(-1), 0.0)
    scale = (hi - lo) / 15.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)
    codes = np.clip(np.round(x / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    return codes, scale, zero


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, k: int) -> np.ndarray:
    """The weight [N, K] that MatMulNBits computes with."""
    w = (codes.astype(np.float32) - zero[..., None].astype(np.float32)) * scale[..., None]
    return w.reshape(w.shape[0], -1)[:, :k]


def pack(codes: np.ndarray, zero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two 4-bit values per byte, the first in the low nibble: (B [N, blocks, block/2], zero points [N * ceil(blocks/2)])."""
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    n, blocks = zero.shape
    z = np.zeros((n, blocks + blocks % 2), np.uint8)
    z[:, :blocks] = zero
    zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    return packed, zp.reshape(-1)


def matmul_nbits(g, x: str, weight: np.ndarray, bias: np.ndarray | None, stem: str) -> str:
    """Write x @ weight.T (+ bias) as one MatMulNBits node of graph builder `g`; weight [N, K]."""
    n, k = weight.shape
    if k < MIN_K or n < 1:
        raise GispError(f"--quantize int4: {stem} has shape [out {n}, in {k}]; MatMulNBits needs at least {MIN_K} "
                        "input features; export this model without --quantize int4")
    codes, scale, zero = quantize_blocks(weight)
    packed, zp = pack(codes, zero)
    inputs = [x, g.const(stem + ".qweight", packed), g.const(stem + ".scales", scale.reshape(-1)),
              g.const(stem + ".zero_points", zp)]
    if bias is not None and np.any(bias):
        inputs += ["", g.const(stem + ".bias", bias.astype(np.float32))]
    return g.op("MatMulNBits", inputs, domain="com.microsoft", K=k, N=n, bits=BITS, block_size=BLOCK,
                accuracy_level=ACCURACY_LEVEL, stem=stem)
