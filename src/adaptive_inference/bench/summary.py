"""One small JSON from benchmark job folders (`adaptive-inference benchmark` outputs), for the report's GPU section
(report.gpu_results): per configuration its quality against the baseline (KL, top-1, perplexity, GSM8K, GPQA),
paired decode speedup and structural bound, with the device, dtype, packages and code digest of the run. Used
for the embedded model's jobs run on a GPU (scripts/benchmark_summary.py)."""

from __future__ import annotations

import json
from pathlib import Path

from .. import manifest
from ..errors import UserError

KIND = "benchmark_jobs"
QUALITY = ("kl_to_baseline", "top1_agreement", "perplexity", "eval_tokens", "gsm8k_accuracy", "gsm8k_n",
           "gpqa_accuracy", "gpqa_n")
SAME = ("gpu", "device", "dtype", "model", "code")  # what every job of one summary must share


def job_row(folder: Path) -> tuple[str, dict, dict]:
    """(config, its row, what describes the run) of one verified job folder."""
    m = manifest.verify(folder, stage="benchmark")
    try:
        return _row(m, json.loads((folder / "results.json").read_text()))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{folder}: not a benchmark job's results.json ({type(e).__name__}: {e})") from None


def _row(m: dict, r: dict) -> tuple[str, dict, dict]:
    run, q = r["run"], r["run"]["quality"]
    row = {"speedup": run["speedup_vs_baseline"], "speedup_ci95": run["speedup_ci95"],
           "bound": 1 / run["structural"]["weight_bytes_fraction"],
           "decode_tps": run["speed"]["decode_tps"]["median"],
           "baseline_decode_tps": run["speed"]["baseline_decode_tps"]["median"], **{k: q.get(k) for k in QUALITY}}
    if "vs_float32" in q:
        row["vs_float32"] = {k: q["vs_float32"].get(k) for k in ("kl_to_baseline", "top1_agreement", "perplexity")}
    info = {"gpu": r["environment"].get("gpu"), "device": run["device"], "dtype": m["params"].get("dtype"),
            "runtime": m["params"].get("runtime"), "model": r["model"]["name"], "packages": m.get("packages"),
            "code": m.get("code")}
    return run["config"], row, info


def summarize(folders: list[Path], concurrent: int = 1) -> dict:
    """The summary of job folders of one run (same device, dtype, model and code), the baseline's row first.
    concurrent: how many jobs shared the device at a time; above 1 their timings are not each job's alone, and
    the report shows their quality only."""
    if concurrent < 1:
        raise UserError(f"concurrent jobs must be at least 1, not {concurrent}")
    jobs, infos = {}, []
    for f in sorted(folders):
        name, row, info = job_row(f)
        if name in jobs:
            raise UserError(f"{f}: a second job of configuration {name!r}")
        jobs[name] = row
        infos.append((f, info))
    if "baseline" not in jobs:
        raise UserError("no baseline job among the folders")
    first = infos[0][1]
    for f, info in infos:
        if any(info[k] != first[k] for k in SAME):
            raise UserError(f"{f}: another {'/'.join(SAME)} than {infos[0][0]}")
    return {"kind": KIND, **first, "concurrent_jobs": concurrent, "jobs": {"baseline": jobs.pop("baseline"), **jobs}}
