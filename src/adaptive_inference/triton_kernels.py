"""Triton kernels for CUDA decode (imported on CUDA only; triton comes with torch's CUDA wheels).

w8_linear: x [M, K] (bf16 / fp16 / fp32) times an int8 weight [N, K] with a per-row scale [N], the packed
int8 weight's matmul. At decode sizes the matmul only streams the weight, so each program owns a block of
output rows and reads its int8 codes once, widening them in registers (tensor-core dot with the rows of x
padded to 16); split-K over `splits` programs when there are too few row blocks to fill the GPU. Registered
as the custom op adaptive_inference::w8_linear so torch.compile treats it as one opaque call and CUDA graphs
capture it (the autotuning runs on first use, outside capture: the decoder's first step of a plan runs for
real before it is captured).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [(32, 256, 4, 4), (64, 256, 4, 4), (32, 512, 4, 3), (64, 512, 8, 3),
                                 (128, 128, 4, 4), (16, 512, 4, 4), (128, 256, 8, 3)]]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "SPLITS"], reset_to_zero=["y_ptr"])
@triton.jit
def _w8_kernel(x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, SPLITS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    chunk = tl.cdiv(tl.cdiv(K, SPLITS), BLOCK_K) * BLOCK_K
    for k0 in range(pid_k * chunk, tl.minimum(K, (pid_k + 1) * chunk), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(q_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
    acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    out = y_ptr + rm[:, None] * N + rn[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLITS == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # partial sums of the K slices, into fp32
        tl.atomic_add(out, acc, mask=mask)


@functools.lru_cache(maxsize=256)
def _splits(n: int, k: int, device: int) -> int:
    """Split-K so that about two waves of programs run: few output rows and a long K (the MLP down matrix)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    blocks = triton.cdiv(n, 64)
    s = 1
    while blocks * s < 2 * sms and k // (s * 2) >= 1024:
        s *= 2
    return s


@torch.library.custom_op("adaptive_inference::w8_linear", mutates_args=())
def w8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = q.shape[0]
    splits = _splits(n, k, x.device.index or 0)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype) if splits == 1 else \
        torch.zeros((m, n), device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, 16), splits)  # noqa: E731
    _w8_kernel[grid](x.contiguous(), q, scale, y, m, n, k, SPLITS=splits, BLOCK_M=16)
    return y if splits == 1 else y.to(x.dtype)


@w8_linear.register_fake
def _(x, q, scale):
    return x.new_empty((x.shape[0], q.shape[0]))
