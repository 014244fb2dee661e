"""Snakefile and dvc.yaml are two front-ends over the same CLI: same stages, commands, files and params keys.
dvc.yaml is generated from params.yaml and the technique registry; the committed file must be current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adaptive_inference import cli, dvcgen
from adaptive_inference import params as params_mod

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def snakemake_jobs() -> dict[str, str]:
    """Output folder -> shell command of every job of a forced dry run."""
    res = subprocess.run([str(SNAKEMAKE), "-n", "-p", "--forceall", "--cores", "1"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    jobs = {}
    for cmd in re.findall(r"^Shell command: (adaptive-inference .+)$", res.stdout + res.stderr, re.M):
        cmd = re.sub(r"\s*>\s*\S+\s+2>&1\s*$", "", cmd).strip()
        jobs[re.search(r"--out (\S+)", cmd).group(1)] = " ".join(cmd.split())
    return jobs


def test_dvc_yaml_is_generated_from_params():
    params = params_mod.load(ROOT / "params.yaml")
    assert (ROOT / "dvc.yaml").read_text() == dvcgen.text(params), "run `adaptive-inference dvc-yaml`"


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake not installed beside this python")
def test_snakefile_and_dvc_yaml_run_the_same_commands():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    smk = snakemake_jobs()
    dvc_cmds = {re.search(r"--out (\S+)", s["cmd"]).group(1): " ".join(s["cmd"].split()) for s in dvc.values()}
    assert dvc_cmds == smk


def test_every_stage_is_a_cli_subcommand_with_a_params_section():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    subcommands = set(cli.parser()._subparsers._group_actions[0].choices)
    sections = set(params_mod.schema()["properties"])
    for stage in dvc.values():
        assert stage["cmd"].split()[1] in subcommands
        assert {p.split(".")[0] for p in stage["params"]} <= sections


def test_jobs_depend_on_their_own_config_and_artifacts_only():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    router = dvc["benchmark-torch-router"]
    assert "benchmark.configs.router" in router["params"] and "benchmark.configs.lobotomy" not in router["params"]
    assert "artifacts/router" in router["deps"] and "artifacts/lobotomy" not in router["deps"]
    assert "src/adaptive_inference/techniques/vocab_router/head.py" in router["deps"]
    assert "src/adaptive_inference/techniques/lobotomy/stages.py" not in router["deps"]
    base = dvc["benchmark-mlx-baseline"]
    assert not [d for d in base["deps"] if d.startswith("artifacts/") and d not in ("artifacts/model", "artifacts/corpus")]


def test_default_params_are_valid():
    params_mod.load(ROOT / "params.yaml")


@pytest.mark.parametrize("mutate, expected", [
    (lambda p: p["corpus"].update(seeed=1), "corpus.seeed: unknown key"),
    (lambda p: p["cache_hidden"].update(batch_size="8"), "cache_hidden.batch_size"),
    (lambda p: p["benchmark"]["decode"].update(repeats=0), "benchmark.decode.repeats"),
    (lambda p: p.update(extra={}), "extra: unknown key"),
    (lambda p: p["model"].pop("source"), "model.source: missing key"),
])
def test_bad_params_fail_naming_the_key(tmp_path, mutate, expected):
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(p)
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(p))
    res = subprocess.run([sys.executable, "-m", "adaptive_inference.cli", "build-corpus", "--params", str(bad),
                          "--out", str(tmp_path / "corpus")], capture_output=True, text=True)
    assert res.returncode == 2
    assert expected in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "corpus").exists()


def test_a_configuration_may_name_its_backends():
    from adaptive_inference.bench import jobs

    bench = {"backends": ["torch", "mlx"], "reference": False,
             "configs": {"baseline": {"techniques": []}, "q": {"techniques": ["x"], "backends": ["torch"]}}}
    assert jobs.job_folders(bench) == ["artifacts/benchmark/torch/baseline", "artifacts/benchmark/torch/q",
                                       "artifacts/benchmark/mlx/baseline"]
    assert jobs.config_backends(bench, "q") == ["torch"] and jobs.config_backends(bench, "baseline") == ["torch", "mlx"]
    assert jobs.job_params({**bench, **{k: 0 for k in jobs.SHARED_KEYS}}, "q")["config"] == {"name": "q", "techniques": ["x"]}
