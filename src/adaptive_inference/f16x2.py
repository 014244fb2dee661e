"""The fp16-pair arithmetic of the CUDA decode GEMVs (triton_kernels' f16x2 kernels), kept free of triton so
that CPU tests check it: the PTX the kernels inline, the x prep, and `emulate`, which runs that PTX's few
instructions in numpy (integer ops bit-exact, each half2 op rounded once to fp16 as the GPU does).

A 32-bit word holds four int8 codes (bytes 0-3: columns 4i..4i+3) or eight 4-bit codes (byte b: column 4i + b
in its low nibble, H + 4i + b in its high one: triton_kernels' split-halves layout). One LOP3 masks two codes,
at bits s and 16 + s, into the mantissas of two halves: 1024's for an int8 byte (with its sign bit flipped:
1152 + code) or a low nibble (1024 + code), 64's for a high nibble (the mantissa's spacing there is 1/16, so
the shifted code is the code: 64 + code). One half2 subtract centres them; the dot takes half2 FMAs against x
prepared as fp16 pairs (columns 4i, 4i + 2) and (4i + 1, 4i + 3): prep_x.
"""

from __future__ import annotations

import re

import numpy as np
import torch

# int8: $0 = the word's 4 codes . x as one fp16 pair; $1 the word, $2 / $3 the x pairs
I8_DOT = """{
.reg .b32 w8, t0, t1, mid;
mov.b32 mid, 0x64806480;
shr.u32 w8, $1, 8;
lop3.b32 t0, $1, 0x647F647F, 0x64806480, 0xCA;
lop3.b32 t1, w8, 0x647F647F, 0x64806480, 0xCA;
sub.f16x2 t0, t0, mid;
sub.f16x2 t1, t1, mid;
mul.f16x2 $0, t0, $2;
fma.rn.f16x2 $0, t1, $3, $0;
}"""

# 4-bit: ($0, $1) = the word's low-nibble and high-nibble columns' centred codes (code - 8) . x as fp16 pairs;
# $2 the word, $3 / $4 the x pairs of its low columns, $5 / $6 those of its high columns (at H)
W4_DOT = """{
.reg .b32 w8, t0, t1, t2, t3, lo8, hi8;
mov.b32 lo8, 0x64086408;
mov.b32 hi8, 0x54805480;
shr.u32 w8, $2, 8;
lop3.b32 t0, $2, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t1, $2, 0x00F000F0, 0x54005400, 0xEA;
lop3.b32 t2, w8, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 t3, w8, 0x00F000F0, 0x54005400, 0xEA;
sub.f16x2 t0, t0, lo8;
sub.f16x2 t2, t2, lo8;
sub.f16x2 t1, t1, hi8;
sub.f16x2 t3, t3, hi8;
mul.f16x2 $0, t0, $3;
fma.rn.f16x2 $0, t2, $4, $0;
mul.f16x2 $1, t1, $5;
fma.rn.f16x2 $1, t3, $6, $1;
}"""


# nested 8-bit: ($0, $1) as W4_DOT's, for the 8-bit codes 16 code + residual of two 4-bit words in that layout
# ($2 the codes' word, $3 the residual's), centred (code8 - 128); x pairs / 256 as for int8. Two shifts and two
# LOP3 bit selects make the low columns' and the high columns' 8-bit codes as bytes (codes' nibble high,
# residual's low), then each byte word as in I8_DOT, unsigned (1024 + code8 - 1152): 2.25 instructions a weight
N8_DOT = """{
.reg .b32 c4, r4, u0, u1, v0, v1, t0, t1, t2, t3, mid;
mov.b32 mid, 0x64806480;
shl.b32 c4, $2, 4;
shr.u32 r4, $3, 4;
lop3.b32 u0, c4, $3, 0xF0F0F0F0, 0xE4;
lop3.b32 u1, $2, r4, 0xF0F0F0F0, 0xE4;
shr.u32 v0, u0, 8;
shr.u32 v1, u1, 8;
lop3.b32 t0, u0, 0x00FF00FF, 0x64006400, 0xEA;
lop3.b32 t1, v0, 0x00FF00FF, 0x64006400, 0xEA;
lop3.b32 t2, u1, 0x00FF00FF, 0x64006400, 0xEA;
lop3.b32 t3, v1, 0x00FF00FF, 0x64006400, 0xEA;
sub.f16x2 t0, t0, mid;
sub.f16x2 t1, t1, mid;
sub.f16x2 t2, t2, mid;
sub.f16x2 t3, t3, mid;
mul.f16x2 $0, t0, $4;
fma.rn.f16x2 $0, t1, $5, $0;
mul.f16x2 $1, t2, $6;
fma.rn.f16x2 $1, t3, $7, $1;
}"""


