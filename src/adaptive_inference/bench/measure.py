"""Measurements of one configuration against the baseline of the same backend, in one process.

Decode: the configuration and the baseline generate the same prompt side by side, one step each in turn
(who goes first alternates), so every token of one has a token of the other taken within ~100 ms of
machine state: a paired speedup per (prompt, repeat) with little noise. Quality: teacher-forced, against
the baseline logits computed here (no other job is needed)."""

from __future__ import annotations

import re
import resource
import sys
import time

import numpy as np

from .. import cost, metrics
from ..generation import generate, stream, teacher_forced
from ..plan import FULL_WEIGHTS, StepPlan, weights_name
from .stats import paired_speedup, spread

WARMUP_TOKENS = 8  # tokens of an untimed warm-up generation


def _begin(policy, data: dict, prompt, category: str):
    """A policy's view of the request before it runs (the category map's oracle control reads the true
    category; the gears' prompt classifier reads the prompt's text)."""
    if hasattr(policy, "begin"):
        policy.begin({"category": category, "text": data["tokenizer"].decode(list(prompt))})
    return policy


def first_change(plan: StepPlan, num_layers: int) -> int:
    """The first layer where a gate-free plan runs differently from the full model (num_layers: only its
    head differs). The layers before it give the baseline's residual, so its forward may resume there."""
    if weights_name(plan.weights) != FULL_WEIGHTS:
        return 0
    return min(set(plan.skip_layers) | set(plan.zero_mlp) | {layer for layer, _ in plan.blend}, default=num_layers)


def quality(lm, data: dict, new_policy, prompt_tokens: int) -> tuple[dict, list[list[int]]]:
    """Perplexity, KL and top-1 agreement against the baseline, overall and per category; and the
    configuration's teacher-forced argmax ids (torch vs MLX agreement is computed from them). A gate-free
    plan resumes from the baseline forward's input of its first changed layer (the same logits, fewer
    layers run: a head-only change runs only the head)."""
    parts, by_cat, top1 = [], {}, []
    L = lm.cfg.num_hidden_layers
    for ids, cat in zip(data["eval"], data["eval_categories"], strict=True):
        policy = None if new_policy is None else _begin(new_policy(), data, ids[:prompt_tokens], cat)
        plan = policy.plan(0) if getattr(policy, "static", False) else None
        first = first_change(plan, L) if plan is not None and plan.gate is None and not plan.is_full else 0
        t = lm.ids_array(np.asarray(ids)[None])
        fw = lm.forward(t, lm.new_cache(1, len(ids)), capture={first} if first else None)
        base = lm.to_numpy(fw.out.logits[0])
        if policy is None or (plan is not None and plan.is_full):
            logits = base
        elif first:
            logits = lm.logits(ids, plan, resume=(first, fw.captured[first]))
        else:
            logits = teacher_forced(lm, ids, policy, prompt_tokens=prompt_tokens)[0]
        part = metrics.compare_self(base, ids) if logits is base else metrics.compare(logits, metrics.log_softmax(base), ids)
        parts.append(part)
        by_cat.setdefault(cat, []).append(part)
        top1.append(logits.argmax(-1).tolist())
    out = metrics.summarize(parts)
    out["by_category"] = {c: metrics.summarize(p) for c, p in sorted(by_cat.items())}
    return out, top1


def quality_vs(lm, reference, data: dict) -> dict:
    """The baseline of `lm` against the same model loaded as `reference` (e.g. bf16 weights against fp32):
    perplexity, KL(reference || lm) and top-1 agreement on the eval texts."""
    parts = [metrics.compare(lm.logits(ids), metrics.log_softmax(reference.logits(ids)), ids) for ids in data["eval"]]
    return metrics.summarize(parts)


def decode_pairs(lm, data: dict, policies: dict, p: dict, between=None) -> dict:
    """policies: {"baseline": factory, "config": factory} (or the baseline alone). Greedy decode of each
    prompt, the policies stepping in turn; per (repeat, prompt) one paired sample. between(): called right
    before each pair (a bandwidth sample); its results are returned under "between", in pair order."""
    n, names = p["new_tokens"], list(policies)
    prompts, cats = data["prompts"], data["prompt_categories"]
    for _ in range(p["warmup"]):  # a few steps reach every first-use cost (allocations, MLX's kernel builds)
        for name in names:
            generate(lm, prompts[0], max_new_tokens=min(n, WARMUP_TOKENS),
                     policy=_begin(policies[name](), data, prompts[0], cats[0]))
    acc = {name: {"per_token": [], "prefill": [], "latencies": [], "executed": [], "greedy": []} for name in names}
    sampled = []
    for rep in range(p["repeats"]):
        for i, (prompt, cat) in enumerate(zip(prompts, cats, strict=True)):
            if between is not None:
                sampled.append(between())
            order = names if (rep + i) % 2 == 0 else names[::-1]
            streams = {k: stream(lm, np.array([prompt]), max_new_tokens=n,
                                 policy=_begin(policies[k](), data, prompt, cat)) for k in order}
            steps = {k: [] for k in order}
            for _ in range(n):
                for k in order:
                    steps[k].append(next(streams[k]))
            for k, ss in steps.items():
                a = acc[k]
                decode = [s.seconds for s in ss[1:]]
                a["per_token"].append(sum(decode) / len(decode))
                a["prefill"].append(len(prompt) / ss[0].seconds)
                a["latencies"] += decode
                a["executed"] += [s.executed for s in ss[1:]]
                if rep == 0:
                    a["greedy"].append([int(s.tokens[0]) for s in ss])
    k = len(prompts)
    out = {}
    for name, a in acc.items():
        lat = np.array(a["latencies"]) * 1e3
        per_rep = [k / sum(a["per_token"][j:j + k]) for j in range(0, len(a["per_token"]), k)]
        out[name] = {"decode_tps": spread(per_rep), "prefill_tps": spread(a["prefill"]),
                     "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95))},
                     "per_token_s": a["per_token"], "executed": a["executed"], "greedy": a["greedy"]}
    if between is not None:
        out["between"] = sampled
    if "config" in out:
        out["config"]["paired_speedup"] = paired_speedup(out["baseline"]["per_token_s"], out["config"]["per_token_s"])
    return out


