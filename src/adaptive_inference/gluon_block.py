"""The 4-bit block ops' CUDA GEMV written in Gluon (Triton's layout-explicit dialect), so that its K loop holds
no layout conversion and no barrier. triton_block's Triton kernel left its layouts to the compiler, which moved
x's fp16 pairs and the group totals through shared memory inside the loop (16 barriers a tile on sm_90).

A program makes x's fp16 pairs once for all of K into shared memory (RMS-normed, rounded through x's dtype as
F.rms_norm stores it, then / 16 for 4-bit codes or / 256 for nested 8-bit ones), with the sum of each word
position's four columns; one barrier. Then it takes row blocks of ROWS x WARPS weight rows (with glu, the
matching rows of both halves of [gate | up]): pid, pid + programs, ... (persistent: at most CTAS programs an SM,
so x's pairs are made once a program, not once a row block), in one loop over its (row block, K tile) steps whose
loads go out a step ahead. In a step a warp owns ROWS rows and a lane 8 consecutive code words of each (32 low
and 32 high columns: one group-slice each, GROUP >= 32), so x's pairs are read once per word for all its rows, a
word position's partial sums stay in the lane (fp16 pairs, then fp32 per group with its scale and min) and the
only cross-lane sum is a row block's, after its last tile. The arithmetic is triton_block's: the PTX of f16x2
(W4_DOT, N8_DOT). Launched as a programmatic dependent (sm_90), its first tile's loads go out before it waits
for the kernel before it.

Measured so far (H100, docs/measurements 2026-12-07): the kernel as first written (a program a row block, no PDL)
matched the reference and took the Llama-3-8B shape's four block GEMVs in 0.90-1.10 of the Triton kernel's time
with 40-55% fewer loop instructions; the persistent, PDL form here has not run on a GPU yet, so triton_block
keeps the Triton kernel as the default."""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from . import triton_block, triton_kernels
from .f16x2 import N8_DOT, W4_DOT
from .triton_kernels import _TILES

WPT = gl.constexpr(8)  # code words a lane holds of a row (two 128-bit loads): 32 low and 32 high columns
_W4_DOT = gl.constexpr(W4_DOT)
_N8_DOT = gl.constexpr(N8_DOT)
# the Triton kernels' helpers compiled as Gluon (their tl builtins are Gluon's too): fp16 pairs added as pairs, a
# pair's total in fp32, two fp32 as a pair, and the rows' epilogue (+ bias, silu(gate) * up, + residual)
_add_f16x2 = gluon.jit(triton_kernels._add_f16x2.fn)
_f16x2_total = gluon.jit(triton_kernels._f16x2_total.fn)
_f16_pair = gluon.jit(triton_block._f16_pair.fn)
_finish = gluon.jit(triton_block._finish.fn)


@gluon.jit
def _grid_dependency(WAIT: gl.constexpr):
    """griddepcontrol (programmatic dependent launch, sm_90): wait for the previous kernel's writes (WAIT), or let
    the next kernel start; no-ops in a kernel launched without it."""
    if WAIT:
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    else:
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)


