"""A decode block's packed matmuls with the small ops around them folded in, as two custom ops, so that a block
is its 4 matmuls and the attention op: 5 launches where the separate ops took 10 (the 8B shape, compiled, on an
H100: two RMSNorm kernels, the SiLU, the sum of a split matmul's slices and an x prep besides them, ~0.36 ms a
step; docs/measurements, 2026-12-07).

- `w8_norm_linear(x, lnw, eps, q, scale, bias, glu)`: RMSNorm(x) * lnw times the int8 weight (qkv; gate_up with
  glu, which returns silu(gate) * up of the two halves of its output). Each program of the kernel takes the
  norm of x itself before its dot (x is a few KB, in L2), so no launch makes the normed x.
- `w8_linear_add(x, q, scale, residual)`: residual + x times the weight (o, down).
No split of K: a program owns whole output rows (gate_up: row i of both halves), so it finishes them itself and
nothing is left to sum.

`w4_norm_linear` and `w4_linear_add` are the same for 4-bit codes (quant_cuda's "w4": split halves, an fp16
scale and min per group) read at depth 4, or at depth 8 with the nested format's second plane.

Their implementations here are the plain torch ops they replace (any device; what a CPU test runs);
triton_block registers the CUDA kernels. Rows are decode rows: x [M, K] with M at most ROWS."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROWS = 4  # the most decode rows the ops take (triton_kernels.GEMV_ROWS: x rows a GEMV program reads one by one)


def _w8(a: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """a [M, K] times (q [N, K] int8 * scale [N]).T in a's dtype, + bias [N] when not empty (quant_cuda.linear's
    arithmetic)."""
    y = (a.float() @ q.float().T * scale.float()).to(a.dtype)
    return y + bias if bias.numel() else y


@torch.library.custom_op("adaptive_inference::w8_norm_linear", mutates_args=())
def w8_norm_linear(x: torch.Tensor, lnw: torch.Tensor, eps: float, q: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor, glu: bool) -> torch.Tensor:
    """[M, N] in x's dtype: F.rms_norm(x [M, K], lnw, eps) times the int8 weight, + bias (empty: none); glu:
    silu(gate) * up of its halves [gate | up], [M, N / 2]."""
    return _glu(_w8(F.rms_norm(x, (x.shape[-1],), lnw, eps), q, scale, bias), glu)


@w8_norm_linear.register_fake
def _(x, lnw, eps, q, scale, bias, glu):
    return x.new_empty((x.shape[0], q.shape[0] // 2 if glu else q.shape[0]))


@torch.library.custom_op("adaptive_inference::w8_linear_add", mutates_args=())
def w8_linear_add(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """[M, N] in x's dtype: residual [M, N] + x [M, K] times the int8 weight."""
    return residual + _w8(x, q, scale, x.new_empty(0))


@w8_linear_add.register_fake
def _(x, q, scale, residual):
    return x.new_empty((x.shape[0], q.shape[0]))


def w4_dequantize(codes: torch.Tensor, plane: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor,
                  group_size: int) -> torch.Tensor:
    """[N, K] fp32 of 4-bit codes [N, K / 2] in w4_linear's split halves (byte j: column j low, j + K / 2 high)
    with a scale and min [N, K / group] per group: code * scale + min; with the nested format's second plane
    (same layout; empty: none) the 8-bit code 16 code + plane on a scale / 16 grid centred by 7.5 steps."""
    def unpack(b):
        return torch.cat([b & 15, b >> 4], dim=1).float()

    c, s = unpack(codes), scale.float()
    if plane.numel():
        c, s = 16 * c + unpack(plane) - 7.5, s / 16
    g = torch.arange(c.shape[1], device=c.device) // group_size
    return c * s[:, g] + minv.float()[:, g]


def _glu(y: torch.Tensor, glu: bool) -> torch.Tensor:
    if not glu:
        return y
    gate, up = y.chunk(2, -1)
    return F.silu(gate) * up


@torch.library.custom_op("adaptive_inference::w4_norm_linear", mutates_args=())
def w4_norm_linear(x: torch.Tensor, lnw: torch.Tensor, eps: float, codes: torch.Tensor, plane: torch.Tensor,
                   scale: torch.Tensor, minv: torch.Tensor, group_size: int, bias: torch.Tensor,
                   glu: bool) -> torch.Tensor:
    """w8_norm_linear for 4-bit codes (w4_dequantize)."""
    w = w4_dequantize(codes, plane, scale, minv, group_size)
    y = (F.rms_norm(x, (x.shape[-1],), lnw, eps).float() @ w.T).to(x.dtype)
    return _glu(y + bias if bias.numel() else y, glu)


@w4_norm_linear.register_fake
def _(x, lnw, eps, codes, plane, scale, minv, group_size, bias, glu):
    return x.new_empty((x.shape[0], codes.shape[0] // 2 if glu else codes.shape[0]))


@torch.library.custom_op("adaptive_inference::w4_linear_add", mutates_args=())
def w4_linear_add(x: torch.Tensor, codes: torch.Tensor, plane: torch.Tensor, scale: torch.Tensor,
                  minv: torch.Tensor, group_size: int, residual: torch.Tensor) -> torch.Tensor:
    """w8_linear_add for 4-bit codes (w4_dequantize)."""
    return residual + (x.float() @ w4_dequantize(codes, plane, scale, minv, group_size).T).to(x.dtype)


@w4_linear_add.register_fake
def _(x, codes, plane, scale, minv, group_size, residual):
    return x.new_empty((x.shape[0], codes.shape[0]))
