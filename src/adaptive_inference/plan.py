"""What a backend runs for one forward step: data, not code, so every technique is a policy over it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    """Which parts of the decoder to run for one step.

    skip_layers: whole blocks bypassed (the residual passes through; their KV entries stay empty
      and later steps mask them out).
    zero_mlp: blocks whose MLP returns zeros (attention still runs); its weights are not read.
    head: None = the full LM head; else a gated head (vocab_router.GatedHead) whose router picks,
      per position, the pre-sliced common head or the full one.
    """

    skip_layers: frozenset[int] = frozenset()
    zero_mlp: frozenset[int] = frozenset()
    head: object | None = None

    @property
    def is_full(self) -> bool:
        return not self.skip_layers and not self.zero_mlp and self.head is None


FULL = StepPlan()


@dataclass(frozen=True)
class HeadDecision:
    """A gated head's choice on one decode step, kept by the backend for token selection.

    common: numpy bool [B], rows that used the common head; common_logits: backend array [B, n_common],
    log-probs of the common ids (None when no row chose it); ids: backend array of those vocab ids.
    """

    common: object
    common_logits: object | None
    ids: object


class StaticPolicy:
    """The same plan every step (baseline, lobotomy); adaptive techniques implement the same two calls
    and set `static = False`, so teacher-forced evaluation steps through them token by token."""

    static = True

    def __init__(self, plan: StepPlan = FULL):
        self._plan = plan

    def plan(self, step: int) -> StepPlan:
        return self._plan

    def observe(self, logits) -> None:
        """Called with the last-position logits of each step (backend-native array)."""
