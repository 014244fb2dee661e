"""Triton kernels for CUDA decode (imported on CUDA only; triton comes with torch's CUDA wheels).

matmul_partials: x [M, K] times a weight [N, K], 16-bit or int8 with a per-row scale, at decode sizes, where
the matmul only streams the weight: each program owns a block of output rows and reads its weights once,
widening them in registers (up to GEMV_ROWS rows of x a reduction on the CUDA cores, above a tensor-core dot
with the rows padded to 16), over one of `splits` slices of K when there are too few row blocks to fill the
GPU. It returns the slices' fp32 partial sums, each stored once, for the caller to add up in torch ops (under
torch.compile that sum fuses into the next op: one launch per matmul); its ops store one slice in x's dtype,
the result itself (gated_linear_op.partials_dtype). Optionally gated by flags on the
device (gated_linear_op). Its ops (gated_linear_partials, w8_linear_partials) are custom ops, so
torch.compile treats each as one opaque call and CUDA graphs capture it (the autotuning runs on first use,
outside capture: the decoder's first step of a plan runs for real before it is captured).

w4_linear: the same for 4-bit codes with a per-group fp16 (scale, min), w = code * scale + min, re-laid at
prepare time so that byte j of a row holds the codes of columns j (low nibble) and j + K/2 (high): one load
gives two column tiles of x. With a second plane of residual codes (the nested format read at depth 8) the
code is code * 16 + residual on a scale / 16 grid centred by 7.5 steps: 1 byte per weight, like int8.
The dequantization happens in registers, group by group, before the dot: in fp32 a weight at a time, or (PAIRS,
autotuned beside it where ADAPTIVE_INFERENCE_W4_PAIRS=1) in bf16 pairs, f16x2.W4_BF16: ~2 instructions a weight
against ~7, the scale and min rounded to bf16 first (a rounding error ~7% of the quantization error's rms, not
~2%: the output's error from 0.17% to 0.55% of its norm beside the quantization's 7.8%, 8B-like weights, group 32).

The CUDA-core kernels (decode: up to GEMV_ROWS rows) read int8 and 4-bit codes as int32 words and make floats
of them with _magic (mask in place, OR into the bits of 2**23, one float subtract) instead of an
integer-to-float conversion (I2F, quarter rate on sm_90) per weight, and keep one accumulator per column of
the tile, reduced once after the K loop. Under torch.compile (f16x2_gemv) int8 and depth-4 codes take the
fp16-pair kernels instead: a LOP3 masks two codes into the mantissas of two halves, and the dot runs in half2
instructions (2 columns each) on x prepared as fp16 pairs (prep_x, fused by the compiler into the op making
x), summed in fp16 pairs over a group or 4 words, then in fp32: sm_90 SASS loops of 3.4-5.3 instructions a
weight for 4-bit, by tile (5.2-8.9 with _magic), 2.9-3.7 for int8 (5.8-7.4). The 4-bit GEMVs keep the next tile's words
in flight while they work on this one (PREFETCH, a register double buffer, autotuned). The fp16-pair PTX and
the x prep are in f16x2.py (tested on the CPU through its emulator). Measured on an H100
(docs/measurements, 2026-12-07, each kernel alone): an 8B layer's 4-bit GEMV 87.6 -> 74.1 us (tinygemm 82.1),
int8 85.5 -> 81.7."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import attention_op, gated_linear_op  # noqa: F401  (define the ops this module gives CUDA kernels)
from .errors import env_choice
from .f16x2 import I8_DOT, N8_DOT, W4_BF16, W4_DOT, prep_x
from .gated_linear_op import add_partials, partials_dtype

# the interpreter (TRITON_INTERPRET=1, CPU tests of the kernels) emulates bf16 dots wrongly and cannot
# autotune: fp32 dots and one configuration there
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DOT_DTYPE = tl.float32 if INTERPRET else tl.bfloat16
# ADAPTIVE_INFERENCE_TRITON_TILES=N: autotune over the first N tiles of each list only (the GPU tests set 1: an
# autotuned kernel runs one tile, the fastest, and timing 26 of them per test shape took a minute a test)
_TILES = 1 if INTERPRET else int(os.environ.get("ADAPTIVE_INFERENCE_TRITON_TILES") or 0) or None
_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [(32, 256, 4, 4), (64, 256, 4, 4), (32, 512, 4, 3), (64, 512, 8, 3),
                                 (128, 128, 4, 4), (16, 512, 4, 4), (128, 256, 8, 3)]][:_TILES]
# the CUDA-core kernels' (1024-wide K tiles: 1-byte codes)
_GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                 for bn, bk, w, s in [(16, 256, 4, 4), (32, 256, 4, 4), (32, 128, 4, 4), (64, 128, 4, 3),
                                      (16, 512, 4, 3), (64, 256, 8, 3), (8, 512, 4, 4), (16, 1024, 4, 3),
                                      (32, 1024, 8, 3), (64, 256, 4, 3), (128, 128, 4, 3)]][:_TILES]
# the 4-bit GEMVs': those and two more tiles, each with and without the register prefetch (on an H100 the
# prefetch took the f16x2 kernel's gate_up from 43.8 to 35.2 us; it made no difference to bf16 and int8)
_W4_GEMV_CONFIGS = [triton.Config({**c.kwargs, "PREFETCH": p}, num_warps=c.num_warps, num_stages=c.num_stages)
                    for p in (1, 0) for c in _GEMV_CONFIGS + [triton.Config({"BLOCK_N": bn, "BLOCK_K": 512}, num_warps=w,
                                                                            num_stages=3) for bn, w in ((32, 4), (64, 8))]
                    ][:_TILES]


@triton.jit
def _any_runs(run_ptr, M, RUN_PAD: tl.constexpr, GATE: tl.constexpr):
    """Whether some row of x runs: its flag in run [M] (uint8) set (GATE 1) or clear (GATE 2); read before any
    weight."""
    r = tl.arange(0, RUN_PAD)
    hit = (r < M) & ((tl.load(run_ptr + r, mask=r < M, other=0) != 0) == (GATE == 1))
    return tl.sum(hit.to(tl.int32), axis=0) > 0


@triton.jit
def _gate(run_ptr, M, GATED, pid_n, RUN_PAD: tl.constexpr, GATE: tl.constexpr, BLOCK_N: tl.constexpr):
    """(some row runs, this program's block of output columns needs its weights): a block wholly below GATED
    only if some row runs (GATE 0: ungated, both true)."""
    if GATE:
        runs = _any_runs(run_ptr, M, RUN_PAD, GATE)
    else:
        runs = tl.full([], 1, tl.int1)
    return runs, ((pid_n + 1) * BLOCK_N > GATED) | runs


@triton.jit
def _tile(ptr, rows, cols, R, C):
    """ptr[rows][:, cols] of a row-major [R, C] matrix, zeros outside it."""
    return tl.load(ptr + rows[:, None] * C + cols[None, :], mask=(rows[:, None] < R) & (cols[None, :] < C), other=0)


@triton.jit
def _tile_to(ptr, rows, cols, R, C, start, end):
    """_tile, all zeros where start >= end (the tile's first column and its K slice's end, in one unit): the
    tiles of a slice never straddle its end (only the row's end, which C masks). A per-tile test, so the mask
    stays constant over the 4 words a 128-bit load reads (a column test against the slice's end split each into
    two 64-bit loads)."""
    return tl.load(ptr + rows[:, None] * C + cols[None, :], mask=(rows[:, None] < R) & (cols[None, :] < C) & (start < end),
                   other=0)


@triton.jit
def _k_slice(K, pid_k, SPLITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """[start, stop) of K slice pid_k of SPLITS, in whole BLOCK_K tiles."""
    chunk = tl.cdiv(tl.cdiv(K, SPLITS), BLOCK_K) * BLOCK_K
    return pid_k * chunk, tl.minimum(K, (pid_k + 1) * chunk)


@triton.autotune(configs=_CONFIGS, key=["N", "K", "SPLITS", "GATE", "SCALED"])
@triton.jit
def _tc_kernel(x_ptr, w_ptr, s_ptr, run_ptr, y_ptr, M, N, K, GATED, SPLITS: tl.constexpr, RUN_PAD: tl.constexpr,
               GATE: tl.constexpr, SCALED: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """matmul_partials on tensor cores: blocks of BLOCK_M rows of x (padded), weights of any dtype widened in
    registers; the gating and the stores of matmul_partials."""
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    runs, needed = _gate(run_ptr, M, GATED, pid_n, RUN_PAD, GATE, BLOCK_N)
    if needed:
        k_lo, k_hi = _k_slice(K, pid_k, SPLITS, BLOCK_K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            w, x = _tile(w_ptr, rn, rk, N, K), _tile(x_ptr, rm, rk, M, K)
            acc += tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)))
    if GATE:
        acc = tl.where((rn[None, :] < GATED) & ~runs, 0.0, acc)
    if SCALED:
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _rows_dot(x_ptr, w_ptr, m, rn, N, K, k_lo, k_hi, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N] dots of row m of x with weight rows rn over columns [k_lo, k_hi), any weight dtype widened to
    fp32; products accumulate per column and are reduced once, after the loop (no shuffles per tile)."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * K + rk, mask=rk < K, other=0.0)
        acc += _tile(w_ptr, rn, rk, N, K).to(tl.float32) * x.to(tl.float32)[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _magic(bits, OFFSET: tl.constexpr):
    """int32 `bits` (an integer < 2**23 ORed into 0x4B000000, the fp32 2**23) as fp32 minus OFFSET: exact, and
    one float add instead of an integer-to-float conversion (I2F, a quarter-rate instruction)."""
    return bits.to(tl.float32, bitcast=True) - OFFSET


@triton.jit
def _int8_byte(w, B: tl.constexpr):
    """Byte B (0-3) of int32 words w, a signed int8 code c, as fp32 c * 256 ** (B % 2), exactly."""
    if B >= 2:
        w = w >> 16
    SHIFT: tl.constexpr = 8 * (B % 2)
    return _magic((w & (0xFF << SHIFT)) ^ (0x4B000000 | (0x80 << SHIFT)), 8388608.0 + (128 << SHIFT))


@triton.jit
def _rows_dot_int8(x_ptr, w_ptr, m, rn, N, K, k_lo, k_hi, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """_rows_dot for int8 codes read as int32 words [N, K / 4] (four columns a word)."""
    KW = K // 4
    acc = tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rw = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        w = _tile(w_ptr, rn, rw, N, KW)
        xw = x_ptr + m * K + 4 * rw
        for b in tl.static_range(4):
            x = tl.load(xw + b, mask=rw < KW, other=0.0).to(tl.float32) * (1.0 if b % 2 == 0 else 1.0 / 256)
            acc += _int8_byte(w, b) * x[None, :]
    return tl.sum(acc, axis=1)


_I8_F16X2_DOT = tl.constexpr(I8_DOT)


@triton.jit
def _i8_f16x2_dot(w, xa, xb, ASM: tl.constexpr):
    """The 4 int8 codes of int32 words w dotted with x in fp16, two columns a half2 instruction: one fp16 pair in
    int32. xa, xb: fp16 pairs of x (columns 4i, 4i + 2) and (4i + 1, 4i + 3) (prep_x). One LOP3 makes two
    halves 1152 + code of bytes 0 and 2 (1024 + the byte with its sign bit flipped, in the mantissa), one
    subtract makes them the codes: 1.75 instructions a weight. ASM False (the interpreter): in fp32, as fp32."""
    if ASM:
        d = tl.inline_asm_elementwise(_I8_F16X2_DOT, "=r,r,r,r", [w, xa, xb], dtype=tl.int32, is_pure=True, pack=1)
    else:
        d = tl.zeros(w.shape, dtype=tl.float32)
        for b in tl.static_range(4):
            code = ((w << (24 - 8 * b)) >> 24).to(tl.float32)
            d += code * _f16_lane(xa if b % 2 == 0 else xb, 16 * (b // 2))
    return d


@triton.jit
def _rows_dot_i8_f16x2(xq_ptr, w_ptr, m, rn, N, K, k_lo, k_hi, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       ASM: tl.constexpr):
    """_rows_dot_int8 in fp16 pairs (_i8_f16x2_dot): each 4 words' pairs are added as pairs, then in fp32; xq is
    x / 256 (the pairs' sums stay far from fp16's range), so the dots come out / 256."""
    KW = K // 4
    BLOCK_W: tl.constexpr = BLOCK_K // 4
    acc = tl.zeros((BLOCK_N, BLOCK_W // 4), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rw = k0 // 4 + tl.arange(0, BLOCK_W)
        xq = xq_ptr.to(tl.pointer_type(tl.int32)) + m * (K // 2) + 2 * rw  # fp16 pairs as words
        xa = tl.load(xq, mask=rw < KW, other=0)
        xb = tl.load(xq + 1, mask=rw < KW, other=0)
        acc += _group_sums(_i8_f16x2_dot(_tile(w_ptr, rn, rw, N, KW), xa[None, :], xb[None, :], ASM), BLOCK_W // 4,
                           ASM)
    return tl.sum(acc, axis=1) * 256


@triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "SPLITS", "GATE", "SCALED"])
@triton.jit
def _gemv_kernel(x_ptr, xq_ptr, w_ptr, s_ptr, run_ptr, y_ptr, M, N, K, GATED, SPLITS: tl.constexpr,
                 RUN_PAD: tl.constexpr, GATE: tl.constexpr, SCALED: tl.constexpr, XQ: tl.constexpr, ASM: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """matmul_partials for a few rows of x on the CUDA cores: one program per (block of output columns, row of
    x, K slice), a reduction instead of a tensor-core dot padded to 16 rows. SCALED: int8 codes as int32 words
    (XQ: dotted in fp16 pairs with xq = prep_x(x, 1 / 256), _rows_dot_i8_f16x2)."""
    pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    runs, needed = _gate(run_ptr, M, GATED, pid_n, RUN_PAD, GATE, BLOCK_N)
    if needed:
        k_lo, k_hi = _k_slice(K, pid_k, SPLITS, BLOCK_K)
        if SCALED and XQ:
            acc = _rows_dot_i8_f16x2(xq_ptr, w_ptr, m, rn, N, K, k_lo, k_hi, BLOCK_N, BLOCK_K, ASM)
        elif SCALED:
            acc = _rows_dot_int8(x_ptr, w_ptr, m, rn, N, K, k_lo, k_hi, BLOCK_N, BLOCK_K)
        else:
            acc = _rows_dot(x_ptr, w_ptr, m, rn, N, K, k_lo, k_hi, BLOCK_N, BLOCK_K)
    if GATE:
        acc = tl.where((rn < GATED) & ~runs, 0.0, acc)  # a block across GATED: its gated columns too
    if SCALED:
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + (pid_k * M + m) * N + rn, acc, mask=rn < N)


FP32_2POW23_BITS = 0x4B000000  # _w4_gemv_kernel's MAGIC
GEMV_ROWS = 4  # the CUDA-core kernels take up to this many rows of x, the tensor-core ones above
_gated_tuned: set = set()


def matmul_partials(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, run: torch.Tensor | None,
                    gated: int, splits: int, want: bool = True, xq: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[splits, M, N] in dtype whose sum over the first axis is x [M, K] @ w [N, K].T (w 16-bit, or int8 times a
    per-row scale [N]), in one launch: each program stores its K slice's partial sums once (no zero fill, no
    atomics). With run [M] (bool): the first `gated` output columns are zero unless some row's flag equals
    `want`, and their programs then read no weight (the flags are read first). xq: prep_x(x, 1 / 256), for int8
    weights at up to GEMV_ROWS rows (then dotted in fp16 pairs, and x is not read: it may be an empty [M, 0])."""
    m, k = x.shape[0], w.shape[1]
    n = w.shape[0]
    x = x.contiguous() if xq is None else xq
    gate, scaled = (0 if run is None else 1 if want else 2), scale is not None
    flags = run.contiguous().view(torch.uint8) if gate else x
    s = scale if scaled else x
    pad = max(16, triton.next_power_of_2(m))
    y = torch.empty((splits, m, n), device=x.device, dtype=dtype)  # the kernels' stores cast their fp32 sums

    if scaled and m <= GEMV_ROWS and k % 4:
        raise ValueError(f"matmul_partials: int8 weights need in-features divisible by 4, got {k}")
    if xq is not None and not (scaled and m <= GEMV_ROWS):
        raise ValueError(f"matmul_partials: xq is for int8 weights at up to {GEMV_ROWS} rows, got {m} rows")

    def launch(flags):
        if m <= GEMV_ROWS:  # int8 codes read as int32 words
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m, splits)  # noqa: E731
            _gemv_kernel[grid](x, x if xq is None else xq, w.view(torch.int32) if scaled else w, s, flags, y, m, n, k,
                               gated, SPLITS=splits, RUN_PAD=pad, GATE=gate, SCALED=scaled, XQ=xq is not None,
                               ASM=not INTERPRET)
        else:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, 16), splits)  # noqa: E731
            _tc_kernel[grid](x, w, s, flags, y, m, n, k, gated, SPLITS=splits, RUN_PAD=pad, GATE=gate, SCALED=scaled,
                             DOT_DTYPE=DOT_DTYPE, BLOCK_M=16)

    tag = (n, k, splits, m <= GEMV_ROWS, gate)
    if gate and tag not in _gated_tuned:  # autotune with every weight read (a skipped program times nothing)
        launch(torch.full_like(flags, int(want)))
        _gated_tuned.add(tag)
    launch(flags)
    return y


