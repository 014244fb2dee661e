"""The slurm profile on a real single-node SLURM (scripts/local_slurm.sh: Debian's slurmctld + slurmd +
munge): the CI configuration's deterministic stages give the same bytes through SLURM as locally, and a
job SLURM kills is a clear failure that leaves no debris and that a rerun completes. Skipped, with the
reason, where SLURM cannot be started (not root, no apt, no Debian packages), and unless AI_TEST_SLURM=1
(it installs system packages and starts daemons: opt-in, `AI_TEST_SLURM=1 pytest tests/test_slurm.py`)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from test_determinism import folder_bytes
from test_pipeline import BIN, project, run

ROOT = Path(__file__).resolve().parents[1]
SLURM = ["snakemake", "--workflow-profile", "workflow/profiles/slurm", "--slurm-no-account",
         # no slurmdbd here: job states come from squeue (slurmctld keeps them MinJobAge = 1 h)
         "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1"]
STAGES = ("model", "corpus", "hidden", "profile_ffn", "lobotomy", "token_router")


@pytest.fixture(scope="module")
def slurm():
    if os.environ.get("AI_TEST_SLURM") != "1":
        pytest.skip("set AI_TEST_SLURM=1 to start a local SLURM (root, apt) and run the pipeline through it")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "local_slurm.sh")], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"no local SLURM: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    yield
    subprocess.run(["bash", str(ROOT / "scripts" / "local_slurm.sh"), "stop"], capture_output=True)


def _job_id(rule: str, timeout: float = 120) -> str:
    end = time.time() + timeout
    while time.time() < end:
        out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            jid, name, state = line.split()[:3]
            if state == "RUNNING" and rule in subprocess.run(["scontrol", "show", "job", jid], capture_output=True,
                                                             text=True).stdout:
                return jid
        time.sleep(0.5)
    raise AssertionError(f"no running SLURM job of rule {rule}")


@pytest.mark.pipeline
def test_slurm_profile_same_bytes_and_a_killed_job(slurm, tmp_path):
    targets = [f"artifacts/{s}" for s in STAGES]
    local, cluster = project(tmp_path / "local"), project(tmp_path / "cluster")
    run(["snakemake", "--cores", "2", *targets], local)
    run([*SLURM, *targets], cluster)
    for stage in STAGES:
        assert folder_bytes(cluster / "artifacts" / stage) == folder_bytes(local / "artifacts" / stage), stage

    # SLURM ends a job at its time limit with SIGTERM, then SIGKILL after KillWait; scancel sends the same
    # (no job of the tiny pipeline outlives SLURM's 1-minute minimum limit)
    target = "artifacts/benchmark/torch/baseline"
    proc = subprocess.Popen([*SLURM, "--retries", "0", target], cwd=cluster, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    jid = _job_id("rule_benchmark")
    time.sleep(3)
    subprocess.run(["scancel", jid], check=True)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "CANCELLED" in out, out[-3000:]
    debris = [p.name for p in (cluster / "artifacts" / "benchmark" / "torch").glob(".*tmp*")]
    assert not debris and not (cluster / target).exists(), debris
    run([*SLURM, target], cluster)  # the rerun completes
    assert (cluster / target / "results.json").is_file()
