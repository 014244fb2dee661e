import numpy as np
import pytest

from adaptive_inference.bench.stats import paired_speedup


def test_paired_speedup_cancels_shared_drift():
    """A machine that slows down 40% over the run: each pair shares the slowdown, so the paired median
    finds the true 1.10x with a tight interval, where separate medians of the two series would not."""
    rng = np.random.default_rng(0)
    drift = np.linspace(1.0, 1.4, 40) * (1 + 0.01 * rng.standard_normal(40))
    base = 0.040 * drift
    config = 0.040 / 1.10 * drift * (1 + 0.01 * rng.standard_normal(40))
    s = paired_speedup(base.tolist(), config.tolist())
    assert s["median"] == pytest.approx(1.10, abs=0.01) and s["pairs"] == 40
    lo, hi = s["ci95"]
    assert lo <= s["median"] <= hi and hi - lo < 0.02


def test_paired_speedup_interval_widens_with_noise():
    rng = np.random.default_rng(1)
    base = np.full(20, 0.04)
    quiet = paired_speedup(base, base / 1.05 * (1 + 0.005 * rng.standard_normal(20)))
    noisy = paired_speedup(base, base / 1.05 * (1 + 0.05 * rng.standard_normal(20)))
    width = lambda s: s["ci95"][1] - s["ci95"][0]  # noqa: E731
    assert width(noisy) > 3 * width(quiet)
