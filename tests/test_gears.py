"""Entropy gears on a tiny model: the quantize and calibrate_entropy stages, packed weight sets on both
backends, the gears policy (forced to the top gear it is the baseline, bit for bit), decisions shared by
the backends, and the cost model's bytes per gear."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import tiny_stage_inputs

from adaptive_inference import cost, quant, techniques
from adaptive_inference.backends import load_backend
from adaptive_inference.errors import UserError
from adaptive_inference.generation import generate, teacher_forced
from adaptive_inference.plan import StaticPolicy, StepPlan, WeightSet
from adaptive_inference.techniques.gears import apply, calibrate, classifier, monitor
from adaptive_inference.techniques.gears import quantize as qstage

QPARAMS = {"layout": "nested", "group_size": 32, "parts": ["attention", "mlp", "head"]}
CPARAMS = {"low_percentile": 40, "high_percentile": 60, "low_cap_frac": 0.06, "high_cap_frac": 0.18,
           "prompt_tokens": 8, "hard": ["code"], "trivial": ["prose"]}
IDS = [5, 17, 99, 3, 64, 12, 7, 80, 33, 2, 41, 9]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tiny_stage_inputs(
        tmp_path_factory.mktemp("gears"),
        {"seed": 0, "categories": ["code", "prose"], "train": 1, "calib": 3, "eval": 1, "max_chars": 400},
        {"seq_len": 48, "batch_size": 4, "early_layer": 1, "layer_inputs": [], "dtype": "float32"})
    qstage.build(QPARAMS, root / "model", root / "quantized")
    calibrate.build(CPARAMS, root / "hidden", root / "model", root / "corpus", root / "entropy")
    return root


@pytest.fixture(scope="module", params=["torch", "mlx"])
def lm(request, inputs):
    return load_backend(request.param, inputs / "model", "float32")


def test_quantize_stage_records_bytes_and_errors(inputs, tmp_path):
    q = json.loads((inputs / "quantized" / "quantize.json").read_text())
    read = q["bytes_read_per_token"]
    assert read["low"] < read["mid"] < read["high"] and q["matrices"] == 4 * 4 + 1
    assert q["resident_bytes"]["packed"] == pytest.approx(read["mid"], rel=0.02)  # one copy serves both gears
    for part in ("attention", "mlp", "head"):
        assert q["relative_error"]["mid"][part]["max"] < 0.01 < q["relative_error"]["low"][part]["mean"] < 0.15
    qstage.build(QPARAMS, inputs / "model", tmp_path / "again")  # deterministic bytes
    assert (tmp_path / "again" / "gears.safetensors").read_bytes() == (inputs / "quantized" / "gears.safetensors").read_bytes()
    sep = qstage.build({**QPARAMS, "layout": "separate", "parts": ["mlp"]}, inputs / "model", tmp_path / "sep")
    assert sorted(p.name for p in (tmp_path / "sep").glob("*.safetensors")) == ["int4.safetensors", "int8.safetensors"]
    assert sep["outputs"]["bytes_read_per_token"]["high"] == read["high"]


@pytest.mark.parametrize("bad, match", [({"layout": "dense"}, "quantize.layout"), ({"parts": ["ffn"]}, "unknown part")])
def test_quantize_refuses_bad_params(inputs, tmp_path, bad, match):
    with pytest.raises(UserError, match=match):
        qstage.build({**QPARAMS, **bad}, inputs / "model", tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("gear, depth", [("mid", 8), ("low", 4)])
def test_packed_weight_set_multiplies_the_dequantized_weights(lm, inputs, gear, depth):
    """A packed set's logits equal those of the same model holding the dequantized weights as floats (MLX:
    exactly its affine format; torch: up to its int8 rounding of the activations, ~1% of a logit's scale)."""
    ws = apply.weight_sets(inputs / "quantized")[monitor.GEARS.index(gear)]
    packed = lm.logits(IDS, StepPlan(weights=ws))
    states = quant.load_file(ws.path)
    deq = lambda name, w: lm.asarray(quant.dequantize(states[name], depth=depth))  # noqa: E731
    lm.weight_sets["deq"] = [replace(lw, **{f: deq(f"layers.{i}.{f}", getattr(lw, f)) for f in ("wqkv", "wo", "w_gate_up", "w_down")})
                             for i, lw in enumerate(lm.weight_sets["full"])]
    lm.packed_heads["deq"] = deq("lm_head", lm.lm_head)
    floats = lm.logits(IDS, StepPlan(weights="deq"))
    tol = 1e-4 if lm.name == "mlx" else 0.05 * np.abs(floats).max()
    np.testing.assert_allclose(packed, floats, atol=tol)
    assert not np.allclose(packed, lm.logits(IDS), atol=1e-5)  # the gear really reads other weights
    assert set(lm.relative_bytes[gear]) == {"attention", "mlp", "head"} and max(lm.relative_bytes[gear].values()) < 0.3


