"""A matmul that a decision taken on the device may skip, `adaptive_inference::gated_linear`: x @ w.T whose
first `gated` output columns are computed only if some row of x runs (zeros where none does). The layers after
a token gate run it inside one captured step, so the gate needs no host read and a layer that no row runs
reads none of those weights. Its implementation here is F.linear and a select (any device; what a CPU test
runs); triton_kernels registers the CUDA kernel, whose programs read the flags before any weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("adaptive_inference::gated_linear", mutates_args=())
def gated_linear(x: torch.Tensor, w: torch.Tensor, run: torch.Tensor, gated: int) -> torch.Tensor:
    """x [M, K] @ w [N, K].T with columns < gated zeroed where no row of run [M] (bool) is set."""
    y = F.linear(x, w)
    if gated <= 0:
        return y
    head = torch.where(run.any(), y[:, :gated], torch.zeros((), dtype=y.dtype, device=y.device))
    return torch.cat([head, y[:, gated:]], dim=1)


@gated_linear.register_fake
def _(x, w, run, gated):
    return x.new_empty((x.shape[0], w.shape[0]))


class GatedWeight:
    """A full weight whose matmul (TorchLM.linear calls .linear) skips its first `gated` output columns when no
    row of `run` runs the layer: what TorchLM.gated_layer hands the decoder for a gated layer."""

    capturable = True

    def __init__(self, w: torch.Tensor, run: torch.Tensor, gated: int):
        self.w, self.run, self.gated = w, run, gated

    @property
    def shape(self):
        return self.w.shape

    def linear(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        y = gated_linear(x.reshape(-1, x.shape[-1]), self.w, self.run.reshape(-1), self.gated)
        y = y.view(*x.shape[:-1], -1)  # run [B, T] per row of x [B, T, K]
        return y if b is None else y + b
