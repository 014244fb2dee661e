"""Backend-neutral generation on top of a backend's generate_step (the one place per-step logic lives)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class GenerationResult:
    """One generation with its measurements (seconds; tokens exclude the prompt)."""

    tokens: list[int]
    prompt_tokens: int
    prefill_s: float = 0.0
    token_latencies_s: list[float] = field(default_factory=list)
    finish_reason: str = "length"

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tps(self) -> float:
        # the first token comes out of the prefill; decode speed counts the steps after it
        steps = self.token_latencies_s[1:]
        return len(steps) / sum(steps) if steps else float("nan")


def generate(lm, prompt: list[int], *, max_new_tokens: int, policy=None, stop_ids=(),
             temperature: float = 0.0, seed: int = 0) -> GenerationResult:
    """Single-sequence generation with per-token timing; stops after any of stop_ids."""
    res = GenerationResult(tokens=[], prompt_tokens=len(prompt))
    steps = lm.generate_step(np.asarray(prompt)[None], max_new_tokens=max_new_tokens, policy=policy,
                             temperature=temperature, seed=seed)
    for i, (tok, dt) in enumerate(steps):
        if i == 0:
            res.prefill_s = dt
        res.token_latencies_s.append(dt)
        res.tokens.append(int(tok[0]))
        if res.tokens[-1] in stop_ids:
            res.finish_reason = "stop"
            break
    return res
