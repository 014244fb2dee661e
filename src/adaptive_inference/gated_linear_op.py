"""A matmul that a decision taken on the device may skip, `adaptive_inference::gated_linear`: x @ w.T whose
first `gated` output columns are computed only if some row of x runs (zeros where none does). The layers after
a token gate run it inside one captured step, so the gate needs no host read and a layer that no row runs
reads none of those weights. The op returns fp32 partial sums over `splits` slices of K (split-K, so a matrix
with few output rows still fills the GPU), which gated_linear adds up in plain torch ops: under torch.compile
that sum fuses into the residual add that follows, so a split-K matmul costs one launch (no zero fill before
its atomic adds, no cast after). With one slice there is nothing to add and the op stores the result in x's
dtype (partials_dtype), so an op after it that inductor cannot fuse into (the attention op after qkv) reads
it as it is, without a cast launch. Its implementation here is F.linear and a select (any device; what a CPU test
runs); triton_kernels registers the CUDA kernel, whose programs read the flags before any weight."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=16)
def sms(device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: Triton's interpreter on CPU, as a small GPU, so
    CPU tests reach the split-K path)."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


# the most rows (batch x tokens) whose matmuls are gated: with more, some row runs nearly every layer on nearly
# every step (8 rows skipping on 45% each: all skip on 0.8% of steps) and the gated kernel, the tensor-core one
# there, costs more than it saves (H100, 8B: 0.93x at batch 8), so those steps read the weights as usual
# (0.97x with this rule: the gate's own work, for a bound of 1.004)
GATED_ROWS = 4


def split_k(n: int, k: int, sms: int) -> int:
    """Slices of K for a decode-sized matmul of n output rows on `sms` SMs: about two waves of programs (blocks
    of 64 rows), each slice at least 1024 long (the MLP down matrix splits, the gate/up matrix does not). Plain
    arithmetic, so torch.compile folds it."""
    blocks, s = -(-n // 64), 1
    while blocks * s < 2 * sms and k // (s * 2) >= 1024:
        s *= 2
    return s


def partials_dtype(x: torch.Tensor, splits: int) -> torch.dtype:
    """What a partials op (gated / w8 / w4_linear_partials) stores: fp32 slices to add up, or with one slice
    the result itself, in x's dtype."""
    return torch.float32 if splits > 1 else x.dtype


def add_partials(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A partials op's [splits, M, N] added up in dtype (one slice: a view, no kernel). Under torch.compile a sum
    of fewer than 8 slices becomes adds fused into the next op (inductor's unroll_reductions_threshold), 8 or
    more a kernel of its own: the 8B down matrix's 8 slices, 1.3 us a layer on an H100. Adding them one by one
    fuses them into the next RMSNorm instead, one program that then reads every slice in both of its passes;
    tried with x_for_pairs (2026-12-07), the two measured no faster end to end, and this one was taken back."""
    return y[0].to(dtype) if y.shape[0] == 1 else y.sum(0).to(dtype)


@torch.library.custom_op("adaptive_inference::gated_linear_partials", mutates_args=())
def gated_linear_partials(x: torch.Tensor, w: torch.Tensor, run: torch.Tensor, gated: int,
                          splits: int) -> torch.Tensor:
    """[splits, M, N] (partials_dtype) whose sum over the first axis is x [M, K] @ w [N, K].T, with columns
    < gated zero where no row of run [M] (bool) is set."""
    y = F.linear(x, w).float()
    if gated > 0:
        y = torch.cat([torch.where(run.any(), y[:, :gated], torch.zeros((), dtype=y.dtype, device=y.device)),
                       y[:, gated:]], dim=1)
    return torch.cat([y[None], y.new_zeros((splits - 1, *y.shape))]).to(partials_dtype(x, splits))


@gated_linear_partials.register_fake
def _(x, w, run, gated, splits):
    return x.new_empty((splits, x.shape[0], w.shape[0]), dtype=partials_dtype(x, splits))


def gated_linear(x: torch.Tensor, w: torch.Tensor, run: torch.Tensor, gated: int, splits: int = 1) -> torch.Tensor:
    """x [M, K] @ w [N, K].T in x's dtype, columns < gated zero where no row of run [M] is set."""
    return add_partials(gated_linear_partials(x, w, run, gated, splits), x.dtype)


class GatedWeight:
    """A full weight whose matmul (TorchLM.linear calls .linear) skips its first `gated` output columns when no
    row of `run` runs the layer: what TorchLM.gated_layer hands the decoder for a gated layer."""

    def __init__(self, w: torch.Tensor, run: torch.Tensor, gated: int, splits: int = 1):
        self.w, self.run, self.gated, self.splits = w, run, gated, splits

    @property
    def shape(self):
        return self.w.shape

    def linear(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        y = gated_linear(x.reshape(-1, x.shape[-1]), self.w, self.run.reshape(-1), self.gated, self.splits)
        y = y.view(*x.shape[:-1], -1)  # run [B, T] per row of x [B, T, K]
        return y if b is None else y + b
