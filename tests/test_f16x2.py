"""The CUDA decode GEMVs' fp16-pair arithmetic, run on the CPU: the PTX the kernels inline (f16x2.I8_DOT,
f16x2.W4_DOT, f16x2.N8_DOT, f16x2.W4_BF16) through f16x2.emulate, and the x prep. Codes must come out exact for every byte value in every
position of a word, and dots must match float64 to fp16 rounding."""

import numpy as np
import pytest
import torch

from adaptive_inference import f16x2


def pair(a, b) -> np.ndarray:
    """uint32 words holding the fp16 pairs (a, b) (a in the low half)."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float16), np.asarray(b, np.float16))
    return a.view(np.uint16).astype(np.uint32) | b.view(np.uint16).astype(np.uint32) << 16


def lanes(words: np.ndarray) -> np.ndarray:
    """[..., 2] float64: the fp16 pair of each word."""
    return words.astype(np.uint32).view(np.float16).reshape(*words.shape, 2).astype(np.float64)


def every_byte_everywhere() -> np.ndarray:
    """Words whose bytes run through all 256 values in each of the 4 positions."""
    b = np.arange(256, dtype=np.uint32)
    return b | (b + 85) % 256 << 8 | (b + 170) % 256 << 16 | (b + 255) % 256 << 24


def byte(w: np.ndarray, i: int) -> np.ndarray:
    return (w >> np.uint32(8 * i)) & np.uint32(0xFF)


def test_prep_x_pairs_columns_0_2_and_1_3_scaled():
    x = torch.randn(2, 12, dtype=torch.bfloat16)
    q = f16x2.prep_x(x, 1 / 16)
    assert q.dtype == torch.float16 and q.shape == (2, 12)
    words = q.numpy().view(np.uint32)  # [2, 6]: what the kernels load
    want = (x.float() / 16).numpy()
    for i in range(3):
        np.testing.assert_array_equal(lanes(words[:, 2 * i]), want[:, [4 * i, 4 * i + 2]])
        np.testing.assert_array_equal(lanes(words[:, 2 * i + 1]), want[:, [4 * i + 1, 4 * i + 3]])


def test_int8_codes_are_exact_in_every_position():
    w = every_byte_everywhere()
    one, zero = pair(1, 1), pair(0, 0)
    signed = lambda i: byte(w, i).astype(np.int8).astype(np.float64)  # noqa: E731
    (even,) = f16x2.emulate(f16x2.I8_DOT, 1, w, one, zero)
    (odd,) = f16x2.emulate(f16x2.I8_DOT, 1, w, zero, one)
    np.testing.assert_array_equal(lanes(even), np.stack([signed(0), signed(2)], -1))
    np.testing.assert_array_equal(lanes(odd), np.stack([signed(1), signed(3)], -1))


def test_4bit_codes_are_exact_and_centred_in_every_position():
    w = every_byte_everywhere()
    one, zero = pair(1, 1), pair(0, 0)
    low = lambda i: (byte(w, i) & 15).astype(np.float64) - 8  # noqa: E731  column 4i + i
    high = lambda i: (byte(w, i) >> np.uint32(4)).astype(np.float64) - 8  # noqa: E731  column H + 4i + i
    lo, hi = f16x2.emulate(f16x2.W4_DOT, 2, w, one, zero, one, zero)
    np.testing.assert_array_equal(lanes(lo), np.stack([low(0), low(2)], -1))
    np.testing.assert_array_equal(lanes(hi), np.stack([high(0), high(2)], -1))
    lo, hi = f16x2.emulate(f16x2.W4_DOT, 2, w, zero, one, zero, one)
    np.testing.assert_array_equal(lanes(lo), np.stack([low(1), low(3)], -1))
    np.testing.assert_array_equal(lanes(hi), np.stack([high(1), high(3)], -1))


def nested8(c: np.ndarray, r: np.ndarray, i: int, high: bool) -> np.ndarray:
    """The nested 8-bit code 16 code + residual of byte i's low (column 4i + i) or high (H + 4i + i) nibbles,
    centred (- 128)."""
    s = np.uint32(4 if high else 0)
    return ((byte(c, i) >> s & 15) * 16 + (byte(r, i) >> s & 15)).astype(np.float64) - 128


def test_nested_8bit_codes_are_exact_and_centred_in_every_position():
    """Every (code, residual) nibble pair in every position of the two words, low and high columns."""
    b = np.arange(256, dtype=np.uint32)
    c, r = np.meshgrid(b, b)  # all 65536 pairs of bytes
    c, r = c.ravel(), r.ravel()
    c = c | (c + 85) % 256 << 8 | (c + 170) % 256 << 16 | (c + 255) % 256 << 24
    r = r | (r + 37) % 256 << 8 | (r + 111) % 256 << 16 | (r + 201) % 256 << 24
    one, zero = pair(1, 1), pair(0, 0)
    for xa, xb, first in ((one, zero, 0), (zero, one, 1)):  # columns 4i, 4i + 2, then 4i + 1, 4i + 3
        lo, hi = f16x2.emulate(f16x2.N8_DOT, 2, c, r, xa, xb, xa, xb)
        for got, high in ((lo, False), (hi, True)):
            want = np.stack([nested8(c, r, first, high), nested8(c, r, first + 2, high)], -1)
            np.testing.assert_array_equal(lanes(got), want)


def bound(codes: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 3 * 2.0**-11 * (np.abs(codes) * np.abs(x)).sum(-1) + 2.0**-24 * np.abs(codes).sum(-1)


@pytest.mark.parametrize("seed", [0, 1])
def test_dots_match_float64_to_fp16_rounding(seed):
    """A word's dot with x prepared as the kernels' xq (x / 256 for int8, x / 16 for 4-bit), against float64:
    within 3 fp16 roundings of sum |code x| plus fp16's subnormal spacing per code (x / 256 of a small x is
    subnormal)."""
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    x = rng.standard_normal((4096, 8)) * rng.choice([0.01, 1.0, 30.0], size=(4096, 1))
    x = torch.from_numpy(x).to(torch.bfloat16).float().numpy()  # activations arrive in bf16
    codes8 = np.stack([byte(w, i).astype(np.int8) for i in range(4)], -1).astype(np.float64)
    xs = x[:, :4] / 256
    (d8,) = f16x2.emulate(f16x2.I8_DOT, 1, w, pair(xs[:, 0], xs[:, 2]), pair(xs[:, 1], xs[:, 3]))
    want8 = (codes8 * xs).sum(-1)
    assert np.all(np.abs(lanes(d8).sum(-1) - want8) <= bound(codes8, xs))
    low = np.stack([(byte(w, i) & 15) for i in range(4)], -1).astype(np.float64) - 8
    high = np.stack([(byte(w, i) >> np.uint32(4)) for i in range(4)], -1).astype(np.float64) - 8
    xl, xh = x[:, :4] / 16, x[:, 4:] / 16
    lo, hi = f16x2.emulate(f16x2.W4_DOT, 2, w, pair(xl[:, 0], xl[:, 2]), pair(xl[:, 1], xl[:, 3]),
                           pair(xh[:, 0], xh[:, 2]), pair(xh[:, 1], xh[:, 3]))
    for got, c, xx in ((lo, low, xl), (hi, high, xh)):
        assert np.all(np.abs(lanes(got).sum(-1) - (c * xx).sum(-1)) <= bound(c, xx))
    r = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)  # nested: x / 256 as int8's
    xl, xh = x[:, :4] / 256, x[:, 4:] / 256
    lo, hi = f16x2.emulate(f16x2.N8_DOT, 2, w, r, pair(xl[:, 0], xl[:, 2]), pair(xl[:, 1], xl[:, 3]),
                           pair(xh[:, 0], xh[:, 2]), pair(xh[:, 1], xh[:, 3]))
    for got, high, xx in ((lo, False, xl), (hi, True, xh)):
        c = np.stack([nested8(w, r, i, high) for i in range(4)], -1)
        assert np.all(np.abs(lanes(got).sum(-1) - (c * xx).sum(-1)) <= bound(c, xx))


def bf16_pair(a, b) -> np.ndarray:
    """uint32 words holding the bf16 pairs (a, b), each rounded once from float64."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return f16x2._bf16_bits(a) | f16x2._bf16_bits(b) << np.uint32(16)


