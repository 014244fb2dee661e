"""Configurations as data: a configuration names techniques; each technique turns its artifact into a policy.

A technique registers `name -> factory(artifact_dir, cfg) -> policy`; policies expose plan(step) and
observe(logits) (see plan.StaticPolicy). Composition folds the plans of every technique in order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .errors import UserError
from .model_config import ModelConfig
from .plan import StaticPolicy, StepPlan

Factory = Callable[[Path | None, ModelConfig], object]
REGISTRY: dict[str, tuple[str | None, Factory]] = {}  # name -> (artifact stage it reads, factory)


def register(name: str, stage: str | None):
    def deco(factory: Factory) -> Factory:
        REGISTRY[name] = (stage, factory)
        return factory

    return deco


class ComposedPolicy:
    """Union of the plans of several policies; every policy observes every step."""

    def __init__(self, policies: list):
        self.policies = policies

    def plan(self, step: int) -> StepPlan:
        plans = [p.plan(step) for p in self.policies]
        return StepPlan(skip_layers=frozenset().union(*(p.skip_layers for p in plans)),
                        zero_mlp=frozenset().union(*(p.zero_mlp for p in plans)))

    def observe(self, logits) -> None:
        for p in self.policies:
            p.observe(logits)


def check(configs: dict[str, dict]) -> None:
    """Fail before any work if a configuration names an unknown technique."""
    for name, spec in configs.items():
        for t in spec["techniques"]:
            if t not in REGISTRY:
                known = ", ".join(sorted(REGISTRY)) or "none yet"
                raise UserError(f"benchmark.configs.{name}: unknown technique {t!r} (known: {known})")


def artifact_for(stage: str | None, artifacts: list[Path]) -> Path | None:
    if stage is None:
        return None
    from . import manifest

    for a in artifacts:
        if manifest.read(a).get("stage") == stage:
            return a
    raise UserError(f"no artifact of stage {stage!r} among --artifacts")


def make_policy(techniques: list[str], artifacts: list[Path], cfg: ModelConfig):
    """The policy of a configuration; an empty list is the baseline."""
    policies = []
    for t in techniques:
        stage, factory = REGISTRY[t]
        policies.append(factory(artifact_for(stage, artifacts), cfg))
    if not policies:
        return StaticPolicy()
    return policies[0] if len(policies) == 1 else ComposedPolicy(policies)
