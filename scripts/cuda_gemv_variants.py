"""Each batch-1 GEMV kernel alone on a model shape's matrices (no eager op adding the partial sums, which the
compiled step fuses away): cuBLAS, our bf16 GEMV, int8 in fp32 and in fp16 pairs, 4-bit in fp32 and in fp16
pairs (each with and without the register prefetch), tinygemm int4; split-K sweeps on the small matrices. Times
in a CUDA graph over >= 1 GiB of weight copies (cuda_gemv.time_graph); share of the measured read bandwidth.

    python scripts/cuda_gemv_variants.py --shapes llama3-8b [--out F]
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

from adaptive_inference import f16x2, gated_linear_op, quant, quant_cuda  # noqa: E402
from adaptive_inference import triton_kernels as tk  # noqa: E402
from adaptive_inference.bench.cuda_techniques import SHAPES  # noqa: E402
from adaptive_inference.model_config import ModelConfig  # noqa: E402

W4_KERNELS = (tk._w4_gemv_kernel, tk._w4_gemv_f16x2_kernel)
W4_CONFIGS = {k: list(k.configs) for k in W4_KERNELS}


def prefetch_only(pf: int | None) -> None:
    """Autotune the 4-bit GEMVs over the configurations with PREFETCH == pf (None: all)."""
    for k in W4_KERNELS:
        k.configs = [c for c in W4_CONFIGS[k] if pf is None or c.kwargs["PREFETCH"] == pf]
        k.cache.clear()


def cases(w0: torch.Tensor, x: torch.Tensor, small: bool) -> dict:
    """name -> (fn(x, tensors), tensors, prefetch filter or None)."""
    n, k = w0.shape
    sp0 = gated_linear_op.split_k(n, k, gated_linear_op.sms(x.device))
    p8 = quant.quantize(w0.float().cpu().numpy(), "int8")
    p4 = quant.quantize(w0.float().cpu().numpy(), "int4", group_size=32)
    t8, t4 = quant_cuda.prepare(p8).tensors, quant_cuda.prepare(p4, kernel="triton").tensors
    xq4, xq8, none = f16x2.prep_x(x, 1 / 16), f16x2.prep_x(x, 1 / 256), x.new_empty(0)
    fams = {"bf16": (lambda sp: lambda x, t: tk.matmul_partials(x, t[0], None, None, 0, sp), (w0,), False),
            "int8": (lambda sp: lambda x, t: tk.w8_linear_partials(x, none, *t, sp), t8, False),
            "int8_f16x2": (lambda sp: lambda x, t: tk.w8_linear_partials(x, xq8, *t, sp), t8, False),
            "int4": (lambda sp: lambda x, t: tk.w4_linear_partials(x, none, *t, 32, False, sp), t4, True),
            "int4_f16x2": (lambda sp: lambda x, t: tk.w4_linear_partials(x, xq4, *t, 32, False, sp), t4, True)}
    out = {"cublas": (lambda x, t: F.linear(x, t[0]), (w0,), None)}
    for fam, (make, tens, w4) in fams.items():
        for pf in (0, 1) if w4 else (None,):
            out[f"{fam}{'' if pf is None else f'_pf{pf}'}@{sp0}"] = (make(sp0), tens, pf)
        for sp in (1, 2, 4, 8, 16) if small and fam != "bf16" else ():
            if sp != sp0:
                out[f"{fam}@{sp}"] = (make(sp), tens, None)
    out["tinygemm"] = (lambda x, t: torch._weight_int4pack_mm(x, t[0], 32, t[1]),
                       quant_cuda.prepare(p4, kernel="tinygemm").tensors, None)
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.set_defaults(matrices=["qkv", "o", "gate_up", "down"])
    a = ap.parse_args()
    bw, out = header()
    for shape in a.shapes:
        rows = out["shapes"].setdefault(shape, {})
        for name, (n, k) in matrices(ModelConfig.from_dict(SHAPES[shape])).items():
            if name not in a.matrices:
                continue
            w0 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), w0.float())
            row = rows[name] = {"n": n, "k": k}
            for case, (fn, tens, pf) in cases(w0, x, name in ("qkv", "o")).items():
                prefetch_only(pf)
                size = sum(t.numel() * t.element_size() for t in tens)
                copies = max(2, -(-(1 << 30) // size))
                ws = [tens] + [tuple(t.clone() for t in tens) for _ in range(copies - 1)]
                y = fn(x, tens)
                err = ((y.sum(0) if y.dim() == 3 else y).float() - ref).abs().max().item() / ref.abs().max().item()
                s = time_graph(fn, x, ws, a.replays)
                row[case] = {"us": s * 1e6, "bytes": size, "share_of_bandwidth": size / s / bw, "max_rel_err": err}
                del ws
                torch.cuda.empty_cache()
            prefetch_only(None)
            print(shape, name, json.dumps(row), flush=True)
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
