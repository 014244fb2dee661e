import numpy as np
import pytest

from adaptive_inference.backends import load_backend
from adaptive_inference.generation import generate, stream
from adaptive_inference.plan import StaticPolicy, StepPlan
from adaptive_inference.techniques.vocab_router import train as vr
from adaptive_inference.techniques.vocab_router.head import GatedHead

IDS = [5, 17, 99, 3, 64, 12, 7, 120, 33, 2, 41, 8]


def test_common_ids_smallest_set_reaching_coverage():
    next_ids = np.array([1, 1, 1, 1, 2, 2, 3, -1])
    argmax = np.array([1, 1, 2, 4])
    ids, info = vr.choose_common_ids(next_ids, argmax, vocab=8, coverage=0.75)
    # counts: 1 -> 6, 2 -> 3, 3 -> 1, 4 -> 1 (of 11): {1, 2} covers 9/11 >= 0.75, {1} does not
    assert ids.tolist() == [1, 2] and info["coverage"] == pytest.approx(9 / 11)


def test_calibrated_threshold_reaches_target_recall():
    rng = np.random.default_rng(0)
    rare = rng.random(1000) < 0.2
    prob = np.clip(rare * 0.6 + rng.random(1000) * 0.5, 0, 1)
    t = vr.calibrate(prob, rare, 0.9)
    assert vr.stats(prob, rare, t)["recall"] >= 0.9
    assert vr.stats(prob, rare, t + 0.05)["recall"] < 0.9 or t + 0.05 > prob.max()


def test_router_learns_a_separable_rule():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 16)).astype(np.float32)
    y = x[:, 0] > 1.0
    w, curve = vr.train(x, y, {"hidden": 16, "epochs": 8, "batch_size": 256, "lr": 0.01, "seed": 0})
    s = vr.stats(vr.predict(w, x), y, 0.5)
    assert curve[-1] < curve[0] and s["recall"] > 0.9 and s["precision"] > 0.7


def head_for(lm, threshold: float, n_common: int = 32, seed: int = 0) -> GatedHead:
    rng = np.random.default_rng(seed)
    H = lm.cfg.hidden_size
    common = np.sort(rng.choice(lm.cfg.vocab_size, n_common, replace=False)).astype(np.int64)
    return GatedHead(common, rng.normal(size=(8, H)).astype(np.float32) * 0.1, np.zeros(8, np.float32),
                        rng.normal(size=(1, 8)).astype(np.float32), np.zeros(1, np.float32), threshold)


@pytest.fixture(params=["torch", "mlx"])
def lm(request, tiny):
    return load_backend(request.param, tiny[1], "float32")


def test_router_that_never_picks_common_is_exactly_baseline(lm):
    assert np.array_equal(lm.logits(IDS, StepPlan(head=head_for(lm, threshold=-1.0))), lm.logits(IDS))


def test_common_head_is_a_distribution_that_keeps_common_ranking(lm):
    g = head_for(lm, threshold=2.0)  # always the common head
    got, full = lm.logits(IDS, StepPlan(head=g)), lm.logits(IDS)
    prob = np.exp(got.astype(np.float64))
    assert np.allclose(prob.sum(-1), 1.0, atol=1e-4)
    c = g.common_ids
    assert np.array_equal(got.argmax(-1), c[full[:, c].argmax(-1)])
    rare_mass = 1 - prob[:, c].sum(-1)
    rare = np.setdiff1d(np.arange(lm.cfg.vocab_size), c)
    assert np.allclose(prob[:, rare].std(-1), 0, atol=1e-9) and (rare_mass > 0).all()


def test_sampling_on_common_head_stays_in_common_ids_and_logs_decisions(lm):
    g = head_for(lm, threshold=2.0)
    res = generate(lm, IDS[:5], max_new_tokens=12, policy=StaticPolicy(StepPlan(head=g)), temperature=1.5, seed=1)
    assert set(res.tokens) <= set(g.common_ids.tolist())
    assert len(set(res.tokens)) > 1  # really sampled
    assert [e.head for e in res.executed] == ["common"] * 12
    assert all(e.info["common_head"] == [True] and 0 <= e.info["p_rare"][0] <= 1 for e in res.executed)
    C, H = len(g.common_ids), lm.cfg.hidden_size
    assert res.executed[3].head_params == C * H + g.router_params


def test_torch_and_mlx_gate_alike(tiny):
    t, m = load_backend("torch", tiny[1], "float32"), load_backend("mlx", tiny[1], "float32")
    for thr in (0.3, 0.5, 0.7):
        gt, gm = head_for(t, thr, seed=3), head_for(m, thr, seed=3)
        np.testing.assert_allclose(t.logits(IDS, StepPlan(head=gt)), m.logits(IDS, StepPlan(head=gm)), atol=2e-4)


def median_p_rare(lm, prompt, n: int) -> float:
    res = generate(lm, prompt, max_new_tokens=n, policy=StaticPolicy(StepPlan(head=head_for(lm, -1.0))))
    return float(np.median([e.info["p_rare"][0] for e in res.executed]))


