"""Fold benchmark job folders into one JSON for report.gpu_results (adaptive_inference.bench.summary).

    python scripts/benchmark_summary.py OUT/bench/* --concurrent 4 --out docs/measurements/benchmark_jobs_h100_smollm2_DATE.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from adaptive_inference import atomic  # noqa: E402
from adaptive_inference.bench.summary import summarize  # noqa: E402
from adaptive_inference.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", type=Path, nargs="+", help="benchmark job folders of one run")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--concurrent", type=int, default=1,
                    help="jobs that ran at a time on the device (above 1: the report shows no speed for them)")
    a = ap.parse_args(argv)
    try:
        out = summarize(a.folders, a.concurrent)
    except UserError as e:
        sys.exit(f"error: {e}")
    atomic.write_json(a.out, out)


if __name__ == "__main__":
    main()