def _force_high(inputs, cfg):
    """The gears policy pinned to the top gear: the first gear is high and no mean entropy is below 0."""
    p = techniques.make_policy([{"name": "gears", "first": "high"}], [inputs / "quantized", inputs / "entropy"], cfg)
    p.cfg = replace(p.cfg, low=0.0, high=0.0)
    return p


class _EveryStep(StaticPolicy):
    static = False  # the baseline taken token by token, as the gears policy is


def test_gears_forced_to_the_top_gear_are_the_baseline_bit_for_bit(lm, inputs):
    logits, executed = teacher_forced(lm, IDS, _force_high(inputs, lm.cfg), prompt_tokens=4)
    base, _ = teacher_forced(lm, IDS, _EveryStep(), prompt_tokens=4)
    assert np.array_equal(logits, base) and {e.weights for e in executed} == {"full"}
    res = generate(lm, IDS[:4], max_new_tokens=5, policy=_force_high(inputs, lm.cfg))
    assert res.tokens == generate(lm, IDS[:4], max_new_tokens=5).tokens


def test_gears_follow_the_monitor_token_by_token(lm, inputs):
    """Low thresholds that every entropy exceeds: the first gear (low) holds min_duration steps, then the
    monitor climbs to high; the executed weight sets show it, and the cost model prices each step."""
    policy = techniques.make_policy([{"name": "gears", "first": "low", "min_duration": 2, "window": 2}],
                                    [inputs / "quantized", inputs / "entropy"], lm.cfg)
    policy.cfg = replace(policy.cfg, low=0.0, high=0.01, hysteresis=0.0)
    _, executed = teacher_forced(lm, IDS, policy, prompt_tokens=4)
    gears = [e.weights for e in executed]
    assert gears[:2] == ["low", "low"] and gears[-1] == "full" and policy.shifts >= 1
    q = json.loads((inputs / "quantized" / "quantize.json").read_text())["bytes_read_per_token"]
    low = [e for e in executed if e.weights == "low"]
    frac = cost.structural(lm.cfg, low, 8, lm.relative_bytes)["weight_bytes_fraction"]
    assert frac == pytest.approx(q["low"] / q["high"], rel=0.01)  # the cost model reads the stage's bytes
    assert cost.weights_usage(executed)["low"] == pytest.approx(2 / len(executed))


def test_backends_take_the_same_decisions_on_the_same_logits(inputs):
    import torch

    from adaptive_inference.blas import import_mlx

    mx = import_mlx()
    rng = np.random.default_rng(0)
    trace = [rng.standard_normal((2, 128)).astype(np.float32) * s for s in (8, 8, 8, 0.1, 0.1, 0.1, 0.1, 8, 8, 8)]
    gears = {}
    for name, as_array in (("torch", torch.from_numpy), ("mlx", mx.array)):
        p = techniques.make_policy([{"name": "gears", "first": "mid", "min_duration": 1, "window": 2}],
                                   [inputs / "quantized", inputs / "entropy"], _Cfg())
        gears[name] = []
        for logits in trace:
            p.observe(None, as_array(logits))
            gears[name].append(p.gear)
    assert gears["torch"] == gears["mlx"] and len(set(gears["torch"])) > 1


