"""Torch-specific: the static cache's holes. (Shared behaviour: test_backend_contract.py.)"""

import contextlib
import dataclasses
import gc

import numpy as np
import pytest
import torch

from adaptive_inference import torch_backend, torch_kernels
from adaptive_inference.plan import StepPlan
from adaptive_inference.torch_backend import TorchLM

IDS = [5, 17, 99, 3, 64, 12, 7, 120, 33, 2, 41, 8]


def _step_after_skip(lm, garbage_layer=None):
    """Prefill 6 tokens, decode token 6 with layer 2 skipped, then decode token 7 normally.
    Optionally overwrite the KV entries of position 6 in `garbage_layer` before the last step."""
    cache = lm.new_cache(1, len(IDS))
    lm.forward(torch.tensor([IDS[:6]]), cache)
    lm.decode_one_token(torch.tensor([IDS[6]]), cache, StepPlan(skip_layers=frozenset({2})))
    if garbage_layer is not None:
        g = torch.Generator().manual_seed(0)
        cache.k[garbage_layer, :, :, 6] = torch.randn(cache.k[garbage_layer, :, :, 6].shape, generator=g) * 10
        cache.v[garbage_layer, :, :, 6] = torch.randn(cache.v[garbage_layer, :, :, 6].shape, generator=g) * 10
    return cache, lm.decode_one_token(torch.tensor([IDS[7]]), cache).out.logits[0].numpy()


def test_skipped_layer_leaves_masked_kv_hole(tiny):
    """A layer skipped at a step writes no KV there, and later steps must not attend to that slot."""
    lm = TorchLM.load(tiny[1])
    cache, clean = _step_after_skip(lm)
    assert not cache.written[2, 0, 6] and cache.written[1, 0, 6] and cache.written[2, 0, 7]
    assert not cache.written[:, 0, 8:].any()  # nothing beyond the last step is visible
    _, garbage_in_hole = _step_after_skip(lm, garbage_layer=2)
    np.testing.assert_array_equal(clean, garbage_in_hole)  # the hole is invisible
    _, garbage_elsewhere = _step_after_skip(lm, garbage_layer=1)
    assert not np.allclose(clean, garbage_elsewhere, atol=1e-3)  # other layers still attend to step 6
    assert not np.allclose(clean, lm.logits(IDS[:8])[-1], atol=1e-4)


def test_decode_step_has_static_shapes(tiny):
    """What a compiled decode step needs: positions as a tensor and attention over the whole static cache
    (the same shapes at every step), so one graph serves every position. (The torch ops a compiled step
    traces; the eager CPU step with the kernel runs fused calls instead, tested against them below.)"""
    lm = TorchLM.load(tiny[1], cpu_matmul="library")
    shapes = []
    orig = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append((tuple(k.shape), tuple(attn_mask.shape)))
        return orig(q, k, v, attn_mask=attn_mask, **kw)

    cache = lm.new_cache(1, 10)
    lm.forward(torch.tensor([IDS[:4]]), cache)
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        for t in IDS[4:8]:
            lm.decode_one_token(torch.tensor([t]), cache)
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    assert len(set(shapes)) == 1 and shapes[0][0][2] == 10


def _decode_logits(lm, plans, batch=1):
    """Prefill IDS[:4] on `batch` equal rows, then decode IDS[4:] one token per step under plans[step % n]."""
    cache = lm.new_cache(batch, len(IDS))
    lm.forward(torch.tensor([IDS[:4]] * batch), cache)
    return np.stack([lm.decode_one_token(torch.tensor([t] * batch), cache, plans[s % len(plans)]).out.logits.numpy()
                     for s, t in enumerate(IDS[4:])])


