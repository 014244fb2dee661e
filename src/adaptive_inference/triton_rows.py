"""The block ops' CUDA GEMVs for several decode rows at once (batch 2 to block_op.MAX_ROWS; rows padded to a power of 2): a program reads its tile of
weight words once for all rows of x, makes their codes' fp16 pairs once (f16x2's *_CODES) and dots them with each
row (PAIR_DOT: two half2 instructions a word a row). triton_block's kernels take one row of x a program, so each
row reads the weights again (from L2 at best), and above GEMV_ROWS rows the block ops gave way to the separate
ops' tensor-core kernels, which read the 4-bit codes at 0.8-0.9 TB/s on an H100 (docs/measurements, 2026-12-06).

The arithmetic is triton_block's, row for row: x RMS-normed and rounded through x's dtype where it is read, fp16
pairs of x / 16 (4-bit), x / 256 (int8, nested 8-bit), per-group fp32 totals with the scale and min, the same
epilogue (_finish). Under the interpreter (ASM off) the dots run in fp32 as there."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .f16x2 import I8_CODES, N8_CODES, PAIR_DOT, W4_CODES
from .triton_block import _finish, _x_pairs
from .triton_kernels import (
    _TILES,
    INTERPRET,
    _f16x2_dot,
    _group_sums,
    _i8_f16x2_dot,
    _n8_f16x2_dot,
    _pair_sums,
    _scales,
    _tile,
)

_W4_CODES, _N8_CODES, _I8_CODES, _PAIR_DOT = (tl.constexpr(a) for a in (W4_CODES, N8_CODES, I8_CODES, PAIR_DOT))
# (BLOCK_N, BLOCK_K, warps) with and without the register prefetch of the next tile; the first is the GPU tests'
_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "PREFETCH": p}, num_warps=w, num_stages=2)
            for p in (1, 0) for bn, bk, w in [(16, 256, 4), (8, 512, 4), (32, 256, 8), (16, 512, 8), (32, 128, 4),
                                              (64, 128, 8), (8, 256, 4)]][:_TILES]


@triton.jit
def _pair_dot(c0, c1, xa, xb):
    """[MR, BN, BW] fp16 pairs c0 . xa + c1 . xb of code pairs [BN, BW] against x's pairs [MR, BW]."""
    return tl.inline_asm_elementwise(_PAIR_DOT, "=r,r,r,r,r", [c0[None, :, :], c1[None, :, :], xa[:, None, :],
                                                                 xb[:, None, :]], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _w4_rows_dot(w, r, xa, xb, xc, xd, NESTED: tl.constexpr, ASM: tl.constexpr):
    """(low columns, high columns) partial sums [MR, BN, BW] of 4-bit code words w [BN, BW] (NESTED: the 8-bit
    codes with the residual words r) against x's pairs [MR, BW]: the codes made once, dotted per row."""
    if ASM:
        if NESTED:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(_N8_CODES, "=r,=r,=r,=r,r,r", [w, r], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                                                       is_pure=True, pack=1)
        else:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(_W4_CODES, "=r,=r,=r,=r,r", [w], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                                                       is_pure=True, pack=1)
        lo, hi = _pair_dot(c0, c1, xa, xb), _pair_dot(c2, c3, xc, xd)
    elif NESTED:
        lo, hi = _n8_f16x2_dot(w[None, :, :], r[None, :, :], xa[:, None, :], xb[:, None, :], xc[:, None, :],
                               xd[:, None, :], False)
    else:
        lo, hi = _f16x2_dot(w[None, :, :], xa[:, None, :], xb[:, None, :], xc[:, None, :], xd[:, None, :], False)
    return lo, hi


@triton.jit
def _rows_group_sums(d, NG: tl.constexpr, ASM: tl.constexpr):
    """[MR, BN, BW] word partial sums -> [MR, BN, NG] fp32 group sums (_group_sums row by row)."""
    MR: tl.constexpr = d.shape[0]
    BN: tl.constexpr = d.shape[1]
    return tl.reshape(_group_sums(tl.reshape(d, (MR * BN, d.shape[2])), NG, ASM), (MR, BN, NG))


@triton.jit
def _rows_rstd(x_ptr, rm, M, K, eps, NORM: tl.constexpr, BLOCK_K: tl.constexpr):
    """[MR] 1 / RMS of rows rm of x [M, K] (F.rms_norm's: fp32 mean of squares); zeros unless NORM."""
    rstd = tl.zeros(rm.shape, dtype=tl.float32)
    if NORM:
        ss = tl.zeros((rm.shape[0], BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0.0).to(tl.float32)
            ss += v * v
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=1) / K + eps)
    return rstd