def _gears(inputs, cfg, lag: int):
    return techniques.make_policy([{"name": "gears", "first": "mid", "min_duration": 1, "window": 2, "lag": lag}],
                                  [inputs / "quantized", inputs / "entropy"], cfg)


def test_lag_one_applies_each_decision_a_step_later(inputs):
    """lag: 1: step s reads the gear decided after step s - 2, so its plan can be asked before step s - 1 is
    observed (generation runs it ahead); asked in either order it is lag 0's plan of the step before."""
    import torch

    from adaptive_inference.techniques.compose import ComposedPolicy

    trace = [torch.from_numpy(np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32) * s)
             for s in (8, 8, 0.1, 0.1, 0.1, 8, 8, 8, 0.1)]
    now, late, ahead = _gears(inputs, _Cfg(), 0), _gears(inputs, _Cfg(), 1), _gears(inputs, _Cfg(), 1)
    got = {"now": [now.plan(0).weights], "late": [late.plan(0).weights], "ahead": [ahead.plan(0).weights]}
    got["ahead"].append(ahead.plan(1).weights)  # before step 0 is observed, as generation running ahead asks
    for s, logits in enumerate(trace, start=1):
        for name, p in (("now", now), ("late", late), ("ahead", ahead)):
            p.observe(None, logits)
            if name != "ahead" or s + 1 <= len(trace):
                got[name].append(p.plan(s + (name == "ahead")).weights)
    assert got["late"] == got["ahead"] == [got["now"][0], *got["now"][:-1]]
    assert len({str(w) for w in got["now"]}) > 1  # the trace moves the gears
    assert now.decided == late.decided and not now.plans_ahead and late.plans_ahead
    assert ComposedPolicy([late, StaticPolicy()]).plans_ahead and not ComposedPolicy([now, StaticPolicy()]).plans_ahead


def test_gears_lag_one_run_ahead_give_the_same_steps(lm, inputs, monkeypatch):
    """Generation running a lag-1 gears policy ahead (forced here; CUDA's default) queues each step before it
    reads the one before back: the same tokens and executed weight sets as generation step by step."""
    from adaptive_inference.generation import runs_ahead, stream

    def run(ahead: bool):
        monkeypatch.setattr(lm, "runs_ahead", ahead, raising=False)
        policy = _gears(inputs, lm.cfg, 1)
        policy.cfg = replace(policy.cfg, low=0.0, high=0.01, hysteresis=0.0)  # climbs to the top gear
        assert runs_ahead(lm, policy) == ahead
        steps = list(stream(lm, np.array([IDS[:4]]), max_new_tokens=6, policy=policy))
        return [s.tokens.tolist() for s in steps], [s.executed.weights for s in steps]

    tokens, weights = run(True)
    assert (tokens, weights) == run(False) and weights[:2] == ["mid", "mid"] and weights[-1] == "full"


class _DeviceLogits(np.ndarray):
    """Logits that say they are on CUDA, so GearsPolicy.step_queued takes them (entropy_bits_device is patched)."""
    is_cuda = True