def bf16_lanes(words: np.ndarray) -> np.ndarray:
    """[..., 2] float64: the bf16 pair of each word."""
    w = words.astype(np.uint32)
    return np.stack([(w << np.uint32(16)).view(np.float32), (w & np.uint32(0xFFFF0000)).view(np.float32)],
                    -1).astype(np.float64)


def test_bf16_weights_are_exact_codes_in_every_position():
    """Scale 1 and min 0: each of the 4 bytes' low nibble (a low column) and high nibble (a high one) comes out as
    its code, element i in lane i % 2 of word i // 2."""
    w = every_byte_everywhere()
    one, zero = bf16_pair(1, 1), bf16_pair(0, 0)
    lo0, lo1, hi0, hi1 = f16x2.emulate(f16x2.W4_BF16, 4, w, one, one, zero, zero, one, one, zero, zero)
    low = [(byte(w, i) & 15).astype(np.float64) for i in range(4)]
    high = [(byte(w, i) >> np.uint32(4)).astype(np.float64) for i in range(4)]
    np.testing.assert_array_equal(bf16_lanes(lo0), np.stack(low[:2], -1))
    np.testing.assert_array_equal(bf16_lanes(lo1), np.stack(low[2:], -1))
    np.testing.assert_array_equal(bf16_lanes(hi0), np.stack(high[:2], -1))
    np.testing.assert_array_equal(bf16_lanes(hi1), np.stack(high[2:], -1))


