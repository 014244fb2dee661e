"""regenerate (what CI runs): `dvc repro` of the pipeline in this folder (its dvc.yaml and params.yaml),
then `dvc metrics diff` of reports/metrics.json against the copy committed in git at `regenerate.rev`.
Prints every metric that moved; fails (exit 1) when a quality metric named in `regenerate.tolerance`
moved past its tolerance or disappeared. Speed metrics are shown, never gated: they are machine noise.
Accept a change by committing the regenerated reports/metrics.json."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from .errors import UserError

METRICS = "reports/metrics.json"


def _run(cmd: list[str], cwd: Path, capture: bool = True) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=capture, text=True)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} not found on PATH (make setup installs it)") from None


def committed(rev: str, cwd: Path) -> dict:
    """The reference metrics: METRICS as committed at rev (path relative to cwd)."""
    res = _run(["git", "show", f"{rev}:./{METRICS}"], cwd)
    if res.returncode != 0:
        raise UserError(f"no {METRICS} committed at {rev} under {cwd} to compare against "
                        f"(run once, then commit {METRICS})")
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError:
        raise UserError(f"{METRICS} at {rev} is not valid JSON") from None


def metrics_diff(rev: str, cwd: Path) -> dict[str, dict]:
    """`dvc metrics diff` of METRICS, every key (flattened with dots) -> {old, new, diff}."""
    res = _run(["dvc", "metrics", "diff", rev, "--targets", METRICS, "--json", "--all"], cwd)
    if res.returncode != 0:
        raise UserError(f"dvc metrics diff failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    out = json.loads(res.stdout or "{}")
    return next(iter(out.values()), {}) if out else {}


def within(old: float, new: float, tol: dict) -> bool:
    d = abs(new - old) - 1e-12
    return d <= tol.get("abs", -1) or d <= tol.get("rel", -1) * abs(old)


def verdicts(diff: dict[str, dict], tolerance: dict[str, dict]) -> list[tuple[str, dict, str]]:
    """(key, row, verdict) for every key that changed; verdict 'FAIL ...' for a gated metric past tolerance."""
    rows = []
    for key, row in sorted(diff.items()):
        name = key.rsplit(".", 1)[-1]
        old, new = row.get("old"), row.get("new")
        tol = tolerance.get(name)
        if old == new or (isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new)):
            continue
        if tol is None:
            rows.append((key, row, "shown"))
        elif new is None:
            rows.append((key, row, "FAIL: missing"))
        elif old is None:
            rows.append((key, row, "new"))
        elif within(old, new, tol):
            rows.append((key, row, "ok"))
        else:
            rows.append((key, row, "FAIL: past " + ", ".join(f"{k} {v:g}" for k, v in tol.items())))
    return rows


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.6g}" if isinstance(x, float) else str(x)


def table(rows: list[tuple[str, dict, str]]) -> str:
    lines = ["| metric | committed | now | change | verdict |", "|---|---:|---:|---:|---|"]
    lines += [f"| {k} | {_fmt(r.get('old'))} | {_fmt(r.get('new'))} | {_fmt(r.get('diff'))} | {v} |" for k, r, v in rows]
    return "\n".join(lines)


def run(params: dict, cwd: Path = Path(".")) -> int:
    cwd = Path(cwd)
    rev, tolerance = params["rev"], params["tolerance"]
    committed(rev, cwd)  # fail before any work when there is nothing to compare against
    print(f"regenerate: dvc repro in {cwd.resolve().name}/", flush=True)
    res = _run(["dvc", "repro"], cwd, capture=False)
    if res.returncode != 0:
        raise UserError(f"dvc repro failed (exit {res.returncode}); see the stage logs under logs/")
    rows = verdicts(metrics_diff(rev, cwd), tolerance)
    print(table(rows) if rows else f"regenerate: every metric equals the one committed at {rev}")
    failed = [(k, r) for k, r, v in rows if v.startswith("FAIL")]
    gated = sum(1 for _, _, v in rows if v != "shown")
    print(f"regenerate: {len(rows)} metrics moved ({gated} gated quality metrics, {len(rows) - gated} shown only); "
          f"{len(failed)} past tolerance", flush=True)
    if failed:
        print("regenerate: FAILED: " + "; ".join(f"{k} {_fmt(r.get('old'))} -> {_fmt(r.get('new'))}"
                                                 for k, r in failed[:5])
              + (f" and {len(failed) - 5} more" if len(failed) > 5 else ""))
        return 1
    return 0