def test_compiled_decode_equals_eager_and_switches_plans(tiny_llama):
    """One compiled graph per distinct plan: plans that alternate step by step give the eager step's logits
    (within 1e-5) and report the same executed layers; a gated plan runs eagerly beside them."""
    from adaptive_inference.plan import StepPlan

    eager = TorchLM.load(tiny_llama[1], cpu_matmul="library")
    compiled = TorchLM.load(tiny_llama[1], cpu_matmul="library", compile=True)
    plans = [StepPlan(), StepPlan(skip_layers=frozenset({1})), StepPlan(zero_mlp=frozenset({0, 2}), blend=((3, 0.5),))]
    want, got = _decode_logits(eager, plans), _decode_logits(compiled, plans)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert len(compiled.compiled_steps) == 3  # one per plan, reused as plans come back
    cache = compiled.new_cache(1, 6)
    assert cache.max_len % 128 == 0  # bucketed: other prompt lengths reuse the graph
    compiled.forward(torch.tensor([IDS[:4]]), cache)
    step = compiled.decode_one_token(torch.tensor([IDS[4]]), cache, plans[2]).executed
    cache = eager.new_cache(1, 6)
    eager.forward(torch.tensor([IDS[:4]]), cache)
    assert step == eager.decode_one_token(torch.tensor([IDS[4]]), cache, plans[2]).executed


