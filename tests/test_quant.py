import numpy as np
import pytest

from adaptive_inference import quant
from adaptive_inference.errors import UserError

# Kernel tolerance: fp32 accumulation in another order than the float64 reference, so per output
# |y - y_ref| <= 1e-5 * sum_k |x_k w~_nk| (about K * eps with room for the 8-lane partial sums).
KERNEL_RTOL = 1e-5
TINY = np.finfo(np.float32).tiny


def weight(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random weight with the awkward cases: an outlier row, a zero row, a constant group, a skewed group."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    w[0, 3] = 2.0
    w[1] = 0.0
    w[2, :32] = -0.7
    w[3, 32:64] = np.abs(w[3, 32:64]) + 0.4
    return w


def group_scale(p: quant.Int4Weight) -> np.ndarray:
    return np.repeat(p.scale.astype(np.float32), p.group_size, axis=1)


def test_int8_round_trip_bound():
    w = weight(48, 224)
    p = quant.quantize(w, "int8")
    assert p.q.dtype == np.int8 and p.scale.shape == (48,) and np.abs(p.q).max() <= 127
    err = np.abs(quant.dequantize(p) - w)
    assert (err <= p.scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert np.all(quant.dequantize(p)[1] == 0)  # zero row stays exactly zero
    assert np.abs(p.q).max(axis=1)[0] == 127  # the largest weight uses the full range


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_bound(group):
    w = weight(40, 256)
    p = quant.quantize(w, "int4", group_size=group)
    assert p.codes.shape == (40, 128) and p.scale.shape == (40, 256 // group) and p.scale.dtype == np.float16
    assert p.residual is None and p.depths == (4,)
    s = group_scale(p)
    err = np.abs(quant.dequantize(p) - w)
    assert (err <= s / 2 * (1 + 1e-5) + 1e-7).all()
    assert err.max() > 0  # it is lossy: the bound is not vacuous
    if group == 32:
        np.testing.assert_allclose(quant.dequantize(p)[2, :32], -0.7, rtol=1e-5)  # constant group: ~exact


@pytest.mark.parametrize("group", [32, 128])
def test_nested_round_trip_bounds(group):
    w = weight(40, 256, seed=1)
    p = quant.quantize(w, "nested", group_size=group)
    s = group_scale(p)
    four = quant.dequantize(p, depth=4)
    np.testing.assert_array_equal(four, quant.dequantize(quant.quantize(w, "int4", group_size=group)))
    assert (np.abs(four - w) <= s / 2 * (1 + 1e-5) + 1e-7).all()
    eight = quant.dequantize(p)  # deepest by default
    assert (np.abs(eight - w) <= s / 32 * (1 + 1e-4) + 1e-7).all()
    assert np.abs(eight - w).mean() < np.abs(four - w).mean() / 8


def test_int4_scales_cover_the_group_in_fp16():
    # a group whose min and max are not fp16-representable: the rounded scale/min must still cover it
    w = np.linspace(-0.1234567, 0.3456789, 32, dtype=np.float32)[None, :]
    p = quant.quantize(w, "int4")
    lo = p.minv.astype(np.float64)[0, 0]
    hi = lo + 15 * p.scale.astype(np.float64)[0, 0]
    assert lo <= w.min() and hi >= w.max()


def test_nibble_layout():
    codes = np.arange(64, dtype=np.uint8)[None, :] % 16
    packed = quant._pack_nibbles(codes)
    assert packed.shape == (1, 32)
    assert packed[0, 0] == codes[0, 0] | codes[0, 16] << 4  # byte i: column i low, column 16 + i high
    assert packed[0, 17] == codes[0, 33] | codes[0, 49] << 4
    np.testing.assert_array_equal(quant.unpack_nibbles(packed), codes)


def test_bytes_read_and_resident():
    w = weight(64, 256)
    p8 = quant.quantize(w, "int8")
    p4 = quant.quantize(w, "int4", group_size=32)
    pn = quant.quantize(w, "nested", group_size=32)
    assert quant.bytes_read(p8) == 64 * 256 + 64 * 4
    assert quant.bytes_read(p4) == 64 * 128 + 2 * 64 * 8 * 2  # codes + fp16 scale and min per group
    assert quant.bytes_read(pn, depth=4) == quant.bytes_read(p4)
    assert quant.bytes_read(pn, depth=8) == quant.resident_bytes(pn) == quant.bytes_read(p4) + 64 * 128


@pytest.mark.parametrize("fmt", ["int8", "int4", "nested"])
def test_arrays_round_trip(fmt):
    p = quant.quantize(weight(8, 64), fmt)
    back = quant.from_arrays(quant.to_arrays(p, "layers.0.q_proj"), "layers.0.q_proj")
    np.testing.assert_array_equal(quant.dequantize(back), quant.dequantize(p))
    with pytest.raises(UserError):
        quant.from_arrays({}, "layers.0.q_proj")


@pytest.mark.parametrize("w, fmt, kw", [
    (np.zeros(16, np.float32), "int8", {}),
    (np.zeros((4, 100), np.float32), "int8", {}),  # in-features not a multiple of 32
    (np.zeros((0, 32), np.float32), "int8", {}),
    (np.zeros((4, 48), np.float32), "int4", {}),  # 48 columns: not a multiple of the group
    (np.zeros((4, 64), np.float32), "int4", {"group_size": 48}),  # group not a power of two >= 32
    (np.zeros((4, 96), np.float32), "int4", {"group_size": 96}),
    (np.zeros((4, 64), np.float32), "int4", {"group_size": 16}),
    (np.zeros((4, 64), np.float32), "nested", {"group_size": 0}),
    (np.zeros((4, 64), np.int32), "int8", {}),
    (np.full((4, 64), np.nan, np.float32), "int8", {}),
    (np.full((4, 64), 1e6, np.float32), "int4", {}),  # beyond the fp16 scales
    (np.zeros((4, 64), np.float32), "int3", {}),
])
def test_bad_input_is_refused(w, fmt, kw):
    with pytest.raises(UserError) as e:
        quant.quantize(w, fmt, **kw)
    assert "\n" not in str(e.value)


def test_depth_not_stored_is_refused():
    with pytest.raises(UserError):
        quant.dequantize(quant.quantize(weight(4, 64), "int4"), depth=8)


CASES = [("int8", None, 37, 96), ("int8", None, 64, 256), ("int4", 4, 37, 96), ("int4", 4, 64, 256),
         ("nested", 4, 64, 256), ("nested", 8, 37, 96), ("nested", 8, 64, 256)]


def check_float(y: np.ndarray, x: np.ndarray, wq: np.ndarray):
    """y == x @ wq.T up to fp32 accumulation (MLX: float activations)."""
    ref = x.astype(np.float64) @ wq.astype(np.float64).T
    bound = KERNEL_RTOL * (np.abs(x).astype(np.float64) @ np.abs(wq).astype(np.float64).T) + 1e-7
    assert y.shape == ref.shape
    assert (np.abs(y - ref) <= bound).all(), float((np.abs(y - ref) / bound).max())


def act_quant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The torch kernel's activation rounding, in the same float32 arithmetic: (x~ [B, K], scale d [B, K/32])."""
    b = x.reshape(x.shape[0], -1, 32)
    d = (np.abs(b).max(axis=2) / np.float32(127)).astype(np.float32)
    inv = np.where(d >= TINY, np.float32(1) / np.where(d >= TINY, d, 1), 0).astype(np.float32)
    return (np.rint(b * inv[..., None]) * d[..., None]).reshape(x.shape), d


def check_torch(y: np.ndarray, x: np.ndarray, wq: np.ndarray):
    """The torch kernel computes x~ @ wq.T with x~ its rounded activations: (1) equal to that up to fp32
    accumulation; (2) so within sum_k |wq_nk| |x_k - x~_k| (<= d/2 each) of the float result x @ wq.T."""
    xt, d = act_quant(x)
    assert (np.abs(x - xt) <= np.repeat(d, 32, axis=1) / 2 * (1 + 1e-6)).all()
    check_float(y, xt, wq)
    exact = x.astype(np.float64) @ wq.astype(np.float64).T
    slack = np.abs(x - xt).astype(np.float64) @ np.abs(wq).astype(np.float64).T
    assert (np.abs(y - exact) <= slack * (1 + 1e-4) + 1e-6).all()


@pytest.mark.parametrize("fmt, depth, n, k", CASES)
@pytest.mark.parametrize("batch", [1, 3, 8, 11])
def test_torch_kernel_matches_dequantized(fmt, depth, n, k, batch):
    from adaptive_inference import quant_torch

    p = quant.quantize(weight(n, k), fmt, group_size=32)
    x = np.random.default_rng(batch).standard_normal((batch, k)).astype(np.float32)
    x[0, 32:64] = 0.0  # an all-zero activation block (scale 0)
    x[-1, :32] *= 100.0  # an outlier block
    y = quant_torch.linear(_torch(x), quant_torch.prepare(p, depth=depth)).numpy()
    check_torch(y, x, quant.dequantize(p, depth=depth))


def _torch(a):
    import torch

    return torch.from_numpy(a)


def test_torch_linear_shapes_bias_and_errors():
    import torch

    from adaptive_inference import quant_torch

    p = quant.quantize(weight(40, 64), "nested", group_size=32)
    w4, w8 = quant_torch.prepare(p, depth=4), quant_torch.prepare(p, depth=8)
    assert w4.tensors[0].data_ptr() == w8.tensors[0].data_ptr()  # both gears read the same codes
    assert w4.tensors[0].data_ptr() == p.codes.ctypes.data  # no copy of the packed state
    x = torch.randn(2, 3, 64)
    b = torch.randn(40)
    y = quant_torch.linear(x, w8, b)
    assert y.shape == (2, 3, 40)
    ref = quant_torch.linear(x.reshape(6, 64), w8).reshape(2, 3, 40) + b
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert quant_torch.linear(torch.randn(0, 64), w4).shape == (0, 40)
    with pytest.raises(UserError):
        quant_torch.linear(torch.randn(1, 63), w4)
    with pytest.raises(UserError):
        quant_torch.prepare(quant.quantize(weight(4, 64), "int4"), depth=8)


@pytest.mark.parametrize("fmt, depth, n, k", [c for c in CASES if c[3] % 32 == 0])
@pytest.mark.parametrize("batch", [1, 5])
def test_mlx_kernel_matches_dequantized(fmt, depth, n, k, batch):
    from adaptive_inference import quant_mlx
    from adaptive_inference.blas import import_mlx

    mx = import_mlx()
    p = quant.quantize(weight(n, k), fmt, group_size=32)
    m = quant_mlx.prepare(p, depth=depth)
    wq = quant.dequantize(p, depth=depth)
    # same weights as torch: exact for the affine formats, int8's bias -128 s rounds within an ulp
    np.testing.assert_allclose(np.array(quant_mlx.dequantize(m)), wq, rtol=0, atol=1e-7 * np.abs(wq).max())
    x = np.random.default_rng(batch).standard_normal((batch, k)).astype(np.float32)
    check_float(np.array(quant_mlx.linear(mx.array(x), m)), x, wq)


def test_mlx_refuses_what_it_cannot_hold():
    from adaptive_inference import quant_mlx

    with pytest.raises(UserError):  # 100 columns (made by hand: quantize refuses them): no MLX group fits
        quant_mlx.prepare(quant.Int8Weight(q=np.zeros((8, 100), np.int8), scale=np.ones(8, np.float32)))
    with pytest.raises(UserError):
        quant_mlx.prepare(quant.quantize(weight(8, 256), "int4", group_size=256))


def test_cuda_int4_convention_is_the_dequantized_weight():
    """quant_cuda hands tinygemm (aten._weight_int4pack_mm) per group (scale, zero) with w~ = (q - 8) scale +
    zero. Checked here on the CPU twin of that kernel, which takes the same [K/g, N, 2] table: it multiplies
    by quant.dequantize's weight (the CUDA tiling itself is tested on the GPU, tests/test_cuda_graphs.py)."""
    import torch

    from adaptive_inference import quant_cuda

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    p = quant.quantize(w, "int4", group_size=64)
    c, _, _ = quant.codes(p, 4)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    tiled = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(c.astype(np.int32)), 2)
    got = torch._weight_int4pack_mm_for_cpu(torch.from_numpy(x), tiled, 64, torch.from_numpy(quant_cuda.scale_and_zero(p)))
    np.testing.assert_allclose(got.numpy(), x @ quant.dequantize(p).T, rtol=1e-4, atol=1e-3)
    assert [quant_cuda.inner_k_tiles(k) for k in (576, 1536, 4096, 96)] == [4, 8, 8, 2]
    with pytest.raises(UserError, match="depth 8 needs group_size"):  # a group of 256: no Triton tile holds it
        quant_cuda.prepare(quant.quantize(w, "nested", group_size=256), depth=8)
    halves = quant_cuda.split_halves(p.codes)  # w4_linear's layout: byte j = column j | column j + K/2 << 4
    cols = quant.unpack_nibbles(p.codes)
    assert halves.shape == (64, 128) and np.array_equal(halves & 15, cols[:, :128]) and np.array_equal(halves >> 4, cols[:, 128:])
    with pytest.raises(UserError, match="group_size"):
        quant_cuda.prepare(quant.Int4Weight(p.codes, p.scale, p.minv, 512))
    # "auto": our Triton kernel for compiled steps wherever its shape rules allow (faster end to end on an H100,
    # 2026-12-07); for eager ones tinygemm where its rules allow (faster alone than our fp32 kernel)
    for fmt, depth in (("int4", 4), ("nested", 4), ("nested", 8)):
        packed = quant_cuda.prepare(quant.quantize(w, fmt, group_size=64), depth=depth, device="cpu")
        assert (packed.kind, packed.nested) == ("w4", depth == 8)
    g256 = quant.quantize(w, "int4", group_size=256)  # no tile of ours holds a group of 256
    assert [quant_cuda.four_bit_kernel(q, 4, compiled=c) for q in (p, g256) for c in (True, False)] == \
        ["triton", "tinygemm", "tinygemm", "tinygemm"]
    assert quant_cuda.four_bit_kernel(quant.quantize(w, "nested", group_size=64), 8, compiled=False) == "triton"
    assert quant_cuda.four_bit_kernel(g256, 4, "triton") == "triton"