@torch.library.register_kernel("adaptive_inference::gated_linear_partials", "cuda")
def _gated_linear_cuda(x: torch.Tensor, w: torch.Tensor, run: torch.Tensor, gated: int, splits: int) -> torch.Tensor:
    """gated_linear_op.gated_linear_partials in one launch whose skipped programs read no weight (16-bit weights)."""
    return matmul_partials(x, w, None, run, gated, splits, dtype=partials_dtype(x, splits))


@torch.library.custom_op("adaptive_inference::w8_linear_partials", mutates_args=())
def w8_linear_partials(x: torch.Tensor, xq: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       splits: int) -> torch.Tensor:
    """[splits, M, N] (partials_dtype) whose sum over the first axis is x [M, K] @ (q [N, K] int8 * scale [N]).T;
    xq: prep_x(x, 1 / 256) for _rows_dot_i8_f16x2 (up to GEMV_ROWS rows; x then only gives M and the dtype), or
    empty."""
    return matmul_partials(x, q, scale, None, 0, splits, xq=xq if xq.numel() else None,
                           dtype=partials_dtype(x, splits))


@w8_linear_partials.register_fake
def _(x, xq, q, scale, splits):
    return x.new_empty((splits, x.shape[0], q.shape[0]), dtype=partials_dtype(x, splits))


