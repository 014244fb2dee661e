"""Next-token quality against a reference distribution (numpy, float64)."""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(logits: np.ndarray, base_logp: np.ndarray, ids: list[int]) -> dict[str, np.ndarray]:
    """Per-position NLL of the next token, KL(base || ours) and top-1 agreement, for logits [T, V]
    against base log-probs [T, V] of the same positions (the last position has no next token)."""
    lp = log_softmax(logits[:-1])
    base = base_logp[:-1]
    return {
        "nll": -lp[np.arange(len(ids) - 1), ids[1:]],
        "kl": (np.exp(base) * (base - lp)).sum(-1),
        "agree": base.argmax(-1) == lp.argmax(-1),
    }


def summarize(parts: list[dict[str, np.ndarray]]) -> dict[str, float]:
    nll, kl, agree = (np.concatenate([p[k] for p in parts]) for k in ("nll", "kl", "agree"))
    return {"perplexity": float(np.exp(nll.mean())), "kl_to_baseline": float(kl.mean()),
            "top1_agreement": float(agree.mean()), "eval_tokens": int(len(nll))}
