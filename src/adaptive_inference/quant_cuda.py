"""CUDA runtime for the packed gears (quant.py formats): `prepare(packed)` once, then `linear(x, prepared)`.

- int4 (and a nested weight read at depth 4) runs on torch's own tinygemm kernel, aten._weight_int4pack_mm
  (what torchao's int4 weight-only layout calls): bf16 activations, the 4-bit codes in the kernel's tiled
  layout, and per group a bf16 (scale, zero) with w~ = (q - 8) * scale + zero, so zero = minv + 8 * scale.
  Group sizes 32 to 256; in-features a multiple of 64, out-features a multiple of 8.
- int8 (per-row scale) runs on our Triton kernel (triton_kernels.w8_linear: reads the int8 codes once,
  widens them in registers). Measured on an H200 (docs/measurements/cuda_packed_kernels_*.json), the
  dequantize-in-matmul expression F.linear(x, q.to(x.dtype)) * scale that inductor compiles reached 0.77
  TB/s at batch 1, 2.6x slower than the bf16 weight: no int8 path of torch's own pays at decode sizes.
- a nested weight at depth 8 has no CUDA kernel here: refused in one line.
Both are plain aten ops on tensors, so packed plans are compiled and captured as CUDA graphs like full ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import quant
from .errors import UserError

INT4_GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True)
class CudaPacked:
    kind: str  # "int8" or "int4"
    shape: tuple[int, int]  # [N, K]
    tensors: tuple  # int8: (q [N, K] int8, scale [N]); int4: (tiled codes, scale_and_zero [K/g, N, 2] bf16)
    group_size: int = 0
    capturable = True  # aten ops and a custom op: compiled and captured like dense weights

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, self, bias)


def scale_and_zero(p: quant.Int4Weight) -> np.ndarray:
    """[K/g, N, 2] float32 (scale, zero) of tinygemm's convention w~ = (q - 8) * scale + zero."""
    _, s, m = quant.codes(p, 4)
    return np.stack([s, m + 8 * s], -1).transpose(1, 0, 2).copy()


def inner_k_tiles(k: int) -> int:
    """The tiled layout's inner tiles (8 where K allows: the kernel's widest loads)."""
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise UserError(f"int4 on CUDA: in-features {k} is not a multiple of 32")


def prepare(p: quant.Int8Weight | quant.Int4Weight, *, depth: int | None = None, device: str = "cuda") -> CudaPacked:
    if isinstance(p, quant.Int8Weight):
        return CudaPacked("int8", p.shape, (torch.from_numpy(np.ascontiguousarray(p.q)).to(device),
                                            torch.from_numpy(np.ascontiguousarray(p.scale)).to(device)))
    depth = max(p.depths) if depth is None else depth
    if depth not in p.depths:
        raise UserError(f"quant_cuda.prepare: depth {depth} not stored (have {p.depths})")
    if depth != 4:
        raise UserError("packed weights on CUDA: a nested weight read at depth 8 has no CUDA kernel "
                        "(for the gears on CUDA set quantize.layout: separate, int8 + int4)")
    n, k = p.shape
    if p.group_size not in INT4_GROUPS or n % 8:
        raise UserError(f"int4 on CUDA: needs group_size in {INT4_GROUPS} and out-features divisible by 8, "
                        f"got group_size {p.group_size}, out-features {n}")
    codes = torch.from_numpy(quant.unpack_nibbles(p.codes)).to(device)  # uint8 [N, K], 0..15
    tiled = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).contiguous(), inner_k_tiles(k))
    sz = torch.from_numpy(scale_and_zero(p)).to(device=device, dtype=torch.bfloat16)
    return CudaPacked("int4", p.shape, (tiled, sz), p.group_size)


def linear(x: torch.Tensor, w: CudaPacked, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N], like F.linear(x, dequantized weight, bias)."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise UserError(f"quant_cuda.linear: input has {x.shape[-1]} features, weight expects {k}")
    x2 = x.reshape(-1, k)
    if w.kind == "int8":
        from .triton_kernels import w8_linear

        y = w8_linear(x2, *w.tensors)
    else:
        y = torch._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), w.tensors[0], w.group_size,
                                      w.tensors[1]).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)
