"""Snakefile and dvc.yaml are two front-ends over the same CLI: same commands, files and params keys."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adaptive_inference import cli
from adaptive_inference import params as params_mod

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def snakemake_jobs() -> dict[str, dict]:
    res = subprocess.run([str(SNAKEMAKE), "-n", "-p", "--forceall", "--cores", "1"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    jobs = {}
    for name, cmd in re.findall(r"^rule (\w+):\n(?:    .*\n)*Shell command: (.+)$", res.stdout + res.stderr, re.M):
        if name != "all":
            jobs[name] = {"cmd": re.sub(r"\s*>\s*\S+\s+2>&1\s*$", "", cmd).strip()}
    for smk in (ROOT / "workflow/rules").glob("*.smk"):
        for name, body in re.findall(r"^rule (\w+):\n((?:    .*\n|\n)+)", smk.read_text(), re.M):
            jobs[name]["params"] = re.findall(r'config\["(\w+)"\]', body)
            jobs[name]["code"] = re.findall(r'"(src/[^"]+)"', body)
    return jobs


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake not installed beside this python")
def test_snakefile_and_dvc_yaml_agree():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    smk = snakemake_jobs()
    assert set(dvc) == set(smk)
    for name, stage in dvc.items():
        assert " ".join(stage["cmd"].split()) == smk[name]["cmd"], name
        assert stage["params"] == smk[name]["params"], name
        assert [d for d in stage["deps"] if d.startswith("src/")] == smk[name]["code"], name
        outs = [next(iter(o)) if isinstance(o, dict) else o
                for key in ("outs", "metrics", "plots") for o in stage.get(key, [])]
        for out in outs:  # every DVC output is named in the Snakemake command or output list
            assert out in smk[name]["cmd"] or out.startswith("reports/"), (name, out)


def test_every_stage_is_a_cli_subcommand_with_a_params_section():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    subcommands = set(cli.parser()._subparsers._group_actions[0].choices)
    sections = set(params_mod.schema()["properties"])
    for stage in dvc.values():
        assert stage["cmd"].split()[1] in subcommands
        assert set(stage["params"]) <= sections


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
