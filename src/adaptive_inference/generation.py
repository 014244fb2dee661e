"""Generation in layers, backend-neutral: the decoder's prefill / decode_one_token -> a token stream ->
generate (one sequence, timed) / generate_batch / teacher_forced (quality under a policy)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .plan import ExecutedStep, StaticPolicy


@dataclass
class Step:
    """One streamed step: next ids [B] (numpy), its wall time in seconds (pending work included), and
    what the decoder executed. Step 0 is the prefill."""

    tokens: np.ndarray
    seconds: float
    executed: ExecutedStep


def runs_ahead(lm, policy) -> bool:
    """Whether stream queues a step before reading the token of the one before (see stream)."""
    return getattr(lm, "runs_ahead", False) and getattr(policy, "plans_ahead", getattr(policy, "static", False))


def stream(lm, prompt: np.ndarray, *, max_new_tokens: int, policy=None, temperature: float = 0.0,
           seed: int = 0) -> Iterator[Step]:
    """Yield one Step per generated token for a [B, T] prompt of equal-length rows. The policy picks each
    step's plan and observes what ran and the step's logits.

    Where the backend queues work asynchronously (lm.runs_ahead: CUDA) and the policy's plans never depend on
    the step just before (`static`: the same plan every step; or `plans_ahead`: plans that follow the step
    index, or for step s + 1 observations up to step s - 1, as the gears' `lag: 1`), step s + 1 is queued
    before step s's token is read back (its input ids never leave the device): the host's per-token work (the
    read, the policy, the next step's launches) then overlaps the device's step instead of leaving the device
    idle through it every token. Each step's tokens are copied to the host as soon as it is queued (lm.fetch),
    so reading them waits for that step alone; so are the decisions it took on the device (the token gate's
    flags, the vocab router's P(rare)) and what a policy with `step_queued` will observe (the gears'
    entropies). The same Steps come out, in the same order, observed in the same order; a Step's seconds is
    then the time since the one before."""
    policy = policy or StaticPolicy()
    ids = lm.ids_array(np.atleast_2d(prompt))
    cache = lm.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
    state = lm.sampler_state(seed)
    ahead = runs_ahead(lm, policy)
    pending = None  # ahead: the queued step whose token is not read yet
    lm.materialize()
    t0 = time.perf_counter()

    def finish(fwd, read) -> Step:
        nonlocal t0
        out = read()  # the host needs the token: this waits for the step (and, ahead, not for the next one)
        policy.observe(fwd.executed, fwd.out.logits)  # after: what ran may be known only once evaluated
        t1 = time.perf_counter()
        done, t0 = Step(out, t1 - t0, fwd.executed), t1
        return done

    for step in range(max_new_tokens):
        if not ahead:
            lm.materialize()
            t0 = time.perf_counter()
        plan = policy.plan(step)
        fwd = lm.prefill(ids, cache, plan) if step == 0 else lm.decode_one_token(ids, cache, plan)
        ids, state = lm.next_tokens(fwd.out, temperature, state)
        read = lm.fetch(ids)  # queued before the next step, so reading it never waits for that step
        if hasattr(policy, "step_queued"):  # what the policy will observe, started on its way too (the gears)
            policy.step_queued(fwd.out.logits, lm)
        if not ahead:
            yield finish(fwd, read)
            continue
        if pending is not None:
            yield finish(*pending)
        pending = fwd, read
    if pending is not None:
        yield finish(*pending)


@dataclass
class GenerationResult:
    """One generation with its measurements (seconds; tokens exclude the prompt)."""

    tokens: list[int]
    prompt_tokens: int
    prefill_s: float = 0.0
    token_latencies_s: list[float] = field(default_factory=list)
    executed: list[ExecutedStep] = field(default_factory=list)
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
    for i, step in enumerate(stream(lm, np.asarray(prompt)[None], max_new_tokens=max_new_tokens, policy=policy,
                                    temperature=temperature, seed=seed)):
        if i == 0:
            res.prefill_s = step.seconds
        res.token_latencies_s.append(step.seconds)
        res.executed.append(step.executed)
        res.tokens.append(int(step.tokens[0]))
        if res.tokens[-1] in stop_ids:
            res.finish_reason = "stop"
            break
    return res


def generate_batch(lm, prompts: np.ndarray, *, max_new_tokens: int, policy=None) -> np.ndarray:
    """Greedy tokens [B, max_new_tokens] for equal-length prompts [B, T]."""
    return np.stack([s.tokens for s in stream(lm, prompts, max_new_tokens=max_new_tokens, policy=policy)], 1)


def teacher_forced(lm, ids: list[int], policy=None, *, prompt_tokens: int = 1) -> tuple[np.ndarray, list]:
    """Logits [T, vocab] (float32 numpy) of a text under a policy, and what ran.

    A static policy without a gate runs the text in one forward. Otherwise the first `prompt_tokens`
    tokens are the prefill (a gate sees them as the prompt) and every later token is one decode step under
    the policy's plan for that step, as generation would run it."""
    policy = policy or StaticPolicy()
    plan0 = policy.plan(0)
    cache = lm.new_cache(1, len(ids))
    if getattr(policy, "static", False) and plan0.gate is None:
        fwd = lm.forward(lm.ids_array(np.asarray(ids)[None]), cache, plan0)
        return lm.to_numpy(fwd.out.logits[0]), [fwd.executed]
    n = max(1, min(prompt_tokens, len(ids)))
    fwd = lm.forward(lm.ids_array(np.asarray(ids[:n])[None]), cache, plan0)
    policy.observe(fwd.executed, fwd.out.logits[:, -1])
    rows, executed = [lm.to_numpy(fwd.out.logits[0])], [fwd.executed]
    for step, tok in enumerate(ids[n:], start=1):
        fwd = lm.decode_one_token(lm.ids_array(np.asarray([tok])), cache, policy.plan(step))
        policy.observe(fwd.executed, fwd.out.logits)
        rows.append(lm.to_numpy(fwd.out.logits))
        executed.append(fwd.executed)
    return np.concatenate(rows), executed
