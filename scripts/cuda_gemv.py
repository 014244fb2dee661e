"""Batch-1 decode matmuls of a model shape on a GPU, each implementation on the same weights: the time of one
x [1, K] @ w.T in a captured CUDA graph and the share of the measured read bandwidth it reaches. Each weight
has enough copies that a graph's reads exceed the L2 cache several times over (a weight read straight after
itself would come from L2). Implementations: cuBLAS (what F.linear and the decoder use) and a plain Triton
reduction (one program per block of rows and K slice), which showed cuBLAS needs no replacement at these
shapes but the LM head (docs/measurements/cuda_gemv_h100_llama3-8b_2026-12-06.json).

    python scripts/cuda_gemv.py --shapes llama3-8b [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from cuda_techniques import SHAPES, read_bandwidth  # noqa: E402

from adaptive_inference import triton_kernels  # noqa: E402
from adaptive_inference.model_config import ModelConfig  # noqa: E402


@triton.autotune(configs=triton_kernels._GEMV_CONFIGS, key=["N", "K", "SPLITS"], reset_to_zero=["y_ptr"])
@triton.jit
def _dense_gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """One row of x times a bf16 / fp16 weight [N, K] on the CUDA cores: one program per (row block, K slice)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    chunk = tl.cdiv(tl.cdiv(K, SPLITS), BLOCK_K) * BLOCK_K
    for k0 in range(pid_k * chunk, tl.minimum(K, (pid_k + 1) * chunk), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    if SPLITS == 1:
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)
    else:
        tl.atomic_add(y_ptr + rn, acc, mask=rn < N)


def dense_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [1, K] @ w.T for a 16-bit weight [N, K]: the batch-1 decode matmul as a plain streaming reduction."""
    k = x.shape[-1]
    n = w.shape[0]
    splits, y = triton_kernels._output(x.reshape(1, k), n)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    _dense_gemv_kernel[grid](x.contiguous(), w, y, n, k, SPLITS=splits)
    return (y if splits == 1 else y.to(x.dtype)).reshape(*x.shape[:-1], n)


IMPLS = {"cublas": lambda x, w: F.linear(x, w), "triton_gemv": dense_gemv}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["llama3-8b"], choices=list(SHAPES))
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    bw = read_bandwidth("cuda")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "read_bandwidth_gbs": bw / 1e9,
           "shapes": {}}
    for shape in a.shapes:
        cfg = ModelConfig.from_dict(SHAPES[shape])
        rows = {}
        for name, (n, k) in matrices(cfg).items():
            nbytes = n * k * 2
            copies = max(2, -(-(1 << 30) // nbytes))  # >= 1 GiB of weights a graph
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), ws[0].float())
            rows[name] = {"n": n, "k": k, "mb": nbytes / 1e6}
            for impl in a.impls:
                err = (IMPLS[impl](x, ws[0]).float() - ref).abs().max().item()
                s = time_graph(IMPLS[impl], x, ws, a.replays)
                rows[name][impl] = {"us": s * 1e6, "share_of_bandwidth": nbytes / s / bw, "max_abs_err": err}
            print(shape, name, json.dumps(rows[name]), flush=True)
            del ws
            torch.cuda.empty_cache()
        layer = [r for k, r in rows.items() if k != "head"]
        out["shapes"][shape] = {"matrices": rows, "layer_us": {i: sum(r[i]["us"] for r in layer) for i in a.impls},
                                "layer_best_us": sum(min(r[i]["us"] for i in a.impls) for r in layer)}
        print(shape, "layer", out["shapes"][shape]["layer_us"], "best", out["shapes"][shape]["layer_best_us"])
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