def w8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, splits: int = 1,
              f16x2: bool | None = None) -> torch.Tensor:
    """x [M, K] times the int8 weight, in x's dtype (the partial sums added in torch ops: fused under compile);
    f16x2: the fp16-pair GEMV (default: f16x2_gemv), which reads xq only."""
    f16x2 = (f16x2_gemv(x.shape[0]) if f16x2 is None else f16x2 and x.shape[0] <= GEMV_ROWS) and x.shape[1] % 4 == 0
    xs = x_for_pairs(x, 1 / 256) if f16x2 else (x, x.new_empty(0))
    return add_partials(w8_linear_partials(*xs, q, scale, splits), x.dtype)


@triton.jit
def _codes(c_ptr, r_ptr, rn, rk, N, H, NESTED: tl.constexpr):
    """Codes of weight rows rn at packed columns rk: (columns rk, columns rk + H) as float32 tiles; nested: the
    8-bit code from both planes, centred by 7.5 steps of the scale / 16 grid. 4-bit codes through _magic (at
    batch 8 on an H100: gate_up 87.9 -> 77.6 us); nested ones through conversions, as the magic version of them
    measured slower (149.6 -> 193.1 us; docs/measurements/cuda_packed_kernels_h100_batch8_magic_2026-12-06.json)."""
    wmask = (rn[:, None] < N) & (rk[None, :] < H)
    c = tl.load(c_ptr + rn[:, None] * H + rk[None, :], mask=wmask, other=0)
    if NESTED:
        r = tl.load(r_ptr + rn[:, None] * H + rk[None, :], mask=wmask, other=0)
        lo = (c & 15).to(tl.float32) * 16 + (r & 15).to(tl.float32) - 7.5
        hi = (c >> 4).to(tl.float32) * 16 + (r >> 4).to(tl.float32) - 7.5
        return lo, hi
    c = c.to(tl.int32)
    return _magic((c & 15) | 0x4B000000, 8388608.0), _magic((c >> 4) | 0x4B000000, 8388608.0)


