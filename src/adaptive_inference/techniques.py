"""Configurations as data: a configuration names techniques; each technique turns its artifact into a policy.

A technique registers `name -> factory(artifact_dir, cfg) -> policy`; policies expose plan(step) and
observe(logits) (see plan.StaticPolicy). Composition folds the plans of every technique in order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from .errors import UserError
from .model_config import ModelConfig
from .plan import StaticPolicy, StepPlan

Factory = Callable[[Path | None, ModelConfig], object]
REGISTRY: dict[str, tuple[str | None, Factory]] = {}  # name -> (artifact stage it reads, factory)
MODULES = ("lobotomy", "vocab_router")  # modules whose import registers their techniques


def _discover() -> None:
    for m in MODULES:
        importlib.import_module(f".{m}", __package__)


def register(name: str, stage: str | None):
    def deco(factory: Factory) -> Factory:
        REGISTRY[name] = (stage, factory)
        return factory

    return deco


class ComposedPolicy:
    """Union of the plans of several policies; every policy observes every step."""

    def __init__(self, policies: list):
        self.policies = policies
        self.static = all(getattr(p, "static", False) for p in policies)

    def plan(self, step: int) -> StepPlan:
        plans = [p.plan(step) for p in self.policies]
        heads = [p.head for p in plans if p.head is not None]
        if len(heads) > 1:
            raise UserError("a configuration may gate the LM head with one technique only")
        return StepPlan(skip_layers=frozenset().union(*(p.skip_layers for p in plans)),
                        zero_mlp=frozenset().union(*(p.zero_mlp for p in plans)),
                        head=heads[0] if heads else None)

    def observe(self, logits) -> None:
        for p in self.policies:
            p.observe(logits)


def check(configs: dict[str, dict]) -> None:
    """Fail before any work if a configuration names an unknown technique."""
    _discover()
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
    _discover()
    policies = []
    for t in techniques:
        stage, factory = REGISTRY[t]
        policies.append(factory(artifact_for(stage, artifacts), cfg))
    if not policies:
        return StaticPolicy()
    return policies[0] if len(policies) == 1 else ComposedPolicy(policies)
