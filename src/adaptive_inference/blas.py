"""The one way the project imports MLX: `import_mlx()`, which on Linux preloads an OpenBLAS first.

Why: the `mlx[cpu]` Linux wheel links netlib's reference BLAS (1024^2 fp32 GEMM 8 GFLOP/s here); an OpenBLAS
loaded RTLD_GLOBAL before `mlx.core` wins symbol resolution, so libmlx calls its cblas_sgemm (~100 GFLOP/s here,
MLX prefill 18 -> ~390 tok/s on SmolLM2-135M).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import sys
from pathlib import Path

from .errors import UserError

ENV_VAR = "ADAPTIVE_INFERENCE_BLAS"  # a libopenblas path, or "reference" to keep the wheel's BLAS

_info: dict | None = None


def blas_info() -> dict:
    """What BLAS MLX's CPU matmuls use in this process (recorded by import_mlx, for benchmark reports)."""
    if _info is not None:
        return dict(_info)
    if "mlx.core" in sys.modules:
        return {"mlx_blas": "unknown", "how": "mlx.core imported without import_mlx(); preload not applied"}
    return {"mlx_blas": "not loaded", "how": "import_mlx() not called yet"}


def _faiss_openblas() -> list[Path]:
    """The OpenBLAS in the faiss-cpu wheel, preceded by the runtime libraries it needs (hashed names)."""
    try:
        libs = Path(importlib.metadata.distribution("faiss-cpu").locate_file("faiss_cpu.libs"))
    except importlib.metadata.PackageNotFoundError:
        return []
    blas = sorted(libs.glob("libopenblas*.so*"))
    if not blas:
        return []
    deps = [p for name in ("libquadmath", "libgfortran", "libgomp") for p in sorted(libs.glob(name + "-*.so*"))]
    return [*deps, blas[0]]


def _candidates() -> list[tuple[str, list[str]]]:
    """(how, libraries to load in order) in order of preference."""
    out = []
    system = ctypes.util.find_library("openblas")
    if system:
        out.append(("system library", [system]))
    faiss = _faiss_openblas()
    if faiss:
        out.append(("faiss-cpu wheel", [str(p) for p in faiss]))
    return out


def _preload() -> dict:
    env = os.environ.get(ENV_VAR, "").strip()
    if env == "reference":
        return {"mlx_blas": "reference (netlib)", "how": f"{ENV_VAR}=reference"}
    if env:
        if not Path(env).is_file():
            raise UserError(f"{ENV_VAR}={env}: no such file (give a libopenblas path, or 'reference')")
        try:
            ctypes.CDLL(env, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise UserError(f"{ENV_VAR}={env}: cannot load: {e}") from None
        return {"mlx_blas": "openblas", "path": env, "how": f"{ENV_VAR}"}
    errors = []
    for how, paths in _candidates():
        try:
            for p in paths:
                ctypes.CDLL(p, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            errors.append(f"{how}: {e}")
            continue
        return {"mlx_blas": "openblas", "path": paths[-1], "how": how}
    info = {"mlx_blas": "reference (netlib)", "how": "no OpenBLAS found"}
    if errors:
        info["errors"] = errors
    return info


def import_mlx():
    """Import and return `mlx.core`, first preloading an OpenBLAS on Linux (see module docstring).

    Order: $ADAPTIVE_INFERENCE_BLAS, a system libopenblas, the faiss-cpu wheel's copy.
    """
    global _info
    if _info is None:
        if not sys.platform.startswith("linux"):
            _info = {"mlx_blas": "platform default", "how": f"no preload on {sys.platform}"}
        elif "mlx.core" in sys.modules:
            _info = {"mlx_blas": "unknown", "how": "mlx.core was imported before import_mlx(); preload not applied"}
        else:
            _info = _preload()
    import mlx.core as mx

    return mx
