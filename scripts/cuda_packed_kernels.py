"""Packed-weight matmuls on a CUDA GPU at decode sizes, against the bf16 weight: microseconds per call and the
read bandwidth they reach, per kernel path quant_cuda can take (4-bit codes: our Triton kernel and torch's tinygemm) (and, for int8, what inductor makes of the dequantize expression).

    python scripts/cuda_packed_kernels.py [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from adaptive_inference import quant, quant_cuda  # noqa: E402

SHAPES = {"8b_qkv": (6144, 4096), "8b_gate_up": (28672, 4096), "8b_down": (4096, 14336)}


def us_per_call(fn, x, n: int = 200) -> float:
    for _ in range(5):
        fn(x)
    g = torch.cuda.CUDAGraph()  # replayed as a graph, as decode runs it: launch overhead out of the timing
    with torch.cuda.graph(g):
        for _ in range(20):
            fn(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    start.record()
    for _ in range(n // 20):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / n


def packed_linear(p):
    return lambda x: quant_cuda.linear(x, p)


def int8_inductor(p8):
    """The dequantize-in-matmul expression, compiled: what inductor makes of an int8 weight without a kernel."""
    q, scale = p8.tensors
    return torch.compile(lambda x: F.linear(x, q.to(x.dtype)) * scale.to(x.dtype), dynamic=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(a.batch, k, device="cuda", dtype=torch.bfloat16)
        host = w.float().cpu().numpy()
        paths = {"bf16": (lambda x, w=w: F.linear(x, w), n * k * 2)}
        for g in (32, 128):
            p = quant.quantize(host, "int4", group_size=g)
            for kernel in ("triton", "tinygemm"):
                paths[f"int4_g{g}_{kernel}"] = (packed_linear(quant_cuda.prepare(p, kernel=kernel)), quant.bytes_read(p))
        pn = quant.quantize(host, "nested", group_size=32)
        for depth in (4, 8):  # the gears' low and mid reads of one nested copy
            paths[f"nested_d{depth}_triton"] = (packed_linear(quant_cuda.prepare(pn, depth=depth, kernel="triton")),
                                                quant.bytes_read(pn, depth=depth))
        p8s = quant.quantize(host, "int8")
        p8 = quant_cuda.prepare(p8s)
        paths["int8_triton"] = (packed_linear(p8), quant.bytes_read(p8s))  # what quant_cuda runs
        paths["int8_inductor"] = (int8_inductor(p8), quant.bytes_read(p8s))
        ref = F.linear(x, w).float()
        for path, (fn, nbytes) in paths.items():
            t = us_per_call(fn, x)
            err = ((fn(x).float() - ref).abs().max() / ref.abs().max()).item()  # quantization error included
            rows.append({"shape": name, "n": n, "k": k, "path": path, "us": t, "gbs": nbytes / t / 1e3,
                         "max_rel_err_vs_bf16": err})
            print(json.dumps(rows[-1]), flush=True)
        del w, host
    if a.out:
        a.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                     "batch": a.batch, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