def test_entropies_started_when_a_step_is_queued_are_the_ones_observed(inputs, monkeypatch):
    """On CUDA generation hands the gears each step's logits as it queues the step (step_queued): the entropies
    are reduced there and their copy started, and observe takes them for those logits, drops what a generation
    left unobserved, and reduces logits it was not handed (teacher forcing) itself."""
    monkeypatch.setattr(monitor, "entropy_bits_device", lambda z: monitor.entropy_bits(z.view(np.ndarray)) + 100.0)
    reads: list = []

    class Lm:
        def fetch(self, x):
            return lambda: (reads.append(float(x[0])), x)[1]

    policy = _gears(inputs, _Cfg(), 0)
    rng = np.random.default_rng(0)
    stale, first, second = (rng.standard_normal((1, 128)).view(_DeviceLogits) for _ in range(3))
    policy.step_queued(stale, Lm())
    policy.step_queued(first, Lm())
    policy.observe(None, first)  # stale is dropped unread
    seen = policy.states[0].recent
    assert len(reads) == 1 and not policy.fetched
    assert seen == pytest.approx([monitor.entropy_bits(first.view(np.ndarray))[0] + 100])
    policy.step_queued(np.zeros((1, 128)), Lm())  # host logits: nothing started
    policy.observe(None, second.view(np.ndarray))  # not handed over: reduced here, without the +100
    assert len(reads) == 1 and not policy.fetched
    assert policy.states[0].recent[-1] == pytest.approx(monitor.entropy_bits(second.view(np.ndarray))[0])


class _Cfg:
    vocab_size = 128


def test_calibration_thresholds_histograms_and_classifier(inputs, tmp_path):
    e = json.loads((inputs / "entropy" / "entropy.json").read_text())
    t = e["thresholds"]
    assert 0 <= t["low"] <= t["high"] <= 0.18 * 7 and t["low"] <= 0.06 * 7 + 1e-9
    assert sum(sum(c["histogram"]) for c in e["by_category"].values()) == e["tokens"]
    assert e["separation"]["ratio"] > 0 and 0 <= e["classifier"]["cv_gear_agreement"] <= 1
    assert sum(e["forecast_occupancy"].values()) == pytest.approx(1.0)
    calibrate.build(CPARAMS, inputs / "hidden", inputs / "model", inputs / "corpus", tmp_path / "again")
    assert (tmp_path / "again" / "entropy.json").read_bytes() == (inputs / "entropy" / "entropy.json").read_bytes()
    with pytest.raises(UserError, match="calibrate_entropy.hard: category 'math'"):
        calibrate.build({**CPARAMS, "hard": ["math"]}, inputs / "hidden", inputs / "model", inputs / "corpus",
                        tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_classifier_picks_the_first_gear_from_the_prompt(inputs):
    p = techniques.make_policy(["gears"], [inputs / "quantized", inputs / "entropy"], _Cfg())
    c = json.loads((inputs / "entropy" / "entropy.json").read_text())["classifier"]
    assert p.gear == monitor.GEARS.index(c["majority_gear"])  # before any prompt
    p.model = {**c, "use": True}
    text = "def f(x):\n    return x + 1"
    p.begin({"category": "code", "text": text})
    assert p.gear == classifier.gear_of(classifier.predict_entropy(c, text), p.cfg.low, p.cfg.high)
    assert techniques.make_policy([{"name": "quantized", "gear": "low"}], [inputs / "quantized"], _Cfg()).plan(3).weights.depth == 4


def test_bad_artifacts_and_options_are_one_line_errors(inputs, tmp_path, lm):
    with pytest.raises(UserError, match="gear must be one of"):
        techniques.make_policy([{"name": "quantized", "gear": "top"}], [inputs / "quantized"], _Cfg())
    with pytest.raises(UserError, match="first must be"):
        techniques.make_policy([{"name": "gears", "first": "fast"}], [inputs / "quantized", inputs / "entropy"], _Cfg())
    with pytest.raises(UserError, match="gears: lag must be 0 .* or 1 .*, got 2"):
        _gears(inputs, _Cfg(), 2)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt packed weights"):
        lm.logits(IDS, StepPlan(weights=WeightSet("broken", str(bad), 4)))
    states = quant.load_file(inputs / "quantized" / "gears.safetensors")
    quant.save_file({"layers.0.wo": states["layers.0.wqkv"]}, tmp_path / "wrong.safetensors")
    with pytest.raises(UserError, match="layers.0.wo is"):
        lm.logits(IDS, StepPlan(weights=WeightSet("wrong", str(tmp_path / "wrong.safetensors"), 4)))
    assert "wrong" not in lm.weight_sets and "broken" not in lm.weight_sets
