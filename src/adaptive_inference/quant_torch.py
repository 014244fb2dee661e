"""Torch runtime for the packed gears (quant.py formats): `prepare(packed)` once, then `linear(x, prepared)`.

The matmul is in torch_kernels (a C++ extension built at first use). Like llama.cpp's Q4_0 x Q8_0 path, it
quantizes the activations to int8 per block of 32 (scale max|x|/127) and runs integer dot products on the
packed codes (AVX2 maddubs/madd), so a 4-bit gear costs fewer instructions per weight than widening the
codes to fp32 would: on this CPU a float-activation kernel ran int4 no faster than int8 (compute-bound),
this one runs int4 near memory speed. The result is x~ @ w~.T with x~ the rounded activations, so the
extra error is bounded per output by sum_k |w~_nk| |x_k - x~_k| <= sum_k |w~_nk| d_block(k) / 2 (tested).
Without AVX2+FMA+F16C the same source builds plain C++ loops with the same arithmetic.
Output rows are split over torch's threads; a batch runs 8 rows per pass over the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import quant
from .errors import UserError
from .torch_kernels import kernels


@dataclass(frozen=True)
class TorchPacked:
    """A packed weight in the kernel's layout; shares memory with the numpy state it came from."""

    kind: str  # "int8" or "int4"
    shape: tuple[int, int]  # [N, K]
    tensors: tuple  # int8: (q, scale); int4: (codes, residual or empty, scale, minv)
    group_size: int = 0
    capturable = False  # C++ kernels: opaque to torch.compile and to CUDA graph capture

    @property
    def args(self) -> tuple:
        return self.tensors if self.kind == "int8" else (*self.tensors, self.group_size)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, self, bias)


def prepare(p: quant.Int8Weight | quant.Int4Weight, *, depth: int | None = None) -> TorchPacked:
    """Kernel layout of a packed weight, read at depth (nested: 4 or 8). No copy and no float weight:
    the two gears of a nested weight share the same tensors. Builds the extension on first use."""
    kernels()
    if isinstance(p, quant.Int8Weight):
        return TorchPacked("int8", p.shape, (torch.from_numpy(np.ascontiguousarray(p.q)),
                                             torch.from_numpy(np.ascontiguousarray(p.scale, np.float32))))
    depth = max(p.depths) if depth is None else depth
    if depth not in p.depths:
        raise UserError(f"quant_torch.prepare: depth {depth} not stored (have {p.depths})")
    residual = torch.from_numpy(p.residual) if depth == 8 else torch.empty(0, dtype=torch.uint8)
    return TorchPacked("int4", p.shape, (torch.from_numpy(np.ascontiguousarray(p.codes)), residual,
                                         torch.from_numpy(np.ascontiguousarray(p.scale, np.float16)),
                                         torch.from_numpy(np.ascontiguousarray(p.minv, np.float16))),
                       p.group_size)


def linear(x: torch.Tensor, w: TorchPacked, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N], like F.linear(x, dequantized weight, bias) (up to the activation rounding)."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise UserError(f"quant_torch.linear: input has {x.shape[-1]} features, weight expects {k}")
    # decode calls this ~200 times a token: a 2-D contiguous fp32 x skips every view and cast (~1 us each)
    flat = x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous()
    x2 = x if flat else x.reshape(-1, k).to(torch.float32).contiguous()
    fn = kernels().w8_linear if w.kind == "int8" else kernels().w4_linear
    y = fn(x2, *w.args)
    if bias is not None:
        y += bias
    return y if flat else y.reshape(*x.shape[:-1], n).to(x.dtype)
