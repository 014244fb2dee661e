"""The machine's read bandwidth, measured in the job that uses it: decode of a model larger than the caches
is bound by it, so bytes read per token / bandwidth is the limit a decode step can reach.

A timed sum of a float32 buffer well past the last-level cache, with torch's thread pool (MLX's CPU
reductions run on one thread and would understate the machine); median of a few repeats. On a shared VM the
bandwidth a process gets moves between states (34 and 54 GB/s on one 2-core VM, switching within seconds), so
a job samples it more than once and takes the best as its limit."""

from __future__ import annotations

import time

import numpy as np

BUFFER_BYTES = 512 * 2**20


def read_gbs(nbytes: int = BUFFER_BYTES, repeats: int = 5) -> dict:
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()  # first touch: page faults are not bandwidth
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        seconds.append(time.perf_counter() - t0)
    return {"read_gbs": nbytes / float(np.median(seconds)) / 1e9, "buffer_mb": nbytes // 2**20,
            "threads": torch.get_num_threads()}
