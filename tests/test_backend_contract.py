"""What every backend owes the decoder, run once per backend on each tiny shape (one shared runner): the
unmodified model matches transformers, plans change exactly what they say, the KV cache holds up."""

import copy

import numpy as np
import pytest
import torch

from adaptive_inference.backends import load_backend
from adaptive_inference.generation import generate, generate_batch, stream, teacher_forced
from adaptive_inference.plan import GateDecision, StaticPolicy, StepPlan

IDS = [5, 17, 99, 3, 64, 12, 7, 120, 33, 2, 41, 8]


def hf_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(params=["torch", "mlx"])
def lm(request, tiny):
    return load_backend(request.param, tiny[1], "float32")


class KeepGate:
    """A gate after layer `after` that keeps (row, position, layer) where keep_fn says so."""

    def __init__(self, after: int, keep_fn):
        self.after_layer, self.keep_fn, self.calls = after, keep_fn, 0

    def decide(self, x, lm):
        B, T = x.shape[:2]
        keep = np.ones((B, T, lm.cfg.num_hidden_layers), dtype=bool)
        self.keep_fn(keep, self.calls)
        self.calls += 1
        return GateDecision(keep, info={"gate_calls": self.calls})


class PerStep(StaticPolicy):
    static = False

    def __init__(self, plans: dict):
        self.plans = plans

    def plan(self, step):
        return self.plans.get(step, StepPlan())


class Spy(StaticPolicy):
    """A policy that logs when it plans and observes (static or not)."""

    def __init__(self, static: bool, log: list):
        super().__init__()
        self.static, self.log = static, log

    def plan(self, step):
        self.log.append(("plan", step))
        return super().plan(step)

    def observe(self, executed, logits):
        self.log.append(("observe", logits.shape[0]))


@pytest.mark.parametrize("static", [True, False])
def test_stream_runs_a_static_plan_one_step_ahead(lm, monkeypatch, static):
    """Where the backend runs ahead (CUDA; forced here) a static policy's step s + 1 is queued before step s's
    token is read: the same tokens and executed steps in the same order, each step observed once, in order,
    and never a step past max_new_tokens; a policy that is not static plans only after it observed."""
    prompts = np.array([IDS[:5], IDS[3:8]])
    want_log: list = []
    want = list(stream(lm, prompts, max_new_tokens=6, policy=Spy(static, want_log)))
    monkeypatch.setattr(lm, "runs_ahead", True, raising=False)
    steps, log = [], []
    fetch = lm.fetch

    def logged_fetch(x):  # each step's tokens: the copy asked for when the step is queued, read when finished
        n = sum(e[0] == "fetch" for e in log)
        log.append(("fetch", n))
        read = fetch(x)
        return lambda: (log.append(("read", n)), read())[1]
    monkeypatch.setattr(lm, "fetch", logged_fetch)
    spy = Spy(static, log)  # a policy with step_queued (the gears) is handed each step's logits as it is queued
    spy.step_queued = lambda logits, _: log.append(("queued", sum(e[0] == "queued" for e in log), logits.shape[0]))
    for s in stream(lm, prompts, max_new_tokens=6, policy=spy):
        steps.append(s)
        log.append(("yield", len(steps) - 1))
    assert [s.tokens.tolist() for s in steps] == [s.tokens.tolist() for s in want]
    assert [s.executed for s in steps] == [s.executed for s in want]
    assert all(s.seconds > 0 for s in steps)
    plans = [e for e in log if e[0] == "plan"]
    assert plans == [("plan", i) for i in range(6)]  # six steps, no seventh launched
    order = [e[0] for e in log if e[0] not in ("fetch", "queued")]
    assert [log.index(("fetch", i)) < log.index(("plan", i + 1)) for i in range(5)] == [True] * 5
    assert [log.index(("queued", i, 2)) < log.index(("plan", i + 1)) for i in range(5)] == [True] * 5
    assert sum(e[0] == "queued" for e in log) == 6
    if static:  # plan(s + 1) comes before step s's token is read, observed and yielded
        assert order[:4] == ["plan", "plan", "read", "observe"]
        assert [log.index(("plan", i + 1)) < log.index(("read", i)) for i in range(5)] == [True] * 5
        assert [log.index(("plan", i + 1)) < log.index(("yield", i)) for i in range(5)] == [True] * 5
    else:
        assert order == ["plan", "read", "observe", "yield"] * 6


