"""MLX runtime for the packed gears (quant.py formats): `prepare(packed)` once, then `linear(x, prepared)`.

MLX's own affine format (uint32 words, per-group scale and bias) holds every quant.py format exactly:
int4 is already affine; int8 per-channel becomes codes q + 128 with bias -128 scale in every group; a nested
weight read at depth 8 becomes 8-bit codes 16 q + r. So both backends multiply by the same dequantized
weights. MLX cannot read two 4-bit planes in one kernel, so a nested weight's two depths are two separate
MLX arrays (no memory shared between the low and mid gear here, unlike torch).
Scales and biases are kept in float32 (MLX requires them in the activations' dtype; fp16 -> fp32 is exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import quant
from .blas import import_mlx
from .errors import UserError

MLX_GROUPS = (128, 64, 32)  # group sizes mx.quantized_matmul accepts (affine mode)


@dataclass(frozen=True)
class MLXPacked:
    shape: tuple[int, int]  # [N, K]
    w: object  # mx uint32 [N, K * bits / 32]
    scales: object  # mx float32 [N, K / group_size]
    biases: object
    group_size: int
    bits: int


def _pack_words(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [N, K] -> uint32 [N, K * bits / 32], element j at bits (j % per) * bits of word j // per."""
    n, k = codes.shape
    per = 32 // bits
    c = codes.reshape(n, k // per, per).astype(np.uint32)
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(c << shifts, axis=2).astype(np.uint32)


def prepare(p: quant.Int8Weight | quant.Int4Weight, *, depth: int | None = None) -> MLXPacked:
    """MLX affine arrays that dequantize to exactly quant.dequantize(p, depth=depth)."""
    mx = import_mlx()
    n, k = p.shape
    if isinstance(p, quant.Int8Weight):
        group = next((g for g in MLX_GROUPS if k % g == 0), None)
        if group is None:
            raise UserError(f"quant_mlx.prepare: int8 in-features {k} is not a multiple of 32 (MLX groups)")
        codes = (p.q.astype(np.int16) + 128).astype(np.uint8)
        scale = np.repeat(p.scale.astype(np.float32)[:, None], k // group, axis=1)
        bias = scale * np.float32(-128)
        bits = 8
    else:
        depth = max(p.depths) if depth is None else depth
        if p.group_size not in MLX_GROUPS:
            raise UserError(f"quant_mlx.prepare: group_size {p.group_size} not in MLX's {MLX_GROUPS}")
        c, scale, bias = quant.codes(p, depth)
        codes, group, bits = c.astype(np.uint8), p.group_size, depth
    return MLXPacked(shape=(n, k), w=mx.array(_pack_words(codes, bits)), scales=mx.array(scale),
                     biases=mx.array(bias), group_size=group, bits=bits)


def linear(x, w: MLXPacked, bias=None):
    """x [..., K] (mx float32) -> [..., N], like x @ dequantized(w).T + bias."""
    mx = import_mlx()
    if x.shape[-1] != w.shape[1]:
        raise UserError(f"quant_mlx.linear: input has {x.shape[-1]} features, weight expects {w.shape[1]}")
    y = mx.quantized_matmul(x, w.w, w.scales, w.biases, transpose=True, group_size=w.group_size, bits=w.bits)
    return y if bias is None else y + bias


def dequantize(w: MLXPacked):
    """The float32 weight MLX sees (for tests)."""
    mx = import_mlx()
    return mx.dequantize(w.w, w.scales, w.biases, group_size=w.group_size, bits=w.bits)
