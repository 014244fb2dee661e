"""CUDA runtime for the packed gears (quant.py formats): `prepare(packed)` once, then `linear(x, prepared)`.

- 4-bit codes (int4, and a nested weight read at depth 4 or 8) run on our Triton kernels
  (triton_kernels.w4_linear: both nibble planes re-laid in split halves, the format's fp16 scale and min per
  group; at depth 8 the 8-bit code rebuilt in registers from both planes). End to end on an H100 (8B shape,
  compiled + graphs, batch 1, paired in one run, 2026-12-07): 1.916x against 1.848x for torch's own tinygemm
  kernel (aten._weight_int4pack_mm, what torchao's int4 weight-only layout calls: bf16 activations, the codes
  in its tiled layout, per group a bf16 (scale, zero) with w~ = (q - 8) * scale + zero, so zero = minv + 8 *
  scale), and ahead at batch 8 too (1.07x / 1.04x, 2026-12-06): "auto" takes ours for compiled decode where
  its shape rules allow (group 32 / 64 / 128, in-features a multiple of 2 x group). Eager decode has only our
  fp32 kernel (the fp16-pair one needs its x prep fused by the compiler), slower alone than tinygemm (an 8B
  layer 87.6 vs 82.1 us, H100, before its 128-bit code loads; not remeasured since): there "auto" keeps
  tinygemm where its rules allow (group 32 to 256, in-features a multiple of 64, out-features of 8).
- int8 (per-row scale) runs on our Triton kernels (triton_kernels.w8_linear: reads the int8 codes once,
  widens them in registers; a CUDA-core reduction at decode batch sizes, tensor cores above). Measured on
  an H200 (docs/measurements/cuda_packed_kernels_*.json), the
  dequantize-in-matmul expression F.linear(x, q.to(x.dtype)) * scale that inductor compiles reached 0.77
  TB/s at batch 1, 2.6x slower than the bf16 weight: no int8 path of torch's own pays at decode sizes.
All are aten ops or custom ops on tensors, so packed plans are compiled and captured as CUDA graphs like full ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from . import block_op, gated_linear_op, quant
from .errors import UserError

INT4_GROUPS = (32, 64, 128, 256)  # tinygemm's
TRITON_GROUPS = (32, 64, 128)  # w4_linear's (a group may not span two of its column tiles of 128 or 256)


@dataclass(frozen=True)
class CudaPacked:
    kind: str  # "int8", "int4" (tinygemm) or "w4" (w4_linear, depth 4 or nested depth 8)
    shape: tuple[int, int]  # [N, K]
    tensors: tuple  # int8: (q [N, K] int8, scale [N]); int4: (tiled codes, scale_and_zero [K/g, N, 2] bf16);
    # w4: (codes [N, K/2] split halves, residual plane (same layout) or an empty tensor, scale, min [N, K/g] fp16)
    group_size: int = 0
    nested: bool = False  # w4 read at depth 8
    splits: int = 1  # int8 / w4: slices of K the Triton kernels split the matmul into (gated_linear_op.split_k)
    pairs: bool = True  # int8 / w4 at depth 4: the fp16-pair kernels where they apply (triton_kernels.f16x2_gemv)
    block: bool = False  # int8 / w4: a decode block on these weights runs as block_op's ops
    capturable = True  # aten ops and a custom op: compiled and captured like dense weights

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, self, bias)

    def norm_linear(self, x: torch.Tensor, lnw: torch.Tensor, eps: float, bias: torch.Tensor | None = None,
                    glu: bool = False) -> torch.Tensor:
        """RMSNorm(x [M, K]) * lnw times this weight (+ bias; glu: silu(gate) * up of the halves), one op
        (block_op's w8_ / w4_norm_linear)."""
        b = x.new_empty(0) if bias is None else bias
        if self.kind == "int8":
            return block_op.w8_norm_linear(x, lnw, eps, *self.tensors, b, glu)
        return block_op.w4_norm_linear(x, lnw, eps, *self.tensors, self.group_size, b, glu)

    def linear_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x times this weight, one op (block_op's w8_ / w4_linear_add)."""
        if self.kind == "int8":
            return block_op.w8_linear_add(x, *self.tensors, residual)
        return block_op.w4_linear_add(x, *self.tensors, self.group_size, residual)


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


def split_halves(plane: np.ndarray) -> np.ndarray:
    """A quant.py nibble plane [N, K/2] -> w4_linear's: byte j = code of column j | code of column j + K/2 << 4."""
    c = quant.unpack_nibbles(plane)
    half = c.shape[1] // 2
    return np.ascontiguousarray(c[:, :half] | (c[:, half:] << 4))


def triton_ok(p: quant.Int4Weight) -> bool:
    return p.group_size in TRITON_GROUPS and p.shape[1] % (2 * p.group_size) == 0


def four_bit_kernel(p: quant.Int4Weight, depth: int, kernel: str = "auto", compiled: bool = True) -> str:
    """"triton" (w4_linear) or "tinygemm" for 4-bit codes read at depth: kernel "auto" takes the one measured
    faster for the decode mode (module docstring) where the weight fits it, else the other."""
    if kernel != "auto":
        return kernel
    n, k = p.shape
    tiny_ok = depth == 4 and p.group_size in INT4_GROUPS and n % 8 == 0 and k % 64 == 0
    return "triton" if triton_ok(p) and (compiled or not tiny_ok) else "tinygemm"


def prepare(p: quant.Int8Weight | quant.Int4Weight, *, depth: int | None = None, device: str = "cuda",
            kernel: str = "auto", compiled: bool = True, block: bool = False) -> CudaPacked:
    """kernel, for 4-bit codes: "auto" (four_bit_kernel: for compiled decode steps, or eager ones where not
    `compiled`), "triton" (w4_linear) or "tinygemm". block: int8 weights and 4-bit ones on w4_linear marked for
    block_op's ops."""
    def splits() -> int:  # for our Triton kernels (the device is asked only once the weight is known to fit one)
        return gated_linear_op.split_k(*p.shape, gated_linear_op.sms(device))

    if isinstance(p, quant.Int8Weight):
        return CudaPacked("int8", p.shape, (torch.from_numpy(np.ascontiguousarray(p.q)).to(device),
                                            torch.from_numpy(np.ascontiguousarray(p.scale)).to(device)), splits=splits(),
                          block=block and p.shape[1] % 4 == 0)  # the block kernel reads 4 codes a word
    depth = max(p.depths) if depth is None else depth
    if depth not in p.depths:
        raise UserError(f"quant_cuda.prepare: depth {depth} not stored (have {p.depths})")
    n, k = p.shape
    if four_bit_kernel(p, depth, kernel, compiled) == "triton" and triton_ok(p):
        t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        residual = t(split_halves(p.residual)) if depth == 8 else torch.empty(0, dtype=torch.uint8, device=device)
        return CudaPacked("w4", p.shape, (t(split_halves(p.codes)), residual, t(p.scale), t(p.minv)), p.group_size,
                          depth == 8, splits(), block=block)
    if depth != 4:
        raise UserError(f"packed weights on CUDA: a nested weight read at depth 8 needs group_size in "
                        f"{TRITON_GROUPS} and in-features a multiple of 2 x group_size, got {p.group_size}, {p.shape[1]}")
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

        y = w8_linear(x2, *w.tensors, w.splits, f16x2=None if w.pairs else False)
    elif w.kind == "w4":
        from .triton_kernels import w4_linear

        y = w4_linear(x2, *w.tensors, w.group_size, w.nested, w.splits, f16x2=None if w.pairs else False)
    else:
        y = torch._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), w.tensors[0], w.group_size,
                                      w.tensors[1]).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


def around_attention(layers: list) -> list:
    """Packed layers fitted to the attention op between their qkv and o matmuls, which inductor cannot fuse
    into: qkv in one slice of K (a split matmul's partial sums are added by the op after it, fused there into a
    residual add or the SiLU, but here a launch of its own; one slice is stored as the result, in x's dtype,
    and is as fast for qkv: 4-bit 9.9 us vs 10.6 at 4 slices, int8 11.2 vs 10.7 plus the sum) and o on the
    fp32 kernels (the fp16-pair kernels' x prep would be a launch of its own after the attention op, for
    0.9-1.6 us of kernel time: int8 8.7 vs 7.8, 4-bit 8.8 vs 7.2). 8B shape, H100, each kernel alone
    (docs/measurements, 2026-12-07)."""

    def fit(w, **kw):
        return dataclasses.replace(w, **kw) if isinstance(w, CudaPacked) else w

    return [dataclasses.replace(lw, wqkv=fit(lw.wqkv, splits=1), wo=fit(lw.wo, pairs=False)) for lw in layers]