@gluon.jit
def _x_prologue(x_ptr, l_ptr, xs, xsum, m, eps, K: gl.constexpr, NORM: gl.constexpr, SCALE: gl.constexpr,
                NIT: gl.constexpr, BW: gl.constexpr, WARPS: gl.constexpr):
    """x's row m into shared memory: xs [4 NIT, BW] the fp16 pairs (low columns 4p, 4p + 2 and 4p + 1, 4p + 3 of
    word position p, then the same at H) and xsum [2 NIT, BW] each position's four columns summed (low, high), in
    x / SCALE's units; zeros past K / 8 positions."""
    H: gl.constexpr = K // 2
    HW: gl.constexpr = K // 8
    rstd = 0.0
    if NORM:  # F.rms_norm's: fp32 mean of squares
        L1: gl.constexpr = gl.BlockedLayout([4], [32], [WARPS], [0])
        ss = gl.zeros([4 * 32 * WARPS], gl.float32, L1)
        for k0 in range(0, K, 4 * 32 * WARPS):
            rk = k0 + gl.arange(0, 4 * 32 * WARPS, layout=L1)
            v = gl.load(x_ptr + m * K + rk, mask=rk < K, other=0.0).to(gl.float32)
            ss += v * v
        rstd = 1.0 / gl.sqrt(gl.sum(ss, axis=0) / K + eps)
    LP: gl.constexpr = gl.BlockedLayout([1, 2, 2], [32, 1, 1], [WARPS, 1, 1], [2, 1, 0])
    pos = gl.arange(0, BW, layout=gl.SliceLayout(1, gl.SliceLayout(2, LP)))
    pp = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, LP)))
    qq = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, LP)))
    cols = 4 * pos[:, None, None] + 2 * pp[None, :, None] + qq[None, None, :]  # column 2p + q of each word position
    for it in gl.static_range(NIT):
        ok = (it * BW + pos[:, None, None]) < HW
        for half in gl.static_range(2):
            c = half * H + 4 * it * BW + cols
            v = gl.load(x_ptr + m * K + c, mask=ok, other=0.0).to(gl.float32)
            if NORM:
                v = (v * rstd * gl.load(l_ptr + c, mask=ok, other=0.0).to(gl.float32)).to(x_ptr.dtype.element_ty)
            v = (v.to(gl.float32) * SCALE).to(gl.float16).to(gl.float32)  # as the dots read it
            even, odd = gl.split(v)  # columns (0, 2) and (1, 3) of each word position
            c0, c2 = gl.split(even)
            c1, c3 = gl.split(odd)
            xs.index(4 * it + 2 * half).store(_f16_pair(c0, c2))
            xs.index(4 * it + 2 * half + 1).store(_f16_pair(c1, c3))
            xsum.index(2 * it + half).store((c0 + c1 + c2 + c3) * (1.0 / SCALE))
    gl.thread_barrier()


@gluon.jit
def _tile(c_ptr, q_ptr, s_ptr, m_ptr, rows3, words3, rows2, words2, NY, H: gl.constexpr, HW: gl.constexpr,
          G: gl.constexpr, GROUP: gl.constexpr, NESTED: gl.constexpr):
    """One tile's loads, all zeros past the rows' or the row's end: code words [BN, 32, WPT] (and the residual
    plane's, NESTED; else the codes again), and each lane's fp16 scale and min [BN, 32] of its low and its high
    group-slice."""
    inside = (rows3 < NY) & (words3 < HW)
    c = gl.load(c_ptr + rows3 * HW + words3, mask=inside, other=0)
    r = c
    if NESTED:
        r = gl.load(q_ptr + rows3 * HW + words3, mask=inside, other=0)
    ok = (rows2 < NY) & (words2 < HW)
    g_lo = rows2 * G + (4 * words2) // GROUP
    g_hi = rows2 * G + (H + 4 * words2) // GROUP
    return (c, r, gl.load(s_ptr + g_lo, mask=ok, other=0.0), gl.load(m_ptr + g_lo, mask=ok, other=0.0),
            gl.load(s_ptr + g_hi, mask=ok, other=0.0), gl.load(m_ptr + g_hi, mask=ok, other=0.0))


@gluon.jit
def _tile_dot(acc, t, xa, xb, xc, xd, s_lo, s_hi, NESTED: gl.constexpr):
    """acc [BN, 32] + tile t's code words (and residual words, NESTED) [BN, 32, WPT] dotted with x's pairs
    [1, 32, WPT], per lane: its 8 words' fp16 partial sums, then per group-slice 16 scale (centred codes . x') +
    (min + offset scale) sum(x) (s_lo, s_hi: the slices' sum(x) [1, 32])."""
    c, r, sc_lo, mn_lo, sc_hi, mn_hi = t
    if NESTED:
        lo, hi = gl.inline_asm_elementwise(_N8_DOT, "=r,=r,r,r,r,r,r,r", [c, r, xa, xb, xc, xd],
                                           dtype=(gl.int32, gl.int32), is_pure=True, pack=1)
        OFFSET: gl.constexpr = 7.53125
    else:
        lo, hi = gl.inline_asm_elementwise(_W4_DOT, "=r,=r,r,r,r,r,r", [c, xa, xb, xc, xd],
                                           dtype=(gl.int32, gl.int32), is_pure=True, pack=1)
        OFFSET: gl.constexpr = 8.0
    for high in gl.static_range(2):
        tot = _f16x2_total(gl.reduce(hi if high else lo, 2, _add_f16x2))
        sc = (sc_hi if high else sc_lo).to(gl.float32)
        mn = (mn_hi if high else mn_lo).to(gl.float32)
        acc += tot * (16.0 * sc) + (mn + OFFSET * sc) * (s_hi if high else s_lo)
    return acc


