"""One cost model for every technique: what a decode step read and computed, from what the decoder reports
it executed (plan.ExecutedStep), as a share of the full model's step. 1 / bytes share is the structural
bound: the speedup a purely memory-bound decoder would get."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .model_config import ModelConfig
from .plan import ExecutedStep


def _params(cfg: ModelConfig) -> dict[str, int]:
    h, d = cfg.hidden_size, cfg.head_dim
    return {"attention": h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + h,  # + its norm
            "mlp": 3 * h * cfg.intermediate_size + h,
            "kv": 2 * h * d * cfg.num_key_value_heads + h,  # a skipping token's K/V write (+ the input norm)
            "head": cfg.vocab_size * h}


def step_params(cfg: ModelConfig, step: ExecutedStep, relative_bytes: dict[str, dict] | None = None) -> float:
    """Weight bytes a step read, in units of one full-precision parameter. relative_bytes: per packed weight
    set, {attention|mlp|head: bytes it reads / full bytes} (Decoder.relative_bytes); the head's share
    applies when the full head ran (a narrower head reads full-precision rows)."""
    p = _params(cfg)
    r = (relative_bytes or {}).get(step.weights, {})
    head = r.get("head", 1.0) if step.head == "full" else 1.0
    return (r.get("attention", 1.0) * (len(step.layers_run) * p["attention"] + len(step.kv_only_layers) * p["kv"])
            + r.get("mlp", 1.0) * len(step.mlps_run) * p["mlp"] + head * step.head_params)


def structural(cfg: ModelConfig, steps: list[ExecutedStep], context: int,
               relative_bytes: dict[str, dict] | None = None) -> dict[str, float]:
    """Mean share of weight bytes and FLOPs per decode step against the full model, over `steps`."""
    p, L = _params(cfg), cfg.num_hidden_layers
    full_params = L * (p["attention"] + p["mlp"]) + p["head"]
    attn_flops = 4 * cfg.num_attention_heads * cfg.head_dim * context  # scores + weighted sum, per layer
    full_flops = 2 * full_params + L * attn_flops
    if not steps:
        return {"weight_bytes_fraction": 1.0, "flops_fraction": 1.0}
    fb, ff = [], []
    for s in steps:
        fb.append(step_params(cfg, s, relative_bytes) / full_params)
        # a row computes only the layers it ran (row_layer_share); the head runs for every row
        block = 2 * (p["attention"] * len(s.layers_run) + p["mlp"] * len(s.mlps_run))
        share = s.row_layer_share * L / max(len(s.layers_run), 1)
        kv = 2 * p["kv"] * len(s.kv_only_layers)
        ff.append((block * share + kv + 2 * s.head_params + s.row_layer_share * L * attn_flops) / full_flops)
    return {"weight_bytes_fraction": float(np.mean(fb)), "flops_fraction": float(np.mean(ff))}


def head_usage(steps: list[ExecutedStep]) -> dict[str, float]:
    """Share of steps per head that ran ({'full': 1.0} for a plain model)."""
    return _shares(Counter(s.head for s in steps), len(steps))


def weights_usage(steps: list[ExecutedStep]) -> dict[str, float]:
    """Share of steps per weight set (gear occupancy; {'full': 1.0} for a plain model)."""
    return _shares(Counter(s.weights for s in steps), len(steps))


def _shares(counts: Counter, n: int) -> dict[str, float]:
    return {k: v / n for k, v in sorted(counts.items())} if n else {}