def test_dense_kernel_matches_library_matmul(tiny_llama):
    """The fp32 eager decode step on the kernels (torch_kernels: dense_linear, and decode_attention, silu_mul,
    rms_norm_rows in place of ~30 torch ops a layer) gives the torch ops' logits to fp32 rounding, for one row
    and a batch, with a skipped layer's KV hole in between; its prefill (many rows) is the torch ops themselves."""
    kernel = TorchLM.load(tiny_llama[1])
    library = TorchLM.load(tiny_llama[1], cpu_matmul="library")
    assert kernel.dense_kernel and kernel.fused_decode and not library.dense_kernel and not library.fused_decode
    plans = [StepPlan(), StepPlan(skip_layers=frozenset({1})), StepPlan(zero_mlp=frozenset({0}))]
    for batch in (1, 3):
        np.testing.assert_allclose(_decode_logits(kernel, plans, batch),
                                   _decode_logits(library, plans, batch), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(kernel.logits(IDS), library.logits(IDS))


def test_fused_block_equals_per_op_kernels(tiny, monkeypatch):
    """decode_layer (a whole block per kernel call) gives the per-op kernel path's logits bit for bit on each
    tiny shape (Qwen2's q/k/v bias included), for one row and a batch, under plans that skip a layer, zero an
    MLP and blend; every block that runs is one call, and the per-op path makes none."""
    fused, per_op = TorchLM.load(tiny[1]), TorchLM.load(tiny[1])
    per_op.fused_layers = False
    ext, calls = torch_kernels.kernels(), []

    class Counting:
        def __getattr__(self, name):
            f = getattr(ext, name)
            return lambda *a: calls.append(name) or f(*a)

    monkeypatch.setattr(torch_kernels, "kernels", Counting)
    plans = [StepPlan(), StepPlan(skip_layers=frozenset({1})), StepPlan(zero_mlp=frozenset({0}), blend=((2, 0.5),))]
    L, steps = fused.cfg.num_hidden_layers, len(IDS) - 4
    for batch in (1, 3):
        calls.clear()
        got = _decode_logits(fused, plans, batch)
        assert calls.count("decode_layer") == sum(L - len(plans[s % 3].skip_layers) for s in range(steps))
        calls.clear()
        want = _decode_logits(per_op, plans, batch)
        assert "decode_layer" not in calls and "decode_attention" in calls
        np.testing.assert_array_equal(got, want)


def test_pooled_caches_reset_and_stay_apart(tiny_llama):
    """The cache pool that CUDA graphs need (a graph holds its cache's addresses): a cache dropped and handed
    out again is the same storage reset to fresh values, caches alive together never share storage, and
    decoding through pooled caches gives the unpooled logits exactly."""
    fresh = TorchLM.load(tiny_llama[1], cpu_matmul="library")
    pooled = TorchLM.load(tiny_llama[1], cpu_matmul="library")
    pooled.reuse_caches = True  # what cuda_graphs turns on; the pool itself is device-independent
    plans = [StepPlan(), StepPlan(skip_layers=frozenset({1}))]
    want = _decode_logits(fresh, plans)
    a = pooled.new_cache(1, len(IDS))
    a.k.fill_(7.0)  # dirty it, then drop it
    storage = a.k.data_ptr()
    del a
    b = pooled.new_cache(1, len(IDS))
    assert b.k.data_ptr() == storage and not b.k.any() and not b.written.any() and b.length == 0
    c = pooled.new_cache(1, len(IDS))  # b is alive: c gets its own storage
    assert c.k.data_ptr() != b.k.data_ptr()
    del b, c
    np.testing.assert_array_equal(_decode_logits(pooled, plans), want)
    np.testing.assert_array_equal(_decode_logits(pooled, plans), want)  # again, on reused storage
    assert not fresh.cuda_graphs and not pooled.cuda_graphs  # CPU: graphs never turn on


def _emulated_capture(self, fn):
    """TorchLM._capture without CUDA: the first call runs fn, capture runs nothing, replay runs fn again on the
    same buffers (what a replayed graph does), so the buffer plumbing around the graphs is tested on CPU."""
    first = fn()
    out = None if first is None else tuple(t.clone() for t in first) if isinstance(first, tuple) else first

    def replay():
        r = fn()
        for o, t in zip(*((out, r) if isinstance(out, tuple) else ((out,), (r,))), strict=True):
            if o is not None and t is not o:
                o.copy_(t)
    return first, out, replay


class _FakeCuda:
    """The torch.cuda calls TorchLM._capture makes, on CPU: records whether Python's garbage collector ran
    enabled inside the capture."""

    def __init__(self):
        self.inside = []

    def stream_ctx(self, _s):
        return contextlib.nullcontext()

    def graph(self, g, pool=None):
        @contextlib.contextmanager
        def capture():
            self.inside.append(gc.isenabled())
            yield
        return capture()


@pytest.mark.parametrize("fails", [False, True])
def test_capture_runs_with_the_garbage_collector_off(monkeypatch, fails):
    """A collection inside a CUDA graph capture can free an earlier model's graphs and buffers (CUDA calls a
    capture forbids; torch no longer collects before capturing): _capture collects first, keeps the collector
    off while it captures and turns it back on after, also when the captured function raises."""
    fake, stub = _FakeCuda(), type("Stub", (), {"wait_stream": lambda *a: None, "replay": lambda *a: None})
    for name, value in {"Stream": stub, "current_stream": stub, "stream": fake.stream_ctx, "CUDAGraph": stub,
                        "graph_pool_handle": lambda: None, "graph": fake.graph}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    calls = []

    def fn():
        calls.append(gc.isenabled())
        if fails and len(calls) == 2:
            raise RuntimeError("capture failed")
        return torch.zeros(1)

    owner = type("Owner", (), {})()
    assert gc.isenabled()
    if fails:
        with pytest.raises(RuntimeError, match="capture failed"):
            TorchLM._capture(owner, fn)
    else:
        TorchLM._capture(owner, fn)
    assert fake.inside == [False] and calls == [True, False] and gc.isenabled()


def _gate(lm, writes_kv: bool, seed: int = 0):
    """A token gate after layer 0 with random weights: tokens keep some later layers and skip others."""
    from adaptive_inference.techniques.token_router.apply import TokenGate

    cfg, rng = lm.cfg, np.random.default_rng(seed)
    n = cfg.num_hidden_layers - 1
    w = {"w1": rng.standard_normal((8, cfg.hidden_size)).astype(np.float32),
         "b1": np.zeros(8, np.float32), "w2": rng.standard_normal((n, 8)).astype(np.float32),
         "b2": np.zeros(n, np.float32)}
    return TokenGate(w, 1, cfg.num_hidden_layers, writes_kv)


def _head(lm, threshold: float):
    """A gated head (vocab router) with random weights: common head where P(rare) <= threshold."""
    from adaptive_inference.techniques.vocab_router.head import GatedHead

    rng, cfg = np.random.default_rng(3), lm.cfg
    ids = np.sort(rng.choice(cfg.vocab_size, cfg.vocab_size // 4, replace=False)).astype(np.int64)
    return GatedHead(ids, rng.standard_normal((8, cfg.hidden_size)).astype(np.float32), np.zeros(8, np.float32),
                     rng.standard_normal((1, 8)).astype(np.float32), np.zeros(1, np.float32), threshold)


def test_per_block_graphs_give_the_eager_step(tiny_llama, monkeypatch):
    """A plan that decides inside the forward (a token gate) replays graphs under cuda_graphs, chosen by the host
    after the decision: the blocks before it one by one, the rest of the step as one graph per sequence of
    blocks and K/V writes when every row decided alike, block by block when rows disagree; gate-free plans
    replay one graph per step, a gated head (the vocab router) its router and common-head segments on either
    side of the host's decision. With capture emulated (replay = rerun on the captured buffers), every step
    gives the eager logits and executed steps: batch 1 (whole blocks kept or skipped) and batch 3 (rows
    disagree: a mixed block runs eagerly and blends with the untouched input buffer), K/V written for skipped
    blocks or left as holes, two caches interleaved."""
    monkeypatch.setattr(TorchLM, "_capture", _emulated_capture)
    eager = TorchLM.load(tiny_llama[1], cpu_matmul="library")
    graphs = TorchLM.load(tiny_llama[1], cpu_matmul="library")
    graphs.cuda_graphs = graphs.reuse_caches = True  # what a CUDA device turns on
    mixed, heads = 0, {}
    for batch in (1, 3):
        plans = [StepPlan(gate=_gate(eager, True)), StepPlan(head=_head(eager, 2.0)),
                 StepPlan(gate=_gate(eager, False, 1)), StepPlan(head=_head(eager, 0.5)),
                 StepPlan(skip_layers=frozenset({2}), gate=_gate(eager, True, 2))]
        for _ in range(2):  # the second pass replays what the first captured
            caches = {id(lm): [lm.new_cache(batch, len(IDS)) for _ in range(2)] for lm in (eager, graphs)}
            for lm in (eager, graphs):
                for c in caches[id(lm)]:
                    lm.forward(torch.tensor([[t + r for t in IDS[:4]] for r in range(batch)]), c)
            for s, t in enumerate(IDS[4:]):
                for i in range(2):  # rows of a batch see other tokens, so they disagree
                    plan, tok = plans[(s + i) % len(plans)], torch.tensor([t + i + 3 * r for r in range(batch)])
                    want = eager.decode_one_token(tok, caches[id(eager)][i], plan)
                    got = graphs.decode_one_token(tok, caches[id(graphs)][i], plan)
                    # (the graph side's cache is bucketed to 128 slots: attention sums in another order)
                    for part in ("logits", "pick"):
                        a, b = getattr(got.out, part), getattr(want.out, part)
                        assert (a is None) == (b is None)
                        if a is not None:
                            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
                    heads[got.out.name] = heads.get(got.out.name, 0) + 1
                    g, w = got.executed, want.executed
                    assert dataclasses.replace(g, info={}) == dataclasses.replace(w, info={})
                    assert g.info.get("common_head") == w.info.get("common_head")
                    mixed += 0 < got.executed.row_layer_share < 1 and batch > 1
        if batch > 1:
            assert mixed, "rows never disagreed: the blend with the input buffer went untested"
    kinds = {k[0] if isinstance(k[0], str) else k[0][0] if isinstance(k[0], tuple) else "step" for k in graphs.graphs}
    # whole steps, blocks (rows that disagree), sequences of blocks and K/V-only writes once a gate decided
    # for every row, head parts
    assert kinds == {"step", "io", "block", "run", "segment"}
    runs = [k[0][1] for k in graphs.graphs if isinstance(k[0], tuple) and k[0][0] == "run"]
    assert any(kind == "kv" for r in runs for _, kind, _, _ in r) and any(len(r) > 1 for r in runs)
    assert set(heads) == {"full", "common", "mixed"}, heads


@pytest.mark.parametrize("run_graphs", [64, 0])
def test_compiled_per_block_graphs_serve_every_layer(tiny_llama, monkeypatch, run_graphs):
    """With compile on, a token gate's graphs run compiled block functions: the eager step's logits (within
    1e-5) and executed layers, from one compiled function per kind of block (run with its MLP, K/V write only)
    shared by every layer: a layer's weights and cache slice are arguments, so layers never recompile. With no
    room for sequence graphs (RUN_GRAPHS 0) the same steps replay block by block."""
    monkeypatch.setattr(TorchLM, "_capture", _emulated_capture)
    monkeypatch.setattr(torch_backend, "RUN_GRAPHS", run_graphs)
    torch._dynamo.reset()
    eager = TorchLM.load(tiny_llama[1], cpu_matmul="library")
    graphs = TorchLM.load(tiny_llama[1], cpu_matmul="library", compile=True)
    graphs.cuda_graphs = graphs.reuse_caches = True
    plan = StepPlan(gate=_gate(eager, True))
    caches = {id(lm): lm.new_cache(1, len(IDS)) for lm in (eager, graphs)}
    for lm in (eager, graphs):
        lm.forward(torch.tensor([IDS[:4]]), caches[id(lm)])
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for t in IDS[4:]:
        want = eager.decode_one_token(torch.tensor([t]), caches[id(eager)], plan)
        got = graphs.decode_one_token(torch.tensor([t]), caches[id(graphs)], plan)
        np.testing.assert_allclose(got.out.logits.numpy(), want.out.logits.numpy(), atol=1e-5)
        assert got.executed == want.executed
    assert set(graphs._layer_fns) == {("block", True, 1.0), ("kv", True, 1.0)}
    assert any(isinstance(k[0], tuple) and k[0][0] == "run" for k in graphs.graphs) == (run_graphs > 0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames == 2


@pytest.mark.parametrize("writes_kv", [True, False])
@pytest.mark.parametrize("mode", ["compiled", "graphs", "compiled+graphs"])
def test_device_gate_gives_the_host_gates_steps(tiny_llama, monkeypatch, mode, writes_kv):
    """A token gate decided on the device (as on CUDA): the whole step is one compiled / captured unit, the gate's
    MLP runs in it and every later layer runs gated (gated_linear: zero columns where no row runs the layer,
    kept per row with a select). Against the host's decision, eager, batch 1 and 3 (rows disagree), K/V written
    for skipped rows or left as holes, a plan that also skips a layer and one with no layer after the gate:
    the same logits (within 1e-5) and the same executed steps, read after the token (settle). Batch 6 (more
    rows than GATED_ROWS): the same, with the matmuls not gated."""
    from adaptive_inference import gated_linear_op

    monkeypatch.setattr(TorchLM, "_capture", _emulated_capture)
    calls = []
    op = gated_linear_op.gated_linear
    if "compiled" not in mode:  # eager: count the gated matmuls and whether some row ran them
        monkeypatch.setattr(gated_linear_op, "gated_linear", lambda *a: calls.append((a[0].shape[0], a[2].any().item()))
                            or op(*a))
    torch._dynamo.reset()
    eager = TorchLM.load(tiny_llama[1], cpu_matmul="library")
    lm = TorchLM.load(tiny_llama[1], cpu_matmul="library", compile="compiled" in mode)
    lm.cuda_graphs = lm.reuse_caches = "graphs" in mode
    lm.device_gate = True
    L = eager.cfg.num_hidden_layers
    plans = [StepPlan(gate=_gate(eager, writes_kv)), StepPlan(),
             StepPlan(skip_layers=frozenset({2}), gate=_gate(eager, writes_kv, 2)),
             StepPlan(skip_layers=frozenset(range(1, L)), gate=_gate(eager, writes_kv, 3))]
    skipped = mixed = 0
    for batch in (1, 3, 6):
        caches = {id(m): m.new_cache(batch, len(IDS)) for m in (eager, lm)}
        for m in (eager, lm):
            m.forward(torch.tensor([[(t + r) % eager.cfg.vocab_size for t in IDS[:4]] for r in range(batch)]), caches[id(m)])
        for s, t in enumerate(IDS[4:]):
            plan, tok = plans[s % len(plans)], torch.tensor([(t + 3 * r) % eager.cfg.vocab_size for r in range(batch)])
            want = eager.decode_one_token(tok, caches[id(eager)], plan)
            got = lm.decode_one_token(tok, caches[id(lm)], plan)
            np.testing.assert_allclose(got.out.logits.numpy(), want.out.logits.numpy(), atol=1e-5)
            assert got.executed == want.executed
            skipped += len(got.executed.layers_run) < L - len(plan.skip_layers)
            mixed += batch > 1 and 0 < got.executed.info.get("skip_share", 0) < 1
    assert skipped and mixed  # whole layers skipped (no row ran them) and rows that disagreed
    # gated matmuls ran, some with no row running, none at batch 6
    assert "compiled" in mode or ({r for r, _ in calls} == {1, 3} and {a for _, a in calls} == {False, True})
    assert all(k.gate is None or lm.compiled_steps[k] is not None for k in lm.compiled_steps)  # one unit a step
    if lm.cuda_graphs:
        assert {k[0] if isinstance(k[0], str) else "step" for k in lm.graphs} == {"step"}  # no per-block graphs


def test_gated_linear_partials_add_up_to_the_matmul():
    """gated_linear: fp32 partial sums over `splits` slices of K (what the CUDA kernel stores, one per element)
    that add up to x @ w.T in x's dtype; gated columns zero where no row runs, the others always computed; the
    same compiled (the op's fake gives the partials' shape); split_k splits long K on few output rows only."""
    from adaptive_inference.gated_linear_op import gated_linear, gated_linear_partials, split_k

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 64, generator=g), torch.randn(40, 64, generator=g)
    compiled = torch.compile(gated_linear, fullgraph=True, dynamic=False)
    for runs in ([True, False, False], [False] * 3):
        run = torch.tensor(runs)
        assert gated_linear_partials(x, w, run, 24, 3).shape == (3, 3, 40)
        for fn in (gated_linear, compiled):
            got = fn(x, w, run, 24, 3)
            torch.testing.assert_close(got[:, 24:], x @ w[24:].T)
            torch.testing.assert_close(got[:, :24], x @ w[:24].T if any(runs) else torch.zeros(3, 24))
    assert split_k(4096, 14336, 132) == 8 and split_k(28672, 4096, 132) == 1 and split_k(4096, 512, 132) == 1
    # one slice: nothing to add, the op stores the result in x's dtype (no cast launch after it), eager and
    # compiled alike (the fake's dtype is the op's)
    xb, wb, run = x.bfloat16(), w.bfloat16(), torch.tensor([True, False, False])
    want = (xb.float() @ wb.float().T).bfloat16()
    for splits, stored in ((1, torch.bfloat16), (3, torch.float32)):
        assert gated_linear_partials(xb, wb, run, 24, splits).dtype == stored
        for fn in (gated_linear, compiled):
            got = fn(xb, wb, run, 24, splits)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got, want)


def test_cuda_attention_choice_is_checked_and_cpu_keeps_its_path(tiny):
    from adaptive_inference.errors import UserError

    with pytest.raises(UserError, match="cuda_attention 'flash'"):
        TorchLM.load(tiny[1], cuda_attention="flash")
    assert not TorchLM.load(tiny[1], cuda_attention="kernel").attention_kernel  # the Triton kernel is CUDA only


@pytest.mark.parametrize("compile", [False, True])
def test_decode_attention_op_in_the_step_equals_the_ops(tiny_llama, compile):
    """The one-op decode attention (here its torch implementation; on CUDA the Triton kernel) inside the step,
    eager and under torch.compile (which calls it on the caches in place), against the step's own ops: the same
    logits at batch 2 with plans that skip a layer (its slot stays a masked hole) switching step by step."""
    ids = [5, 17, 99, 3, 64, 12, 7, 120, 33, 2, 41, 8]
    plans = [StepPlan(), StepPlan(skip_layers=frozenset({1})), StepPlan(zero_mlp=frozenset({0}))]

    def run(lm):
        cache = lm.new_cache(2, len(ids))
        lm.forward(torch.tensor([ids[:4], ids[1:5]]), cache)
        return np.stack([lm.decode_one_token(torch.tensor([t, t + 1]), cache, plans[s % 3]).out.logits.numpy()
                         for s, t in enumerate(ids[4:])])

    want = run(TorchLM.load(tiny_llama[1], cpu_matmul="library"))
    lm = TorchLM.load(tiny_llama[1], cpu_matmul="library", compile=compile)
    lm.attention_kernel = True  # CPU: the op's torch implementation (on CUDA the Triton kernel, the default)
    np.testing.assert_allclose(run(lm), want, rtol=1e-5, atol=1e-5)


def test_matmuls_around_the_attention_op_need_no_launch_of_their_own(tiny_llama, tmp_path, monkeypatch):
    """Split-K partial sums are added by the op after the matmul and the fp16-pair kernels' x prep is made by
    the op before it, both fused there by inductor; the attention op cannot take either, so qkv runs in one
    slice (no sum launch a layer) and o without fp16 pairs (no prep launch), the other matmuls keep both:
    packed CUDA weights (quant_cuda.CudaPacked, here made on CPU) and a token gate's gated weights (qkv)."""
    from adaptive_inference import gated_linear_op, quant
    from adaptive_inference.plan import WeightSet
    from adaptive_inference.quant_cuda import CudaPacked

    lm = TorchLM.load(tiny_llama[1])
    states = {f"layers.{i}.{f}": quant.quantize(getattr(lw, f).float().numpy(), "int8")
              for i, lw in enumerate(lm.layers) for f in ("wqkv", "wo", "w_gate_up", "w_down")}
    quant.save_file(states, tmp_path / "int8.safetensors")
    monkeypatch.setattr(TorchLM, "pack", lambda self, state, depth: CudaPacked("int8", state.shape, (), splits=4))
    lm.add_weight_set(WeightSet("int8", str(tmp_path / "int8.safetensors")))
    for lw in lm.weight_sets["int8"]:
        assert lw.wqkv.splits == 1 and lw.wo.splits == lw.w_gate_up.splits == lw.w_down.splits == 4
        assert not lw.wo.pairs and lw.wqkv.pairs and lw.w_gate_up.pairs and lw.w_down.pairs

    monkeypatch.setattr(gated_linear_op, "split_k", lambda n, k, sms: 4)
    lm = TorchLM.load(tiny_llama[1], dtype="bfloat16")
    lm._sms = 132  # as on a GPU: gated 16-bit matmuls split K
    gated = lm.gated_layer(lm.layers[1], torch.ones(1, dtype=torch.bool), 8)
    assert gated.wqkv.splits == 1 and gated.wo.splits == gated.w_gate_up.splits == gated.w_down.splits == 4
