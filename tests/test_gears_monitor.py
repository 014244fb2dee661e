import math

import numpy as np
import pytest

from adaptive_inference.errors import UserError
from adaptive_inference.techniques.gears import monitor as em
from adaptive_inference.techniques.gears.monitor import HIGH, LOW, MID

V = 1024  # log2 V = 10 bits; catastrophic above 9 bits


def uniform_over(k: int, vocab: int = V) -> np.ndarray:
    """Logits whose softmax is uniform over the first k ids: entropy exactly log2 k bits."""
    z = np.full(vocab, -1e9)
    z[:k] = 0.0
    return z


def cfg(**kw):
    base = dict(low=1.0, high=3.0, vocab_size=V, window=1, hysteresis=0.0, min_duration=1)
    return em.MonitorConfig(**{**base, **kw})


def shifts(gears) -> list[int]:
    """Indices where the gear changes."""
    return [i for i in range(1, len(gears)) if gears[i] != gears[i - 1]]


def test_entropy_bits_known_distributions():
    assert em.entropy_bits(uniform_over(V)) == pytest.approx(10.0)
    assert em.entropy_bits(uniform_over(2)) == pytest.approx(1.0)
    assert em.entropy_bits(uniform_over(1)) == pytest.approx(0.0, abs=1e-12)
    p = np.array([0.5, 0.25, 0.125, 0.125])
    assert em.entropy_bits(np.log(p) + 7.0) == pytest.approx(1.75)  # shift-invariant
    batch = np.stack([uniform_over(4), uniform_over(8), uniform_over(16)])
    np.testing.assert_allclose(em.entropy_bits(batch), [2.0, 3.0, 4.0])
    assert np.isfinite(em.entropy_bits(np.array([1e4, -1e4, 0.0])))  # no overflow on large logits


def test_scale_to_vocab():
    assert em.scale_to_vocab(1.8, 32768) == pytest.approx(1.8)
    assert em.scale_to_vocab(1.5, 65536) == pytest.approx(1.6)
    assert em.scale_to_vocab(3.5, 49152) == pytest.approx(3.5 * math.log2(49152) / 15)


def test_gears_follow_synthetic_logits():
    ks = [1, 1, 4, 4, 16, 16, 16, 2, 1]  # entropies 0,0,2,2,4,4,4,1,0 bits
    h = em.entropy_bits(np.stack([uniform_over(k) for k in ks]))
    gears = em.run(cfg(), h, gear=MID)
    assert list(gears) == [MID, LOW, LOW, MID, MID, HIGH, HIGH, HIGH, MID, LOW]  # 1 bit == low: not below it


def test_rolling_mean_not_last_value():
    # window 3: a single 6-bit spike among zeros averages to 2 bits -> MID, never HIGH
    gears = em.run(cfg(window=3), [0, 0, 0, 6, 0, 0, 0], gear=LOW)
    assert HIGH not in gears and MID in gears
    assert list(gears[:3]) == [LOW, LOW, LOW]  # window not full yet: the first gear stays


def test_first_gear_kept_until_window_fills():
    gears = em.run(cfg(window=5), [8.0] * 4 + [0.0] * 2, gear=LOW)
    assert list(gears[:5]) == [LOW] * 5  # four 8-bit steps: window of 5 not yet full


def test_hysteresis_blocks_oscillation_near_threshold():
    trace = [3.05, 2.95] * 10  # jitters +-0.05 bits around high = 3.0
    assert len(shifts(em.run(cfg(hysteresis=0.0), trace, gear=MID))) == 20
    assert len(shifts(em.run(cfg(hysteresis=0.1), trace, gear=MID))) == 0
    # a real move past the band still shifts, both ways
    assert list(em.run(cfg(hysteresis=0.1), [3.2, 2.85], gear=MID)) == [MID, HIGH, MID]
    assert list(em.run(cfg(hysteresis=0.1), [3.2, 2.95], gear=MID)) == [MID, HIGH, HIGH]


def test_hysteresis_jump_across_two_gears():
    assert list(em.run(cfg(hysteresis=0.1), [5.0, 0.0], gear=LOW)) == [LOW, HIGH, LOW]


def test_min_duration_holds_each_gear():
    rng = np.random.default_rng(0)
    trace = rng.choice([0.0, 2.0, 5.0], size=200)  # asks for a new gear nearly every step
    for d in (1, 4, 7):
        gears = em.run(cfg(min_duration=d), trace, gear=MID)
        s = [0, *shifts(gears)]
        assert min(np.diff(s)) >= d  # every gear (the first included) ran at least d steps
        if d == 1:
            assert len(s) > 100
    gears = em.run(cfg(min_duration=4), [0.0] * 5 + [5.0] * 5, gear=MID)
    assert list(gears) == [MID] * 4 + [LOW] * 4 + [HIGH] * 3


