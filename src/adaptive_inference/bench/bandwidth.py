"""The machine's read bandwidth, measured in the job that uses it: decode of a model larger than the caches
is bound by it, so bytes read per token / bandwidth is the limit a decode step can reach.

A timed sum of a float32 buffer well past the last-level cache, with torch's thread pool (MLX's CPU
reductions run on one thread and would understate the machine); median of a few repeats. On a shared VM the
bandwidth a process gets moves between states (34 and 54 GB/s on one 2-core VM, ~30 and ~55 on another,
switching within seconds), so a job samples it right before each timed decode pair and compares each pair's
decode with its own sample (paired_share); the best of the samples is kept beside it."""

from __future__ import annotations

import time

import numpy as np

BUFFER_BYTES = 512 * 2**20


class Reader:
    """A read-bandwidth probe with its buffer allocated (and paged in) once: calling it times `repeats` sums
    and returns the median in GB/s (~15 ms a sum at 35 GB/s). The benchmark calls it right before each timed
    decode pair, so each pair's decode is compared with the bandwidth the machine had then."""

    def __init__(self, nbytes: int = BUFFER_BYTES):
        import torch

        self.nbytes = nbytes
        self.x = torch.ones(nbytes // 4, dtype=torch.float32)
        self.x.sum()  # first touch: page faults are not bandwidth

    def __call__(self, repeats: int = 3) -> float:
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.x.sum()
            seconds.append(time.perf_counter() - t0)
        return self.nbytes / float(np.median(seconds)) / 1e9


def paired_share(seconds_per_token: list[float], read_gbs: list[float], bytes_per_token: float) -> dict:
    """Per decode pair, the share of that moment's bandwidth limit the decode reached (tok/s x bytes a step
    reads / bandwidth sampled right before the pair); the median over pairs, and the median limit (tok/s)."""
    if len(seconds_per_token) != len(read_gbs) or not read_gbs:
        raise ValueError(f"paired_share: {len(seconds_per_token)} decode samples, {len(read_gbs)} bandwidth samples")
    shares = [bytes_per_token / s / (g * 1e9) for s, g in zip(seconds_per_token, read_gbs, strict=True)]
    return {"share_of_limit": float(np.median(shares)),
            "limit_tps": float(np.median([g * 1e9 / bytes_per_token for g in read_gbs])),
            "pair_read_gbs": [round(g, 2) for g in read_gbs]}


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
