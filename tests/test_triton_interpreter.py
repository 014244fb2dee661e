"""The CUDA decode's Triton kernels in Triton's interpreter on the CPU (scripts/interpret_kernels.py, in a process of
its own: the interpreter is chosen when triton is imported, and triton lives outside the venv's site-packages,
in .venv/triton, which `make test` installs): the tensor-core 4-bit kernel's every tile both ways, the 4-bit and
int8 GEMVs, the block ops' kernels, the device-side decisions (gated columns, the router's two heads) and the
decode attention kernel, each against float64 or the torch ops they stand for."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRITON = Path(os.environ.get("ADAPTIVE_INFERENCE_TRITON_DIR") or ROOT / ".venv" / "triton")


@pytest.mark.skipif(not (TRITON / "triton").is_dir(), reason=f"no triton for the interpreter in {TRITON} "
                    "(`make test` installs it there)")
def test_the_cuda_kernels_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(TRITON), str(ROOT / "src")])}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "interpret_kernels.py")], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0 and "\n0 case(s) past tolerance" in r.stdout, r.stdout[-6000:] + r.stderr[-3000:]
    assert r.stdout.count("\nok ") >= 115  # every check ran (120 cases)
