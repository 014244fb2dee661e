"""The gears' apply layer (both backends, through StepPlan.weights): a step reads the full weights (high),
the 8-bit ones (mid) or the 4-bit ones (low); the decoder loads a packed set once and keeps it resident.

`gears` (seed 002): the prompt classifier picks the first gear (prefill included; the calib's most common gear
where the classifier did not beat that choice in cross-validation); after each step the
entropy of its next-token distribution feeds the monitor (rolling mean, hysteresis, minimum duration,
catastrophic fallback), whose gear the next step reads. The minimum duration is also the seed's answer to
the KV cache mixing precisions: entries written under one gear are read by steps of another, and holding a
gear for a few steps keeps runs of same-precision entries. Rows of a batch have their own monitors; the
step reads the highest gear any row asks for (one weight set per forward). `lag: 1` applies each decision one
step later (step s reads the gear decided after step s - 2): the plan of step s then never waits for step s - 1,
so on CUDA generation queues step s before it reads step s - 1 back (generation.stream), hiding the host's
per-token entropy read, policy and launches behind the device's step, at the cost of gears that react a token
later. The same decisions come out on every backend, running ahead or not.
`quantized`: one gear for every step (the static int8 / int4 controls).
"""

from __future__ import annotations

from pathlib import Path

from ... import manifest
from ...errors import UserError
from ...plan import FULL_WEIGHTS, StepPlan, WeightSet
from . import classifier, monitor


def weight_sets(folder: Path) -> dict[int, str | WeightSet]:
    """{gear: what StepPlan.weights names} from a quantize artifact."""
    q = manifest.read_json(folder, "quantize", "quantize.json")
    sets: dict[int, str | WeightSet] = {monitor.HIGH: FULL_WEIGHTS}
    for gear in (monitor.LOW, monitor.MID):
        g = q["gears"][monitor.GEARS[gear]]
        path = folder / g["file"]
        if not path.is_file():
            raise UserError(f"corrupt artifact {folder}: missing {g['file']}")
        sets[gear] = WeightSet(monitor.GEARS[gear], str(path), g["depth"])
    return sets


class GearsPolicy:
    static = False  # the plan changes with the monitor: teacher-forced quality follows it token by token

    def __init__(self, sets: dict, cfg: monitor.MonitorConfig, model: dict | None, first: int, lag: int = 0):
        self.sets, self.cfg, self.model, self.first, self.lag = sets, cfg, model, first, lag
        self.plans_ahead = lag >= 1  # plan(s) never needs step s - 1 observed (generation.runs_ahead)
        self.states: list[monitor.MonitorState] | None = None
        self.decided: list[int] = []  # the decision after each observed step (the prefill is step 0)
        self.shifts = 0
        self.fetched: list = []  # (logits, read) of queued steps whose entropies are on their way (step_queued)

    def begin(self, meta: dict) -> None:
        """The prompt classifier, from the prompt's text (the benchmark passes it before each prompt)."""
        if self.model is not None and self.model["use"] and meta.get("text"):
            e = classifier.predict_entropy(self.model, meta["text"])
            self.first = classifier.gear_of(e, self.cfg.low, self.cfg.high)

    @property
    def gear(self) -> int:
        """The monitor's latest decision (before any step: the first gear)."""
        return self.decided[-1] if self.decided else self.first

    def plan(self, step: int) -> StepPlan:
        i = step - 1 - self.lag  # the observed step whose decision this step follows
        return StepPlan(weights=self.sets[self.decided[i] if i >= 0 else self.first])

    def step_queued(self, logits, lm) -> None:
        """generation.stream, right after it queued a step: on CUDA the step's entropies are reduced where its
        logits are and copied to the host before the next step is queued, so observe never waits behind it."""
        if getattr(logits, "is_cuda", False):
            self.fetched.append((logits, lm.fetch(monitor.entropy_bits_device(logits))))

    def observe(self, executed, logits) -> None:
        while self.fetched and self.fetched[0][0] is not logits:  # a generation left before its last step
            self.fetched.pop(0)
        h = (self.fetched.pop(0)[1]() if self.fetched else monitor.entropy_bits(logits)).reshape(-1)
        if self.states is None:
            self.states = [monitor.start(self.cfg, self.gear) for _ in h]
        self.states = [monitor.update(self.cfg, s, float(v)) for s, v in zip(self.states, h, strict=True)]
        gear = max(s.gear for s in self.states)
        self.shifts += gear != self.gear
        self.decided.append(gear)


def gears_policy(artifacts: dict[str, Path], cfg, options: dict) -> GearsPolicy:
    e = manifest.read_json(artifacts["entropy"], "calibrate_entropy", "entropy.json")
    if e["vocab_size"] != cfg.vocab_size:
        raise UserError(f"entropy calibration {artifacts['entropy']} is for vocab {e['vocab_size']}, "
                        f"model has {cfg.vocab_size}")
    first, lag = options["first"], options["lag"]
    if first not in ("classifier", *monitor.GEARS):
        raise UserError(f"gears: first must be 'classifier' or one of {', '.join(monitor.GEARS)}, got {first!r}")
    if lag not in (0, 1) or isinstance(lag, bool):
        raise UserError(f"gears: lag must be 0 (each step follows the step before) or 1 (one step later), got {lag!r}")
    mcfg = monitor.MonitorConfig(low=e["thresholds"]["low"], high=e["thresholds"]["high"], vocab_size=cfg.vocab_size,
                                 window=options["window"], hysteresis=options["hysteresis"],
                                 min_duration=options["min_duration"])
    model = e["classifier"] if first == "classifier" else None
    start = (monitor.GEARS.index(model["majority_gear"]) if model is not None else monitor.GEARS.index(first))
    return GearsPolicy(weight_sets(artifacts["quantized"]), mcfg, model, start, lag)


def static_policy(artifacts: dict[str, Path], cfg, options: dict):
    from ...plan import StaticPolicy

    if options["gear"] not in monitor.GEARS:
        raise UserError(f"quantized: gear must be one of {', '.join(monitor.GEARS)}, got {options['gear']!r}")
    return StaticPolicy(StepPlan(weights=weight_sets(artifacts["quantized"])[monitor.GEARS.index(options["gear"])]))
