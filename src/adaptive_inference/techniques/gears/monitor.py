"""Seed 002's EntropyMonitor as pure functions over a frozen state, and its threshold calibration.

Each decode step: the entropy (bits) of the step's next-token distribution -> a rolling mean over `window`
steps -> a gear for the next step: LOW (int4) when the mean is at or below `low`, HIGH (full precision) at
or above `high`, MID (int8) between. Around each threshold a `hysteresis` band (bits) must be crossed before
the gear moves, and a gear is held at least `min_duration` steps (the seed's answer to the KV cache mixing
precisions). Until the window fills, the first gear (the prompt classifier's pick) stays.
Catastrophic fallback: raw entropy above `catastrophic_frac` * log2(V) for `catastrophic_run` consecutive
steps forces at least MID at once, ignoring the minimum duration. The seed ties it to "model failures from
bad quantization", which only a quantized gear causes, so it lifts LOW to MID and leaves HIGH alone.
Numpy only: both backends hand their logits here, so they take the same decisions on the same logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ...errors import UserError

LOW, MID, HIGH = 0, 1, 2
GEARS = ("low", "mid", "high")
REFERENCE_VOCAB = 32768  # the seed's thresholds are stated for this vocabulary size


def entropy_bits(logits) -> np.ndarray:
    """Shannon entropy in bits of softmax(logits) over the last axis ([..., V] -> [...]), on the host.

    exp in float32 (3x faster than float64 on a 49k vocab; ~1e-7 bits off), sums in float64. Logits on an
    accelerator (a torch tensor on CUDA) are reduced where they are, in float32, and only the entropies
    come back: one value per row instead of the vocab.
    """
    if getattr(logits, "is_cuda", False):
        return entropy_bits_device(logits).cpu().numpy()
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=-1, dtype=np.float64)
    # H = log s - sum(p z), with p = e / s (nats), then to bits
    return (np.log(s) - np.einsum("...i,...i->...", e, z, dtype=np.float64) / s) / math.log(2)


def entropy_bits_device(logits):
    """entropy_bits of torch logits, left where they are (float32 on the logits' device)."""
    lp = logits.float().log_softmax(-1)
    return -(lp.exp() * lp).sum(-1) / math.log(2)


def scale_to_vocab(bits: float, vocab_size: int) -> float:
    """A threshold stated for the seed's reference vocab (32768) scaled to this vocab: x log2(V)/log2(32768)."""
    return bits * math.log2(vocab_size) / math.log2(REFERENCE_VOCAB)


@dataclass(frozen=True)
class MonitorConfig:
    low: float  # bits, already in this model's scale
    high: float
    vocab_size: int
    window: int = 4
    hysteresis: float = 0.1  # bits beyond a threshold before the gear moves
    min_duration: int = 4  # steps a gear is held before the next shift
    catastrophic_frac: float = 0.9
    catastrophic_run: int = 2

    def __post_init__(self):
        if not 0 <= self.low <= self.high:
            raise UserError(f"entropy monitor: need 0 <= low <= high, got low={self.low} high={self.high}")
        if self.vocab_size < 2 or self.window < 1 or self.min_duration < 1 or self.catastrophic_run < 1:
            raise UserError("entropy monitor: vocab_size >= 2, window >= 1, min_duration >= 1 and "
                            "catastrophic_run >= 1 are required")
        if self.hysteresis < 0 or not 0 < self.catastrophic_frac <= 1:
            raise UserError("entropy monitor: hysteresis >= 0 and 0 < catastrophic_frac <= 1 are required")

    @property
    def catastrophic_bits(self) -> float:
        return self.catastrophic_frac * math.log2(self.vocab_size)


@dataclass(frozen=True)
class MonitorState:
    gear: int
    recent: tuple[float, ...] = ()  # last `window` entropies (bits)
    held: int = 0  # steps since the last shift (or since the start)
    hot_run: int = 0  # consecutive steps above the catastrophic level
    fallback: bool = False  # the last update was a catastrophic fallback


def start(cfg: MonitorConfig, gear: int = MID) -> MonitorState:
    """State before the first step; gear is the prompt classifier's pick."""
    if gear not in (LOW, MID, HIGH):
        raise UserError(f"entropy monitor: gear must be one of 0, 1, 2 ({', '.join(GEARS)}), got {gear}")
    return MonitorState(gear=gear)


def target_gear(cfg: MonitorConfig, current: int, mean: float) -> int:
    """The gear the rolling mean asks for; a threshold next to `current` must be passed by `hysteresis`."""
    upper = {LOW: cfg.low, MID: cfg.high}  # gear g is left upward when mean > upper[g] + hysteresis
    lower = {MID: cfg.low, HIGH: cfg.high}  # and downward when mean < lower[g] - hysteresis
    gear = current
    while gear in upper and mean > upper[gear] + cfg.hysteresis:
        gear += 1
    if gear == current:
        while gear in lower and mean < lower[gear] - cfg.hysteresis:
            gear -= 1
    return gear


def update(cfg: MonitorConfig, state: MonitorState, entropy: float) -> MonitorState:
    """State after observing one step's entropy (bits); `.gear` is the gear for the next step."""
    recent = (*state.recent, float(entropy))[-cfg.window:]
    hot_run = state.hot_run + 1 if entropy > cfg.catastrophic_bits else 0
    held = state.held + 1
    if hot_run >= cfg.catastrophic_run and state.gear < MID:
        return MonitorState(gear=MID, recent=recent, held=0, hot_run=hot_run, fallback=True)
    gear = state.gear
    if len(recent) == cfg.window and held >= cfg.min_duration:
        gear = target_gear(cfg, state.gear, float(np.mean(recent)))
    if gear != state.gear:
        held = 0
    return replace(state, gear=gear, recent=recent, held=held, hot_run=hot_run, fallback=False)


def run(cfg: MonitorConfig, entropies, gear: int = MID) -> np.ndarray:
    """Gears a trace would run: out[0] is the first gear, out[t + 1] the gear after observing entropies[t]."""
    state = start(cfg, gear)
    out = [state.gear]
    for h in np.asarray(entropies, dtype=np.float64):
        state = update(cfg, state, float(h))
        out.append(state.gear)
    return np.asarray(out, dtype=np.int8)


@dataclass(frozen=True)
class Calibration:
    low: float
    high: float
    low_percentile_value: float  # before the cap
    high_percentile_value: float
    low_cap: float
    high_cap: float
    low_capped: bool
    high_capped: bool

    def as_dict(self) -> dict:
        return {k: (bool(v) if isinstance(v, bool | np.bool_) else float(v)) for k, v in self.__dict__.items()}


def calibrate(entropies, vocab_size: int, *, low_percentile: float = 40, high_percentile: float = 60,
              low_cap_frac: float = 0.06, high_cap_frac: float = 0.18) -> Calibration:
    """Seed rule: thresholds at percentiles of the observed entropies, capped at low_cap_frac / high_cap_frac
    of log2(V) (the seed's caps against thresholds inflated by a noisy calibration set)."""
    h = np.asarray(entropies, dtype=np.float64).ravel()
    if h.size == 0 or not np.isfinite(h).all():
        raise UserError("calibrate entropy: need a non-empty set of finite entropies")
    if not 0 <= low_percentile <= high_percentile <= 100:
        raise UserError(f"calibrate entropy: need 0 <= low_percentile <= high_percentile <= 100, got "
                        f"{low_percentile}, {high_percentile}")
    lo_p, hi_p = (float(v) for v in np.percentile(h, [low_percentile, high_percentile]))
    bits = math.log2(vocab_size)
    lo_cap, hi_cap = low_cap_frac * bits, high_cap_frac * bits
    return Calibration(low=min(lo_p, lo_cap), high=min(hi_p, hi_cap), low_percentile_value=lo_p,
                       high_percentile_value=hi_p, low_cap=lo_cap, high_cap=hi_cap,
                       low_capped=lo_p > lo_cap, high_capped=hi_p > hi_cap)
