"""Pick and load a backend by name; each lives in its own module so MLX is imported only when used."""

from __future__ import annotations

from pathlib import Path

NAMES = ("torch", "mlx")


def load_backend(name: str, model_dir: Path, dtype: str = "float32", device: str | None = None,
                 runtime: dict | None = None):
    """runtime: params benchmark.runtime (cpu_matmul, compile, cuda_graphs, cuda_block_ops); torch reads all, MLX
    cpu_matmul."""
    if name == "torch":
        from .torch_backend import TorchLM, default_device

        return TorchLM.load(model_dir, device=device or default_device(), dtype=dtype, **(runtime or {}))
    if name == "mlx":
        from .mlx_backend import MLXLM

        return MLXLM.load(model_dir, dtype=dtype, cpu_matmul=(runtime or {}).get("cpu_matmul", "kernel"))
    from .errors import UserError

    raise UserError(f"unknown backend {name!r} (known: {', '.join(NAMES)})")