def batch_speed(lm, data: dict, new_policy, p: dict) -> list[dict]:
    """Batched greedy throughput (generated tokens and requests per wall second, prefill included) and the
    structural bound of the decode steps that ran (rows of a batch may ask for different plans: the bound
    counts what the batch really read); a short first round warms up."""
    pool, n = data["batch_pool"], p["new_tokens"]
    values = {bs: [] for bs in p["sizes"]}
    executed = {bs: [] for bs in p["sizes"]}
    for rep in range(1 + p["repeats"]):
        for bs in p["sizes"]:
            prompts = np.array([pool[i % len(pool)] for i in range(bs)])
            t0 = time.perf_counter()
            steps = list(stream(lm, prompts, max_new_tokens=n if rep else min(n, WARMUP_TOKENS), policy=new_policy()))
            if rep:
                values[bs].append(bs * n / (time.perf_counter() - t0))
                executed[bs] += [s.executed for s in steps[1:]]
    context = len(pool[0]) + n // 2
    out = []
    for bs, v in values.items():
        frac = cost.structural(lm.cfg, executed[bs], context, lm.relative_bytes)["weight_bytes_fraction"]
        out.append({"batch_size": bs, "tps": spread(v), "requests_per_s": spread([x / n for x in v]),
                    "weight_bytes_fraction": frac, "structural_bound": 1 / frac})
    return out


def gsm8k_accuracy(lm, data: dict, new_policy, max_new_tokens: int) -> dict:
    if not data["gsm8k"]:
        return {}
    correct = 0
    for item in data["gsm8k"]:
        res = generate(lm, item["prompt"], max_new_tokens=max_new_tokens, stop_ids=data["stop_ids"],
                       policy=_begin(new_policy(), data, item["prompt"], item["category"]))
        numbers = re.findall(r"-?\d[\d,]*\.?\d*", data["tokenizer"].decode(res.tokens))
        got = numbers[-1].replace(",", "").rstrip(".") if numbers else None
        correct += got is not None and float(got) == float(item["answer"])
    return {"gsm8k_accuracy": correct / len(data["gsm8k"]), "gsm8k_n": len(data["gsm8k"])}


def gpqa_choice(lm, data: dict, new_policy) -> dict:
    """GPQA multiple choice by mean log-likelihood of each option's tokens after the question, under the
    configuration's policy (the question is its prompt; None: the baseline): accuracy and the picks. How
    often a configuration picks what the baseline picks is computed in the report, from the baseline job's
    picks (each job scores its own configuration only)."""
    if not data["gpqa"]:
        return {}
    picks = []
    for item in data["gpqa"]:
        n = len(item["prompt"])
        scores = []
        for opt in item["options"]:
            ids = item["prompt"] + opt
            policy = None if new_policy is None else _begin(new_policy(), data, item["prompt"], item["category"])
            logits = lm.logits(ids) if policy is None else teacher_forced(lm, ids, policy, prompt_tokens=n)[0]
            lp = metrics.log_softmax(logits[n - 1:-1])
            scores.append(float(lp[np.arange(len(opt)), opt].mean()))
        picks.append(int(np.argmax(scores)))
    answers = [item["answer"] for item in data["gpqa"]]
    return {"gpqa_accuracy": float(np.mean([a == b for a, b in zip(picks, answers, strict=True)])),
            "gpqa_picks": picks, "gpqa_n": len(answers)}


def structural(lm, executed: list, context: int) -> dict:
    out = cost.structural(lm.cfg, executed, context, lm.relative_bytes)
    return {**out, "head_usage": cost.head_usage(executed), "weights_usage": cost.weights_usage(executed),
            "relative_bytes": {k: v for k, v in lm.relative_bytes.items()}}


def peak_memory_mb(lm) -> dict:
    """Peak resident memory of this process (host RAM); on CUDA also the allocator's peak (device memory)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": rss / 2**20 if sys.platform == "darwin" else rss / 2**10}  # bytes on macOS, KiB on Linux
    if lm.name == "torch" and lm.device == "cuda":
        import torch

        out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