@triton.jit
def _w4_rows_tile(acc, w, r, xa, xb, xc, xd, s_ptr, m_ptr, rn, k0, H, N, G, GROUP: tl.constexpr, NG: tl.constexpr,
                  BLOCK_K: tl.constexpr, NESTED: tl.constexpr, ASM: tl.constexpr):
    """acc [MR, BN, NG] + one tile of code words dotted with every row's x pairs, per group: 16 scale (centred
    codes . x') + (min + offset scale) sum(x), as triton_block's _w4_tile_dot / _n8_tile_dot."""
    lo, hi = _w4_rows_dot(w, r, xa, xb, xc, xd, NESTED, ASM)
    MR: tl.constexpr = xa.shape[0]
    UNIT: tl.constexpr = 256.0 if NESTED else 16.0  # x' = x / UNIT
    OFFSET: tl.constexpr = 7.53125 if NESTED else 8.0
    for high in tl.static_range(2):
        xg = tl.reshape(_pair_sums(tl.reshape(xc if high else xa, (MR * xa.shape[1],)),
                                   tl.reshape(xd if high else xb, (MR * xa.shape[1],)), MR * NG), (MR, NG)) * UNIT
        sc, mn = _scales(s_ptr, m_ptr, rn, (k0 + high * H) // GROUP, N, G, GROUP, False, BLOCK_K)
        acc += (_rows_group_sums(hi if high else lo, NG, ASM) * (16 * sc)[None, :, :]
                + (mn + OFFSET * sc)[None, :, :] * xg[:, None, :])
    return acc


@triton.jit
def _words(c_ptr, q_ptr, rn, rw, N, HW, NESTED: tl.constexpr):
    """A tile's code words [BN, BW] and (NESTED) the residual plane's, else the codes again (no second load)."""
    w = _tile(c_ptr, rn, rw, N, HW)
    r = w
    if NESTED:
        r = _tile(q_ptr, rn, rw, N, HW)
    return w, r


@triton.jit
def _rows_x(x_ptr, l_ptr, rm, M, K, cols, C, rstd, NORM: tl.constexpr, SCALE: tl.constexpr):
    """x's fp16 pairs [MR, BW] of word columns cols (< C) for rows rm (< M), as _x_pairs makes them."""
    return _x_pairs(x_ptr, l_ptr, rm[:, None], K, cols[None, :], (rm[:, None] < M) & (cols[None, :] < C),
                    rstd[:, None], NORM, SCALE)


@triton.autotune(configs=_CONFIGS, key=["N", "K", "GROUP", "NESTED", "NORM", "GLU", "ADD", "MR"])
@triton.jit
def _w4_rows_kernel(x_ptr, l_ptr, c_ptr, q_ptr, s_ptr, m_ptr, b_ptr, r_ptr, y_ptr, M, N, K, eps, GROUP: tl.constexpr,
                    NESTED: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr, BIAS: tl.constexpr,
                    ADD: tl.constexpr, ASM: tl.constexpr, MR: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """Rows 0..M-1 (< MR) of y = (residual +) x' [M, K] @ w.T (+ bias) for 4-bit codes in w4_linear's split
    halves (int32 words [N, K / 8]; NESTED: read at depth 8 with the residual plane q) and fp16 scale and min
    [N, K / GROUP]. GLU: rows rn and rn + N / 2 ([gate | up]), storing silu(gate) * up."""
    pid_n = tl.program_id(0)
    NY = N // 2 if GLU else N
    BLOCK_W: tl.constexpr = BLOCK_K // 4
    NG: tl.constexpr = BLOCK_K // GROUP
    SCALE: tl.constexpr = 1 / 256 if NESTED else 1 / 16
    H, HW, G = K // 2, tl.multiple_of(K // 8, 8), K // GROUP
    rm = tl.arange(0, MR)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, BLOCK_W)
    up_c, up_q, up_s, up_m = c_ptr + NY * HW, q_ptr + NY * HW, s_ptr + NY * G, m_ptr + NY * G
    w, r = _words(c_ptr, q_ptr, rn, rw, NY, HW, NESTED)
    w_up, r_up = w, r
    if GLU:
        w_up, r_up = _words(up_c, up_q, rn, rw, NY, HW, NESTED)
    rstd = _rows_rstd(x_ptr, rm, M, K, eps, NORM, BLOCK_K)
    acc = tl.zeros((MR, BLOCK_N, NG), dtype=tl.float32)
    acc_up = tl.zeros((MR, BLOCK_N, NG), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if PREFETCH:  # the next tile's words (zeros past the row's end), loaded before this one is dotted
            nxt = _words(c_ptr, q_ptr, rn, rw + BLOCK_W, NY, HW, NESTED)
            if GLU:
                nxt_up = _words(up_c, up_q, rn, rw + BLOCK_W, NY, HW, NESTED)
        xa, xb = _rows_x(x_ptr, l_ptr, rm, M, K, 4 * rw, 4 * HW, rstd, NORM, SCALE)
        xc, xd = _rows_x(x_ptr, l_ptr, rm, M, K, H + 4 * rw, H + 4 * HW, rstd, NORM, SCALE)
        acc = _w4_rows_tile(acc, w, r, xa, xb, xc, xd, s_ptr, m_ptr, rn, k0, H, NY, G, GROUP, NG, BLOCK_K, NESTED,
                            ASM)
        if GLU:
            acc_up = _w4_rows_tile(acc_up, w_up, r_up, xa, xb, xc, xd, up_s, up_m, rn, k0, H, NY, G, GROUP, NG,
                                   BLOCK_K, NESTED, ASM)
        rw += BLOCK_W
        if PREFETCH:
            w, r = nxt
            if GLU:
                w_up, r_up = nxt_up
        else:
            w, r = _words(c_ptr, q_ptr, rn, rw, NY, HW, NESTED)
            if GLU:
                w_up, r_up = _words(up_c, up_q, rn, rw, NY, HW, NESTED)
    cols = tl.where(rm[:, None] < M, rn[None, :], NY)  # padded rows: stored nowhere
    _finish(tl.sum(acc, axis=2), tl.sum(acc_up, axis=2), b_ptr, r_ptr, y_ptr, rm[:, None], cols, NY, BIAS, GLU, ADD)


@triton.jit
def _w8_rows_tile(acc, w, xa, xb, ASM: tl.constexpr):
    """acc [MR, BN, BW / 4] + one tile of int8 words w [BN, BW] dotted with every row's pairs of x / 256 [MR, BW],
    summed in fp16 pairs four words at a time, then in fp32 (triton_block's _dot)."""
    if ASM:
        c0, c1 = tl.inline_asm_elementwise(_I8_CODES, "=r,=r,r", [w], dtype=(tl.int32, tl.int32), is_pure=True,
                                           pack=1)
        d = _pair_dot(c0, c1, xa, xb)
    else:
        d = _i8_f16x2_dot(w[None, :, :], xa[:, None, :], xb[:, None, :], False)
    return acc + _rows_group_sums(d, w.shape[1] // 4, ASM)


@triton.autotune(configs=_CONFIGS, key=["N", "K", "NORM", "GLU", "ADD", "MR"])
@triton.jit
def _w8_rows_kernel(x_ptr, l_ptr, w_ptr, s_ptr, b_ptr, r_ptr, y_ptr, M, N, K, eps, NORM: tl.constexpr,
                    GLU: tl.constexpr, BIAS: tl.constexpr, ADD: tl.constexpr, ASM: tl.constexpr, MR: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """_w4_rows_kernel for int8 q [N, K] (int32 words [N, K / 4]) with a scale per row: triton_block's
    _w8_block_kernel (fp16 pairs) for rows 0..M-1 at once."""
    pid_n = tl.program_id(0)
    NY = N // 2 if GLU else N
    BLOCK_W: tl.constexpr = BLOCK_K // 4
    KW = K // 4
    rm = tl.arange(0, MR)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, BLOCK_W)
    w_up_ptr = w_ptr + NY * KW
    w = _tile(w_ptr, rn, rw, NY, KW)
    w_up = w
    if GLU:
        w_up = _tile(w_up_ptr, rn, rw, NY, KW)
    rstd = _rows_rstd(x_ptr, rm, M, K, eps, NORM, BLOCK_K)
    acc = tl.zeros((MR, BLOCK_N, BLOCK_W // 4), dtype=tl.float32)
    acc_up = tl.zeros((MR, BLOCK_N, BLOCK_W // 4), dtype=tl.float32)
    for _k0 in range(0, K, BLOCK_K):
        if PREFETCH:
            nxt = _tile(w_ptr, rn, rw + BLOCK_W, NY, KW)
            if GLU:
                nxt_up = _tile(w_up_ptr, rn, rw + BLOCK_W, NY, KW)
        xa, xb = _rows_x(x_ptr, l_ptr, rm, M, K, 4 * rw, K, rstd, NORM, 1 / 256)
        acc = _w8_rows_tile(acc, w, xa, xb, ASM)
        if GLU:
            acc_up = _w8_rows_tile(acc_up, w_up, xa, xb, ASM)
        rw += BLOCK_W
        if PREFETCH:
            w = nxt
            if GLU:
                w_up = nxt_up
        else:
            w = _tile(w_ptr, rn, rw, NY, KW)
            if GLU:
                w_up = _tile(w_up_ptr, rn, rw, NY, KW)
    y = tl.sum(acc, axis=2) * 256.0 * tl.load(s_ptr + rn, mask=rn < NY, other=0.0).to(tl.float32)[None, :]
    up = y
    if GLU:
        up = tl.sum(acc_up, axis=2) * 256.0 * tl.load(s_ptr + NY + rn, mask=rn < NY, other=0.0).to(tl.float32)[None, :]
    cols = tl.where(rm[:, None] < M, rn[None, :], NY)
    _finish(y, up, b_ptr, r_ptr, y_ptr, rm[:, None], cols, NY, BIAS, GLU, ADD)


def _grid(ny: int):
    return lambda meta: (triton.cdiv(ny, meta["BLOCK_N"]),)


def w4_rows(x: torch.Tensor, codes: torch.Tensor, plane: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor,
            group_size: int, y: torch.Tensor, *, lnw: torch.Tensor | None, eps: float, bias: torch.Tensor | None,
            glu: bool, residual: torch.Tensor | None) -> torch.Tensor:
    """triton_block.w4_block's launch of _w4_rows_kernel (its checks done there), into y [M, N or N / 2]."""
    m, k = x.shape
    c32 = codes.view(torch.int32)
    _w4_rows_kernel[_grid(y.shape[1])](
        x, x if lnw is None else lnw, c32, plane.view(torch.int32) if plane.numel() else c32, scale, minv,
        scale if bias is None else bias, y if residual is None else residual, y, m, codes.shape[0], k, eps,
        GROUP=group_size, NESTED=bool(plane.numel()), NORM=lnw is not None, GLU=glu, BIAS=bias is not None,
        ADD=residual is not None, ASM=not INTERPRET, MR=triton.next_power_of_2(m))
    return y


def w8_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, y: torch.Tensor, *, lnw: torch.Tensor | None,
            eps: float, bias: torch.Tensor | None, glu: bool, residual: torch.Tensor | None) -> torch.Tensor:
    """triton_block.w8_block's launch of _w8_rows_kernel (its checks done there), into y [M, N or N / 2]."""
    m, k = x.shape
    _w8_rows_kernel[_grid(y.shape[1])](
        x, x if lnw is None else lnw, q.view(torch.int32), scale, scale if bias is None else bias,
        y if residual is None else residual, y, m, q.shape[0], k, eps, NORM=lnw is not None, GLU=glu,
        BIAS=bias is not None, ADD=residual is not None, ASM=not INTERPRET, MR=triton.next_power_of_2(m))
    return y