def test_bf16_weights_scale_each_element_by_its_own_scale_and_min():
    """code * scale + min, rounded once to bf16 from the bf16 scale and min, each element with the scale and
    min of its own lane (the low columns' and the high columns' apart)."""
    rng = np.random.default_rng(0)
    w = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    s = rng.uniform(1e-4, 0.1, size=(4, 4096)) * rng.choice([-1, 1], size=(4, 4096))
    m = -8 * np.abs(s) * rng.uniform(0, 1.5, size=(4, 4096))
    sp = [bf16_pair(s[2 * j], s[2 * j + 1]) for j in range(2)]  # low columns' pairs (elements 0-1, 2-3)
    mp = [bf16_pair(m[2 * j], m[2 * j + 1]) for j in range(2)]
    sh, mh = [bf16_pair(-s[2 * j], m[2 * j + 1]) for j in range(2)], [bf16_pair(m[2 * j], s[2 * j + 1]) for j in range(2)]
    out = f16x2.emulate(f16x2.W4_BF16, 4, w, *sp, *mp, *sh, *mh)
    for k, (sc, mn, shift) in enumerate(((sp, mp, 0), (sh, mh, 4))):
        for j in range(2):
            codes = np.stack([(byte(w, 2 * j + i) >> np.uint32(shift) & 15).astype(np.float64) for i in range(2)], -1)
            want = codes * bf16_lanes(sc[j]) + bf16_lanes(mn[j])
            np.testing.assert_array_equal(bf16_lanes(out[2 * k + j]), bf16_lanes(bf16_pair(want[:, 0], want[:, 1])))


def test_bf16_rounding_is_once_to_nearest_even():
    v = np.array([1.0, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-40, -(1 + 2.0**-8), 3.0e38 * 1.0001])
    got = (f16x2._bf16_bits(v) << np.uint32(16)).view(np.float32).astype(np.float64)
    np.testing.assert_array_equal(got[:5], [1.0, 1.0, 1 + 2.0**-6, 1 + 2.0**-7, -1.0])  # ties to even, one rounding
    assert got[5] == float(torch.tensor(3.0e38 * 1.0001, dtype=torch.float64).to(torch.bfloat16))


def test_prmt_selects_and_smears_bytes():
    a, b = np.array([0x04838281], np.uint32), np.array([0x88078685], np.uint32)
    assert f16x2._prmt(a, np.uint32(0), np.uint32(0x4140))[0] == 0x00820081
    assert f16x2._prmt(a, b, np.uint32(0x7654))[0] == 0x88078685
    assert f16x2._prmt(a, b, np.uint32(0xB2A0))[0] == 0x0083FF81  # bit 3: the selected byte's sign, smeared


def test_emulate_refuses_an_instruction_it_does_not_know():
    with pytest.raises(ValueError, match="no emulation of add.s32"):
        f16x2.emulate("{\nadd.s32 $0, $1, $1;\n}", 1, np.zeros(2, np.uint32))