@triton.jit
def _scales(s_ptr, m_ptr, rn, g0, N, G, GROUP: tl.constexpr, NESTED: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-group (scale, min) [BLOCK_N, BLOCK_K / GROUP] of rows rn from group g0 on, float32 (nested: the
    scale of the 8-bit grid, / 16)."""
    rg = g0 + tl.arange(0, BLOCK_K // GROUP)
    gmask = (rn[:, None] < N) & (rg[None, :] < G)
    sc = tl.load(s_ptr + rn[:, None] * G + rg[None, :], mask=gmask, other=0.0).to(tl.float32)
    mn = tl.load(m_ptr + rn[:, None] * G + rg[None, :], mask=gmask, other=0.0).to(tl.float32)
    if NESTED:
        sc = sc * 0.0625
    return sc, mn


@triton.jit
def _dequant_dot(acc, codes, xs, scales, GROUP: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """acc + xs @ (codes * scale + min)^T for a [BLOCK_N, BLOCK_K] tile of codes, scales = its groups' _scales."""
    sc, mn = scales
    w = tl.reshape(tl.reshape(codes, (BLOCK_N, BLOCK_K // GROUP, GROUP)) * sc[:, :, None] + mn[:, :, None],
                   (BLOCK_N, BLOCK_K))
    return acc + tl.dot(xs.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)))


_W4_BF16 = tl.constexpr(W4_BF16)
_ASM = tl.constexpr(not INTERPRET)  # inline PTX (the interpreter runs none: the same arithmetic in tl ops there)


@triton.jit
def _bf16_weights(c, sc, mn, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  ASM: tl.constexpr):
    """The low and high columns' bf16 weights of a [BLOCK_N, BLOCK_K] tile of code bytes c (uint8), their groups'
    scales and mins sc, mn = ((scale, min) of the low columns, of the high ones), each [BLOCK_N, BLOCK_K / GROUP]
    float32: code * scale + min in bf16 arithmetic on pairs (f16x2.W4_BF16; scale and min rounded to bf16 first).
    ASM False (the interpreter, whose bf16 rounding is not the GPU's): the same in fp32, unrounded."""
    NG: tl.constexpr = BLOCK_K // GROUP
    shape: tl.constexpr = (BLOCK_N, NG, GROUP)
    c = tl.reshape(c, shape)
    dt: tl.constexpr = tl.bfloat16 if ASM else tl.float32
    s_lo = tl.broadcast_to(sc[0].to(dt)[:, :, None], shape)
    m_lo = tl.broadcast_to(mn[0].to(dt)[:, :, None], shape)
    s_hi = tl.broadcast_to(sc[1].to(dt)[:, :, None], shape)
    m_hi = tl.broadcast_to(mn[1].to(dt)[:, :, None], shape)
    if ASM:
        lo, hi = tl.inline_asm_elementwise(_W4_BF16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [c, s_lo, m_lo, s_hi, m_hi],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        lo = (c & 15).to(tl.float32) * s_lo + m_lo
        hi = (c >> 4).to(tl.float32) * s_hi + m_hi
    return tl.reshape(lo, (BLOCK_N, BLOCK_K)), tl.reshape(hi, (BLOCK_N, BLOCK_K))


# ADAPTIVE_INFERENCE_W4_PAIRS=1: the tensor-core 4-bit kernel's autotuner also tries the weights made in bf16
# pairs (_bf16_weights); off by default until a GPU has checked and timed it (scripts/gpu_kernel_checks.sh)
W4_PAIRS = env_choice("ADAPTIVE_INFERENCE_W4_PAIRS", ("0", "1"), "0")


# its tiles (BLOCK_N, BLOCK_K, warps, stages): _CONFIGS' with K tiles of at most 256 columns, which all compile to
# 254-255 registers a thread for sm_90 (8 warps an SM), and smaller ones that leave room for 12-28 warps
# (scripts/kernel_sass.py --kernels t4 t4b; a group may not span two K tiles: _w4_prune)
_W4_TC_TILES = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in _CONFIGS
                if c.kwargs["BLOCK_K"] <= 256 or INTERPRET] + [(32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4),
                                                               (128, 64, 4, 4), (32, 64, 4, 4)]


def w4_tc_configs(pairs: tuple[int, ...], tiles: list[tuple[int, int, int, int]] | None = None) -> list:
    """The tensor-core 4-bit kernel's configurations over tiles (default _W4_TC_TILES, cut to
    ADAPTIVE_INFERENCE_TRITON_TILES): the next tile's scales loaded a tile ahead or not (the pipeliner streams the
    codes and x, which feed the dot, but not the scales: a load a tile in the loop), the codes made weights in fp32
    one at a time or (PAIRS 1, depth 4 only) in bf16 pairs."""
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "PREFETCH": p, "PAIRS": d}, num_warps=w, num_stages=st)
               for d in pairs for p in (1, 0) for bn, bk, w, st in (tiles or _W4_TC_TILES)]
    return configs if tiles else configs[:_TILES]