def test_a_policy_behind_never_runs_ahead(lm, monkeypatch):
    """cuda_techniques --run-ahead off|both: a static policy wrapped in Behind plans each step only after the
    step before was observed, with the same tokens, and one whose plans follow the step index alone
    (`plans_ahead`, the benchmark's rate-forced router) runs ahead; "both" names each twin NAME/behind."""
    from adaptive_inference.bench.cuda_techniques import Behind, with_run_ahead

    prompts = np.array([IDS[:5]])
    want = [s.tokens.tolist() for s in stream(lm, prompts, max_new_tokens=4)]
    monkeypatch.setattr(lm, "runs_ahead", True, raising=False)
    log: list = []
    got = []
    for s in stream(lm, prompts, max_new_tokens=4, policy=Behind(Spy(True, log))):
        got.append(s.tokens.tolist())
        log.append(("yield",))
    assert got == want and [e[0] for e in log] == ["plan", "observe", "yield"] * 4
    stepwise = Spy(False, log := [])  # plans that follow the step index alone run ahead though not static
    stepwise.plans_ahead = True
    for _ in stream(lm, prompts, max_new_tokens=4, policy=stepwise):
        log.append(("yield",))
    assert [e[0] for e in log][:4] == ["plan", "plan", "observe", "yield"]
    configs = {"baseline": lambda: Spy(True, [])}
    assert with_run_ahead(configs, "on") is configs
    assert isinstance(with_run_ahead(configs, "off")["baseline"](), Behind)
    both = with_run_ahead(configs, "both")
    assert list(both) == ["baseline", "baseline/behind"] and both["baseline"]().static


def test_matches_transformers(lm, tiny):
    np.testing.assert_allclose(lm.logits(IDS), hf_logits(tiny[2], IDS), atol=1e-4, rtol=1e-4)


