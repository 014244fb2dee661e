"""Stacking techniques: the plans of several policies folded into one."""

from __future__ import annotations

from ..errors import UserError
from ..plan import FULL_WEIGHTS, StepPlan


def _one(values: list, what: str):
    values = [v for v in values if v]
    if len(values) > 1:
        raise UserError(f"a configuration may set the {what} with one technique only")
    return values[0] if values else None


def compose(plans: list[StepPlan]) -> StepPlan:
    """Union of skips and zeroed MLPs; blend, weight set, gate and head may each come from one plan."""
    return StepPlan(skip_layers=frozenset().union(*(p.skip_layers for p in plans)),
                    zero_mlp=frozenset().union(*(p.zero_mlp for p in plans)),
                    blend=_one([p.blend for p in plans], "layer blend") or (),
                    weights=_one([p.weights for p in plans if p.weights != FULL_WEIGHTS], "weight set") or FULL_WEIGHTS,
                    gate=_one([p.gate for p in plans], "in-forward gate"),
                    head=_one([p.head for p in plans], "LM head"))


class ComposedPolicy:
    """Every policy plans and observes every step; their plans are composed."""

    def __init__(self, policies: list):
        self.policies = policies
        self.static = all(getattr(p, "static", False) for p in policies)
        # plan(s) never waits for step s - 1 where no part's does (generation.runs_ahead)
        self.plans_ahead = all(getattr(p, "plans_ahead", getattr(p, "static", False)) for p in policies)

    def plan(self, step: int) -> StepPlan:
        return compose([p.plan(step) for p in self.policies])

    def step_queued(self, logits, lm) -> None:
        for p in self.policies:
            if hasattr(p, "step_queued"):
                p.step_queued(logits, lm)

    def observe(self, executed, logits) -> None:
        for p in self.policies:
            p.observe(executed, logits)