def test_catastrophic_fallback_low_to_mid_after_two_steps():
    c = cfg(min_duration=50, window=4)
    hot = 9.5  # > 0.9 * log2(1024)
    gears = em.run(c, [0.0, hot, hot, hot], gear=LOW)
    assert list(gears) == [LOW, LOW, LOW, MID, MID]  # second hot step, despite min_duration 50
    assert list(em.run(c, [hot, 0.0, hot, 0.0, hot], gear=LOW)) == [LOW] * 6  # never two in a row
    assert list(em.run(c, [hot, 8.9], gear=LOW)) == [LOW] * 3  # 8.9 bits is below 90% of 10
    s = em.update(c, em.update(c, em.start(c, LOW), hot), hot)
    assert s.fallback and s.gear == MID and s.held == 0


def test_catastrophic_fallback_leaves_high_alone():
    gears = em.run(cfg(min_duration=50), [9.9, 9.9, 9.9], gear=HIGH)
    assert list(gears) == [HIGH] * 4


def test_fallback_then_min_duration_from_the_fallback():
    c = cfg(min_duration=3, window=1)
    gears = em.run(c, [9.5, 9.5, 0.0, 0.0, 0.0, 0.0], gear=LOW)
    assert list(gears) == [LOW, LOW, MID, MID, MID, LOW, LOW]


def test_state_is_frozen_and_update_pure():
    c = cfg()
    s0 = em.start(c, MID)
    s1 = em.update(c, s0, 0.0)
    assert s0 == em.MonitorState(gear=MID) and s1.gear == LOW
    with pytest.raises(AttributeError):
        s1.gear = HIGH


def test_calibrate_percentiles_and_caps():
    h = np.linspace(0.0, 10.0, 101)  # p40 = 4, p60 = 6
    big = em.calibrate(h, vocab_size=2**20)  # caps 1.2 / 3.6 bits
    assert big.low_percentile_value == pytest.approx(4.0) and big.high_percentile_value == pytest.approx(6.0)
    assert big.low == pytest.approx(0.06 * 20) and big.high == pytest.approx(0.18 * 20)
    assert big.low_capped and big.high_capped
    small = em.calibrate(h / 10, vocab_size=2**20)  # p40 = 0.4, p60 = 0.6: under both caps
    assert (small.low, small.high) == pytest.approx((0.4, 0.6))
    assert not small.low_capped and not small.high_capped
    mixed = em.calibrate(h / 5, vocab_size=2**20)  # 0.8 (< 1.2), 1.2 (< 3.6)
    assert not mixed.low_capped and mixed.as_dict()["high"] == pytest.approx(1.2)
    one = em.calibrate(h, vocab_size=2**20, low_percentile=10, high_percentile=90)
    assert one.low_percentile_value == pytest.approx(1.0)


@pytest.mark.parametrize("kw", [dict(low=2.0, high=1.0), dict(window=0), dict(min_duration=0),
                                dict(hysteresis=-0.1), dict(catastrophic_frac=1.5), dict(vocab_size=1)])
def test_bad_config_is_refused(kw):
    with pytest.raises(UserError):
        cfg(**kw)


def test_bad_calibration_input_is_refused():
    with pytest.raises(UserError):
        em.calibrate([], vocab_size=V)
    with pytest.raises(UserError):
        em.calibrate([1.0, np.nan], vocab_size=V)
    with pytest.raises(UserError):
        em.calibrate([1.0], vocab_size=V, low_percentile=70, high_percentile=60)
    with pytest.raises(UserError):
        em.start(cfg(), gear=3)


def test_torch_and_mlx_logits_give_the_same_gears():
    import torch

    from adaptive_inference.blas import import_mlx

    mx = import_mlx()
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((40, V)) * rng.uniform(0.1, 8.0, size=(40, 1))).astype(np.float32)
    h_torch = em.entropy_bits(torch.from_numpy(logits).numpy())
    h_mlx = em.entropy_bits(np.array(mx.array(logits)))
    np.testing.assert_array_equal(h_torch, h_mlx)
    c = cfg(low=2.0, high=6.0, window=3, hysteresis=0.2, min_duration=2)
    gears = em.run(c, h_torch, gear=MID)
    np.testing.assert_array_equal(gears, em.run(c, h_mlx, gear=MID))
    assert len(set(gears.tolist())) > 1  # the trace really moves between gears