# 4-bit codes to bf16 weights for the tensor-core kernel (triton_kernels._w4_kernel, rows of x above GEMV_ROWS):
# elementwise over 4 weights (inline asm pack 4): $4 the 4 code bytes (low nibble: a column j, high: j + H), $5 /
# $6 the low columns' bf16 scales as pairs, $7 / $8 their mins, $9..$12 the same of the high columns; ($0, $1) the
# low columns' weights code * scale + min as bf16 pairs, ($2, $3) the high ones'. A PRMT spreads two bytes into the
# halves of a word, one LOP3 masks their nibbles into the mantissa of the bf16 128 (128 + code, exact), a bf16x2
# subtract leaves the codes and one bf16x2 FMA scales them: 2 instructions a weight where the fp32 way takes ~7
W4_BF16 = """{
.reg .b32 t0, t1, u0, u1, k;
mov.b32 k, 0x43004300;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 u0, t0, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 u1, t1, 0x000F000F, 0x43004300, 0xEA;
sub.bf16x2 u0, u0, k;
sub.bf16x2 u1, u1, k;
fma.rn.bf16x2 $0, u0, $5, $7;
fma.rn.bf16x2 $1, u1, $6, $8;
shr.u32 t0, t0, 4;
shr.u32 t1, t1, 4;
lop3.b32 u0, t0, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 u1, t1, 0x000F000F, 0x43004300, 0xEA;
sub.bf16x2 u0, u0, k;
sub.bf16x2 u1, u1, k;
fma.rn.bf16x2 $2, u0, $9, $11;
fma.rn.bf16x2 $3, u1, $10, $12;
}"""


