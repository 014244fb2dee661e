"""One tiny end-to-end run: snakemake builds the report; a rerun is a no-op; dvc repro reruns only
benchmark and report after a benchmark param changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CI_PARAMS = ROOT / "ci" / "params.yaml"  # the CI configuration: model.source tiny, every technique


def tiny_params() -> dict:
    return yaml.safe_load(CI_PARAMS.read_text())


TINY_CONFIGS = tuple(tiny_params()["benchmark"]["configs"])


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    logs = "".join(f.read_text() for f in sorted((cwd / "logs").glob("*.log"))) if (cwd / "logs").exists() else ""
    assert res.returncode == 0 or not check, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}\n{logs[-3000:]}"
    return res.stdout + res.stderr if check else (res.returncode, res.stdout + res.stderr)


def ran_stages(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def edit_params(work: Path, change) -> None:
    p = yaml.safe_load((work / "params.yaml").read_text())
    change(p)
    (work / "params.yaml").write_text(yaml.safe_dump(p))


GIT = ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost"]


def project(work: Path) -> Path:
    """A checkout of this project with the CI params as its params.yaml, under git and DVC (default remote)."""
    work.mkdir()
    for name in ("Snakefile", "workflow", "src", ".dvc/config"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, work / name)
    shutil.copy(CI_PARAMS, work / "params.yaml")
    run(["adaptive-inference", "dvc-yaml"], work)
    run(["git", "init", "-q"], work)
    (work / ".gitignore").write_text("/logs/\n/.snakemake/\n")
    return work


@pytest.mark.pipeline
def test_tiny_pipeline_snakemake_dvc_remote_and_regeneration(tmp_path):
    work = project(tmp_path / "project")
    run(["snakemake", "--cores", "2"], work)
    metrics = json.loads((work / "reports/metrics.json").read_text())
    for backend in ("torch", "mlx"):
        assert set(metrics[backend]) == set(TINY_CONFIGS)
        assert metrics[backend]["map-hard-25"]["weight_bytes_fraction"] < 1
        gears = json.loads((work / f"artifacts/benchmark/{backend}/gears/results.json").read_text())["run"]
        assert sum(gears["structural"]["weights_usage"].values()) == pytest.approx(1)
        assert set(gears["structural"]["relative_bytes"]) <= {"low", "mid"}  # packed sets load on first use
        assert 0 < gears["speed"]["bandwidth"]["share_of_limit"] and gears["speed"]["bandwidth"]["read_gbs"] > 0
        assert metrics[backend]["baseline"]["kl_to_baseline"] == 0.0
        assert metrics[backend]["lobotomy"]["kl_to_baseline"] > 0
        assert metrics[backend]["lobotomy"]["weight_bytes_fraction"] < 1
    assert metrics["agreement"]["torch_vs_mlx_top1"] > 0.99
    assert set(metrics["reference_ratios"]) == {"torch", "mlx"}
    assert "data:image/png;base64" in (work / "reports/report.html").read_text()
    assert "Nothing to be done" in run(["snakemake", "--cores", "2"], work)

    run(["dvc", "init", "-q", "--force"], work)
    shutil.copy(ROOT / ".dvc/config", work / ".dvc/config")  # dvc init wrote its own
    run(["dvc", "commit", "-f", "-q"], work)  # adopt what snakemake built
    assert not ran_stages(run(["dvc", "repro"], work))  # no-op

    # the rerun sets of the three kinds of change, and of a new configuration
    jobs = lambda *cfgs: {f"benchmark-{b}-{c}" for b in ("torch", "mlx") for c in cfgs}  # noqa: E731
    edit_params(work, lambda p: p["make_lobotomy"].update(max_kl=9.0))  # a technique key
    assert ran_stages(run(["dvc", "repro"], work)) == {"make_lobotomy", "report"} | jobs("lobotomy", "stacked")
    edit_params(work, lambda p: p["benchmark"]["batch"].update(new_tokens=3))  # a benchmark key
    assert ran_stages(run(["dvc", "repro"], work)) == {"report"} | jobs(*TINY_CONFIGS)
    edit_params(work, lambda p: p["report"].update(title="Tiny"))  # a report key
    assert ran_stages(run(["dvc", "repro"], work)) == {"report"}
    edit_params(work, lambda p: p["resources"]["benchmark"].update(mem_mb=999))  # a scheduler key
    assert not ran_stages(run(["dvc", "repro"], work))
    edit_params(work, lambda p: p["benchmark"]["configs"].update(cut={"techniques": ["lobotomy"]}))  # a configuration
    run(["adaptive-inference", "dvc-yaml"], work)
    assert ran_stages(run(["dvc", "repro"], work)) == {"report"} | jobs("cut")

    # the DVC remote: push, then a fresh clone pulls every artifact and neither front-end reruns anything
    run([*GIT, "add", "-A"], work)
    run([*GIT, "commit", "-q", "-m", "results"], work)
    run(["dvc", "push", "-q"], work)
    assert (tmp_path / "adaptive-inference-remote").is_dir()  # the default remote, beside the checkout
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(work), str(clone)], tmp_path)
    run(["dvc", "pull", "-q"], clone)
    for folder in ("model", "hidden", "lobotomy", "token_router", "benchmark/mlx/cut"):
        assert (clone / "artifacts" / folder / "MANIFEST.json").read_bytes() == \
            (work / "artifacts" / folder / "MANIFEST.json").read_bytes()
    assert not ran_stages(run(["dvc", "repro"], clone))
    run(["snakemake", "--cores", "1", "--touch"], clone)  # pulled files carry pull-time mtimes
    assert "Nothing to be done" in run(["snakemake", "--cores", "2", "-n"], clone)

    # regeneration: unchanged -> passes; a param that lowers quality -> fails and names the metric
    out = run(["adaptive-inference", "regenerate"], work)
    assert "every metric equals" in out or "0 past tolerance" in out
    edit_params(work, lambda p: p["make_lobotomy"].update(max_layers=3))  # zero 3 of 4 MLPs
    rc, out = run(["adaptive-inference", "regenerate"], work, check=False)
    assert rc == 1 and "FAILED" in out and "lobotomy.kl_to_baseline" in out, out[-3000:]

    # Snakemake's between-workflow output cache: a second checkout reuses prepare_model and cache_hidden
    cache = {"SNAKEMAKE_OUTPUT_CACHE": str(tmp_path / "snakemake-cache")}
    (tmp_path / "snakemake-cache").mkdir()
    first, second = tmp_path / "first", tmp_path / "second"
    for c in (first, second):
        run(["git", "clone", "-q", str(work), str(c)], tmp_path)
    run(["snakemake", "--cores", "2", "artifacts/hidden", "--cache"], first, env=cache)  # --cache takes rule names
    out = run(["snakemake", "--cores", "2", "artifacts/hidden", "--cache"], second, env=cache)
    assert "Symlinking output file artifacts/hidden/MANIFEST.json from cache" in out, out[-3000:]
    assert (first / "logs/cache_hidden.log").stat().st_size > 0  # the stage ran and logged there...
    assert (second / "logs/cache_hidden.log").stat().st_size == 0  # ...not here: Snakemake only touches the log
    assert (second / "artifacts/hidden/MANIFEST.json").read_bytes() == (first / "artifacts/hidden/MANIFEST.json").read_bytes()
