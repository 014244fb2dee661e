"""block_op: a decode block whose int8 / 4-bit matmuls take the norms, the SwiGLU and the residual adds into two ops
gives the block of the separate ops (here the ops' reference implementations; the CUDA kernels in
test_cuda_graphs)."""

import dataclasses

import numpy as np
import pytest
import torch

from adaptive_inference import block_op, quant
from adaptive_inference.decoder import LINEARS
from adaptive_inference.quant_cuda import CudaPacked, split_halves
from adaptive_inference.torch_backend import TorchLM

IDS = [5, 17, 99, 3, 64, 12]


def _packed(w: torch.Tensor, fmt: str):
    """(the weight packed for the block ops as quant_cuda lays it, its dequantized dense twin)."""
    p = quant.quantize(w.float().numpy(), fmt, group_size=32)
    dense = torch.from_numpy(quant.dequantize(p)).to(w.dtype)  # nested: at depth 8, its deepest
    if fmt == "int8":
        return CudaPacked("int8", tuple(w.shape), (torch.from_numpy(p.q), torch.from_numpy(p.scale)), block=True), dense
    plane = torch.from_numpy(split_halves(p.residual)) if fmt == "nested" else torch.empty(0, dtype=torch.uint8)
    t = (torch.from_numpy(split_halves(p.codes)), plane, torch.from_numpy(p.scale), torch.from_numpy(p.minv))
    return CudaPacked("w4", tuple(w.shape), t, 32, nested=fmt == "nested", block=True), dense


@pytest.mark.parametrize("fmt", ["int8", "int4", "nested"])
@pytest.mark.parametrize("mlp, alpha, batch", [(True, 1.0, 1), (False, 1.0, 2), (True, 0.5, 3)])
def test_block_ops_give_the_separate_ops_block(tiny_llama, fmt, mlp, alpha, batch):
    """One decode block on int8, 4-bit or nested 8-bit weights: as block_op's ops (norm folded into qkv / gate_up, SwiGLU into
    gate_up, residual into o / down) and as the separate ops on the dequantized weights: the same output and K/V."""
    lm = TorchLM.load(tiny_llama[1], device="cpu")
    lm.attention_kernel = True  # the decode attention op (its CPU implementation), as on CUDA
    lw = lm.layers[1]
    pairs = {n: _packed(getattr(lw, n), fmt) for n in LINEARS}
    blocked = dataclasses.replace(lw, **{n: p for n, (p, _) in pairs.items()})
    dense = dataclasses.replace(lw, **{n: d for n, (_, d) in pairs.items()})
    assert lm._block_ops(torch.zeros(batch, 1, 1), blocked) and not lm._block_ops(torch.zeros(batch, 1, 1), dense)
    assert not lm._block_ops(torch.zeros(batch, 2, 1), blocked)  # a prefill runs the separate ops
    caches = [lm.new_cache(batch, len(IDS) + 1) for _ in range(2)]
    for c in caches:
        lm.forward(torch.tensor([IDS] * batch), c)
    positions = lm.positions(len(IDS), 1)
    rope = lm.rope(positions)
    x = torch.randn(batch, 1, lm.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    want = lm._block(x, dense, 1, caches[0], rope, positions, None, mlp, alpha)
    got = lm._block(x, blocked, 1, caches[1], rope, positions, None, mlp, alpha)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(caches[1].k.numpy(), caches[0].k.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(caches[1].bias.numpy(), caches[0].bias.numpy())


@pytest.mark.parametrize("fmt, depth", [("int4", 4), ("nested", 4), ("nested", 8)])
def test_w4_dequantize_reads_quant_cudas_layout(fmt, depth):
    """The 4-bit ops' reference reads the codes as quant_cuda lays them (split halves, the nested format's second
    plane at depth 8) to quant's weight."""
    p = quant.quantize(np.random.default_rng(2).standard_normal((6, 128)).astype(np.float32), fmt, group_size=32)
    plane = split_halves(p.residual) if depth == 8 else np.zeros(0, np.uint8)
    got = block_op.w4_dequantize(*(torch.from_numpy(a) for a in (split_halves(p.codes), plane, p.scale, p.minv)), 32)
    np.testing.assert_allclose(got.numpy(), quant.dequantize(p, depth=depth), rtol=0, atol=1e-6)


def test_block_ops_are_the_ops_they_fold():
    """The ops' own arithmetic: RMSNorm then the int8 matmul and bias (glu: silu(gate) * up of the output's
    halves); residual + the matmul."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (6, 8), generator=g, dtype=torch.int8)
    scale, x, lnw = torch.rand(6, generator=g), torch.randn(2, 8, generator=g), torch.rand(8, generator=g)
    w = q.float() * scale[:, None]
    normed = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * lnw
    bias = torch.randn(6, generator=g)
    torch.testing.assert_close(block_op.w8_norm_linear(x, lnw, 1e-6, q, scale, bias, False), normed @ w.T + bias)
    y = normed @ w.T
    torch.testing.assert_close(block_op.w8_norm_linear(x, lnw, 1e-6, q, scale, x.new_empty(0), False), y)
    torch.testing.assert_close(block_op.w8_norm_linear(x, lnw, 1e-6, q, scale, x.new_empty(0), True),
                               torch.nn.functional.silu(y[:, :3]) * y[:, 3:])
    r = torch.randn(2, 6, generator=g)
    torch.testing.assert_close(block_op.w8_linear_add(x, q, scale, r), r + x @ w.T)