_W4_TC_CONFIGS = w4_tc_configs((1, 0) if W4_PAIRS == "1" else (0,))


def _w4_prune(configs, named_args, **kwargs):
    """K tiles of at least a group; for the nested read (depth 8: its 8-bit codes are not exact in a bf16 mantissa)
    the PAIRS configurations are dropped where fp32 ones remain, as the kernel runs those for it anyway."""
    fit = [c for c in configs if c.kwargs["BLOCK_K"] >= kwargs["GROUP"]]
    if not fit:
        raise ValueError(f"_w4_kernel: no tile of its list has BLOCK_K >= the group size {kwargs['GROUP']}")
    return [c for c in fit if not (kwargs["NESTED"] and c.kwargs["PAIRS"])] or fit


@triton.autotune(configs=_W4_TC_CONFIGS, key=["N", "K", "SPLITS", "NESTED", "GROUP"],
                 prune_configs_by={"early_config_prune": _w4_prune})
@triton.jit
def _w4_kernel(x_ptr, c_ptr, r_ptr, s_ptr, m_ptr, y_ptr, M, N, K, SPLITS: tl.constexpr, GROUP: tl.constexpr,
               NESTED: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, PAIRS: tl.constexpr):
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    H = K // 2  # packed columns; column j of the low half pairs with column j + H of the high half
    G = K // GROUP
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo, k_hi = _k_slice(H, pid_k, SPLITS, BLOCK_K)
    s_lo = _scales(s_ptr, m_ptr, rn, k_lo // GROUP, N, G, GROUP, NESTED, BLOCK_K)  # the first tile's
    s_hi = _scales(s_ptr, m_ptr, rn, (k_lo + H) // GROUP, N, G, GROUP, NESTED, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if PREFETCH:  # the next tile's (past the slice: unused; past the row: masked)
            nxt_lo = _scales(s_ptr, m_ptr, rn, (k0 + BLOCK_K) // GROUP, N, G, GROUP, NESTED, BLOCK_K)
            nxt_hi = _scales(s_ptr, m_ptr, rn, (k0 + BLOCK_K + H) // GROUP, N, G, GROUP, NESTED, BLOCK_K)
        else:  # this tile's, where it is used
            s_lo = _scales(s_ptr, m_ptr, rn, k0 // GROUP, N, G, GROUP, NESTED, BLOCK_K)
            s_hi = _scales(s_ptr, m_ptr, rn, (k0 + H) // GROUP, N, G, GROUP, NESTED, BLOCK_K)
        rk = k0 + tl.arange(0, BLOCK_K)
        xm = (rm[:, None] < M) & (rk[None, :] < H)
        x_lo = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=xm, other=0.0)
        x_hi = tl.load(x_ptr + rm[:, None] * K + H + rk[None, :], mask=xm, other=0.0)
        if PAIRS and not NESTED:  # (an autotuner of one configuration prunes nothing)
            c = tl.load(c_ptr + rn[:, None] * H + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < H), other=0)
            lo, hi = _bf16_weights(c, (s_lo[0], s_hi[0]), (s_lo[1], s_hi[1]), GROUP, BLOCK_N, BLOCK_K, _ASM)
            acc += tl.dot(x_lo.to(DOT_DTYPE), tl.trans(lo.to(DOT_DTYPE)))
            acc += tl.dot(x_hi.to(DOT_DTYPE), tl.trans(hi.to(DOT_DTYPE)))
        else:
            lo, hi = _codes(c_ptr, r_ptr, rn, rk, N, H, NESTED)
            acc = _dequant_dot(acc, lo, x_lo, s_lo, GROUP, DOT_DTYPE, BLOCK_N, BLOCK_K)
            acc = _dequant_dot(acc, hi, x_hi, s_hi, GROUP, DOT_DTYPE, BLOCK_N, BLOCK_K)
        if PREFETCH:
            s_lo, s_hi = nxt_lo, nxt_hi
    tl.store(y_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _nibble_dot(acc, w, xw, XW_OK, magic, B: tl.constexpr, HIGH: tl.constexpr):
    """acc + the low (or HIGH) nibble of byte B of int32 words w [BLOCK_N, BLOCK_W] (B >= 2: w already shifted
    right by 16) times x at xw + B [BLOCK_W]. The nibble, masked in place at bit S, is ORed into the fp32 2**(23 -
    S), whose last mantissa bit weighs 2**-S: that float minus 2**(23 - S) is the code, exactly (magic: the
    int32 bits of 2**23, a kernel argument so that the OR and the mask are one instruction)."""
    S: tl.constexpr = 8 * (B % 2) + 4 * HIGH
    x = tl.load(xw + B, mask=XW_OK, other=0.0).to(tl.float32)
    code = ((w & (0xF << S)) | (magic - (S << 23))).to(tl.float32, bitcast=True) - (1 << (23 - S))
    return tl.fma(code, x[None, :], acc)


@triton.jit
def _nibbles_dot(w, w_hi, xw, XW_OK, magic, HIGH: tl.constexpr):
    """[BLOCK_N, BLOCK_W] per word: the low (or HIGH) nibbles' codes of words w [BLOCK_N, BLOCK_W] (packed columns
    4j..4j+3, see the module docstring; w_hi = w >> 16) dotted with x at xw (masked by XW_OK [BLOCK_W])."""
    total = _nibble_dot(tl.zeros(w.shape, dtype=tl.float32), w, xw, XW_OK, magic, 0, HIGH)
    total = _nibble_dot(total, w, xw, XW_OK, magic, 1, HIGH)
    total = _nibble_dot(total, w_hi, xw, XW_OK, magic, 2, HIGH)
    return _nibble_dot(total, w_hi, xw, XW_OK, magic, 3, HIGH)


@triton.jit
def _w4_gemv_start(c_ptr, N, H, HW, pid_n, pid_k, SPLITS: tl.constexpr, NG: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """A 4-bit GEMV program's start: its weight rows rn, its slice [k_lo, k_hi) of the H packed columns, the word
    columns rw of its first tile and that tile's code words, and its per-group accumulator [BLOCK_N, NG]. (K is a
    multiple of 2 x GROUP >= 64: quant_cuda.triton_ok; HW = K / 8 words a row.)"""
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo, k_hi = _k_slice(H, pid_k, SPLITS, BLOCK_K)
    rw = k_lo // 4 + tl.arange(0, BLOCK_K // 4)
    return rn, k_lo, k_hi, rw, _tile_to(c_ptr, rn, rw, N, HW, k_lo, k_hi), tl.zeros((BLOCK_N, NG), dtype=tl.float32)


@triton.autotune(configs=_W4_GEMV_CONFIGS, key=["N", "K", "SPLITS", "NESTED", "GROUP"])
@triton.jit
def _w4_gemv_kernel(x_ptr, c_ptr, r_ptr, s_ptr, m_ptr, y_ptr, M, N, K, MAGIC, SPLITS: tl.constexpr, GROUP: tl.constexpr,
                    NESTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """w4 for a few rows of x (decode): one program per (row block of the weight, row of x, K slice), a
    reduction on the CUDA cores instead of a tensor-core dot padded to 16 rows. The codes are read as int32
    words [N, K / 8] (8 codes a word, BLOCK_K / 4 words a tile); per group: scale x (codes . x) + min x sum(x)
    (nested: of the 8-bit code 16 x code + residual, centred through the min)."""
    pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    BLOCK_W: tl.constexpr = BLOCK_K // 4
    NG: tl.constexpr = BLOCK_K // GROUP
    H, HW, G = K // 2, tl.multiple_of(K // 8, 8), K // GROUP
    rn, k_lo, k_hi, rw, codes, acc = _w4_gemv_start(c_ptr, N, H, HW, pid_n, pid_k, SPLITS, NG, BLOCK_N, BLOCK_K)
    residual = _tile_to(r_ptr, rn, rw, N, HW, k_lo, k_hi) if NESTED else codes
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if PREFETCH:
            codes_next = _tile_to(c_ptr, rn, rw + BLOCK_W, N, HW, k0 + BLOCK_K, k_hi)
            residual_next = _tile_to(r_ptr, rn, rw + BLOCK_W, N, HW, k0 + BLOCK_K, k_hi) if NESTED else codes_next
        ok = rw < HW
        for high in tl.static_range(2):
            xr = x_ptr + m * K + high * H
            dot = _nibbles_dot(codes, codes >> 16, xr + 4 * rw, ok, MAGIC, high)
            if NESTED:
                dot = dot * 16 + _nibbles_dot(residual, residual >> 16, xr + 4 * rw, ok, MAGIC, high)
            dot = tl.sum(tl.reshape(dot, (BLOCK_N, NG, BLOCK_W // NG)), axis=2)
            rk = k0 + tl.arange(0, BLOCK_K)
            xg = tl.sum(tl.reshape(tl.load(xr + rk, mask=rk < H, other=0.0).to(tl.float32), (NG, GROUP)), axis=1)
            sc, mn = _scales(s_ptr, m_ptr, rn, (k0 + high * H) // GROUP, N, G, GROUP, NESTED, BLOCK_K)
            if NESTED:
                mn = mn - 7.5 * sc
            acc += dot * sc + mn * xg[None, :]
        rw += BLOCK_W
        if PREFETCH:
            codes, residual = codes_next, residual_next
        else:
            codes = _tile_to(c_ptr, rn, rw, N, HW, k0 + BLOCK_K, k_hi)
            residual = _tile_to(r_ptr, rn, rw, N, HW, k0 + BLOCK_K, k_hi) if NESTED else codes
    tl.store(y_ptr + (pid_k * M + m) * N + rn, tl.sum(acc, axis=1), mask=rn < N)


_F16X2_DOT = tl.constexpr(W4_DOT)


@triton.jit
def _f16x2_dot(w, xa, xb, xc, xd, ASM: tl.constexpr):
    """The 8 codes of int32 words w (split-halves layout: byte b = columns 4i + b | H + 4i + b << 4) centred
    (code - 8) and dotted with x in fp16, two columns a half2 instruction: (low columns, high columns) partial
    sums as fp16 pairs in int32. xa..xd: x / 16 in fp16 pairs (columns 4i, 4i + 2), (4i + 1, 4i + 3), and the
    same at H (w4_linear's x prep). A code becomes a half by masking it into the mantissa of 1024 (low nibble)
    or 64 (high nibble: spacing 1/16, so the shifted code is the code) and one subtract: 1.6 instructions a
    weight in all. ASM False (the interpreter): the same in fp32, as fp32."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(_F16X2_DOT, "=r,=r,r,r,r,r,r", [w, xa, xb, xc, xd],
                                           dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        lo = tl.zeros(w.shape, dtype=tl.float32)
        hi = tl.zeros(w.shape, dtype=tl.float32)
        for b in tl.static_range(4):
            xw = xa if b % 2 == 0 else xb
            xh = xc if b % 2 == 0 else xd
            lane = 16 * (b // 2)
            lo += (((w >> (8 * b)) & 15).to(tl.float32) - 8.0) * _f16_lane(xw, lane)
            hi += (((w >> (8 * b + 4)) & 15).to(tl.float32) - 8.0) * _f16_lane(xh, lane)
    return lo, hi


_N8_F16X2_DOT = tl.constexpr(N8_DOT)


@triton.jit
def _n8_f16x2_dot(c, r, xa, xb, xc, xd, ASM: tl.constexpr):
    """_f16x2_dot for a nested weight read at depth 8: the 8-bit codes 16 code + residual of the code words c and
    residual words r (same layout), centred (code8 - 128), dotted with x / 256 in fp16 pairs (xa..xd as there):
    (low columns, high columns) partial sums as fp16 pairs in int32. ASM False: in fp32, as fp32."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(_N8_F16X2_DOT, "=r,=r,r,r,r,r,r,r", [c, r, xa, xb, xc, xd],
                                           dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:  # 16 code + residual - 128 = 16 (code - 8) + (residual - 8) + 8: both planes' 4-bit dots, x's sum
        lo_c, hi_c = _f16x2_dot(c, xa, xb, xc, xd, False)
        lo_r, hi_r = _f16x2_dot(r, xa, xb, xc, xd, False)
        lo = 16 * lo_c + lo_r + 8 * (_f16_lane(xa, 0) + _f16_lane(xa, 16) + _f16_lane(xb, 0) + _f16_lane(xb, 16))
        hi = 16 * hi_c + hi_r + 8 * (_f16_lane(xc, 0) + _f16_lane(xc, 16) + _f16_lane(xd, 0) + _f16_lane(xd, 16))
    return lo, hi


@triton.jit
def _f16_lane(words, SHIFT: tl.constexpr):
    """The fp16 at bit SHIFT (0 or 16) of int32 words, as fp32."""
    return ((words >> SHIFT) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _pair_sums(xa, xb, NG: tl.constexpr):
    """[NG] fp32 sums of the fp16 pairs xa, xb [BLOCK_W] (4 columns a word position) over NG equal groups."""
    four = _f16_lane(xa, 0) + _f16_lane(xa, 16) + _f16_lane(xb, 0) + _f16_lane(xb, 16)
    return tl.sum(tl.reshape(four, (NG, xa.shape[0] // NG)), axis=1)


@triton.jit
def _add_f16x2(a, b):
    return tl.inline_asm_elementwise("add.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _f16x2_total(a):
    return tl.inline_asm_elementwise("{.reg .f16 l, h; .reg .f32 fl, fh; mov.b32 {l, h}, $1; cvt.f32.f16 fl, l; "
                                     "cvt.f32.f16 fh, h; add.f32 $0, fl, fh;}", "=f,r", [a], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _group_sums(d, NG: tl.constexpr, ASM: tl.constexpr):
    """[BLOCK_N, BLOCK_W] word partial sums -> [BLOCK_N, NG] fp32 group sums (fp16 pairs added as pairs first)."""
    d = tl.reshape(d, (d.shape[0], NG, d.shape[1] // NG))
    if ASM:
        total = _f16x2_total(tl.reduce(d, 2, _add_f16x2))
    else:
        total = tl.sum(d, axis=2)
    return total


@triton.autotune(configs=_W4_GEMV_CONFIGS, key=["N", "K", "SPLITS", "GROUP"])
@triton.jit
def _w4_gemv_f16x2_kernel(xq_ptr, c_ptr, s_ptr, m_ptr, y_ptr, M, N, K, SPLITS: tl.constexpr,
                          GROUP: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PREFETCH: tl.constexpr):
    """_w4_gemv_kernel (depth 4) with the codes dotted in fp16 pairs (_f16x2_dot) and summed per group in fp16
    pairs, then in fp32: per group scale x 16 x (centred codes . x / 16) + (min + 8 scale) x sum(x). xq: fp16
    [M, K], prep_x(x, 1 / 16), read as int32 pairs (w4_linear makes it); sum(x) is taken from it too, so x itself
    is not read and need not exist (x_for_pairs)."""
    pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    BLOCK_W: tl.constexpr = BLOCK_K // 4
    NG: tl.constexpr = BLOCK_K // GROUP
    H, HW, G = K // 2, tl.multiple_of(K // 8, 8), K // GROUP
    rn, k_lo, k_hi, rw, w, acc = _w4_gemv_start(c_ptr, N, H, HW, pid_n, pid_k, SPLITS, NG, BLOCK_N, BLOCK_K)
    xq = xq_ptr.to(tl.pointer_type(tl.int32)) + m * H + 2 * rw  # fp16 pairs as words
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if PREFETCH:
            w_next = _tile_to(c_ptr, rn, rw + BLOCK_W, N, HW, k0 + BLOCK_K, k_hi)
        ok = rw < HW
        xa, xb = tl.load(xq, mask=ok, other=0), tl.load(xq + 1, mask=ok, other=0)
        xc, xd = tl.load(xq + H // 2, mask=ok, other=0), tl.load(xq + H // 2 + 1, mask=ok, other=0)
        lo, hi = _f16x2_dot(w, xa[None, :], xb[None, :], xc[None, :], xd[None, :], ASM)
        for high in tl.static_range(2):
            xg = _pair_sums(xc if high else xa, xd if high else xb, NG) * 16  # sum(x) per group, from x / 16
            sc, mn = _scales(s_ptr, m_ptr, rn, (k0 + high * H) // GROUP, N, G, GROUP, False, BLOCK_K)
            acc += _group_sums(hi if high else lo, NG, ASM) * (16 * sc) + (mn + 8 * sc) * xg[None, :]
        rw += BLOCK_W
        xq += 2 * BLOCK_W
        if PREFETCH:
            w = w_next
        else:
            w = _tile_to(c_ptr, rn, rw, N, HW, k0 + BLOCK_K, k_hi)
    tl.store(y_ptr + (pid_k * M + m) * N + rn, tl.sum(acc, axis=1), mask=rn < N)


def x_for_pairs(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x's stand-in, xq) for a partials op whose kernel reads xq = prep_x(x, scale) only: an empty [M, 0] of
    x's dtype, so that under torch.compile x itself is never stored when nothing else reads it (the SiLU's
    output before the MLP's down matrix: a launch a layer of its own, beside the one making xq)."""
    return x.new_empty((x.shape[0], 0)), prep_x(x, scale)


def f16x2_gemv(m: int, nested: bool = False) -> bool:
    """Whether a matmul of m rows of x takes the fp16-pair GEMVs (_rows_dot_i8_f16x2, _w4_gemv_f16x2_kernel):
    under torch.compile only, where their x prep (prep_x) fuses into the op that makes x; run eagerly it would
    be launches of its own. Where that op is opaque to inductor (the attention op before the o matmul) a
    weight asks for the fp32 kernels instead (quant_cuda.CudaPacked.pairs, quant_cuda.around_attention)."""
    return m <= GEMV_ROWS and not nested and torch.compiler.is_compiling()


@torch.library.custom_op("adaptive_inference::w4_linear_partials", mutates_args=())
def w4_linear_partials(x: torch.Tensor, xq: torch.Tensor, codes: torch.Tensor, residual: torch.Tensor,
                       scale: torch.Tensor, minv: torch.Tensor, group_size: int, nested: bool,
                       splits: int) -> torch.Tensor:
    """[splits, M, N] (partials_dtype) partial sums of x [M, K] times the weight of codes [N, K/2] (the split-halves layout,
    see the module docstring), per group scale / min [N, K/g] fp16; residual: the depth-8 plane (same layout)
    when nested, else unused; xq: prep_x(x, 1 / 16) for _w4_gemv_f16x2_kernel (depth 4, up to GEMV_ROWS rows; x
    then only gives M and the dtype), or empty."""
    m, k = x.shape[0], 2 * codes.shape[1]
    n = codes.shape[0]
    y = torch.empty((splits, m, n), device=x.device, dtype=partials_dtype(x, splits))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m, splits)  # noqa: E731
    if xq.numel() and m <= GEMV_ROWS and not nested:  # x is not read
        _w4_gemv_f16x2_kernel[grid](xq, codes.view(torch.int32), scale, minv, y, m, n, k, SPLITS=splits,
                                    GROUP=group_size, ASM=not INTERPRET)
        return y
    x = x.contiguous()
    if m <= GEMV_ROWS:
        words = codes.view(torch.int32), (residual if nested else codes).view(torch.int32)  # 8 codes a word
        _w4_gemv_kernel[grid](x, *words, scale, minv, y, m, n, k, FP32_2POW23_BITS, SPLITS=splits, GROUP=group_size,
                              NESTED=nested)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, 16), splits)  # noqa: E731
        _w4_kernel[grid](x, codes, residual, scale, minv, y, m, n, k, SPLITS=splits, GROUP=group_size,
                         NESTED=nested, DOT_DTYPE=DOT_DTYPE, BLOCK_M=16)
    return y


@w4_linear_partials.register_fake
def _(x, xq, codes, residual, scale, minv, group_size, nested, splits):
    return x.new_empty((splits, x.shape[0], codes.shape[0]), dtype=partials_dtype(x, splits))


def w4_linear(x: torch.Tensor, codes: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor,
              group_size: int, nested: bool, splits: int = 1, f16x2: bool | None = None) -> torch.Tensor:
    """x [M, K] times the 4-bit weight, in x's dtype; f16x2: the fp16-pair GEMV (default: f16x2_gemv), which
    reads xq only."""
    f16x2 = f16x2_gemv(x.shape[0], nested) if f16x2 is None else f16x2 and x.shape[0] <= GEMV_ROWS and not nested
    xs = x_for_pairs(x, 1 / 16) if f16x2 else (x, x.new_empty(0))
    return add_partials(w4_linear_partials(*xs, codes, residual, scale, minv, group_size, nested, splits), x.dtype)


def select_linear(x: torch.Tensor, w_no: torch.Tensor, w_yes: torch.Tensor, take: torch.Tensor):
    """fp32 (x @ w_no.T, x @ w_yes.T) for x [..., K] and 16-bit weights [N, K]: the first only if some row has
    take False, the second only if some row has take True (zeros otherwise). take [...] bool is read by the
    kernels, never by the host, so this runs inside a captured graph."""
    x2, run = x.reshape(-1, x.shape[-1]), take.reshape(-1)
    return tuple(matmul_partials(x2, w, None, run, w.shape[0], 1, want)[0].reshape(*x.shape[:-1], w.shape[0])
                 for w, want in ((w_no, False), (w_yes, True)))


@triton.jit
def _decode_attention_kernel(qkv_ptr, k_ptr, v_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr, S, scale,
                             H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr,
                             BLOCK_S: tl.constexpr, DOT: tl.constexpr):
    """One (row, kv head): RoPE on the new k and the group's q heads, k / v written at slot pos of the cache (the
    row's bias slot marked written by kv head 0), then attention of the group's q heads over the cache's slots up
    to pos under its bias (online softmax, fp32; the later slots are unwritten, so a long static cache costs
    nothing until it fills), slot pos taken from registers (another program's write of the bias may land
    later)."""
    b, h = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = H // HKV
    HALF: tl.constexpr = D // 2
    pos = tl.load(pos_ptr)
    rd = tl.arange(0, D)
    rot = (rd + HALF) % D  # rotate-half partner: [-x2, x1]
    sign = tl.where(rd < HALF, -1.0, 1.0)
    cos = tl.load(cos_ptr + rd).to(tl.float32)
    sin = tl.load(sin_ptr + rd).to(tl.float32)
    row = qkv_ptr + b * (H + 2 * HKV) * D
    kin = row + (H + h) * D
    k_new = (tl.load(kin + rd).to(tl.float32) * cos + sign * tl.load(kin + rot).to(tl.float32) * sin).to(
        k_ptr.dtype.element_ty)
    v_new = tl.load(row + (H + HKV + h) * D + rd)
    base = (b * HKV + h) * S * D
    tl.store(k_ptr + base + pos * D + rd, k_new)
    tl.store(v_ptr + base + pos * D + rd, v_new)
    if h == 0:
        tl.store(bias_ptr + b * S + pos, 0.0)
    rg = tl.arange(0, G_PAD)
    gm = rg < G
    qin = row + (h * G + rg)[:, None] * D
    q = tl.load(qin + rd[None, :], mask=gm[:, None], other=0.0).to(tl.float32) * cos[None, :] \
        + sign[None, :] * tl.load(qin + rot[None, :], mask=gm[:, None], other=0.0).to(tl.float32) * sin[None, :]
    q = q.to(k_ptr.dtype.element_ty)
    m_i = tl.full((G_PAD,), -1e30, tl.float32)  # finite: a block of unwritten slots gives exp(-inf) = 0, not nan
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D), tl.float32)
    for s0 in range(0, pos + 1, BLOCK_S):
        rs = s0 + tl.arange(0, BLOCK_S)
        sm = rs < S
        new = rs == pos
        kb = tl.load(k_ptr + base + rs[:, None] * D + rd[None, :], mask=sm[:, None], other=0.0)
        kb = tl.where(new[:, None], k_new[None, :], kb)
        bias = tl.load(bias_ptr + b * S + rs, mask=sm, other=float("-inf")).to(tl.float32)
        bias = tl.where(new, 0.0, bias)
        scores = tl.dot(q.to(DOT), tl.trans(kb.to(DOT))) * scale + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(v_ptr + base + rs[:, None] * D + rd[None, :], mask=sm[:, None], other=0.0)
        vb = tl.where(new[:, None], v_new[None, :], vb)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), vb.to(DOT))
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * H * D + (h * G + rg)[:, None] * D + rd[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gm[:, None])


@torch.library.register_kernel("adaptive_inference::decode_attention", "cuda")
def _decode_attention_cuda(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, heads: int,
                           kv_heads: int) -> torch.Tensor:
    """attention_op.decode_attention in one kernel per (row, kv head) instead of ~5 (RoPE + k write, v write,
    the bias slot, SDPA's input preparation, attention: ~10 us a layer of the compiled 8B step on an H100)."""
    b, s, d = qkv.shape[0], k_cache.shape[2], k_cache.shape[3]
    if not all(t.is_contiguous() for t in (k_cache, v_cache, bias)):  # the kernel indexes them as dense arrays
        raise ValueError("decode_attention: the caches and bias must be contiguous")
    out = torch.empty((b, heads * d), device=qkv.device, dtype=qkv.dtype)
    g_pad = max(16, triton.next_power_of_2(heads // kv_heads))
    _decode_attention_kernel[(b, kv_heads)](
        qkv.contiguous(), k_cache, v_cache, bias, cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous(),
        positions, out, s, d ** -0.5, H=heads, HKV=kv_heads, D=d, G_PAD=g_pad, BLOCK_S=64 if d <= 128 else 32,
        DOT=DOT_DTYPE, num_warps=4)
    return out
