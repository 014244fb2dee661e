"""The decode gemv's row order (cpu_gemv_source): chosen per CPU by timing, a speed choice only: both orders
give every output the same bits, on both extensions."""

import numpy as np
import pytest
import torch

from adaptive_inference import cpu_gemv_source, mlx_kernels, torch_kernels
from adaptive_inference.errors import UserError

SHAPES = [(1, 576), (5, 576), (37, 1536), (4, 24), (7, 1000), (3, 7)]  # N not a multiple of 4, K tails of 8 / 16


def _weights(n, k, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal((1, k)).astype(np.float32)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_row_orders_give_the_same_bits_torch(wdtype):
    ext = torch_kernels.kernels()
    try:
        for n, k in SHAPES:
            w, x = _weights(n, k)
            w, x = torch.from_numpy(w).to(wdtype), torch.from_numpy(x)
            outs = []
            for code in cpu_gemv_source.LAYOUTS.values():
                ext.set_dense_layout(code)
                outs.append(ext.dense_linear(x, w))
            assert torch.equal(outs[0], outs[1]), (n, k)
            torch.testing.assert_close(outs[0], x @ w.float().T, atol=1e-4, rtol=1e-4)
    finally:
        ext.set_dense_layout(cpu_gemv_source.LAYOUTS[torch_kernels.layout])


@pytest.mark.skipif(not mlx_kernels.available(), reason="the MLX CPU kernel needs Linux and MLX's CPU")
def test_row_orders_give_the_same_bits_mlx_and_torch():
    mx = pytest.importorskip("adaptive_inference.blas").import_mlx()
    ext, text = mlx_kernels.kernels(), torch_kernels.kernels()
    try:
        for n, k in SHAPES:
            w, x = _weights(n, k, 1)
            outs = []
            for code in cpu_gemv_source.LAYOUTS.values():
                ext.set_dense_layout(code)
                outs.append(np.array(ext.dense_linear(mx.array(x), mx.array(w))))
            assert np.array_equal(outs[0], outs[1]), (n, k)
            assert np.array_equal(outs[0], text.dense_linear(torch.from_numpy(x), torch.from_numpy(w)).numpy())
    finally:
        ext.set_dense_layout(cpu_gemv_source.LAYOUTS[mlx_kernels.layout])


def test_choose_layout_keeps_the_faster_order_and_honours_the_override(monkeypatch):
    import time

    set_to = []
    slow = {"rows4": 0.002, "sequential": 0.0}
    monkeypatch.delenv(cpu_gemv_source.LAYOUT_ENV, raising=False)
    name = {v: k for k, v in cpu_gemv_source.LAYOUTS.items()}
    got = cpu_gemv_source.choose_layout(set_to.append, lambda: time.sleep(slow[name[set_to[-1]]]), rounds=3)
    assert got == "sequential" and set_to[-1] == cpu_gemv_source.LAYOUTS["sequential"]
    slow = {"rows4": 0.0, "sequential": 0.002}
    assert cpu_gemv_source.choose_layout(set_to.append, lambda: time.sleep(slow[name[set_to[-1]]]), rounds=3) == "rows4"
    monkeypatch.setenv(cpu_gemv_source.LAYOUT_ENV, "sequential")
    set_to.clear()
    assert cpu_gemv_source.choose_layout(set_to.append, lambda: None) == "sequential" and set_to == [1]
    monkeypatch.setenv(cpu_gemv_source.LAYOUT_ENV, "diagonal")
    with pytest.raises(UserError, match="ADAPTIVE_INFERENCE_DENSE_LAYOUT='diagonal'"):
        cpu_gemv_source.choose_layout(set_to.append, lambda: None)


def test_backends_name_the_chosen_order(tiny_llama):
    from adaptive_inference.backends import load_backend

    lm = load_backend("torch", tiny_llama[1], "float32")
    assert cpu_gemv_source.LAYOUT_NAMES[torch_kernels.layout] in lm.matmul_name