def test_generate_matches_transformers_greedy(lm, tiny):
    res = generate(lm, IDS[:6], max_new_tokens=8)
    with torch.inference_mode():
        ref = tiny[2].generate(torch.tensor([IDS[:6]]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert res.tokens == ref[0, 6:].tolist()
    assert len(res.token_latencies_s) == len(res.executed) == 8 and res.prefill_s == res.token_latencies_s[0] > 0


def test_plans_that_change_nothing_are_exactly_baseline(lm):
    """Every mechanism, asked to change nothing, runs exactly the baseline ops: no skips, alpha 1 blends,
    and an in-forward gate that keeps every layer."""
    base = lm.logits(IDS)
    L = lm.cfg.num_hidden_layers
    for plan in (StepPlan(), StepPlan(blend=tuple((i, 1.0) for i in range(L))),
                 StepPlan(gate=KeepGate(1, lambda keep, call: None))):
        assert np.array_equal(lm.logits(IDS, plan), base), plan


def test_incremental_decode_matches_teacher_forced(lm):
    full = lm.logits(IDS)
    cache = lm.new_cache(1, len(IDS))
    out = [lm.to_numpy(lm.forward(lm.ids_array(np.array([IDS[:5]])), cache).out.logits[0])]
    for t in IDS[5:]:
        out.append(lm.to_numpy(lm.decode_one_token(lm.ids_array(np.array([t])), cache).out.logits))
    np.testing.assert_allclose(np.concatenate(out), full, atol=1e-5)


def test_zero_mlp_equals_zeroed_down_proj(lm, tiny):
    zeroed = lm.logits(IDS, StepPlan(zero_mlp=frozenset({1})))
    ref = copy.deepcopy(tiny[2])
    with torch.no_grad():
        ref.model.layers[1].mlp.down_proj.weight.zero_()
    np.testing.assert_allclose(zeroed, hf_logits(ref, IDS), atol=1e-4, rtol=1e-4)
    assert not np.allclose(zeroed, lm.logits(IDS), atol=1e-3)


def test_hard_skip_with_kv_cache_equals_full_prefix_recompute(lm):
    """A layer skipped for every token (prompt included) writes no KV: decoding token by token gives the
    logits of one teacher-forced forward with the same skip set."""
    plan = StepPlan(skip_layers=frozenset({1, 2}))
    stepwise, executed = teacher_forced(lm, IDS, PerStep({s: plan for s in range(len(IDS))}), prompt_tokens=4)
    np.testing.assert_allclose(stepwise, lm.logits(IDS, plan), atol=1e-5)
    assert all(e.layers_run == {0, 3} for e in executed)
    assert not np.allclose(stepwise, lm.logits(IDS), atol=1e-3)


def test_resume_from_a_captured_layer_input_is_the_full_forward(lm):
    """A forward resumed at layer i from the input the full forward captured there gives that forward's
    logits bit for bit, for any plan that changes nothing before i; a gated plan is refused."""
    ids = lm.ids_array(np.array([IDS]))
    L = lm.cfg.num_hidden_layers
    captured = lm.forward(ids, lm.new_cache(1, len(IDS)), capture=set(range(L))).captured
    for i in range(L):
        for plan in (StepPlan(), StepPlan(zero_mlp=frozenset({i})), StepPlan(skip_layers=frozenset({i, L - 1}))):
            resumed = lm.forward(ids, lm.new_cache(1, len(IDS)), plan, resume=(i, captured[i])).out.logits[0]
            assert np.array_equal(lm.to_numpy(resumed), lm.logits(IDS, plan)), (i, plan)
    with pytest.raises(ValueError, match="resume"):
        lm.forward(ids, lm.new_cache(1, len(IDS)), StepPlan(gate=KeepGate(0, lambda keep, call: None)),
                   resume=(1, captured[1]))


class BlendGate:
    after_layer = 0

    def decide(self, x, lm):
        return GateDecision(np.ones((*x.shape[:2], lm.cfg.num_hidden_layers), bool), blend=((2, 0.5),))


def test_soft_blend_alpha_zero_is_hard_skip(lm):
    np.testing.assert_allclose(lm.logits(IDS, StepPlan(blend=((2, 0.0),))),
                               lm.logits(IDS, StepPlan(skip_layers=frozenset({2}))), atol=1e-5)
    half = lm.logits(IDS, StepPlan(blend=((2, 0.5),)))
    assert not np.allclose(half, lm.logits(IDS), atol=1e-4)
    # a gate may set the blend for the layers after it (a soft skip decided from the prompt)
    np.testing.assert_array_equal(lm.logits(IDS, StepPlan(gate=BlendGate())), half)


def test_gate_decisions_inside_the_forward_follow_teacher_forcing(lm):
    """Per-token skips decided after layer 0 during decode equal a teacher-forced run with the same
    decisions (the skipped token leaves a KV hole that later tokens do not see)."""
    def skip_odd_calls(keep, call):
        if call % 2:
            keep[:, :, 2:] = False

    gated = StaticPolicy(StepPlan(gate=KeepGate(0, skip_odd_calls)))  # one gate: it counts its calls
    # the same decisions given as plans: step s skips layers 2.. when the gate's call index s is odd
    planned = PerStep({s: StepPlan(skip_layers=frozenset({2, 3}) if s % 2 else frozenset()) for s in range(12)})
    a, ex = teacher_forced(lm, IDS, gated, prompt_tokens=1)
    b, _ = teacher_forced(lm, IDS, planned, prompt_tokens=1)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert [len(e.layers_run) for e in ex[:4]] == [4, 2, 4, 2]


def test_batch_rows_match_single(lm):
    prompts = np.array([IDS[:6], IDS[6:]])
    batched = generate_batch(lm, prompts, max_new_tokens=5)
    for row in range(2):
        assert batched[row].tolist() == generate(lm, IDS[6 * row:6 * row + 6], max_new_tokens=5).tokens


def test_gate_rows_of_a_batch_decide_alone(lm):
    """Row 1 skips layers 2-3 on every token, row 0 runs everything: each row equals its own run."""
    def row1_skips(keep, call):
        keep[1, :, 2:] = False

    def all_skip(keep, call):
        keep[:, :, 2:] = False

    prompts = np.array([IDS[:6], IDS[6:]])
    steps = list(stream(lm, prompts, max_new_tokens=5, policy=StaticPolicy(StepPlan(gate=KeepGate(1, row1_skips)))))
    batched = np.stack([s.tokens for s in steps], 1)
    assert batched[0].tolist() == generate(lm, IDS[:6], max_new_tokens=5).tokens
    skip = generate(lm, IDS[6:], max_new_tokens=5, policy=StaticPolicy(StepPlan(gate=KeepGate(1, all_skip))))
    assert batched[1].tolist() == skip.tokens
    assert steps[1].executed.layers_run == {0, 1, 2, 3} and steps[1].executed.row_layer_share == 0.75


def test_sampling_is_seeded_and_uses_the_temperature(lm):
    a = generate(lm, IDS[:4], max_new_tokens=12, temperature=2.0, seed=3).tokens
    assert a == generate(lm, IDS[:4], max_new_tokens=12, temperature=2.0, seed=3).tokens
    assert a != generate(lm, IDS[:4], max_new_tokens=12, temperature=2.0, seed=4).tokens
    assert a != generate(lm, IDS[:4], max_new_tokens=12).tokens


def test_unknown_weight_set_is_a_one_line_error(lm):
    from adaptive_inference.errors import UserError

    with pytest.raises(UserError, match="weight set 'int4'"):
        lm.logits(IDS, StepPlan(weights="int4"))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_model_folder_without_weights_is_a_one_line_error(backend, tiny, tmp_path):
    """A folder with a config but no *.safetensors: refused in one line naming the folder, by both backends."""
    import shutil

    from adaptive_inference.errors import UserError

    shutil.copy(tiny[1] / "config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match=r"^model folder has no \*\.safetensors: "):
        load_backend(backend, tmp_path, "float32")
