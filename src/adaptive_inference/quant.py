"""Packed weight formats for the entropy gears, backend-neutral (numpy): `quantize` and `dequantize`.

Formats (a weight is [N, K], out x in, as in nn.Linear):
- "int8": per-output-channel symmetric, w ~ scale[n] * q, q in [-127, 127], fp32 scale per row.
  Symmetric because LLM weight rows are near zero-centred, so a zero point buys little at 255 levels
  and the kernel needs no offset term.
- "int4": group-wise affine, w ~ scale[n, g] * q + minv[n, g], q in [0, 15], fp16 scale and min per
  group of `group_size` input columns (a power of two >= 32). Affine rather than symmetric because 16 levels are few: the
  min/max range wastes no level on a skewed group, and it is exactly MLX's affine (scale, bias) format.
- "nested": "int4" plus a second 4-bit plane with the residual, read at depth 4 (== "int4") or depth 8
  (code 16 q + r, step scale/16). One resident copy serves both low gears: the low gear reads half of it.

Nibble order (both 4-bit planes): in each block of 32 columns, byte i holds column i in its low nibble
and column 16 + i in its high nibble (llama.cpp's Q4 order), so an AVX2 kernel unpacks a block with
one AND and one shift and no shuffle.

Every format needs in-features divisible by 32. Error bounds (tested): int8 |w - w~| <= scale/2;
int4 <= scale/2; nested depth 8 <= scale/32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError

FORMATS = ("int8", "int4", "nested")
BLOCK = 32  # columns per nibble block; group sizes are multiples of it


@dataclass(frozen=True)
class Int8Weight:
    q: np.ndarray  # int8 [N, K]
    scale: np.ndarray  # float32 [N]

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape


@dataclass(frozen=True)
class Int4Weight:
    codes: np.ndarray  # uint8 [N, K // 2], two 4-bit codes per byte
    scale: np.ndarray  # float16 [N, K // group_size]
    minv: np.ndarray  # float16 [N, K // group_size]
    group_size: int
    residual: np.ndarray | None = None  # uint8 [N, K // 2]: the nested format's second plane

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 2

    @property
    def depths(self) -> tuple[int, ...]:
        return (4, 8) if self.residual is not None else (4,)


def _check_weight(w: np.ndarray, what: str) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or min(w.shape) == 0:
        raise UserError(f"{what}: needs a non-empty 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not np.issubdtype(w.dtype, np.floating):
        raise UserError(f"{what}: needs a floating-point weight, got {w.dtype}")
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        raise UserError(f"{what}: weight has non-finite values")
    return w


def quantize(w: np.ndarray, fmt: str, *, group_size: int = 32) -> Int8Weight | Int4Weight:
    """Packed state of weight w [N, K] in format fmt ("int8", "int4", "nested"; group_size for the last two)."""
    if fmt not in FORMATS:
        raise UserError(f"quantize: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    w = _check_weight(w, f"quantize {fmt}")
    if w.shape[1] % BLOCK:  # the torch kernel's activation blocks and MLX's groups are 32 columns
        raise UserError(f"quantize {fmt}: in-features {w.shape[1]} is not a multiple of {BLOCK}")
    if fmt == "int8":
        return _quantize_int8(w)
    return _quantize_int4(w, group_size, nested=fmt == "nested")


def _quantize_int8(w: np.ndarray) -> Int8Weight:
    scale = np.abs(w).max(axis=1) / np.float32(127)
    safe = np.where(scale > 0, scale, np.float32(1))  # an all-zero row: q = 0, scale = 0
    q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
    return Int8Weight(q=q, scale=scale.astype(np.float32))


def _round_f16(x: np.ndarray, direction: float) -> np.ndarray:
    """x (float64) to float16, rounded toward direction (-inf: result <= x, +inf: result >= x)."""
    h = x.astype(np.float16)
    off = (h.astype(np.float64) > x) if direction < 0 else (h.astype(np.float64) < x)
    return np.where(off, np.nextafter(h, np.float16(direction)), h)


def _quantize_int4(w: np.ndarray, group_size: int, *, nested: bool) -> Int4Weight:
    n, k = w.shape
    what = "nested" if nested else "int4"
    if group_size < BLOCK or group_size & (group_size - 1):  # the kernel finds a block's group by a shift
        raise UserError(f"quantize {what}: group_size must be a power of two >= {BLOCK}, got {group_size}")
    if k % group_size:
        raise UserError(f"quantize {what}: in-features {k} is not a multiple of group_size {group_size}")
    if np.abs(w).max() > 60000:  # scales and mins are fp16
        raise UserError(f"quantize {what}: |weight| up to {np.abs(w).max():.3g} exceeds the fp16 scale range")
    g = w.reshape(n, k // group_size, group_size).astype(np.float64)
    # min rounded down and scale rounded up in fp16, so [minv, minv + 15 scale] still covers the group
    minv = _round_f16(g.min(axis=2), -np.inf)
    scale = _round_f16((g.max(axis=2) - minv.astype(np.float64)) / 15, np.inf)
    s = scale.astype(np.float64)[..., None]
    m = minv.astype(np.float64)[..., None]
    safe = np.where(s > 0, s, 1.0)
    q = np.clip(np.rint((g - m) / safe), 0, 15)
    residual = None
    if nested:
        err = g - (q * s + m)  # in [-s/2, s/2]; 16 levels at (r - 7.5) s / 16
        r = np.clip(np.rint(err / safe * 16 + 7.5), 0, 15)
        residual = _pack_nibbles(r.reshape(n, k).astype(np.uint8))
    return Int4Weight(codes=_pack_nibbles(q.reshape(n, k).astype(np.uint8)), scale=scale, minv=minv,
                      group_size=group_size, residual=residual)


def _pack_nibbles(v: np.ndarray) -> np.ndarray:
    """uint8 codes [N, K] (< 16) -> [N, K // 2]: per 32-column block, byte i = col i | col 16 + i << 4."""
    n, k = v.shape
    b = v.reshape(n, k // BLOCK, 2, BLOCK // 2)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_nibbles(p: np.ndarray) -> np.ndarray:
    """Inverse of the packing: [N, K // 2] -> uint8 codes [N, K]."""
    n, half = p.shape
    b = p.reshape(n, half * 2 // BLOCK, 1, BLOCK // 2)
    return np.concatenate([b & 0x0F, b >> 4], axis=2).reshape(n, half * 2)


def codes(p: Int4Weight, depth: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(integer codes [N, K], scale [N, G], offset [N, G]) in float32 with w~ = codes * scale + offset
    per group, at depth 4 or (nested) 8; the form MLX's affine format and the kernels use."""
    if depth not in p.depths:
        raise UserError(f"int4 weight: depth {depth} not stored (have {p.depths})")
    c = unpack_nibbles(p.codes).astype(np.float32)
    s = p.scale.astype(np.float32)
    m = p.minv.astype(np.float32)
    if depth == 8:
        c = c * 16 + unpack_nibbles(p.residual)
        s = s / 16
        m = m - np.float32(7.5) * s
    return c, s, m


def dequantize(p: Int8Weight | Int4Weight, *, depth: int | None = None) -> np.ndarray:
    """Float32 weight [N, K] that the packed state stands for (depth: 4 or 8 for nested, default deepest)."""
    if isinstance(p, Int8Weight):
        return p.q.astype(np.float32) * p.scale[:, None]
    depth = max(p.depths) if depth is None else depth
    c, s, m = codes(p, depth)
    n, k = p.shape
    g = c.reshape(n, k // p.group_size, p.group_size)
    return (g * s[..., None] + m[..., None]).reshape(n, k)


def bytes_read(p: Int8Weight | Int4Weight, *, depth: int | None = None) -> int:
    """Bytes one matmul reads at this depth (codes + scales): the structural cost of a gear."""
    if isinstance(p, Int8Weight):
        return p.q.nbytes + p.scale.nbytes
    depth = max(p.depths) if depth is None else depth
    planes = p.codes.nbytes * (2 if depth == 8 else 1)
    return planes + p.scale.nbytes + p.minv.nbytes


def resident_bytes(p: Int8Weight | Int4Weight) -> int:
    """Bytes held in memory for this packed weight (all depths)."""
    return bytes_read(p) if isinstance(p, Int8Weight) else bytes_read(p, depth=max(p.depths))


def to_arrays(p: Int8Weight | Int4Weight, prefix: str) -> dict[str, np.ndarray]:
    """Flat name -> array dict (for safetensors); `from_arrays` reads it back."""
    if isinstance(p, Int8Weight):
        return {f"{prefix}.q8": p.q, f"{prefix}.scale": p.scale}
    out = {f"{prefix}.q4": p.codes, f"{prefix}.scale": p.scale, f"{prefix}.minv": p.minv,
           f"{prefix}.group_size": np.array([p.group_size], dtype=np.int32)}
    if p.residual is not None:
        out[f"{prefix}.r4"] = p.residual
    return out


def from_arrays(arrays: dict[str, np.ndarray], prefix: str) -> Int8Weight | Int4Weight:
    if f"{prefix}.q8" in arrays:
        return Int8Weight(q=arrays[f"{prefix}.q8"], scale=arrays[f"{prefix}.scale"])
    if f"{prefix}.q4" not in arrays:
        raise UserError(f"packed weights: no {prefix}.q8 or {prefix}.q4 entry")
    return Int4Weight(codes=arrays[f"{prefix}.q4"], scale=arrays[f"{prefix}.scale"],
                      minv=arrays[f"{prefix}.minv"], group_size=int(arrays[f"{prefix}.group_size"][0]),
                      residual=arrays.get(f"{prefix}.r4"))


def save_file(states: dict[str, Int8Weight | Int4Weight], path) -> None:
    """Packed states by weight name -> one safetensors file (deterministic bytes for the same states)."""
    from safetensors.numpy import save_file as save

    arrays = {}
    for name, p in sorted(states.items()):
        arrays.update(to_arrays(p, name))
    save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))


def load_file(path) -> dict[str, Int8Weight | Int4Weight]:
    """Inverse of save_file; a missing or corrupt file is a one-line UserError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file as load

    try:
        arrays = load(str(path))
        names = sorted({k.rsplit(".", 1)[0] for k in arrays if k.endswith((".q8", ".q4"))})
        states = {n: from_arrays(arrays, n) for n in names}
    except (OSError, ValueError, KeyError, IndexError, SafetensorError) as e:
        raise UserError(f"corrupt packed weights {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not states:
        raise UserError(f"packed weights {path}: no packed matrix in the file")
    return states
