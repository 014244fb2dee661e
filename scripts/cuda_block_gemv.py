"""The 4-bit block GEMVs alone on a model shape's matrices, each in its block form (qkv: RMS-normed x; o and down:
+ the residual; gate_up: normed x, silu(gate) * up), depth 4 and nested at depth 8, triton_block's Triton kernel
beside gluon_block's Gluon one: microseconds in a CUDA graph over >= 1 GiB of weight copies, share of the
measured read bandwidth, largest error against the fp32 arithmetic of the weights as dequantized; per kernel the
line through its two depths' times (1.8x the bytes): a fixed part and a marginal rate. --rows 1 8 --kernels
triton matmul matmul-pairs --int8: the separate ops' matmul alone beside the block kernel (at 8 rows: the
tensor-core kernels the separate ops take above 4 rows, their 4-bit weights made in fp32 or in bf16 pairs), int8
too. --profile under `ncu --profile-from-start off`: each timed kernel's hardware counters
(scripts/gpu_kernel_checks.sh's ncu step).

    python scripts/cuda_block_gemv.py --shapes llama3-8b [--out F]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cuda_gemv import header, matrices, parser, time_graph  # noqa: E402

from adaptive_inference import block_op  # noqa: E402
from adaptive_inference import gluon_block as gb  # noqa: E402
from adaptive_inference import triton_block as tb  # noqa: E402
from adaptive_inference import triton_kernels as tk  # noqa: E402
from adaptive_inference.bench.cuda_techniques import SHAPES  # noqa: E402
from adaptive_inference.model_config import ModelConfig  # noqa: E402
from adaptive_inference.triton_block import w4_block, w8_block  # noqa: E402

FORMS = {"qkv": "norm", "o": "add", "gate_up": "norm_glu", "down": "add"}


def packed(n: int, k: int, depth: int, group: int) -> tuple:
    """Random 4-bit codes [N, K / 2] (and the nested format's second plane at depth 8), fp16 scale and min around
    weights of about 0.02."""
    def plane():
        return torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
    scale = (torch.rand(n, k // group, device="cuda") * 0.004 + 0.001).half()
    return plane(), plane() if depth == 8 else torch.empty(0, device="cuda", dtype=torch.uint8), scale, -8 * scale


def reference(x, lnw, w, form, r):
    """The block form's fp32 arithmetic with the fp32 weight w [N, K] (the block ops' torch code)."""
    a = F.rms_norm(x.float(), (x.shape[1],), lnw.float(), 1e-5) if form != "add" else x.float()
    y = a @ w.T
    return block_op._glu(y, True) if form == "norm_glu" else y + r.float() if form == "add" else y


def fixed_and_marginal(row: dict) -> dict:
    """{kernel: (fixed us, marginal GB/s)} of a matrix's row timed at both depths (1.8x the bytes; the same grid
    where the autotuner took the same tile for both): time = fixed + bytes / marginal rate, a line through the two
    points."""
    out = {}
    for kernel in sorted({k.rsplit("_d", 1)[0] for k in row if "_d" in k}):
        a, b = row.get(f"{kernel}_d4"), row.get(f"{kernel}_d8")
        if a and b:
            per_byte = (b["us"] - a["us"]) / (b["bytes"] - a["bytes"])
            out[kernel] = {"fixed_us": a["us"] - a["bytes"] * per_byte, "marginal_gbs": 1e-3 / per_byte}
    return out


def op(form: str, group: int, lnw: torch.Tensor, r: torch.Tensor, kernel: str):
    """fn(x, packed tensors): w4_block in this block form ("matmul": x @ w.T alone, the separate ops' kernel;
    "matmul-pairs": the same with the tensor-core kernel's weights made in bf16 pairs)."""
    if kernel.startswith("matmul"):
        return lambda x, t: tk.w4_linear(x, t[0], t[1] if t[1].numel() else t[0], t[2], t[3], group, bool(t[1].numel()))
    if form == "add":
        return lambda x, t: w4_block(x, *t, group, residual=r, kernel=kernel)
    return lambda x, t: w4_block(x, *t, group, lnw=lnw, eps=1e-5, glu=form == "norm_glu", kernel=kernel)


def op8(form: str, lnw: torch.Tensor, r: torch.Tensor, kernel: str):
    """fn(x, (q, scale)): w8_block in this block form ("matmul": x @ w.T alone, the separate ops' kernel)."""
    if kernel == "matmul":
        return lambda x, t: tk.w8_linear(x, *t)
    if form == "add":
        return lambda x, t: w8_block(x, *t, residual=r)
    return lambda x, t: w8_block(x, *t, lnw=lnw, eps=1e-5, glu=form == "norm_glu")


def runs(kernel: str, m: int, depth: int) -> bool:
    """The block kernels take up to GEMV_ROWS rows of x, matmul any; matmul-pairs is the tensor-core kernel's
    other way (above GEMV_ROWS rows, depth 4)."""
    if kernel == "matmul-pairs":
        return m > tb.GEMV_ROWS and depth == 4
    return kernel == "matmul" or m <= tb.GEMV_ROWS


def timed(fn, x, t, ref, replays: int, bw: float) -> dict:
    """fn's microseconds over >= 1 GiB of copies of the weight tensors t, share of bandwidth, error against ref."""
    size = sum(v.numel() * v.element_size() for v in t)
    copies = max(2, -(-(1 << 30) // size))
    ws = [t] + [tuple(v.clone() for v in t) for _ in range(copies - 1)]
    err = ((fn(x, t).float() - ref).abs().max() / ref.abs().max()).item()
    s = time_graph(fn, x, ws, replays)
    return {"us": s * 1e6, "bytes": size, "share_of_bandwidth": size / s / bw, "max_rel_err": err}


def profiled(fn, x, t) -> None:
    """One call of fn (already autotuned) between cudaProfilerStart and Stop: the launch that
    `ncu --profile-from-start off` profiles."""
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn(x, t)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main() -> None:
    ap = parser(__doc__)
    ap.set_defaults(matrices=list(FORMS))
    ap.add_argument("--kernels", nargs="+", default=["triton", "gluon-serial", "gluon"],
                    choices=["triton", "gluon-serial", "gluon", "matmul", "matmul-pairs"],
                    help="matmul: x @ w.T alone through the separate ops' kernel (above 4 rows: tensor cores, "
                         "their weights made in fp32; matmul-pairs: in bf16 pairs, triton_kernels.W4_PAIRS)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1],
                    help="rows of x (decode batch), each timed; the block kernels take up to 4, matmul any")
    ap.add_argument("--int8", action="store_true", help="also the int8 block GEMV (triton) and matmul")
    ap.add_argument("--depths", nargs="+", type=int, default=[4, 8], choices=[4, 8])
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--profile", action="store_true",
                    help="after timing each kernel, one call of it between cudaProfilerStart and Stop (run under "
                         "ncu --profile-from-start off: the hardware counters of each timed kernel)")
    ap.add_argument("--triton-tiles", nargs="+", default=["8x512"],
                    help="autotune the Triton kernels over these BLOCK_NxBLOCK_K tiles only (all: 'all'; on an H100 "
                         "their autotuner took 8x512 for every 4-bit shape, docs/measurements 2026-12-07)")
    ap.add_argument("--tc-tiles", nargs="+", default=["all"],
                    help="autotune the tensor-core 4-bit kernel (matmul above 4 rows) over these BLOCK_NxBLOCK_K tiles "
                         "of its list only (each tile two compiles a way, the scales a tile ahead or not: 'all' is 9 tiles, 18)")
    a = ap.parse_args()
    tc_tiles = [t for t in tk._W4_TC_TILES if a.tc_tiles == ["all"] or f"{t[0]}x{t[1]}" in a.tc_tiles]
    if not tc_tiles:
        raise SystemExit(f"--tc-tiles {' '.join(a.tc_tiles)}: none of the kernel's tiles "
                         f"({' '.join(f'{t[0]}x{t[1]}' for t in tk._W4_TC_TILES)})")
    if a.triton_tiles != ["all"]:
        for kern in (tb._w4_block_kernel, tb._w4n_block_kernel):
            kern.configs = [c for c in kern.configs if f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}" in a.triton_tiles]
    bw, out = header()
    out["group"] = a.group
    for shape in a.shapes:
        rows = out["shapes"].setdefault(shape, {})
        for name, (n, k) in matrices(ModelConfig.from_dict(SHAPES[shape])).items():
            if name not in a.matrices:
                continue
            form = FORMS[name]
            lnw = (torch.rand(k, device="cuda") + 0.5).bfloat16()
            row = rows[name] = {"n": n, "k": k, "form": form}
            for m in a.rows:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                r = torch.randn(m, n // 2 if form == "norm_glu" else n, device="cuda", dtype=torch.bfloat16)
                tag = "" if m == 1 else f"_m{m}"  # batch 1 keeps the earlier files' keys
                for depth in a.depths:
                    t = packed(n, k, depth, a.group)
                    w = block_op.w4_dequantize(*t, a.group)
                    ref = reference(x, lnw, w, form, r)
                    for kernel in [kn for kn in a.kernels if runs(kn, m, depth)]:
                        want = x.float() @ w.T if kernel.startswith("matmul") else ref
                        fn = op(form, a.group, lnw, r, kernel)
                        tc = kernel.startswith("matmul") and m > tb.GEMV_ROWS
                        if tc:  # the tensor-core kernel, autotuned afresh over one way of making its weights
                            tk._w4_kernel.configs = tk.w4_tc_configs((int(kernel == "matmul-pairs"),), tc_tiles)
                            tk._w4_kernel.cache.clear()
                        row[f"{kernel}{tag}_d{depth}"] = timed(fn, x, t, want, a.replays, bw)
                        if tc:
                            row[f"{kernel}{tag}_d{depth}"]["tile"] = [
                                {k: str(v) for k, v in cfg.all_kwargs().items()} for cfg in tk._w4_kernel.cache.values()]
                        if a.profile:
                            profiled(fn, x, t)
                    del t, w
                    torch.cuda.empty_cache()
                if a.int8:
                    t = (torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8),
                         (torch.rand(n, device="cuda") * 0.001).bfloat16())
                    w = t[0].float() * t[1].float()[:, None]
                    ref = reference(x, lnw, w, form, r)
                    for kernel in ("triton", "matmul") if m <= tb.GEMV_ROWS else ("matmul",):  # the int8 ones
                        want = x.float() @ w.T if kernel == "matmul" else ref
                        row[f"{kernel}{tag}_int8"] = timed(op8(form, lnw, r, kernel), x, t, want, a.replays, bw)
                    del t, w
                    torch.cuda.empty_cache()
            row["fixed_and_marginal"] = fixed_and_marginal(row)
            print(shape, name, json.dumps(row), flush=True)
    out["tiles"] = {name: [{"key": [str(v) for v in key], "tile": cfg.all_kwargs()} for key, cfg in kern.cache.items()]
                    for name, kern in (("triton", tb._w4_block_kernel), ("triton_nested", tb._w4n_block_kernel),
                                       ("gluon", gb._w4_block_kernel))}
    print(json.dumps(out["tiles"]), flush=True)
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
