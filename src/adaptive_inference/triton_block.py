"""The CUDA kernel of block_op's two ops (imported on CUDA only, with triton_kernels): one int8 GEMV whose x is
made where it is read. A program owns BLOCK_N output rows and one row of x, reads its weights once as int32 words
and walks all of K (no split: it adds the residual itself). x's four columns of a word come RMS-normed (its
program first takes x's norm over the whole row, from L2), as the SwiGLU of a [gate | up] row, or as they are,
rounded through x's dtype as the separate ops would store them, then go into triton_kernels' int8 dots: fp16
pairs made in registers (no x prep launch; the ASM path, CUDA) or fp32 (the interpreter)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block_op  # noqa: F401  (defines the ops this module gives CUDA kernels)
from .triton_kernels import (
    _GEMV_CONFIGS,
    GEMV_ROWS,
    INTERPRET,
    _group_sums,
    _i8_f16x2_dot,
    _int8_byte,
    _k_slice,
    _tile,
)

PLAIN, NORM, SWIGLU = 0, 1, 2  # how the kernel makes x (PRO)


@triton.jit
def _x_cols(x_ptr, l_ptr, m, K, cols, ok, rstd, PRO: tl.constexpr):
    """Columns cols of row m of x as the matmul reads them, fp32 rounded through x's dtype: as stored (PLAIN),
    x * rstd * lnw (NORM), or silu(gate) * up of a [gate | up] row of 2K (SWIGLU)."""
    if PRO == 2:
        g = tl.load(x_ptr + m * 2 * K + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + m * 2 * K + K + cols, mask=ok, other=0.0).to(tl.float32)
        v = g / (1.0 + tl.exp(-g)) * u
    else:
        v = tl.load(x_ptr + m * K + cols, mask=ok, other=0.0).to(tl.float32)
        if PRO == 1:
            v = v * rstd * tl.load(l_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return v.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _f16_pair(a, b):
    """fp32 a, b as the fp16 pair (a low, b high) in one int32, as prep_x lays two columns."""
    lo = a.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = b.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16
    return lo | hi


@triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "PRO", "ADD", "PAIRS"])
@triton.jit
def _w8_block_kernel(x_ptr, l_ptr, w_ptr, s_ptr, b_ptr, r_ptr, y_ptr, M, N, K, eps, PRO: tl.constexpr,
                     BIAS: tl.constexpr, ADD: tl.constexpr, PAIRS: tl.constexpr, ASM: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y [M, N] = (residual +) x' [M, K] @ (q * scale).T (+ bias), x' made from x by PRO (_x_cols); q as int32
    words [N, K / 4]. PAIRS: dotted in fp16 pairs of x' / 256 (_i8_f16x2_dot), else in fp32 (_int8_byte)."""
    pid_n, m = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    BLOCK_W: tl.constexpr = BLOCK_K // 4
    KW = K // 4
    k_lo, k_hi = _k_slice(K, 0, 1, BLOCK_K)  # all of K (as bounds the interpreter's range takes too)
    rstd = 0.0
    if PRO == 1:  # the row's norm, before the dot (F.rms_norm's: fp32 mean of squares)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_ptr + m * K + rk, mask=rk < K, other=0.0).to(tl.float32)
            ss += v * v
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    if PAIRS:
        acc = tl.zeros((BLOCK_N, BLOCK_W // 4), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rw = k0 // 4 + tl.arange(0, BLOCK_W)
        ok = rw < KW
        w = _tile(w_ptr, rn, rw, N, KW)
        x0 = _x_cols(x_ptr, l_ptr, m, K, 4 * rw, ok, rstd, PRO)
        x1 = _x_cols(x_ptr, l_ptr, m, K, 4 * rw + 1, ok, rstd, PRO)
        x2 = _x_cols(x_ptr, l_ptr, m, K, 4 * rw + 2, ok, rstd, PRO)
        x3 = _x_cols(x_ptr, l_ptr, m, K, 4 * rw + 3, ok, rstd, PRO)
        if PAIRS:  # x / 256, as prep_x(x, 1 / 256): the pairs' sums stay far from fp16's range
            xa = _f16_pair(x0 * (1 / 256), x2 * (1 / 256))
            xb = _f16_pair(x1 * (1 / 256), x3 * (1 / 256))
            acc += _group_sums(_i8_f16x2_dot(w, xa[None, :], xb[None, :], ASM), BLOCK_W // 4, ASM)
        else:  # bytes 1 and 3 come out times 256
            acc += (_int8_byte(w, 0) * x0[None, :] + _int8_byte(w, 1) * (x1 * (1 / 256))[None, :]
                    + _int8_byte(w, 2) * x2[None, :] + _int8_byte(w, 3) * (x3 * (1 / 256))[None, :])
    y = tl.sum(acc, axis=1)
    if PAIRS:
        y = y * 256
    y = y * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    if BIAS:
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    if ADD:  # the matmul's result in x's dtype, then the residual add, as the separate ops round
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(r_ptr + m * N + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * N + rn, y, mask=rn < N)


def w8_block(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, pro: int, *, lnw: torch.Tensor | None = None,
             eps: float = 0.0, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
             pairs: bool = True) -> torch.Tensor:
    """_w8_block_kernel for x [M, K] (M <= GEMV_ROWS; SWIGLU: [M, 2K]) and q [N, K] int8: [M, N] in x's dtype;
    pairs: the fp16-pair dots (else fp32)."""
    (m, kx), (n, k) = x.shape, q.shape
    if m > GEMV_ROWS or k % 4 or kx != (2 * k if pro == SWIGLU else k):
        raise ValueError(f"w8_block: x {tuple(x.shape)} against weight {tuple(q.shape)} (rows <= {GEMV_ROWS}, "
                         "in-features divisible by 4)")
    x = x.contiguous()
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m)  # noqa: E731
    _w8_block_kernel[grid](x, x if lnw is None else lnw, q.view(torch.int32), scale, scale if bias is None else bias,
                           y if residual is None else residual.contiguous(), y, m, n, k, eps, PRO=pro,
                           BIAS=bias is not None, ADD=residual is not None, PAIRS=pairs, ASM=not INTERPRET)
    return y


@torch.library.register_kernel("adaptive_inference::w8_norm_linear", "cuda")
def _w8_norm_linear_cuda(x, lnw, eps, q, scale, bias):
    return w8_block(x, q, scale, NORM, lnw=lnw, eps=eps, bias=bias if bias.numel() else None)


@torch.library.register_kernel("adaptive_inference::w8_linear_add", "cuda")
def _w8_linear_add_cuda(x, q, scale, residual, swiglu):
    return w8_block(x, q, scale, SWIGLU if swiglu else PLAIN, residual=residual)
