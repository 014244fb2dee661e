"""regenerate's gate: which moves fail, which are only shown; no committed reference -> one-line error.
The real round trip (unchanged passes, a quality regression fails) runs in tests/test_pipeline.py."""

from __future__ import annotations

import subprocess

import pytest

from adaptive_inference import regenerate
from adaptive_inference.errors import UserError

TOL = {"kl_to_baseline": {"abs": 0.01, "rel": 0.05}, "perplexity": {"rel": 0.02}}


def test_within_accepts_a_move_inside_either_bound():
    assert regenerate.within(1.0, 1.04, TOL["kl_to_baseline"])  # 0.04 <= 5% of 1.0
    assert regenerate.within(0.1, 0.109, TOL["kl_to_baseline"])  # 0.009 <= abs 0.01
    assert not regenerate.within(0.1, 0.12, TOL["kl_to_baseline"])
    assert not regenerate.within(10.0, 10.3, TOL["perplexity"])
    assert regenerate.within(10.0, 10.2, TOL["perplexity"])


def test_verdicts_gate_quality_and_only_show_speed():
    diff = {
        "torch.lobotomy.kl_to_baseline": {"old": 0.1, "new": 0.5, "diff": 0.4},
        "torch.router.kl_to_baseline": {"old": 0.1, "new": 0.105, "diff": 0.005},
        "torch.router.perplexity": {"old": 10.0, "new": 10.0, "diff": 0.0},
        "torch.router.decode_tps": {"old": 20.0, "new": 5.0, "diff": -15.0},
        "mlx.gone.kl_to_baseline": {"old": 0.2, "new": None},
        "mlx.added.kl_to_baseline": {"old": None, "new": 0.3},
    }
    got = {k: v for k, _, v in regenerate.verdicts(diff, TOL)}
    assert got["torch.lobotomy.kl_to_baseline"].startswith("FAIL")
    assert got["torch.router.kl_to_baseline"] == "ok"
    assert "torch.router.perplexity" not in got  # unchanged rows are counted, not listed
    assert got["torch.router.decode_tps"] == "shown"  # speed: never gated
    assert got["mlx.gone.kl_to_baseline"] == "FAIL: missing"
    assert got["mlx.added.kl_to_baseline"] == "new"
    assert "| torch.lobotomy.kl_to_baseline | 0.1 | 0.5 | 0.4 | FAIL" in regenerate.table(regenerate.verdicts(diff, TOL))


def test_no_committed_metrics_is_one_line_and_runs_nothing(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    with pytest.raises(UserError, match="no reports/metrics.json committed at HEAD"):
        regenerate.run({"rev": "HEAD", "tolerance": TOL}, tmp_path)
    assert not (tmp_path / "reports").exists()
