"""The machine's read bandwidth, measured in the job that uses it: decode of a model larger than the caches
is bound by it, so bytes read per token / bandwidth is the limit a decode step can reach.

A timed sum of a float32 buffer well past the last-level cache, split over one Python thread per CPU (numpy
releases the GIL in the sum); median of a few repeats. Not torch's thread pool: its OpenMP team stays alive
after the probe, and libgomp, counting more threads than CPUs once MLX's stream thread runs our OpenMP
kernels beside it, stops spinning between parallel regions for good: MLX decode in the same process fell from
43 to 31 tok/s (2-core Xeon VM). On a shared VM the bandwidth a process gets moves between states (34 and 54
GB/s on one 2-core VM, ~30 and ~55 on another, switching within seconds), so a job samples it right before each
timed decode pair and compares each pair's decode with its own sample (paired_share); the best of the samples
is kept beside it."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BUFFER_BYTES = 512 * 2**20


def cpu_threads() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Reader:
    """A read-bandwidth probe with its buffer allocated (and paged in) once: calling it times `repeats` sums
    and returns the median in GB/s (~15 ms a sum at 35 GB/s). The benchmark calls it right before each timed
    decode pair, so each pair's decode is compared with the bandwidth the machine had then."""

    def __init__(self, nbytes: int = BUFFER_BYTES, threads: int | None = None):
        self.nbytes, self.threads = nbytes, threads or cpu_threads()
        self.x = np.ones(nbytes // 4, dtype=np.float32)
        self._parts = np.array_split(self.x, self.threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="bandwidth")
        self._sum()  # first read: page faults and thread starts are not bandwidth

    def _sum(self) -> float:
        return float(sum(self._pool.map(np.add.reduce, self._parts)))

    def __call__(self, repeats: int = 3) -> float:
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self._sum()
            seconds.append(time.perf_counter() - t0)
        return self.nbytes / float(np.median(seconds)) / 1e9

    def close(self) -> None:
        self._pool.shutdown()
        self.x = self._parts = None


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
    reader = Reader(nbytes)
    try:
        return {"read_gbs": reader(repeats), "buffer_mb": nbytes // 2**20, "threads": reader.threads}
    finally:
        reader.close()
