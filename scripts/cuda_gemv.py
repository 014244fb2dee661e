"""Batch-1 decode matmuls of a model shape on a GPU, each implementation on the same weights: the time of one
x [1, K] @ w.T in a captured CUDA graph and the share of the measured read bandwidth it reaches (bytes of the
weight as that implementation stores it). Each weight has enough copies that a graph's reads exceed the L2
cache several times over (a weight read straight after itself would come from L2). Implementations: cuBLAS
(what F.linear and the decoder use), our Triton kernels on the 16-bit weight (triton_kernels.matmul_partials:
plain, and gated with every row running: what a token gate's layers read), int8 (the CUDA-core kernel the
decoder takes at batch 1, and the tensor-core one), 4-bit g32 (torch's tinygemm, our w4 kernel). The partial
sums are added as the compiled step would (one small op). Earlier run: cuBLAS needs no replacement at these
shapes but the LM head (docs/measurements/cuda_gemv_h100_llama3-8b_2026-12-06.json).

    python scripts/cuda_gemv.py --shapes llama3-8b [--out F]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from adaptive_inference import gated_linear_op, quant, quant_cuda, triton_kernels  # noqa: E402
from adaptive_inference.bench.cuda_techniques import SHAPES, read_bandwidth  # noqa: E402
from adaptive_inference.model_config import ModelConfig  # noqa: E402


def partials(gate: bool):
    """Our 16-bit kernel (gated with every row running, or plain) as the decoder calls it."""
    def fn(x, w, splits=None):
        splits = splits or gated_linear_op.split_k(*w.shape, gated_linear_op.sms(x.device))
        run = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if gate else None
        return triton_kernels.matmul_partials(x, w, None, run, w.shape[0], splits).sum(0).to(x.dtype)
    return fn


def packed(fmt: str, kernel: str | None = None, tc: bool = False):
    """(make: the bf16 weight -> its packed form on the GPU, matmul x @ w.T with it); tc: int8 on the tensor-core
    kernel (the one batches above GEMV_ROWS take)."""
    def make(w):
        p = quant.quantize(w.float().cpu().numpy(), fmt, group_size=32)
        return quant_cuda.prepare(p, kernel=kernel) if kernel else quant_cuda.prepare(p)

    def fn(x, p, splits=None):
        p = dataclasses.replace(p, splits=splits) if splits else p
        if tc:
            q, scale = p.tensors
            return triton_kernels.matmul_partials(x.expand(triton_kernels.GEMV_ROWS + 1, -1), q, scale, None, 0,
                                                  p.splits).sum(0)[:1].to(x.dtype)
        return quant_cuda.linear(x, p)
    return make, fn


def nbytes(p) -> int:
    return sum(t.numel() * t.element_size() for t in (p.tensors if hasattr(p, "tensors") else (p,)))


IMPLS = {"cublas": (None, lambda x, w: F.linear(x, w)), "triton": (None, partials(False)),
         "triton_gated": (None, partials(True)), "int8": packed("int8"), "int8_tensor_cores": packed("int8", tc=True),
         "int4_tinygemm": packed("int4", "tinygemm"), "int4_triton": packed("int4", "triton")}


OURS = {"triton", "triton_gated", "int8", "int8_tensor_cores", "int4_triton"}  # split-K of triton_kernels


def matrices(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"qkv": (q + 2 * kv, cfg.hidden_size), "o": (cfg.hidden_size, q),
            "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size), "down": (cfg.hidden_size, cfg.intermediate_size),
            "head": (cfg.vocab_size, cfg.hidden_size)}


def time_graph(fn, x, ws, replays: int) -> float:
    """Seconds per matmul: a graph of one matmul per copy in ws, replayed."""
    for w in ws:  # autotune / first use outside capture
        fn(x, w)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [fn(x, w) for w in ws]
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(replays):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / replays / len(ws))
    del outs
    return best


def parser(doc: str) -> argparse.ArgumentParser:
    """--shapes, --matrices, --replays, --out (this script's and cuda_gemv_variants.py's)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["llama3-8b"], choices=list(SHAPES))
    ap.add_argument("--matrices", nargs="+", help="only these (qkv o gate_up down head)")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--out", type=Path)
    return ap


def header() -> tuple[float, dict]:
    """(the measured read bandwidth in bytes/s, the output's device fields)."""
    bw = read_bandwidth("cuda")
    return bw, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "read_bandwidth_gbs": bw / 1e9,
                "shapes": {}}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--splits", type=int, nargs="+",
                    help="also time our kernels at these split-K counts (rows 'impl@splits'; default: split_k's)")
    a = ap.parse_args()
    bw, out = header()
    for shape in a.shapes:
        cfg = ModelConfig.from_dict(SHAPES[shape])
        rows = {}
        for name, (n, k) in matrices(cfg).items():
            if a.matrices and name not in a.matrices:
                continue
            w0 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), w0.float())
            rows[name] = {"n": n, "k": k, "mb": n * k * 2 / 1e6}
            for impl in a.impls:
                make, fn = IMPLS[impl]
                if make and name == "head":  # the packed sets keep the head 16-bit
                    continue
                w = make(w0) if make else w0
                size = nbytes(w)
                copies = max(2, -(-(1 << 30) // size))  # >= 1 GiB of weights a graph
                ws = [w] + [(dataclasses.replace(w, tensors=tuple(t.clone() for t in w.tensors)) if make else
                             w.clone()) for _ in range(copies - 1)]
                for sp in [None, *(a.splits or [])] if impl in OURS else [None]:
                    f = functools.partial(fn, splits=sp) if sp else fn
                    err = (f(x, w).float() - ref).abs().max().item() / ref.abs().max().item()
                    s = time_graph(f, x, ws, a.replays)
                    rows[name][impl if sp is None else f"{impl}@{sp}"] = {
                        "us": s * 1e6, "bytes": size, "share_of_bandwidth": size / s / bw, "max_rel_err": err}
                del ws, w
                torch.cuda.empty_cache()
            print(shape, name, json.dumps(rows[name]), flush=True)
        layer = [r for k, r in rows.items() if k != "head"]
        if not all(i in r for r in layer for i in a.impls):  # --matrices left some out
            out["shapes"][shape] = {"matrices": rows}
            continue
        out["shapes"][shape] = {"matrices": rows, "layer_us": {i: sum(r[i]["us"] for r in layer) for i in a.impls},
                                "layer_best_16bit_us": sum(min(r[i]["us"] for i in a.impls if not IMPLS[i][0])
                                                           for r in layer)}
        print(shape, "layer", out["shapes"][shape]["layer_us"], "best 16-bit", out["shapes"][shape]["layer_best_16bit_us"])
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