# (ROWS, WARPS, CTAS): a warp's rows, the program's warps, programs an SM (the grid: at most CTAS x SMs programs,
# each taking every so-many row blocks); the first is the one the GPU tests run (_TILES = 1). With glu four rows
# spill (two tiles of codes and their prefetch).
_CONFIGS = [triton.Config({"ROWS": r, "WARPS": w, "CTAS": c}, num_warps=w)
            for r, w, c in [(2, 8, 2), (2, 8, 4), (2, 4, 4), (2, 4, 8), (4, 4, 4), (1, 8, 4), (2, 8, 1024)]]


@gluon.jit
def _rows(pid, step, nprog, NIT: gl.constexpr, BN: gl.constexpr, layout: gl.constexpr):
    """The weight rows [BN] of a program's step (its row blocks pid, pid + nprog, ..., NIT steps each)."""
    return (pid + (step // NIT) * nprog) * BN + gl.arange(0, BN, layout=layout)


@triton.autotune(configs=_CONFIGS[:_TILES], key=["N", "K", "GROUP", "NESTED", "NORM", "GLU", "ADD", "PDL"])
@gluon.jit
def _w4_block_kernel(x_ptr, l_ptr, c_ptr, q_ptr, s_ptr, m_ptr, b_ptr, r_ptr, y_ptr, N, eps, K: gl.constexpr,
                     GROUP: gl.constexpr, NESTED: gl.constexpr, NORM: gl.constexpr, GLU: gl.constexpr,
                     BIAS: gl.constexpr, ADD: gl.constexpr, PDL: gl.constexpr, ROWS: gl.constexpr,
                     WARPS: gl.constexpr, CTAS: gl.constexpr):
    """Row m of y = (residual +) x' [M, K] @ w.T (+ bias) for w's 4-bit codes in w4_linear's split-halves layout
    (int32 words [N, K / 8]; NESTED: with the residual plane q at depth 8) and fp16 scale and min [N, K / GROUP].
    GLU: rows rn and rn + N / 2 ([gate | up]), storing silu(gate) * up [M, N / 2]. A program makes x's pairs
    once, then takes row blocks pid, pid + programs, ...: one loop over its (row block, K tile) steps, each step's
    loads issued before the step before it is dotted. PDL: launched as a programmatic dependent of the kernel
    before it."""
    pid, m, nprog = gl.program_id(0), gl.program_id(1), gl.num_programs(0)
    NY = N // 2 if GLU else N
    BN: gl.constexpr = ROWS * WARPS
    BW: gl.constexpr = 32 * WPT
    H: gl.constexpr = K // 2
    HW: gl.constexpr = K // 8
    G: gl.constexpr = K // GROUP
    NIT: gl.constexpr = (HW + BW - 1) // BW
    SCALE: gl.constexpr = 1 / 256 if NESTED else 1 / 16
    L3: gl.constexpr = gl.BlockedLayout([ROWS, 1, WPT], [1, 32, 1], [WARPS, 1, 1], [2, 1, 0])
    L2: gl.constexpr = gl.SliceLayout(2, L3)
    LR: gl.constexpr = gl.SliceLayout(1, L2)
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, L2))
    j = gl.arange(0, WPT, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    words3_0 = (lane * WPT)[None, :, None] + j[None, None, :]
    words2_0 = (lane * WPT)[None, :]
    steps = (gl.cdiv(NY, BN) - pid + nprog - 1) // nprog * NIT
    up_c, up_q, up_s, up_m = c_ptr + NY * HW, q_ptr + NY * HW, s_ptr + NY * G, m_ptr + NY * G
    # the first tile's loads go out before the prologue, which needs x; launched as a dependent (PDL) they go out
    # while the kernel before it finishes, and the wait holds back what reads its output (x, the residual)
    if PDL:
        _grid_dependency(False)
    rn = _rows(pid, 0, nprog, NIT, BN, LR)
    t = _tile(c_ptr, q_ptr, s_ptr, m_ptr, rn[:, None, None], words3_0, rn[:, None], words2_0, NY, H, HW, G, GROUP,
              NESTED)
    t_up = t
    if GLU:
        t_up = _tile(up_c, up_q, up_s, up_m, rn[:, None, None], words3_0, rn[:, None], words2_0, NY, H, HW, G, GROUP,
                     NESTED)
    if PDL:
        _grid_dependency(True)
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])  # of one [BW] buffer
    xs = gl.allocate_shared_memory(gl.int32, [4 * NIT, BW], flat)
    xsum = gl.allocate_shared_memory(gl.float32, [2 * NIT, BW], flat)
    _x_prologue(x_ptr, l_ptr, xs, xsum, m, eps, K, NORM, SCALE, NIT, BW, WARPS)

    acc = gl.zeros([BN, 32], gl.float32, L2)
    acc_up = gl.zeros([BN, 32], gl.float32, L2)
    for step in range(steps):
        # the next step's loads (all zeros past the row's end and past the last row block)
        rn_n = _rows(pid, step + 1, nprog, NIT, BN, LR)
        off = ((step + 1) % NIT) * BW
        rows3, words3, rows2, words2 = rn_n[:, None, None], words3_0 + off, rn_n[:, None], words2_0 + off
        t_n = _tile(c_ptr, q_ptr, s_ptr, m_ptr, rows3, words3, rows2, words2, NY, H, HW, G, GROUP, NESTED)
        t_up_n = t_n
        if GLU:
            t_up_n = _tile(up_c, up_q, up_s, up_m, rows3, words3, rows2, words2, NY, H, HW, G, GROUP, NESTED)
        it = step % NIT
        xa = xs.index(4 * it).reshape([1, 32, WPT]).load(L3)
        xb = xs.index(4 * it + 1).reshape([1, 32, WPT]).load(L3)
        xc = xs.index(4 * it + 2).reshape([1, 32, WPT]).load(L3)
        xd = xs.index(4 * it + 3).reshape([1, 32, WPT]).load(L3)
        s_lo = gl.sum(xsum.index(2 * it).reshape([1, 32, WPT]).load(L3), axis=2)
        s_hi = gl.sum(xsum.index(2 * it + 1).reshape([1, 32, WPT]).load(L3), axis=2)
        acc = _tile_dot(acc, t, xa, xb, xc, xd, s_lo, s_hi, NESTED)
        if GLU:
            acc_up = _tile_dot(acc_up, t_up, xa, xb, xc, xd, s_lo, s_hi, NESTED)
        if it == NIT - 1:  # the row block's last tile: its rows are done
            _finish(gl.sum(acc, axis=1), gl.sum(acc_up, axis=1), b_ptr, r_ptr, y_ptr, m,
                    _rows(pid, step, nprog, NIT, BN, LR), NY, BIAS, GLU, ADD)
            acc = gl.zeros([BN, 32], gl.float32, L2)
            acc_up = gl.zeros([BN, 32], gl.float32, L2)
        t, t_up = t_n, t_up_n


