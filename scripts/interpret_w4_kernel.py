"""The tensor-core 4-bit kernel (triton_kernels._w4_kernel: rows of x above GEMV_ROWS) in Triton's interpreter,
no GPU: every tile of its list, both ways of making its weights (fp32 / PAIRS; the interpreter runs no inline PTX,
so PAIRS takes its ASM-free fp32 form there: tiles, masks, groups and split K are what this checks; the PTX itself
is tests/test_f16x2.py's), the scales loaded a tile ahead and not, groups 32 / 64 / 128, against float64. Exits
non-zero where an error passes 1e-5 of the largest output.

    pip install --no-deps triton==3.6.0   # torch's CPU wheel does not bring it
    TRITON_INTERPRET=1 python scripts/interpret_w4_kernel.py
"""

import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("interpret_w4_kernel.py: run it with TRITON_INTERPRET=1 (Triton's interpreter, on the CPU)")

from adaptive_inference import quant, quant_cuda  # noqa: E402
from adaptive_inference import triton_kernels as tk  # noqa: E402

CASES = [(96, 256, 32, 9, 2), (72, 512, 64, 16, 3), (40, 512, 128, 5, 2)]  # N (ragged), K, group, rows, splits
# (split K: fp32 partial sums; one slice would store the output in bf16)


def main() -> None:
    rng = np.random.default_rng(0)
    worst = 0.0
    for n, k, group, m, splits in CASES:
        p = quant.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05 + 0.01, "int4", group_size=group)
        tensors = quant_cuda.prepare(p, depth=4, device="cpu", kernel="triton").tensors
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(torch.bfloat16)
        want = x.double() @ torch.from_numpy(quant.dequantize(p)).double().T
        for cfg in tk.w4_tc_configs((0, 1), tk._W4_TC_TILES):
            if cfg.kwargs["BLOCK_K"] < group:
                continue  # pruned by the autotuner (_w4_prune)
            tk._w4_kernel.configs = [cfg]
            tk._w4_kernel.cache.clear()
            y = tk.w4_linear_partials(x, x.new_empty(0), *tensors, group, False, splits).double().sum(0)
            err = ((y - want).abs().max() / want.abs().max()).item()
            worst = max(worst, err)
            print(f"N {n} K {k} group {group} rows {m} splits {splits} {cfg.kwargs} warps {cfg.num_warps}: {err:.1e}",
                  flush=True)
    print(f"largest error / largest output: {worst:.1e}")
    if worst > 1e-5:
        sys.exit(1)


if __name__ == "__main__":
    main()
