"""CUDA graph decode (runs only where CUDA is; the GPU host runs it with `pytest tests/test_cuda_graphs.py`):
replayed steps give the eager step's logits, per plan, with two caches alive and plans switching."""

import numpy as np
import pytest
import torch

from adaptive_inference.plan import StepPlan
from adaptive_inference.torch_backend import TorchLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

IDS = [5, 17, 99, 3, 64, 12, 7, 120, 33, 2, 41, 8]
PLANS = [StepPlan(), StepPlan(skip_layers=frozenset({1})), StepPlan(zero_mlp=frozenset({0, 2}), blend=((3, 0.5),))]


def _two_interleaved(lm, batch: int, plans=PLANS):
    """Two generations side by side (as decode_pairs runs them), plans switching step by step."""
    caches = [lm.new_cache(batch, len(IDS)) for _ in range(2)]
    for c in caches:
        lm.forward(torch.tensor([IDS[:4]] * batch, device="cuda"), c)
    out = []
    for s, t in enumerate(IDS[4:]):
        for i, c in enumerate(caches):
            tok = torch.tensor([t] * batch, device="cuda")
            out.append(lm.decode_one_token(tok, c, plans[(s + i) % len(plans)]).out.logits.cpu().numpy())
    return np.stack(out)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_replay_equals_eager(tiny_llama, compile, batch):
    eager = TorchLM.load(tiny_llama[1], device="cuda", cuda_graphs=False)
    graphs = TorchLM.load(tiny_llama[1], device="cuda", compile=compile)
    assert graphs.cuda_graphs and not eager.cuda_graphs
    want = _two_interleaved(eager, batch)
    for _ in range(2):  # the second pass replays graphs captured in the first, on pooled storage
        np.testing.assert_allclose(_two_interleaved(graphs, batch), want, rtol=1e-4, atol=1e-4)
    assert len(graphs.graphs) == 2 * len(PLANS)  # one per (plan, cache storage)


