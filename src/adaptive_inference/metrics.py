"""Next-token quality against a reference distribution (numpy, float64)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclass(frozen=True)
class Reference:
    """A reference distribution as compare needs it, computed once per text (profile_ffn and layer_importance
    compare ~30 plans against one baseline): per position [T-1] its probabilities p [T-1, V], sum p log p,
    sum p (1 up to rounding) and argmax."""

    p: np.ndarray
    plogp: np.ndarray
    mass: np.ndarray
    top: np.ndarray


def reference(base_logp: np.ndarray) -> Reference:
    """base log-probs [T, V] (the last position has no next token and is dropped)."""
    lb = np.asarray(base_logp[:-1], dtype=np.float64)
    p = np.exp(lb)
    return Reference(p=p, plogp=np.einsum("tv,tv->t", p, lb), mass=p.sum(-1), top=lb.argmax(-1))


def compare(logits: np.ndarray, base: np.ndarray | Reference, ids: list[int]) -> dict[str, np.ndarray]:
    """Per-position NLL of the next token, KL(base || ours) and top-1 agreement, for logits [T, V] against
    base log-probs [T, V] of the same positions (or their Reference). With lse = logsumexp(logits):
    KL = sum p (log p - logits + lse) = sum p log p - p . logits + lse sum p, one exp over the logits."""
    ref = base if isinstance(base, Reference) else reference(base)
    x, lse = _lse(logits)
    return {
        "nll": lse - x[np.arange(len(ids) - 1), ids[1:]],
        # >= 0: a distribution against itself leaves only rounding (~1e-16), never a negative KL
        "kl": np.maximum(ref.plogp - np.einsum("tv,tv->t", ref.p, x) + lse * ref.mass, 0.0),
        "agree": ref.top == x.argmax(-1),
    }


def compare_self(logits: np.ndarray, ids: list[int]) -> dict[str, np.ndarray]:
    """compare() of logits against their own distribution: the NLL, KL exactly 0, top-1 exactly 1."""
    x, lse = _lse(logits)
    n = len(ids) - 1
    return {"nll": lse - x[np.arange(n), ids[1:]], "kl": np.zeros(n), "agree": np.ones(n, dtype=bool)}


def _lse(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """logits[:-1] as float64 and their logsumexp per position."""
    x = np.asarray(logits[:-1], dtype=np.float64)
    m = x.max(-1)
    return x, m + np.log(np.exp(x - m[:, None]).sum(-1))


def summarize(parts: list[dict[str, np.ndarray]]) -> dict[str, float]:
    nll, kl, agree = (np.concatenate([p[k] for p in parts]) for k in ("nll", "kl", "agree"))
    return {"perplexity": float(np.exp(nll.mean())), "kl_to_baseline": float(kl.mean()),
            "top1_agreement": float(agree.mean()), "eval_tokens": int(len(nll))}
