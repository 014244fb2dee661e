"""Summaries of timings: spreads and paired speedups with bootstrap intervals."""

from __future__ import annotations

import statistics

import numpy as np

MIN_SAVING = 0.01  # a structural bound below 1 + this leaves nothing measurable to realize


def realized_share(speedup: float | None, bound: float | None) -> float | None:
    """(speedup - 1) / (bound - 1): the part of the structural saving that showed up; None where the bound saves
    under MIN_SAVING, whose ratio is noise over a near-zero denominator (a token gate at batch 8 that skipped
    almost nothing: 0.970 against a bound of 1.004 read as -8.3)."""
    if speedup is None or bound is None or bound < 1 + MIN_SAVING:
        return None
    return (speedup - 1) / (bound - 1)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": [round(v, 4) for v in values]}


def paired_speedup(base_s: list[float], config_s: list[float], *, resamples: int = 2000) -> dict:
    """Speedup from paired timings (seconds per token of the same prompt, measured side by side): the median
    of base/config over pairs, with a 95% bootstrap interval of that median. Pairing cancels the drift of a
    shared machine that separate medians of two configurations would absorb."""
    r = np.asarray(base_s) / np.asarray(config_s)
    boot = np.median(np.random.default_rng(0).choice(r, (resamples, r.size)), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median": float(np.median(r)), "ci95": [float(lo), float(hi)], "pairs": int(r.size)}
