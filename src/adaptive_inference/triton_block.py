"""The CUDA kernel of block_op's two ops (imported on CUDA only, with triton_kernels): one int8 GEMV that makes its
x where it reads it and finishes its rows itself. A program owns BLOCK_N output rows (with glu, the matching
rows of both halves of [gate | up]) and one row of x, reads its weights once as int32 words and walks all of K
(no split, so nothing is left to sum and it can add the residual or take silu(gate) * up itself). x's four
columns of a word come RMS-normed (its program first takes x's norm over the whole row, from L2) or as they are,
rounded through x's dtype as the separate ops would store them, then go into triton_kernels' int8 dots: fp16
pairs made in registers (no x prep launch; ASM on CUDA, emulated in fp32 in the interpreter) or fp32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block_op  # noqa: F401  (defines the ops this module gives CUDA kernels)
from .errors import env_choice
from .triton_kernels import (
    _GEMV_CONFIGS,
    _W4_GEMV_CONFIGS,
    GEMV_ROWS,
    INTERPRET,
    _f16x2_dot,
    _group_sums,
    _i8_f16x2_dot,
    _int8_byte,
    _k_slice,
    _n8_f16x2_dot,
    _pair_sums,
    _scales,
    _tile,
    _tile_to,
    _w4_gemv_start,
)


@triton.jit
def _x_cols(x_ptr, l_ptr, m, K, cols, ok, rstd, NORM: tl.constexpr):
    """Columns cols of row m of x as the matmul reads them, fp32 rounded through x's dtype: x * rstd * lnw
    (NORM, as F.rms_norm stores it) or as stored."""
    v = tl.load(x_ptr + m * K + cols, mask=ok, other=0.0).to(tl.float32)
    if NORM:
        v = (v * rstd * tl.load(l_ptr + cols, mask=ok, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
    return v.to(tl.float32)


@triton.jit
def _f16_pair(a, b):
    """fp32 a, b as the fp16 pair (a low, b high) in one int32, as prep_x lays two columns."""
    lo = a.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = b.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16
    return lo | hi


@triton.jit
def _dot(acc, w, x0, x1, x2, x3, xa, xb, PAIRS: tl.constexpr, ASM: tl.constexpr):
    """acc + one tile of int32 words w [BLOCK_N, BLOCK_W] dotted with x's four columns a word: in fp16 pairs
    (xa, xb: prep_x's pairs of x / 256; the sums come out / 256) or in fp32 (x0..x3)."""
    if PAIRS:
        acc += _group_sums(_i8_f16x2_dot(w, xa[None, :], xb[None, :], ASM), w.shape[1] // 4, ASM)
    else:  # bytes 1 and 3 come out times 256
        acc += (_int8_byte(w, 0) * x0[None, :] + _int8_byte(w, 1) * (x1 * (1 / 256))[None, :]
                + _int8_byte(w, 2) * x2[None, :] + _int8_byte(w, 3) * (x3 * (1 / 256))[None, :])
    return acc


@triton.jit
def _rows_out(acc, s_ptr, rows, N, PAIRS: tl.constexpr):
    """The rows' dots, scaled (q * scale), fp32."""
    y = tl.sum(acc, axis=1) * (256.0 if PAIRS else 1.0)
    return y * tl.load(s_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)


@triton.jit
def _row_rstd(x_ptr, m, K, eps, NORM: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / RMS of row m of x [M, K] (F.rms_norm's: fp32 mean of squares), before the dot; 0 unless NORM."""
    rstd = 0.0
    if NORM:
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_ptr + m * K + rk, mask=rk < K, other=0.0).to(tl.float32)
            ss += v * v
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    return rstd


@triton.jit
def _finish(y, up, b_ptr, r_ptr, y_ptr, m, rn, NY, BIAS: tl.constexpr, GLU: tl.constexpr, ADD: tl.constexpr):
    """Store row m of y [M, NY] from the rows' fp32 results y (and up: the up half's, GLU), rounded through y's
    dtype where the separate ops store: + bias, silu(gate) * up, + the residual."""
    dt = y_ptr.dtype.element_ty
    if BIAS:
        y = y.to(dt).to(tl.float32) + tl.load(b_ptr + rn, mask=rn < NY, other=0.0).to(tl.float32)
    if GLU:  # gate and up as the matmul would store them, then silu(gate) * up
        g = y.to(dt).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * up.to(dt).to(tl.float32)
    if ADD:  # the matmul's result in x's dtype, then the residual add
        y = y.to(dt).to(tl.float32) + tl.load(r_ptr + m * NY + rn, mask=rn < NY, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * NY + rn, y, mask=rn < NY)


@triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "NORM", "GLU", "ADD", "PAIRS"])
@triton.jit
def _w8_block_kernel(x_ptr, l_ptr, w_ptr, s_ptr, b_ptr, r_ptr, y_ptr, M, N, K, eps, NORM: tl.constexpr,
                     GLU: tl.constexpr, BIAS: tl.constexpr, ADD: tl.constexpr, PAIRS: tl.constexpr,
                     ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row m of y = (residual +) x' [M, K] @ (q * scale).T (+ bias), q [N, K] as int32 words [N, K / 4]; x' is
    x RMS-normed (NORM) or as stored. GLU: the program owns rows rn and rn + N / 2 of the weight ([gate | up]) and
    stores silu(gate) * up [M, N / 2]. PAIRS: dotted in fp16 pairs, else in fp32. Nothing is split: each product
    is complete in its program."""
    pid_n, m = tl.program_id(0), tl.program_id(1)
    NY = N // 2 if GLU else N  # y's columns
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    BLOCK_W: tl.constexpr = BLOCK_K // 4
    KW = K // 4
    k_lo, k_hi = _k_slice(K, 0, 1, BLOCK_K)  # all of K (as bounds the interpreter's range takes too)
    rstd = _row_rstd(x_ptr, m, K, eps, NORM, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_W // 4 if PAIRS else BLOCK_W), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_W // 4 if PAIRS else BLOCK_W), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rw = k0 // 4 + tl.arange(0, BLOCK_W)
        ok = rw < KW
        x0 = _x_cols(x_ptr, l_ptr, m, K, 4 * rw, ok, rstd, NORM)
        x1 = _x_cols(x_ptr, l_ptr, m, K, 4 * rw + 1, ok, rstd, NORM)
        x2 = _x_cols(x_ptr, l_ptr, m, K, 4 * rw + 2, ok, rstd, NORM)
        x3 = _x_cols(x_ptr, l_ptr, m, K, 4 * rw + 3, ok, rstd, NORM)
        xa, xb = x0, x1
        if PAIRS:  # x / 256, as prep_x(x, 1 / 256): the pairs' sums stay far from fp16's range
            xa = _f16_pair(x0 * (1 / 256), x2 * (1 / 256))
            xb = _f16_pair(x1 * (1 / 256), x3 * (1 / 256))
        acc = _dot(acc, _tile(w_ptr, rn, rw, NY, KW), x0, x1, x2, x3, xa, xb, PAIRS, ASM)
        if GLU:
            acc_up = _dot(acc_up, _tile(w_ptr + NY * KW, rn, rw, NY, KW), x0, x1, x2, x3, xa, xb, PAIRS, ASM)
    y = _rows_out(acc, s_ptr, rn, NY, PAIRS)
    up = y
    if GLU:  # the up half's scales only where there is one
        up = _rows_out(acc_up, s_ptr + NY, rn, NY, PAIRS)
    _finish(y, up, b_ptr, r_ptr, y_ptr, m, rn, NY, BIAS, GLU, ADD)


def w8_block(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, *, lnw: torch.Tensor | None = None,
             eps: float = 0.0, bias: torch.Tensor | None = None, glu: bool = False,
             residual: torch.Tensor | None = None, pairs: bool = True) -> torch.Tensor:
    """_w8_block_kernel for x [M, K] (M <= GEMV_ROWS) and q [N, K] int8: [M, N] in x's dtype ([M, N / 2] with
    glu); x RMS-normed first where lnw is given; pairs: the fp16-pair dots (else fp32)."""
    (m, kx), (n, k) = x.shape, q.shape
    if m > GEMV_ROWS or k % 4 or kx != k or (glu and n % 2):
        raise ValueError(f"w8_block: x {tuple(x.shape)} against weight {tuple(q.shape)} (rows <= {GEMV_ROWS}, "
                         "in-features divisible by 4, an even number of out-features for glu)")
    x = x.contiguous()
    ny = n // 2 if glu else n
    y = torch.empty((m, ny), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(ny, meta["BLOCK_N"]), m)  # noqa: E731
    _w8_block_kernel[grid](x, x if lnw is None else lnw, q.view(torch.int32), scale, scale if bias is None else bias,
                           y if residual is None else residual.contiguous(), y, m, n, k, eps, NORM=lnw is not None,
                           GLU=glu, BIAS=bias is not None, ADD=residual is not None, PAIRS=pairs, ASM=not INTERPRET)
    return y


@torch.library.register_kernel("adaptive_inference::w8_norm_linear", "cuda")
def _w8_norm_linear_cuda(x, lnw, eps, q, scale, bias, glu):
    return w8_block(x, q, scale, lnw=lnw, eps=eps, bias=bias if bias.numel() else None, glu=glu)


@torch.library.register_kernel("adaptive_inference::w8_linear_add", "cuda")
def _w8_linear_add_cuda(x, q, scale, residual):
    return w8_block(x, q, scale, residual=residual)


@triton.jit
def _w4_tile_dot(acc, w, xa, xb, xc, xd, s_ptr, m_ptr, rn, k0, H, N, G, GROUP: tl.constexpr, NG: tl.constexpr,
                 BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """acc [BLOCK_N, NG] + one tile of 4-bit code words w (split halves) dotted with x's fp16 pairs / 16 (xa, xb:
    the low half's columns, xc, xd: the high half's), per group: 16 scale (centred codes . x / 16) + (min + 8
    scale) sum(x), as _w4_gemv_f16x2_kernel's loop."""
    lo, hi = _f16x2_dot(w, xa[None, :], xb[None, :], xc[None, :], xd[None, :], ASM)
    for high in tl.static_range(2):
        xg = _pair_sums(xc if high else xa, xd if high else xb, NG) * 16  # sum(x) per group, from x / 16
        sc, mn = _scales(s_ptr, m_ptr, rn, (k0 + high * H) // GROUP, N, G, GROUP, False, BLOCK_K)
        acc += _group_sums(hi if high else lo, NG, ASM) * (16 * sc) + (mn + 8 * sc) * xg[None, :]
    return acc


@triton.jit
def _x_pairs(x_ptr, l_ptr, m, K, cols, ok, rstd, NORM: tl.constexpr, SCALE: tl.constexpr = 0.0625):
    """x's columns cols + 0..3 (as _x_cols makes them) * SCALE (1 / 16 for 4-bit codes, 1 / 256 for 8-bit ones)
    as the fp16 pairs (cols, cols + 2), (cols + 1, cols + 3)."""
    x0 = _x_cols(x_ptr, l_ptr, m, K, cols, ok, rstd, NORM) * SCALE
    x1 = _x_cols(x_ptr, l_ptr, m, K, cols + 1, ok, rstd, NORM) * SCALE
    x2 = _x_cols(x_ptr, l_ptr, m, K, cols + 2, ok, rstd, NORM) * SCALE
    x3 = _x_cols(x_ptr, l_ptr, m, K, cols + 3, ok, rstd, NORM) * SCALE
    return _f16_pair(x0, x2), _f16_pair(x1, x3)


@triton.autotune(configs=_W4_GEMV_CONFIGS, key=["N", "K", "GROUP", "NORM", "GLU", "ADD"])
@triton.jit
def _w4_block_kernel(x_ptr, l_ptr, c_ptr, s_ptr, m_ptr, b_ptr, r_ptr, y_ptr, M, N, K, eps, GROUP: tl.constexpr,
                     NORM: tl.constexpr, GLU: tl.constexpr, BIAS: tl.constexpr, ADD: tl.constexpr, ASM: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """_w8_block_kernel for 4-bit codes (w4_linear's split halves, read as int32 words [N, K / 8], fp16 scale and
    min [N, K / GROUP]), dotted in fp16 pairs as _w4_gemv_f16x2_kernel does, with its register prefetch of the
    next tile's words (PREFETCH)."""
    pid_n, m = tl.program_id(0), tl.program_id(1)
    NY = N // 2 if GLU else N
    BLOCK_W: tl.constexpr = BLOCK_K // 4
    NG: tl.constexpr = BLOCK_K // GROUP
    H, HW, G = K // 2, tl.multiple_of(K // 8, 8), K // GROUP
    rn, k_lo, k_hi, rw, w, acc = _w4_gemv_start(c_ptr, NY, H, HW, pid_n, 0, 1, NG, BLOCK_N, BLOCK_K)
    acc_up = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    w_up = w
    if GLU:
        w_up = _tile_to(c_ptr + NY * HW, rn, rw, NY, HW, k_lo, k_hi)
    rstd = _row_rstd(x_ptr, m, K, eps, NORM, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if PREFETCH:
            w_next = _tile_to(c_ptr, rn, rw + BLOCK_W, NY, HW, k0 + BLOCK_K, k_hi)
            if GLU:
                w_up_next = _tile_to(c_ptr + NY * HW, rn, rw + BLOCK_W, NY, HW, k0 + BLOCK_K, k_hi)
        ok = rw < HW
        xa, xb = _x_pairs(x_ptr, l_ptr, m, K, 4 * rw, ok, rstd, NORM)
        xc, xd = _x_pairs(x_ptr, l_ptr, m, K, H + 4 * rw, ok, rstd, NORM)
        acc = _w4_tile_dot(acc, w, xa, xb, xc, xd, s_ptr, m_ptr, rn, k0, H, NY, G, GROUP, NG, BLOCK_K, ASM)
        if GLU:
            acc_up = _w4_tile_dot(acc_up, w_up, xa, xb, xc, xd, s_ptr + NY * G, m_ptr + NY * G, rn, k0, H, NY, G,
                                  GROUP, NG, BLOCK_K, ASM)
        rw += BLOCK_W
        if PREFETCH:
            w = w_next
            if GLU:
                w_up = w_up_next
        else:
            w = _tile_to(c_ptr, rn, rw, NY, HW, k0 + BLOCK_K, k_hi)
            if GLU:
                w_up = _tile_to(c_ptr + NY * HW, rn, rw, NY, HW, k0 + BLOCK_K, k_hi)
    _finish(tl.sum(acc, axis=1), tl.sum(acc_up, axis=1), b_ptr, r_ptr, y_ptr, m, rn, NY, BIAS, GLU, ADD)


@triton.jit
def _n8_tile_dot(acc, c, r, xa, xb, xc, xd, s_ptr, m_ptr, rn, k0, H, N, G, GROUP: tl.constexpr, NG: tl.constexpr,
                 BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """_w4_tile_dot for a nested weight read at depth 8 (codes c and residual r words; x's fp16 pairs / 256): the
    8-bit code 16 code + residual sits on a scale / 16 grid from min - 7.5 scale / 16, so per group
    16 scale (centred code8 . x / 256) + (min + 120.5 / 16 scale) sum(x)."""
    lo, hi = _n8_f16x2_dot(c, r, xa[None, :], xb[None, :], xc[None, :], xd[None, :], ASM)
    for high in tl.static_range(2):
        xg = _pair_sums(xc if high else xa, xd if high else xb, NG) * 256  # sum(x) per group, from x / 256
        sc, mn = _scales(s_ptr, m_ptr, rn, (k0 + high * H) // GROUP, N, G, GROUP, False, BLOCK_K)
        acc += _group_sums(hi if high else lo, NG, ASM) * (16 * sc) + (mn + 7.53125 * sc) * xg[None, :]
    return acc


@triton.autotune(configs=_W4_GEMV_CONFIGS, key=["N", "K", "GROUP", "NORM", "GLU", "ADD"])
@triton.jit
def _w4n_block_kernel(x_ptr, l_ptr, c_ptr, q_ptr, s_ptr, m_ptr, b_ptr, r_ptr, y_ptr, M, N, K, eps,
                      GROUP: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr, BIAS: tl.constexpr,
                      ADD: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PREFETCH: tl.constexpr):
    """_w4_block_kernel for a nested weight read at depth 8 (codes and residual planes, q_ptr), the 8-bit codes
    made from both planes' words in registers and dotted in fp16 pairs (_n8_f16x2_dot)."""
    pid_n, m = tl.program_id(0), tl.program_id(1)
    NY = N // 2 if GLU else N
    BLOCK_W: tl.constexpr = BLOCK_K // 4
    NG: tl.constexpr = BLOCK_K // GROUP
    H, HW, G = K // 2, tl.multiple_of(K // 8, 8), K // GROUP
    rn, k_lo, k_hi, rw, codes, acc = _w4_gemv_start(c_ptr, NY, H, HW, pid_n, 0, 1, NG, BLOCK_N, BLOCK_K)
    res = _tile_to(q_ptr, rn, rw, NY, HW, k_lo, k_hi)
    acc_up = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    codes_up, res_up = codes, res
    if GLU:
        codes_up = _tile_to(c_ptr + NY * HW, rn, rw, NY, HW, k_lo, k_hi)
        res_up = _tile_to(q_ptr + NY * HW, rn, rw, NY, HW, k_lo, k_hi)
    rstd = _row_rstd(x_ptr, m, K, eps, NORM, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if PREFETCH:
            nxt = (_tile_to(c_ptr, rn, rw + BLOCK_W, NY, HW, k0 + BLOCK_K, k_hi),
                   _tile_to(q_ptr, rn, rw + BLOCK_W, NY, HW, k0 + BLOCK_K, k_hi))
            if GLU:
                nxt_up = (_tile_to(c_ptr + NY * HW, rn, rw + BLOCK_W, NY, HW, k0 + BLOCK_K, k_hi),
                          _tile_to(q_ptr + NY * HW, rn, rw + BLOCK_W, NY, HW, k0 + BLOCK_K, k_hi))
        ok = rw < HW
        xa, xb = _x_pairs(x_ptr, l_ptr, m, K, 4 * rw, ok, rstd, NORM, 1 / 256)
        xc, xd = _x_pairs(x_ptr, l_ptr, m, K, H + 4 * rw, ok, rstd, NORM, 1 / 256)
        acc = _n8_tile_dot(acc, codes, res, xa, xb, xc, xd, s_ptr, m_ptr, rn, k0, H, NY, G, GROUP, NG, BLOCK_K, ASM)
        if GLU:
            acc_up = _n8_tile_dot(acc_up, codes_up, res_up, xa, xb, xc, xd, s_ptr + NY * G, m_ptr + NY * G, rn, k0,
                                  H, NY, G, GROUP, NG, BLOCK_K, ASM)
        rw += BLOCK_W
        if PREFETCH:
            codes, res = nxt
            if GLU:
                codes_up, res_up = nxt_up
        else:
            codes = _tile_to(c_ptr, rn, rw, NY, HW, k0 + BLOCK_K, k_hi)
            res = _tile_to(q_ptr, rn, rw, NY, HW, k0 + BLOCK_K, k_hi)
            if GLU:
                codes_up = _tile_to(c_ptr + NY * HW, rn, rw, NY, HW, k0 + BLOCK_K, k_hi)
                res_up = _tile_to(q_ptr + NY * HW, rn, rw, NY, HW, k0 + BLOCK_K, k_hi)
    _finish(tl.sum(acc, axis=1), tl.sum(acc_up, axis=1), b_ptr, r_ptr, y_ptr, m, rn, NY, BIAS, GLU, ADD)


# which kernel runs the 4-bit block ops on a GPU: this module's Triton one (the measured default; the interpreter's:
# Gluon has none) or gluon_block's, persistent and launched as a programmatic dependent, which no GPU has run yet
# (ADAPTIVE_INFERENCE_W4_BLOCK=gluon, or gluon-serial: an ordinary launch; docs/measurements, 2026-12-07)
W4_BLOCK_KERNEL = "triton" if INTERPRET else env_choice("ADAPTIVE_INFERENCE_W4_BLOCK", ("triton", "gluon", "gluon-serial"),
                                                         "triton")


def w4_block(x: torch.Tensor, codes: torch.Tensor, plane: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor,
             group_size: int, *, lnw: torch.Tensor | None = None, eps: float = 0.0, bias: torch.Tensor | None = None,
             glu: bool = False, residual: torch.Tensor | None = None, kernel: str | None = None) -> torch.Tensor:
    """w8_block for 4-bit codes [N, K / 2] in w4_linear's layout with fp16 scale and min [N, K / group]: read at
    depth 4 (plane empty) or, with the nested format's second plane, at depth 8; both in fp16 pairs. kernel:
    "gluon" (a programmatic dependent launch), "gluon-serial" (an ordinary one) or "triton" (default
    W4_BLOCK_KERNEL)."""
    (m, k), n = x.shape, codes.shape[0]
    if m > GEMV_ROWS or k != 2 * codes.shape[1] or k % (2 * group_size) or (glu and n % 2):
        raise ValueError(f"w4_block: x {tuple(x.shape)} against codes {tuple(codes.shape)} (rows <= {GEMV_ROWS}, "
                         f"in-features a multiple of 2 x group {group_size}, an even number of out-features for glu)")
    x = x.contiguous()
    ny = n // 2 if glu else n
    y = torch.empty((m, ny), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(ny, meta["BLOCK_N"]), m)  # noqa: E731
    residual = None if residual is None else residual.contiguous()
    kernel = kernel or W4_BLOCK_KERNEL
    if kernel.startswith("gluon"):
        from . import gluon_block
        return gluon_block.w4_block(x, codes, plane, scale, minv, group_size, y, lnw=lnw, eps=eps, bias=bias, glu=glu,
                                    residual=residual, pdl=kernel != "gluon-serial")
    ln, b, r = x if lnw is None else lnw, scale if bias is None else bias, y if residual is None else residual
    flags = dict(GROUP=group_size, NORM=lnw is not None, GLU=glu, BIAS=bias is not None, ADD=residual is not None)
    if plane.numel():
        _w4n_block_kernel[grid](x, ln, codes.view(torch.int32), plane.view(torch.int32), scale, minv, b, r, y, m, n, k,
                                eps, **flags, ASM=not INTERPRET)
    else:
        _w4_block_kernel[grid](x, ln, codes.view(torch.int32), scale, minv, b, r, y, m, n, k, eps, **flags,
                               ASM=not INTERPRET)
    return y


@torch.library.register_kernel("adaptive_inference::w4_norm_linear", "cuda")
def _w4_norm_linear_cuda(x, lnw, eps, codes, plane, scale, minv, group_size, bias, glu):
    return w4_block(x, codes, plane, scale, minv, group_size, lnw=lnw, eps=eps, bias=bias if bias.numel() else None,
                    glu=glu)


@torch.library.register_kernel("adaptive_inference::w4_linear_add", "cuda")
def _w4_linear_add_cuda(x, codes, plane, scale, minv, group_size, residual):
    return w4_block(x, codes, plane, scale, minv, group_size, residual=residual)
