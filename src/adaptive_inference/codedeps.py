"""The source files a stage's code reaches: its module and every module of this package it imports,
followed statically (ast). Snakemake rules and dvc.yaml list exactly these as the stage's code deps, so
editing any of them reruns the stage and nothing else (tests/test_workflow.py checks dvc.yaml against it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "adaptive_inference"
SRC = Path(__file__).resolve().parent


def _path(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for p in (SRC / rel / "__init__.py", (SRC / rel).with_suffix(".py")):
        if p.is_file():
            return p
    return None


def _imports(path: Path, module: str) -> set[str]:
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            if base.split(".")[0] != PACKAGE:
                continue
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from . import x` may name a module
    # a module imports its parent packages' __init__ too
    parts = module.split(".")
    out |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return out


def files(*modules: str) -> list[str]:
    """Sorted repo-relative paths (src/adaptive_inference/...) of the modules reachable from `modules`."""
    seen, todo, found = set(), list(modules), set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        p = _path(m)
        if p is None:
            continue
        found.add(p)
        todo += sorted(_imports(p, m))
    return sorted(f"src/{PACKAGE}/{p.relative_to(SRC).as_posix()}" for p in found)


def stage_module(call: str) -> str:
    """'.vocab_router.train:build' (relative to techniques) -> its absolute module name."""
    module = call.split(":")[0]
    return f"{PACKAGE}.techniques{module}" if module.startswith(".") else module


CORE_STAGES = {"prepare_model": "adaptive_inference.prepare_model", "build_corpus": "adaptive_inference.corpus",
               "cache_hidden": "adaptive_inference.hidden_cache", "benchmark": "adaptive_inference.bench.job",
               "benchmark_reference": "adaptive_inference.bench.job",
               "gpu_bench": "adaptive_inference.bench.cuda_techniques"}


def stage_files(stage: str) -> list[str]:
    """Code files of a stage by its manifest name (core stages and every technique stage)."""
    from . import techniques

    if stage in CORE_STAGES:
        return files(CORE_STAGES[stage])
    calls = [s.call for s in techniques.stages() if s.section == stage]
    return files(stage_module(calls[0])) if calls else []
