"""What a decoder runs for one step, as data: techniques are policies that return plans, and the decoder
(decoder.py, written once for every backend) interprets them and reports what it actually executed.

A plan can say what every seed needs:
  skip_layers  whole blocks bypassed (no KV written: later steps mask the hole)           seeds 001, 003
  zero_mlp     blocks whose MLP returns zeros (weights not read)                          seed 000
  blend        (layer, alpha): the block runs, its output is x + alpha * (block(x) - x)   seed 001 (soft)
  weights      the weight set the step reads: "full", or a packed WeightSet (precision gears) seed 002
  gate         a decision taken inside the forward, after layer `gate.after_layer`        seeds 001, 003
  head         a head that may answer over candidate ids only (common-id head)            seed 000
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

FULL_WEIGHTS = "full"


@dataclass(frozen=True)
class WeightSet:
    """Packed weights a step reads instead of the full ones: `path` is a safetensors file of quant.py states
    (names 'layers.{i}.{field}', 'lm_head'; matrices it lacks stay full), read at `depth` bits where a
    format stores several (nested). The decoder loads it once and keeps it resident under `name`."""

    name: str
    path: str
    depth: int | None = None


def weights_name(weights: str | WeightSet) -> str:
    return weights if isinstance(weights, str) else weights.name


class Gate(Protocol):
    """Runs inside the forward once the residual after layer `after_layer` is known."""

    after_layer: int
    # optional attribute writes_kv (default False): a row that skips a layer still writes its K/V there
    # (projection only, Decoder.write_kv); False leaves a masked hole in that layer's cache
    # optional, for a decision on the device (Decoder.device_gate_ok): keep_device(x, lm) -> a backend bool
    # array [B, T, L - after_layer - 1] (the later layers each row runs), and decision(keep) -> the
    # GateDecision those decisions, read back as numpy, amount to; both must agree with decide

    def decide(self, x, lm) -> GateDecision:
        """x: the residual entering layer after_layer + 1, backend array [B, T, hidden]."""


@dataclass(frozen=True)
class GateDecision:
    """keep [B, T, L] bool: which (row, position) runs which layer (layers <= after_layer must be True);
    blend: (layer, alpha) pairs for the later layers (soft skip); info: what the decision was (logged and
    shown to the policy)."""

    keep: np.ndarray
    blend: tuple[tuple[int, float], ...] = ()
    info: dict = field(default_factory=dict)


class Head(Protocol):
    """Replaces the LM head: the full-vocab log-distribution, and optionally a narrower set of logits that
    suffices to pick the next token (decode then never reads the full spread)."""

    def apply(self, h, lm) -> HeadOutput: ...


@dataclass
class HeadOutput:
    """logits: the full-vocab log-distribution [..., vocab] (teacher-forced quality; may stay lazy on MLX);
    pick: what decode picks the next token from (None = logits), with pick_ids mapping its columns back to
    vocab ids (None = they are vocab ids); pick_alt (rows, logits, ids): rows [...] (a backend bool array)
    that pick from those logits instead (ids as pick_ids); name: what ran ('full', 'common', 'mixed');
    params_read: weight elements the head read; info: per-row facts for the decision log. A head that decides
    on the device leaves those three to `settle`, a callable giving (name, params_read, info) once the step
    is evaluated (reading the decision earlier would cost a second evaluation per step)."""

    logits: Any
    name: str
    params_read: int
    pick: Any = None
    pick_ids: Any = None
    pick_alt: tuple | None = None
    info: dict = field(default_factory=dict)
    settle: Callable[[], tuple[str, int, dict]] | None = None

    def settled(self) -> HeadOutput:
        """This output with name, params_read and info known."""
        if self.settle is not None:
            self.name, self.params_read, self.info = self.settle()
            self.settle = None
        return self


@dataclass(frozen=True)
class StepPlan:
    skip_layers: frozenset[int] = frozenset()
    zero_mlp: frozenset[int] = frozenset()
    blend: tuple[tuple[int, float], ...] = ()
    weights: str | WeightSet = FULL_WEIGHTS
    gate: Gate | None = None
    head: Head | None = None

    @property
    def is_full(self) -> bool:
        return self == FULL


FULL = StepPlan()


@dataclass(frozen=True)
class ExecutedStep:
    """What the decoder really ran for one step (after any gate): the input of the cost model.

    layers_run: blocks whose weights were read (any row); mlps_run: of those, MLPs that ran;
    row_layer_share: mean over (row, position) of the share of layers that ran for it;
    head / head_params: the head's name and the elements it read; tokens: B * T of the step."""

    layers_run: frozenset[int]
    mlps_run: frozenset[int]
    weights: str
    head: str
    head_params: int
    tokens: int
    row_layer_share: float = 1.0
    kv_only_layers: frozenset[int] = frozenset()  # skipped by every row but their K/V written (gate.writes_kv)
    info: dict = field(default_factory=dict)


class StaticPolicy:
    """The same plan every step (baseline, lobotomy, router). Adaptive techniques implement the same two
    calls with `static = False`, and teacher-forced evaluation then follows them token by token."""

    static = True

    def __init__(self, plan: StepPlan = FULL):
        self._plan = plan

    def plan(self, step: int) -> StepPlan:
        return self._plan

    def observe(self, executed: ExecutedStep, logits) -> None:
        """Sees what ran at each step and its last-position logits (backend array [B, vocab])."""
