"""The MLX CPU gemv extension (mlx_kernels) against MLX's own matmul, and MLXLM with it against MLXLM without."""

import numpy as np
import pytest

from adaptive_inference import mlx_kernels
from adaptive_inference.errors import UserError
from adaptive_inference.generation import generate
from adaptive_inference.mlx_backend import MLXLM, PLAIN, compiled_blocks

mx = mlx_kernels.mx

pytestmark = pytest.mark.skipif(not mlx_kernels.available(), reason="the MLX CPU kernel needs Linux and MLX's CPU")


def rand(*shape, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed))


@pytest.mark.parametrize("wdtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n,k", [(3072, 576), (13, 37), (3, 8), (576, 1536)])
def test_dense_linear_equals_matmul(wdtype, rows, n, k):
    """Every row-count branch, K tails (K % 8), N tails (N % 4, N < 4) and both thread paths (small / large N x K)."""
    w = rand(n, k, seed=1).astype(getattr(mx, wdtype))
    x = rand(rows, k, seed=2)
    got = mlx_kernels.dense_linear(x, w)
    ref = x @ w.astype(mx.float32).T
    assert got.shape == ref.shape and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-4)


def test_dense_linear_shapes_layouts_and_dtypes():
    w = rand(96, 64, seed=3)
    x = rand(2, 1, 64, seed=4)
    ref = np.array(x @ w.T)
    np.testing.assert_allclose(np.array(mlx_kernels.dense_linear(x, w)), ref, rtol=1e-5, atol=1e-5)  # [B, T, K]
    # a row slice (the k/v rows of a fused qkv weight) and a transposed view (copied first)
    np.testing.assert_allclose(np.array(mlx_kernels.dense_linear(x, w[32:])), ref[..., 32:], rtol=1e-5, atol=1e-5)
    wt = mx.contiguous(w.T).T  # column-major storage of the same [N, K]
    np.testing.assert_allclose(np.array(mlx_kernels.dense_linear(x, wt)), ref, rtol=1e-5, atol=1e-5)
    xb = x.astype(mx.bfloat16)  # output in x's dtype
    out = mlx_kernels.dense_linear(xb, w.astype(mx.bfloat16))
    assert out.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(out.astype(mx.float32)),
                               np.array((xb @ w.astype(mx.bfloat16).T).astype(mx.float32)), rtol=2e-2, atol=2e-2)


def test_dense_linear_inside_compile_and_lazy_graphs():
    w, x = rand(256, 64, seed=5), rand(1, 64, seed=6)
    f = mx.compile(lambda a, b: mlx_kernels.dense_linear(a * 2.0, b) + 1.0)
    np.testing.assert_allclose(np.array(f(x, w)), np.array((x * 2.0) @ w.T + 1.0), rtol=1e-5, atol=1e-5)
    chained = mlx_kernels.dense_linear(mlx_kernels.dense_linear(x, w), rand(64, 256, seed=7))
    np.testing.assert_allclose(np.array(chained), np.array((x @ w.T) @ rand(64, 256, seed=7).T), rtol=1e-4, atol=1e-3)


def test_dense_linear_refuses_bad_input():
    w = rand(16, 32)
    with pytest.raises(ValueError, match="1 to 8 rows"):
        mlx_kernels.dense_linear(rand(9, 32), w)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        mlx_kernels.dense_linear(rand(1, 32), w.astype(mx.float16))
    with pytest.raises(ValueError, match=r"x \[..., K\] and w \[N, K\]"):
        mlx_kernels.dense_linear(rand(1, 31), w)
    assert not mlx_kernels.dense_ok(rand(9, 32), w) and mlx_kernels.dense_ok(rand(8, 32), w)


