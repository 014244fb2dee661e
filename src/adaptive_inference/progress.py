"""Progress of a long stage on stderr (its log): done / total, rate and ETA, at most every few seconds."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, what: str, total: int, unit: str = "items", every_s: float = 5.0, stream=None):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.t0 = self._last = time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.every_s or self.done == self.total:
            self._last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.what}: {self.done}/{self.total} {self.unit}, {rate:.1f}/s, ETA {eta:.0f} s",
                  file=self.stream, flush=True)

    def finish(self, summary: str) -> None:
        print(f"{self.what}: done in {time.perf_counter() - self.t0:.1f} s: {summary}", file=self.stream, flush=True)