@pytest.mark.parametrize("mixed", [True, False])
def test_greedy_decode_on_common_ids_matches_gated_logits(lm, mixed):
    """Decode picks from the 32 common logits and maps back; it must equal the argmax of the full spread."""
    plan = StepPlan(head=head_for(lm, median_p_rare(lm, IDS[:5], 10) if mixed else 2.0))
    res = generate(lm, IDS[:5], max_new_tokens=10, policy=StaticPolicy(plan))
    commons = [e.head == "common" for e in res.executed]
    assert 0 < sum(commons) < len(commons) if mixed else all(commons), "steps on the heads the test needs"
    teacher = lm.logits(IDS[:5] + res.tokens[:-1], plan)
    assert teacher[4:].argmax(-1).tolist() == res.tokens


def test_batched_rows_decide_alone(lm):
    """Rows of a batch take their own head; each row decodes as it would alone."""
    plan = StepPlan(head=head_for(lm, median_p_rare(lm, IDS[:5], 8)))
    prompts = np.array([IDS[:5], IDS[5:10]])
    steps = list(stream(lm, prompts, max_new_tokens=8, policy=StaticPolicy(plan)))
    batched = np.stack([s.tokens for s in steps], 1)
    rows = np.array([s.executed.info["common_head"] for s in steps])
    assert (rows[:, 0] != rows[:, 1]).any(), "the test needs a step whose rows take different heads"
    for row, prompt in zip(batched, prompts, strict=True):
        assert row.tolist() == generate(lm, prompt.tolist(), max_new_tokens=8, policy=StaticPolicy(plan)).tokens


def device_decides(lm) -> bool:
    return lm.select_linear_ok(lm.asarray(np.zeros((1, lm.cfg.hidden_size))), lm.lm_head, lm.lm_head)


def decode_steps(lm, plan, prompts, n: int, host: bool):
    """Per step: (tokens, logits, executed) of a greedy decode; host=True makes the head decide on the host."""
    if host:
        lm.select_linear_ok = lambda *a: False
    try:
        ids = lm.ids_array(np.asarray(prompts))
        cache, state, out = lm.new_cache(ids.shape[0], ids.shape[1] + n), lm.sampler_state(0), []
        for step in range(n):
            fwd = lm.prefill(ids, cache, plan) if step == 0 else lm.decode_one_token(ids, cache, plan)
            ids, state = lm.next_tokens(fwd.out, 0.0, state)
            out.append((lm.to_numpy(ids), lm.to_numpy(fwd.out.logits), fwd.executed))
        return out
    finally:
        vars(lm).pop("select_linear_ok", None)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("decides", ["common", "full", "mixed"])
def test_device_decision_equals_host_decision(tiny_llama, batch, decides):
    """MLX decides on the device (one graph runs the chosen head); its tokens, logits and what it reports
    running equal the host decision's exactly, whichever head the steps take."""
    lm = load_backend("mlx", tiny_llama[1], "float32")
    if not device_decides(lm):
        pytest.skip("the MLX CPU kernel is not available here")
    prompts = [IDS[:5], IDS[5:10]][:batch]
    threshold = {"common": 2.0, "full": -1.0, "mixed": median_p_rare(lm, IDS[:5], 10)}[decides]
    plan = StepPlan(head=head_for(lm, threshold))
    device, host = decode_steps(lm, plan, prompts, 10, False), decode_steps(lm, plan, prompts, 10, True)
    heads = [e.head for _, _, e in device]
    assert set(heads) <= {"common", "full", "mixed"} and (decides == "mixed") == (len(set(heads)) > 1), heads
    for (tok_d, log_d, ex_d), (tok_h, log_h, ex_h) in zip(device, host, strict=True):
        assert np.array_equal(tok_d, tok_h) and np.array_equal(log_d, log_h) and ex_d == ex_h


def test_device_decision_reads_nothing_while_the_step_is_built(tiny_llama, monkeypatch):
    """Building a decode step under the router reads no array on the host (the host path reads P(rare));
    its decision is read once the token is."""
    lm = load_backend("mlx", tiny_llama[1], "float32")
    plan = StepPlan(head=head_for(lm, median_p_rare(lm, IDS[:5], 10)))
    cache = lm.new_cache(1, 16)
    lm.to_numpy(lm.next_tokens(lm.prefill(lm.ids_array(np.asarray([IDS[:5]])), cache, plan).out, 0.0, None)[0])
    reads = []
    real = lm.to_numpy
    monkeypatch.setattr(lm, "to_numpy", lambda x: reads.append(x.shape) or real(x))
    fwd = lm.decode_one_token(lm.ids_array(np.asarray([3])), cache, plan)
    ids, _ = lm.next_tokens(fwd.out, 0.0, None)
    assert reads == ([] if device_decides(lm) else [(1,)])
    lm.to_numpy(ids)
    assert fwd.executed.head in ("common", "full") and len(fwd.executed.info["p_rare"]) == 1


def test_each_head_runs_its_own_segments(lm):
    """Heads made and dropped one after another (a new object may reuse a dropped one's id) each run their own
    router and threshold: captured / compiled segments are keyed by the head, not by its id."""
    ids = lm.ids_array(np.asarray([IDS[:5]]))
    for threshold in (2.0, -1.0) * 4:
        plan = StepPlan(head=head_for(lm, threshold, seed=int(threshold > 0)))
        cache = lm.new_cache(1, 8)
        fwd = lm.prefill(ids, cache, plan)
        fwd = lm.decode_one_token(lm.next_tokens(fwd.out, 0.0, None)[0], cache, plan)
        lm.to_numpy(lm.next_tokens(fwd.out, 0.0, None)[0])
        assert fwd.executed.head == ("common" if threshold > 0 else "full")
        del plan, fwd
