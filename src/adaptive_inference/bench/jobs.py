"""Which benchmark jobs exist and what each depends on: shared by the Snakefile, the dvc.yaml generator
and the jobs themselves (light: no numpy, torch or MLX)."""

from __future__ import annotations

from .. import codedeps, techniques

SHARED_KEYS = ("dtype", "runtime", "quality", "decode", "batch", "gsm8k", "gpqa")  # what every job reads besides its config
REFERENCE_KEYS = ("dtype", "runtime", "quality", "decode")  # the library-reference job times decode only
JOB_MODULE = "adaptive_inference.bench.job"


def job_params(bench: dict, config: str | None) -> dict:
    """The slice of the benchmark params a job depends on (its manifest records exactly this)."""
    out = {k: bench[k] for k in (SHARED_KEYS if config is not None else REFERENCE_KEYS)}
    if config is not None:
        out["config"] = {"name": config, "techniques": bench["configs"][config]["techniques"]}
    return out


def config_backends(bench: dict, config: str) -> list[str]:
    """The backends a configuration runs on: its own `backends` list (within benchmark.backends) or all."""
    own = bench["configs"][config].get("backends")
    return [b for b in bench["backends"] if own is None or b in own]


def job_folders(bench: dict) -> list[str]:
    """Every job's output folder: artifacts/benchmark/<backend>/<config or 'reference'>."""
    out = []
    for b in bench["backends"]:
        out += [f"artifacts/benchmark/{b}/{c}" for c in bench["configs"] if b in config_backends(bench, c)]
        out += [f"artifacts/benchmark/{b}/reference"] if bench["reference"] else []
    return out


def job_artifacts(bench: dict, config: str) -> list[str]:
    """Technique artifact folders the configuration applies."""
    return [f"artifacts/{f}" for f in techniques.artifact_folders(bench["configs"][config]["techniques"])]


def job_code(bench: dict, config: str | None) -> list[str]:
    """Source files a job runs: the job driver and, for a configuration, its techniques' policies."""
    mods = [JOB_MODULE]
    if config is not None:
        reg = techniques.registry()
        mods += [codedeps.stage_module(reg[techniques.spec_name(s)].policy)
                 for s in bench["configs"][config]["techniques"]]
    return codedeps.files(*mods)


def reached_folders(bench: dict) -> set[str]:
    """Folders under artifacts/ the configured jobs need: model and corpus, the technique folders their
    configurations apply, and every folder upstream of those (through the technique stages' inputs)."""
    stages = {s.out: s for s in techniques.stages()}
    todo = [f for c in bench["configs"] for f in techniques.artifact_folders(bench["configs"][c]["techniques"])]
    reached = {"model", "corpus"}
    while todo:
        f = todo.pop()
        if f not in reached:
            reached.add(f)
            todo += stages[f].inputs.values() if f in stages else []
    return reached


def technique_folders(bench: dict) -> list[str]:
    """The technique stages' folders the configured jobs reach, in stage order: the report summarizes them,
    and a technique no configuration uses is not built."""
    reached = reached_folders(bench)
    return [f"artifacts/{s.out}" for s in techniques.stages() if s.out in reached]
