"""Technique registry: each subpackage is one technique (its stages, its policy, its report summary).

A subpackage's __init__ stays light (no torch / MLX at import: the Snakefile and the CLI read it) and
exposes:
  TECHNIQUES  list[Technique]: names a configuration can use, the artifact folders they read, the policy
  STAGES      list[Stage]: its pipeline stages, each one CLI subcommand
  SUMMARIES   {stage: "module:function"}: report blocks for an artifact of that stage
Adding a technique = its subpackage, its params section + schema, its Snakemake rule and its dvc stage.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class Technique:
    """name: used in benchmark.configs; artifacts: folder name under artifacts/ -> stage that writes it;
    policy: "module:function" called as f(artifacts: dict[folder, Path], cfg, options) -> policy;
    options: option -> default (a spec may set them: {name: ..., option: value})."""

    name: str
    artifacts: dict[str, str]
    policy: str
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One CLI subcommand and pipeline stage: `call` ("module:function") is called as
    f(params[section], *input folders, out folder); inputs: CLI argument -> folder under artifacts/ that
    the pipeline passes; out: its folder under artifacts/."""

    name: str
    section: str
    call: str
    help: str
    out: str
    inputs: dict[str, str] = field(default_factory=dict)


def _subpackages() -> list:
    return [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__) if m.ispkg]


def registry() -> dict[str, Technique]:
    return {t.name: t for pkg in _subpackages() for t in getattr(pkg, "TECHNIQUES", [])}


def stages() -> list[Stage]:
    return [s for pkg in _subpackages() for s in getattr(pkg, "STAGES", [])]


def resolve(call: str) -> Callable:
    module, fn = call.split(":")
    return getattr(importlib.import_module(module, __name__), fn)


def spec_name(spec) -> str:
    return spec if isinstance(spec, str) else spec.get("name", "")


def spec_options(spec, technique: Technique) -> dict:
    given = {} if isinstance(spec, str) else {k: v for k, v in spec.items() if k != "name"}
    unknown = sorted(set(given) - set(technique.options))
    if unknown:
        raise UserError(f"technique {technique.name!r} has no option {unknown[0]!r} "
                        f"(options: {', '.join(technique.options) or 'none'})")
    return {**technique.options, **given}


def _lookup(spec, where: str) -> Technique:
    reg = registry()
    t = reg.get(spec_name(spec))
    if t is None:
        known = ", ".join(sorted(reg)) or "none yet"
        raise UserError(f"{where}: unknown technique {spec_name(spec)!r} (known: {known})")
    return t


def check(configs: dict[str, dict]) -> None:
    """Fail before any work if a configuration names an unknown technique or option."""
    for name, spec in configs.items():
        for s in spec["techniques"]:
            spec_options(s, _lookup(s, f"benchmark.configs.{name}"))


def artifact_folders(specs: list) -> list[str]:
    """Folders under artifacts/ that a configuration's techniques read, in order, without repeats."""
    return list(dict.fromkeys(f for s in specs for f in _lookup(s, "configuration").artifacts))


def _find(folder: str, stage: str, dirs: list[Path]) -> Path:
    from .. import manifest

    named = [d for d in dirs if d.name == folder]
    if named:
        return named[0]
    staged = [d for d in dirs if (d / manifest.MANIFEST).is_file() and manifest.read(d).get("stage") == stage]
    if len(staged) == 1:
        return staged[0]
    raise UserError(f"no artifact folder {folder!r} (stage {stage}) among {[str(d) for d in dirs] or 'none'}")


def make_policy(specs: list, artifact_dirs: list[Path], cfg):
    """The policy of a configuration; an empty list is the baseline."""
    from ..plan import StaticPolicy
    from .compose import ComposedPolicy

    policies = []
    for s in specs:
        t = _lookup(s, "configuration")
        found = {folder: _find(folder, stage, [Path(d) for d in artifact_dirs]) for folder, stage in t.artifacts.items()}
        policies.append(resolve(t.policy)(found, cfg, spec_options(s, t)))
    if not policies:
        return StaticPolicy()
    return policies[0] if len(policies) == 1 else ComposedPolicy(policies)


def summaries(artifact_dir: Path) -> list[tuple]:
    """Report blocks for one technique artifact, by its manifest's stage; [] if that stage has none."""
    from .. import manifest

    stage = manifest.verify(artifact_dir).get("stage")
    for pkg in _subpackages():
        call = getattr(pkg, "SUMMARIES", {}).get(stage)
        if call:
            return resolve(call)(Path(artifact_dir))
    return []
