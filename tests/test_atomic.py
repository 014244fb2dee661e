"""Atomic outputs under termination: SIGTERM (a scheduler's time limit) leaves neither the output nor a
temp sibling behind, and the process exits 143."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

DRIVER = """
import sys, time
from pathlib import Path
from adaptive_inference import atomic, cli
cli.handle_sigterm()
out = Path(sys.argv[1])
try:
    with atomic.output_dir(out) as tmp:
        (tmp / "big.bin").write_bytes(b"x" * 1000)
        print("ready", flush=True)
        time.sleep(60)
except cli.Terminated:
    sys.exit(143)
"""


def test_sigterm_removes_the_temp_output(tmp_path):
    out = tmp_path / "artifact"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert any(p.name.startswith(".artifact.tmp-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert os.listdir(tmp_path) == []


STAGE = """
import sys, time
from pathlib import Path
from adaptive_inference import atomic, cli

def slow(args, params):  # a stage that builds its output slowly
    with atomic.output_dir(args.out) as tmp:
        (tmp / "part").write_text("partial")
        print("ready", flush=True)
        time.sleep(60)

cli._dvc_yaml = slow
sys.exit(cli.main(["dvc-yaml", "--params", sys.argv[1], "--out", sys.argv[2]]))
"""


def test_a_stage_killed_by_sigterm_exits_143_with_one_line(tmp_path):
    from test_pipeline import ROOT

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", STAGE, str(ROOT / "params.yaml"), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert proc.stderr.read().strip().splitlines() == [
        "adaptive-inference dvc-yaml: terminated (SIGTERM); partial outputs removed"]
    assert os.listdir(tmp_path) == []