def prep_x(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The f16x2 kernels' xq from x [M, K]: x * scale (a power of 2) in fp16, columns 0 2 1 3 in each 4 (the
    kernels read it as int32 pairs). Torch ops that torch.compile fuses into the kernel making x: kept fp16 here,
    as a dtype view (to int32) would end that fusion (an extra launch a matmul)."""
    m, k = x.shape
    return (x.float() * scale).to(torch.float16).view(m, k // 4, 2, 2).transpose(-1, -2).reshape(m, k)


def _lop3(a: np.ndarray, b: np.ndarray, c: np.ndarray, lut: int) -> np.ndarray:
    out = np.zeros_like(a)
    for i in range(8):  # bit i of lut is f(a, b, c) for the bits (a, b, c) = (i >> 2 & 1, i >> 1 & 1, i & 1)
        if lut >> i & 1:
            out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out


def _f16x2(op: str, *args: np.ndarray) -> np.ndarray:
    """A half2 op on uint32 words: exact in float64 (fp16 products and sums of three are), then one rounding."""
    args = [np.ascontiguousarray(a, dtype=np.uint32) for a in np.broadcast_arrays(*args)]
    h = [a.reshape(-1).view(np.float16).astype(np.float64) for a in args]
    r = {"sub": lambda a, b: a - b, "mul": lambda a, b: a * b, "fma": lambda a, b, c: a * b + c}[op](*h)
    return r.astype(np.float16).view(np.uint32).reshape(args[0].shape)


def _bf16_bits(v: np.ndarray) -> np.ndarray:
    """float64 -> bf16 bits (uint32), rounded once to nearest even (normal values)."""
    bits = np.ascontiguousarray(v, dtype=np.float64).view(np.uint64)
    bits = (bits + np.uint64((1 << 44) - 1) + (bits >> np.uint64(45) & np.uint64(1))) & ~np.uint64((1 << 45) - 1)
    return bits.view(np.float64).astype(np.float32).view(np.uint32) >> np.uint32(16)


def _bf16x2(op: str, *args: np.ndarray) -> np.ndarray:
    """A bf16x2 op on uint32 words: exact in float64 (bf16 products and sums of three are, in range), then one
    rounding to bf16."""
    args = [np.ascontiguousarray(a, dtype=np.uint32) for a in np.broadcast_arrays(*args)]
    halves = [[(a >> np.uint32(16 * i) << np.uint32(16)).view(np.float32).astype(np.float64) for a in args]
              for i in range(2)]
    f = {"sub": lambda a, b: a - b, "fma": lambda a, b, c: a * b + c}[op]
    return _bf16_bits(f(*halves[0])) | _bf16_bits(f(*halves[1])) << np.uint32(16)


def _prmt(a: np.ndarray, b: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """prmt.b32 (default mode): byte i of the result is byte (selector nibble i & 7) of (b:a), its sign smeared if
    the nibble's bit 3 is set."""
    both = np.asarray(a, np.uint64) | np.asarray(b, np.uint64) << np.uint64(32)
    out = np.zeros(np.broadcast(a, b).shape, dtype=np.uint32)
    for i in range(4):
        nib = int(sel) >> (4 * i) & 15
        byte = (both >> np.uint64(8 * (nib & 7)) & np.uint64(0xFF)).astype(np.uint32)
        if nib & 8:
            byte = np.where(byte & 0x80, np.uint32(0xFF), np.uint32(0))
        out |= byte << np.uint32(8 * i)
    return out


def emulate(asm: str, n_out: int, *inputs: np.ndarray) -> list[np.ndarray]:
    """Run the PTX block asm (I8_DOT, W4_DOT, N8_DOT, W4_BF16) on uint32 arrays; the outputs $0..$(n_out - 1), as
    uint32."""
    regs: dict[str, np.ndarray] = {f"${n_out + i}": np.asarray(v, dtype=np.uint32) for i, v in enumerate(inputs)}

    def val(s: str) -> np.ndarray:
        return np.uint32(int(s, 0)) if s[0].isdigit() else regs[s]

    for line in asm.strip().strip("{}").strip().splitlines():
        m = re.fullmatch(r"([\w.]+)\s+(.*);", line.strip())
        if m is None or m.group(1) == ".reg":
            continue
        op, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        dst, src = args[0], [val(a) for a in args[1:]]
        if op == "mov.b32":
            regs[dst] = np.broadcast_to(src[0], regs["$" + str(n_out)].shape).astype(np.uint32)
        elif op == "shr.u32":
            regs[dst] = src[0] >> src[1]
        elif op == "shl.b32":
            regs[dst] = src[0] << src[1]
        elif op == "lop3.b32":
            regs[dst] = _lop3(src[0], src[1], src[2], int(src[3]))
        elif op in ("sub.f16x2", "mul.f16x2", "fma.rn.f16x2"):
            regs[dst] = _f16x2(op.split(".")[0], *src)
        elif op in ("sub.bf16x2", "fma.rn.bf16x2"):
            regs[dst] = _bf16x2(op.split(".")[0], *src)
        elif op == "prmt.b32":
            regs[dst] = _prmt(src[0], src[1], src[2])
        else:
            raise ValueError(f"f16x2.emulate: no emulation of {op}")
    return [regs[f"${i}"] for i in range(n_out)]