@pytest.mark.parametrize("wdtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("take", [[False], [True], [False, False, False], [True, True, True], [True, False, True]])
def test_select_linear_computes_what_some_row_needs(wdtype, take):
    """Each output equals dense_linear exactly where some row needs it, and is zeros where none does."""
    w_no, w_yes = rand(37, 64, seed=1).astype(getattr(mx, wdtype)), rand(300, 64, seed=2).astype(getattr(mx, wdtype))
    x = rand(len(take), 1, 64, seed=3)
    y_no, y_yes = mlx_kernels.select_linear(x, w_no, w_yes, mx.array(take)[:, None])
    assert y_no.shape == (len(take), 1, 37) and y_yes.shape == (len(take), 1, 300) and y_no.dtype == mx.float32
    for y, w, needed in ((y_no, w_no, not all(take)), (y_yes, w_yes, any(take))):
        ref = np.array(mlx_kernels.dense_linear(x, w)) if needed else np.zeros(y.shape, np.float32)
        assert np.array_equal(np.array(y), ref)


def test_select_linear_decides_inside_the_graph():
    """take computed lazily in the same graph (never read by the host) picks the weight."""
    w_no, w_yes = rand(16, 64, seed=5), rand(48, 64, seed=6)
    x = mx.concatenate([mx.array([[1.0], [-1.0]]), rand(2, 63, seed=4)], axis=1)
    take = x[:, 0] > 0  # one row each way
    f = mx.compile(lambda a: mlx_kernels.select_linear(a, w_no, w_yes, a[:, 0] > 0))
    for y_no, y_yes in (mlx_kernels.select_linear(x, w_no, w_yes, take), f(x)):
        np.testing.assert_allclose(np.array(y_no), np.array(x @ w_no.T), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(y_yes), np.array(x @ w_yes.T), rtol=1e-5, atol=1e-5)


def test_select_linear_refuses_bad_input():
    w = rand(16, 32)
    with pytest.raises(ValueError, match="1 to 8 rows"):
        mlx_kernels.select_linear(rand(9, 32), w, w, mx.zeros((9,), dtype=mx.bool_))
    with pytest.raises(ValueError, match="bool, one per row"):
        mlx_kernels.select_linear(rand(2, 32), w, w, mx.zeros((3,), dtype=mx.bool_))
    with pytest.raises(ValueError, match="bool, one per row"):
        mlx_kernels.select_linear(rand(2, 32), w, w, mx.zeros((2,)))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        mlx_kernels.select_linear(rand(1, 32), w, w.astype(mx.float16), mx.zeros((1,), dtype=mx.bool_))
    with pytest.raises(ValueError, match=r"x \[..., K\] and weights \[N, K\]"):
        mlx_kernels.select_linear(rand(1, 32), w, rand(16, 31), mx.zeros((1,), dtype=mx.bool_))


def test_build_failure_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(mlx_kernels, "_ext", None)
    monkeypatch.setenv(mlx_kernels.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(UserError, match=r"cannot build the MLX CPU kernel extension .*cpu_matmul: library.*not found"):
        mlx_kernels.kernels()
    assert not list((tmp_path / "cache").rglob("*.so"))


@pytest.fixture(scope="module")
def pair(tiny):
    _, path, _ = tiny
    return MLXLM.load(path, cpu_matmul="kernel"), MLXLM.load(path, cpu_matmul="library")


def test_backend_kernel_matches_library(pair):
    kernel, library = pair
    assert kernel.dense_kernel and not library.dense_kernel
    assert "gemv" in kernel.matmul_name and "BLAS" in library.matmul_name
    ids = [5, 17, 99, 3, 64, 12, 7, 120, 33, 2, 41, 8]
    np.testing.assert_allclose(kernel.logits(ids), library.logits(ids), rtol=1e-5, atol=1e-5)  # prefill: BLAS both
    a = generate(kernel, ids, max_new_tokens=8)
    b = generate(library, ids, max_new_tokens=8)
    assert a.tokens == b.tokens
    cache_k, cache_l = kernel.new_cache(2, 16), library.new_cache(2, 16)
    prompt = kernel.ids_array(np.array([ids[:6], ids[6:]]))
    kernel.forward(prompt, cache_k)
    library.forward(library.ids_array(np.array([ids[:6], ids[6:]])), cache_l)
    step_k = kernel.decode_one_token(kernel.ids_array(np.array([3, 4])), cache_k).out.logits
    step_l = library.decode_one_token(library.ids_array(np.array([3, 4])), cache_l).out.logits
    np.testing.assert_allclose(kernel.to_numpy(step_k), library.to_numpy(step_l), rtol=1e-5, atol=1e-5)


def test_compiled_kernel_blocks_match_plain(pair):
    kernel, _ = pair
    lw, cfg = kernel.layers[1], kernel.cfg
    x = rand(1, 1, cfg.hidden_size)
    rope = kernel.rope(kernel.positions(5, 1))
    args = (x, lw.ln1, lw.wqkv, lw.bqkv, *rope, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps)
    for plain, compiled in zip(PLAIN[0](*args), compiled_blocks(True)[0](*args), strict=True):
        np.testing.assert_allclose(np.array(plain), np.array(compiled), rtol=1e-5, atol=1e-5)
    mlp_args = (x, lw.ln2, lw.w_gate_up, lw.w_down, cfg.rms_norm_eps)
    np.testing.assert_allclose(np.array(PLAIN[2](*mlp_args)), np.array(compiled_blocks(True)[2](*mlp_args)),
                               rtol=1e-5, atol=1e-5)


def test_unknown_cpu_matmul_is_refused(tiny):
    with pytest.raises(UserError, match="cpu_matmul 'gemv'"):
        MLXLM.load(tiny[1], cpu_matmul="gemv")


IDS = [5, 17, 99, 3, 64, 12, 7, 120, 33, 2, 41, 8]


def test_fused_block_matches_mlx_ops(tiny, monkeypatch):
    """decode_layer (a whole fp32 block as one graph node) gives MLX's own ops' logits and cache on each tiny
    shape (Qwen2's q/k/v bias included), for one row and a batch, under plans that skip a layer, zero an MLP
    and blend; every block that runs is one node, and the per-op path makes none."""
    from adaptive_inference.plan import StepPlan

    fused, per_op = MLXLM.load(tiny[1]), MLXLM.load(tiny[1])
    per_op.fused_layers = False
    real, calls = mlx_kernels.decode_layer, []
    monkeypatch.setattr(mlx_kernels, "decode_layer", lambda *a: calls.append(1) or real(*a))
    plans = [StepPlan(), StepPlan(skip_layers=frozenset({1})), StepPlan(zero_mlp=frozenset({0}), blend=((2, 0.5),))]
    L, steps = fused.cfg.num_hidden_layers, len(IDS) - 4

    def decode(lm, batch):
        cache = lm.new_cache(batch, len(IDS))
        lm.forward(mx.array([IDS[:4]] * batch), cache)
        logits = [np.array(lm.decode_one_token(mx.array([t] * batch), cache, plans[s % 3]).out.logits)
                  for s, t in enumerate(IDS[4:])]
        return np.stack(logits), np.array(mx.stack(cache.k)), np.array(mx.stack(cache.v)), np.array(cache.written)

    assert fused.fused_layers
    for batch in (1, 3):
        calls.clear()
        got = decode(fused, batch)
        assert len(calls) == sum(L - len(plans[s % 3].skip_layers) for s in range(steps))
        calls.clear()
        want = decode(per_op, batch)
        assert not calls
        for g, w in zip(got[:3], want[:3], strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[3], want[3])  # the same slots written (a skipped layer's hole stays)


def test_fused_block_writes_the_cache_in_place(tiny_llama):
    """The fused decode writes each new K/V slot into the cache's own buffer (a slice update that gets the
    buffer donated): a step that copied the cache would cost its whole size per layer, growing with max_len.
    MLX donates only when nothing else holds the array at that moment, which its asynchronous scheduler does
    not promise every step (here 11-31 of 39 steps kept the buffer), so the test asks for several kept steps;
    a kernel node that returned the cache copied it on every step and kept none."""
    lm = MLXLM.load(tiny_llama[1])
    cache = lm.new_cache(1, 64)
    lm.forward(mx.array([IDS[:4]]), cache)
    addresses = []
    for t in IDS * 3:
        out = lm.decode_one_token(mx.array([t]), cache)
        mx.eval(out.out.logits, cache.k, cache.v)
        view = np.asarray(cache.k[0])
        addresses.append(view.__array_interface__["data"][0])
        del view, out
    kept = sum(a == b for a, b in zip(addresses, addresses[1:], strict=False))
    assert lm.fused_layers and kept >= 3, addresses