@pytest.mark.parametrize("device_gate", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_gated_plans_replay_per_block_graphs(tiny_llama, batch, device_gate):
    """Plans that decide inside the forward on a real device: a token gate (decided by the host: per-block graphs
    chosen after its read, K/V-only graphs for skipped blocks; on the device, the CUDA default: one graph a step)
    and gated heads (router and common-head segments around the host's decision) give the eager step's logits,
    rows of a batch disagreeing."""
    from test_torch_backend import _gate, _head

    eager = TorchLM.load(tiny_llama[1], device="cuda", cuda_graphs=False)
    graphs = TorchLM.load(tiny_llama[1], device="cuda")
    assert graphs.device_gate
    graphs.device_gate = device_gate
    plans = [StepPlan(gate=_gate(eager, True)), StepPlan(head=_head(eager, 2.0)), StepPlan(gate=_gate(eager, False, 1)),
             StepPlan(head=_head(eager, 0.5)), StepPlan(skip_layers=frozenset({2}), gate=_gate(eager, True, 2))]
    for _ in range(2):  # the second pass replays what the first captured
        caches = [[lm.new_cache(batch, len(IDS)) for _ in range(2)] for lm in (eager, graphs)]
        for lm, cs in zip((eager, graphs), caches, strict=True):
            for c in cs:
                lm.forward(torch.tensor([[t + r for t in IDS[:4]] for r in range(batch)], device="cuda"), c)
        for s, t in enumerate(IDS[4:]):
            for i in range(2):
                plan = plans[(s + i) % len(plans)]
                tok = torch.tensor([t + i + 3 * r for r in range(batch)], device="cuda")
                want = eager.decode_one_token(tok, caches[0][i], plan)
                got = graphs.decode_one_token(tok, caches[1][i], plan)
                np.testing.assert_allclose(got.out.logits.cpu().numpy(), want.out.logits.cpu().numpy(),
                                           rtol=1e-4, atol=1e-4)
                assert got.executed.layers_run == want.executed.layers_run
    assert any(isinstance(k[0], tuple) and k[0][0] == "block" for k in graphs.graphs) != device_gate


@pytest.mark.parametrize("fmt, depth, kernel, m, group", [
    ("int8", None, "triton", 1, 32), ("int8", None, "triton", 9, 32), ("int4", 4, "triton", 3, 32),
    ("int4", 4, "tinygemm", 3, 32), ("nested", 4, "triton", 1, 32), ("nested", 8, "triton", 9, 32),
    ("int4", 4, "triton", 40, 32), ("int4", 4, "triton", 1, 128), ("nested", 8, "triton", 2, 64)])
def test_packed_linear_is_the_dequantized_weight(fmt, depth, kernel, m, group):
    """quant_cuda's kernels (int8 and 4-bit codes on our Triton kernels, int4 on tinygemm's tiled layout too)
    multiply by quant.dequantize's weight at that depth, to bf16 rounding; a long K takes the split-K path, a
    ragged N and K (400, 1152) partial tiles."""
    from adaptive_inference import quant, quant_cuda, triton_kernels

    rng = np.random.default_rng(0)
    for n, k in ((512, 1024), (256, 8192), (400, 1152 if group < 128 else 1280)):
        w = rng.standard_normal((n, k)).astype(np.float32)
        p = quant.quantize(w, fmt, group_size=group)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        packed = quant_cuda.prepare(p, depth=depth, kernel=kernel)
        assert packed.kind == {"triton": "w4", "tinygemm": "int4"}[kernel] if fmt != "int8" else packed.kind == "int8"
        got = quant_cuda.linear(x, packed).float()
        want = x.float() @ torch.from_numpy(quant.dequantize(p, depth=depth)).cuda().T
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
        if packed.kind in ("int8", "w4") and not packed.nested:  # the fp16-pair GEMVs (compiled decode's) too
            f16x2 = (triton_kernels.w8_linear(x, *packed.tensors, packed.splits, f16x2=True) if packed.kind == "int8"
                     else triton_kernels.w4_linear(x, *packed.tensors, packed.group_size, False, packed.splits,
                                                   f16x2=True))
            torch.testing.assert_close(f16x2.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("pairs", [0, 1])
@pytest.mark.parametrize("m, group", [(9, 32), (40, 128)])
def test_tensor_core_4bit_kernel_both_ways_of_making_weights(monkeypatch, pairs, m, group):
    """triton_kernels' tensor-core 4-bit kernel (above GEMV_ROWS rows), its weights made in fp32 or in bf16 pairs
    (the inline PTX f16x2.W4_BF16, elementwise over 4 weights), on its first tile with the scales loaded a tile
    ahead and on a small one without, multiplies by quant.dequantize's weight to bf16 rounding; ragged N and split
    K included. (Each configuration a compile: kept to 8 for gpu_kernel_checks.sh's time-limited tests step.)"""
    from adaptive_inference import quant, quant_cuda, triton_kernels

    kernel = triton_kernels._w4_kernel
    small = (128, 64, 4, 4) if group <= 64 else (128, 128, 4, 4)
    configs = triton_kernels.w4_tc_configs((pairs,), [(32, 256, 4, 4), small])
    configs = [c for c in configs if c.kwargs["PREFETCH"] == (c.kwargs["BLOCK_K"] == 256)]
    monkeypatch.setattr(kernel, "configs", configs)
    rng = np.random.default_rng(1)
    for n, k in ((400, 1024), (256, 8192)):
        p = quant.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05 + 0.01, "int4", group_size=group)
        packed = quant_cuda.prepare(p, depth=4, kernel="triton")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        want = x.float() @ torch.from_numpy(quant.dequantize(p)).cuda().T
        for config in kernel.configs:  # each tile (the autotuner would time them and keep one)
            monkeypatch.setattr(kernel, "configs", [config])
            kernel.cache.clear()
            got = triton_kernels.w4_linear(x, *packed.tensors, packed.group_size, False, packed.splits, f16x2=False)
            torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    kernel.cache.clear()


@pytest.mark.parametrize("compile", [False, True])
def test_packed_weight_sets_compile_and_replay(tiny_llama, tmp_path, compile):
    """A plan on a packed weight set (int4 and int8 from a quant.py file) is captured like a full one (and
    compiled): replayed steps give the eager steps' logits, plans switching between packed and full."""
    from adaptive_inference import quant
    from adaptive_inference.plan import WeightSet

    eager = TorchLM.load(tiny_llama[1], device="cuda", dtype="bfloat16", cuda_graphs=False)
    sets = []
    for fmt in ("int4", "int8", "nested"):
        states = {f"layers.{i}.{f}": quant.quantize(getattr(lw, f).float().cpu().numpy(), fmt, group_size=32)
                  for i, lw in enumerate(eager.layers) for f in ("wqkv", "wo", "w_gate_up", "w_down")}
        states["lm_head"] = quant.quantize(eager.lm_head.float().cpu().numpy(), fmt, group_size=32)
        quant.save_file(states, tmp_path / f"{fmt}.safetensors")
        sets += [WeightSet(f"{fmt}{d or ''}", str(tmp_path / f"{fmt}.safetensors"), d)
                 for d in ((4, 8) if fmt == "nested" else (None,))]
    graphs = TorchLM.load(tiny_llama[1], device="cuda", dtype="bfloat16", compile=compile)
    plans = [StepPlan(weights=sets[0]), StepPlan(), StepPlan(weights=sets[1], skip_layers=frozenset({1})),
             StepPlan(weights=sets[2]), StepPlan(weights=sets[3])]  # the gears' mid and low reads of one copy
    want = _two_interleaved(eager, 1, plans)
    for _ in range(2):
        np.testing.assert_allclose(_two_interleaved(graphs, 1, plans), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    assert {k[0].weights for k in graphs.graphs} == {"full", *sets}
    assert not np.allclose(want[0], want[1], atol=1e-3)  # the packed set really reads other weights


def test_gear_monitor_entropy_on_the_device_is_the_host_one():
    """The gears' monitor reduces CUDA logits on the device (one value per row comes back)."""
    from adaptive_inference.techniques.gears import monitor

    logits = torch.randn(3, 50000, device="cuda") * 4
    np.testing.assert_allclose(monitor.entropy_bits(logits), monitor.entropy_bits(logits.cpu().numpy()), rtol=1e-5)


@pytest.mark.parametrize("take", [[False], [True], [False, False, False], [True, True, True], [True, False, True],
                                  [False] * 5 + [True]])
def test_select_linear_kernel_reads_the_weight_some_row_needs(take):
    from adaptive_inference import triton_kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(len(take), 1, 576, device="cuda", generator=gen).bfloat16()
    w_no = torch.randn(300, 576, device="cuda", generator=gen).bfloat16()
    w_yes = torch.randn(5000, 576, device="cuda", generator=gen).bfloat16()
    y_no, y_yes = triton_kernels.select_linear(x, w_no, w_yes, torch.tensor(take, device="cuda")[:, None])
    assert y_no.shape == (len(take), 1, 300) and y_yes.shape == (len(take), 1, 5000) and y_no.dtype == torch.float32
    for y, w, needed in ((y_no, w_no, not all(take)), (y_yes, w_yes, any(take))):
        want = x.float() @ w.float().T if needed else torch.zeros_like(y)
        torch.testing.assert_close(y, want, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("threshold", [2.0, -1.0, 0.5])
def test_router_decides_on_the_device_under_graphs(tiny_llama, batch, threshold):
    """bf16 on CUDA: the gated head decides on the device (Triton select_linear inside its captured segment) and
    gives the host decision's logits and reported heads, step by step, on replays too."""
    from test_vocab_router import head_for

    lm = TorchLM.load(tiny_llama[1], device="cuda", dtype="bfloat16")
    host = TorchLM.load(tiny_llama[1], device="cuda", dtype="bfloat16")
    host.select_linear_ok = lambda *a: False
    assert lm.select_linear_ok(torch.zeros(batch, lm.cfg.hidden_size, device="cuda"), lm.lm_head, lm.lm_head)
    plan = StepPlan(head=head_for(lm, threshold))
    heads = set()
    for _ in range(2):  # the second pass replays what the first captured
        caches = [m.new_cache(batch, len(IDS)) for m in (lm, host)]
        for m, c in zip((lm, host), caches, strict=True):
            m.forward(torch.tensor([[t + r for t in IDS[:4]] for r in range(batch)], device="cuda"), c)
        for t in IDS[4:]:
            tok = torch.tensor([t + 3 * r for r in range(batch)], device="cuda")
            got, want = (m.decode_one_token(tok, c, plan) for m, c in zip((lm, host), caches, strict=True))
            np.testing.assert_allclose(got.out.logits.float().cpu().numpy(), want.out.logits.float().cpu().numpy(),
                                       rtol=2e-2, atol=2e-2)
            assert np.array_equal(lm.next_tokens(got.out, 0.0, None)[0].cpu().numpy(),
                                  host.next_tokens(want.out, 0.0, None)[0].cpu().numpy())
            assert got.executed.head == want.executed.head and got.executed.head_params == want.executed.head_params
            heads.add(got.executed.head)
    assert heads == {2.0: {"common"}, -1.0: {"full"}}.get(threshold, heads)
    assert any(k[1][0] == "decide" for k in lm.graphs if k[0] == "segment")


@pytest.mark.parametrize("B, H, Hkv, D, S, pos", [(1, 32, 8, 128, 128, 70), (3, 6, 2, 64, 40, 0), (2, 4, 4, 16, 90, 89),
                                                  (1, 32, 8, 128, 4096, 130)])  # a long cache read up to pos
def test_decode_attention_kernel_equals_rope_write_and_sdpa(B, H, Hkv, D, S, pos):
    """The Triton kernel against the ops it replaces: RoPE, index_copy into the caches, the bias slot marked
    written, SDPA over the whole static cache (a hole in row 0 stays masked; the kernel reads up to pos)."""
    import torch.nn.functional as F

    from adaptive_inference import triton_kernels  # noqa: F401  (registers the op's CUDA kernel)

    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=g, **bf)
    kc, vc = torch.randn(B, Hkv, S, D, generator=g, **bf), torch.randn(B, Hkv, S, D, generator=g, **bf)
    bias = torch.full((B, S), float("-inf"), **bf)
    bias[:, :pos] = 0
    if pos > 3:
        bias[0, 2] = float("-inf")
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    emb = torch.cat([pos * inv, pos * inv])[None]
    cos, sin, p = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16), torch.tensor([pos], device="cuda")
    rk, rv, rb = kc.clone(), vc.clone(), bias.clone()
    q, k, v = qkv.view(B, 1, -1).split((H * D, Hkv * D, Hkv * D), dim=-1)
    q, k, v = (t.reshape(B, 1, n, D).transpose(1, 2) for t, n in ((q, H), (k, Hkv), (v, Hkv)))
    rk.index_copy_(2, p, TorchLM._apply_rope(k, cos, sin))
    rv.index_copy_(2, p, v)
    rb.index_fill_(1, p, 0.0)
    want = F.scaled_dot_product_attention(TorchLM._apply_rope(q, cos, sin).float(), rk.float(), rv.float(),
                                          attn_mask=rb.float()[:, None, None, :], enable_gqa=True)
    got = torch.ops.adaptive_inference.decode_attention(qkv, kc, vc, bias, cos, sin, p, H, Hkv)  # the CUDA kernel
    torch.testing.assert_close(got.float(), want.transpose(1, 2).reshape(B, -1), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(kc.float(), rk.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(vc, rv) and torch.equal(bias, rb)


@pytest.mark.parametrize("compile", [False, True])
def test_decode_attention_kernel_in_the_bf16_step(tiny_llama, compile):
    """bf16 decode with the attention kernel (eager, or compiled and replayed with plans switching) against
    the SDPA path of the same weights: the same greedy tokens, logits within bf16 rounding."""
    sdpa = TorchLM.load(tiny_llama[1], device="cuda", dtype="bfloat16", cuda_graphs=False, cuda_attention="sdpa")
    kernel = TorchLM.load(tiny_llama[1], device="cuda", dtype="bfloat16", compile=compile)  # the CUDA default
    assert kernel.attention_kernel and not sdpa.attention_kernel
    want = _two_interleaved(sdpa, 2)
    for _ in range(2):
        got = _two_interleaved(kernel, 2)
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=0.03 * scale)
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("M, N, K, gated", [(1, 6144, 4096, 4096), (1, 4096, 14336, 4096), (3, 200, 512, 72),
                                            (8, 1024, 2048, 1024)])
def test_gated_linear_kernel_reads_only_where_a_row_runs(M, N, K, gated):
    """The Triton kernel against F.linear (bf16): gated columns exact where some row runs, zeros where none
    does, the other columns always computed (the CUDA-core path up to 4 rows, tensor cores above; split-K)."""
    import torch.nn.functional as F

    from adaptive_inference.gated_linear_op import gated_linear, sms, split_k

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, generator=g, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, generator=g, device="cuda", dtype=torch.bfloat16) * 0.05
    want = F.linear(x.float(), w.float())
    splits = split_k(N, K, sms(0))
    assert splits > 1 or K < 4096
    for runs in ([True] * M, [False] * M, [False] * (M - 1) + [True]):
        got = gated_linear(x, w, torch.tensor(runs, device="cuda"), gated, splits).float()  # the CUDA kernel
        if any(runs):
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
        else:
            assert not got[:, :gated].any()
            torch.testing.assert_close(got[:, gated:], want[:, gated:], rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("writes_kv", [True, False])
def test_device_gate_in_the_bf16_step(tiny_llama, writes_kv):
    """A token gate decided on the device (compiled + graphs, gated_linear kernels) against the host's decision
    on the same bf16 weights (eager, no graphs): the same executed steps and greedy tokens at batch 1 and 3."""
    from test_torch_backend import _gate

    host = TorchLM.load(tiny_llama[1], device="cuda", dtype="bfloat16", cuda_graphs=False)
    dev = TorchLM.load(tiny_llama[1], device="cuda", dtype="bfloat16", compile=True)
    assert dev.device_gate and not host.device_gate_ok(_gate(host, writes_kv))
    for batch in (1, 3):
        plan = StepPlan(gate=_gate(host, writes_kv))
        caches = {id(m): m.new_cache(batch, len(IDS)) for m in (host, dev)}
        for m in (host, dev):
            m.forward(torch.tensor([[t + r for t in IDS[:4]] for r in range(batch)], device="cuda"), caches[id(m)])
        for t in IDS[4:]:
            tok = torch.tensor([t + 3 * r for r in range(batch)], device="cuda")
            want = host.decode_one_token(tok, caches[id(host)], plan)
            got = dev.decode_one_token(tok, caches[id(dev)], plan)
            a, b = got.out.logits.float().cpu().numpy(), want.out.logits.float().cpu().numpy()
            np.testing.assert_allclose(a, b, rtol=0, atol=0.03 * np.abs(b).max())
            assert got.executed == want.executed
    assert dev.graphs and all(k[0] != "io" for k in dev.graphs)  # whole-step graphs, no per-block ones


@pytest.mark.parametrize("compile", [False, True])
def test_generation_one_step_ahead_gives_the_same_tokens(tiny_llama, compile):
    """On CUDA generation queues step s + 1 before it reads step s's token (static plans): the same greedy tokens
    as reading each token before the next step, captured (and compiled) steps, a plan that skips a layer too."""
    from adaptive_inference.generation import generate_batch
    from adaptive_inference.plan import StaticPolicy

    lm = TorchLM.load(tiny_llama[1], device="cuda", dtype="bfloat16", compile=compile)
    assert lm.runs_ahead
    prompts = np.array([IDS[:5], IDS[2:7]])
    for plan in (StepPlan(), StepPlan(skip_layers=frozenset({1}))):
        ahead = generate_batch(lm, prompts, max_new_tokens=8, policy=StaticPolicy(plan))
        lm.runs_ahead = False
        np.testing.assert_array_equal(generate_batch(lm, prompts, max_new_tokens=8, policy=StaticPolicy(plan)), ahead)
        lm.runs_ahead = True


@pytest.mark.parametrize("op", ["norm", "norm_glu", "add"])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("pairs", [True, False])
def test_w8_block_kernel_is_its_ops_arithmetic(op, m, pairs):
    """triton_block's GEMV (x RMS-normed where it is read, or as stored; silu(gate) * up or the residual added in
    its epilogue), fp16-pair or fp32 dots: the block ops' reference arithmetic in fp32, within bf16's rounding
    (in-features not a multiple of its tile)."""
    from adaptive_inference import block_op
    from adaptive_inference.triton_block import w8_block

    g = torch.Generator(device="cuda").manual_seed(0)
    n, k = 200, 4 * 700
    q = torch.randint(-127, 128, (n, k), generator=g, device="cuda", dtype=torch.int8)
    scale = (torch.rand(n, generator=g, device="cuda") * 0.01 + 1e-3).bfloat16()
    x = (torch.randn(m, k, generator=g, device="cuda") * 3).bfloat16()
    lnw, r = (torch.rand(k, generator=g, device="cuda") + 0.5).bfloat16(), torch.randn(m, n, device="cuda").bfloat16()
    bias = torch.randn(n, generator=g, device="cuda").bfloat16()
    glu = op == "norm_glu"
    # the reference: the ops' torch code, on the CPU (on CUDA the ops run the kernel under test)
    x32, scale32, r32, lnw32, bias32 = (t.float().cpu() for t in (x, scale, r, lnw, bias))
    if op == "add":
        got = w8_block(x, q, scale, residual=r, pairs=pairs)
        want = block_op.w8_linear_add(x32, q.cpu(), scale32, r32)
    else:
        b = None if glu else bias
        got = w8_block(x, q, scale, lnw=lnw, eps=1e-5, bias=b, glu=glu, pairs=pairs)
        want = block_op.w8_norm_linear(x32, lnw32, 1e-5, q.cpu(), scale32, x32.new_empty(0) if glu else bias32, glu)
    got = got.cpu()
    assert got.dtype == torch.bfloat16 and got.shape == (m, n // 2 if glu else n)
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 1.2e-2, err  # bf16 rounding of x, of the matmul and of the sum (the separate ops': ~0.5e-2)


@pytest.mark.parametrize("fmt, compile", [("int8", False), ("int8", True), ("int4", True), ("nested", False)])
@pytest.mark.parametrize("batch", [1, 3])
def test_block_ops_on_a_packed_set(tiny_llama, tmp_path, fmt, compile, batch):
    """cuda_block_ops: an int8 / 4-bit / nested (read at depth 8) set's decode blocks on block_op's kernels (norms, SwiGLU and residual adds
    in the matmuls) give the separate kernels' logits, captured (and compiled: eager 4-bit steps take tinygemm),
    plans switching; full weights and prefills run as before."""
    from adaptive_inference import quant
    from adaptive_inference.decoder import LINEARS
    from adaptive_inference.plan import WeightSet

    ref = TorchLM.load(tiny_llama[1], device="cuda", dtype="bfloat16", cuda_graphs=False, cuda_block_ops=False)
    states = {f"layers.{i}.{f}": quant.quantize(getattr(lw, f).float().cpu().numpy(), fmt, group_size=32)
              for i, lw in enumerate(ref.layers) for f in LINEARS}
    quant.save_file(states, tmp_path / f"{fmt}.safetensors")
    ws = WeightSet(fmt, str(tmp_path / f"{fmt}.safetensors"), 8 if fmt == "nested" else None)
    block = TorchLM.load(tiny_llama[1], device="cuda", dtype="bfloat16", compile=compile)  # the CUDA default
    plans = [StepPlan(weights=ws), StepPlan(), StepPlan(weights=ws, skip_layers=frozenset({1}), zero_mlp=frozenset({2}))]
    want = _two_interleaved(ref, batch, plans)
    for _ in range(2):
        np.testing.assert_allclose(_two_interleaved(block, batch, plans), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    assert all(getattr(lw, n).block for lw in block.weight_sets[fmt] for n in LINEARS)
    assert not any(getattr(lw, n).block for lw in ref.weight_sets[fmt] for n in LINEARS)


@pytest.mark.parametrize("op", ["norm", "norm_glu", "add"])
@pytest.mark.parametrize("m, group, k, n", [(1, 32, 2 * 640, 200), (3, 64, 2 * 2560, 200), (2, 32, 2 * 640, 12008)])
@pytest.mark.parametrize("fmt", ["int4", "nested"])
@pytest.mark.parametrize("kernel", ["gluon", "gluon-serial", "triton"])
def test_w4_block_kernel_is_its_ops_arithmetic(op, m, group, k, n, fmt, kernel):
    """The 4-bit block GEMVs (gluon_block's, launched as a programmatic dependent or not, and triton_block's; in
    fp16 pairs: depth 4, and nested at depth 8 from both planes): the block ops' reference arithmetic in fp32,
    within bf16's rounding. K of one partial tile of the Gluon kernel's, and of two and a half; 12008 rows: more
    row blocks than its persistent programs (two SMs' worth a program in the tests' first tile), a ragged last."""
    from adaptive_inference import block_op, quant, quant_cuda
    from adaptive_inference.triton_block import w4_block

    p = quant.quantize(np.random.default_rng(0).standard_normal((n, k)).astype(np.float32) * 0.05, fmt,
                       group_size=group)
    plane = quant_cuda.split_halves(p.residual) if fmt == "nested" else np.zeros(0, np.uint8)
    codes, plane, scale, minv = (torch.from_numpy(a).cuda() for a in (quant_cuda.split_halves(p.codes), plane, p.scale,
                                                                       p.minv))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(m, k, generator=g, device="cuda") * 3).bfloat16()
    lnw, r = (torch.rand(k, generator=g, device="cuda") + 0.5).bfloat16(), torch.randn(m, n, device="cuda").bfloat16()
    glu = op == "norm_glu"
    packed = [t.cpu() for t in (codes, plane, scale, minv)]  # the reference on the CPU: the ops' torch code
    if op == "add":
        got = w4_block(x, codes, plane, scale, minv, group, residual=r, kernel=kernel)
        want = block_op.w4_linear_add(x.float().cpu(), *packed, group, r.float().cpu())
    else:
        got = w4_block(x, codes, plane, scale, minv, group, lnw=lnw, eps=1e-5, glu=glu, kernel=kernel)
        want = block_op.w4_norm_linear(x.float().cpu(), lnw.float().cpu(), 1e-5, *packed, group,
                                       torch.empty(0), glu)
    got = got.cpu()
    assert got.dtype == torch.bfloat16 and got.shape == (m, n // 2 if glu else n)
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 1.2e-2, err