def w4_block(x: torch.Tensor, codes: torch.Tensor, plane: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor,
             group_size: int, y: torch.Tensor, *, lnw: torch.Tensor | None, eps: float, bias: torch.Tensor | None,
             glu: bool, residual: torch.Tensor | None, pdl: bool = True) -> torch.Tensor:
    """triton_block.w4_block's launch of this kernel (its checks done there), into y [M, N or N / 2]; pdl: as a
    programmatic dependent launch (its weight loads overlap the previous kernel's end)."""
    m, k = x.shape
    n = codes.shape[0]
    ny = y.shape[1]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    grid = lambda meta: (min(triton.cdiv(ny, meta["ROWS"] * meta["WARPS"]), meta["CTAS"] * sms), m)  # noqa: E731
    codes32 = codes.view(torch.int32)
    _w4_block_kernel[grid](x, x if lnw is None else lnw, codes32, plane.view(torch.int32) if plane.numel() else codes32,
                           scale, minv, scale if bias is None else bias, y if residual is None else residual, y, n, eps,
                           K=k, GROUP=group_size, NESTED=bool(plane.numel()), NORM=lnw is not None, GLU=glu,
                           BIAS=bias is not None, ADD=residual is not None, PDL=pdl, launch_pdl=pdl)
    return y
