"""Which tokens the router lets skip: calib tokens by type (punctuation, stop words, digits, rare ids,
high-loss tokens: the 10% whose next token the model predicts worst), and the skip share of each type."""

from __future__ import annotations

import string

import numpy as np

STOP_WORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been it its this that these "
    "those there here he she they we you i not no so than then do does did has have had will would can could "
    "should may might must".split())
RARE_COUNT = 3  # ids seen fewer times than this in the train split
HIGH_LOSS_SHARE = 0.10


def token_types(calib: dict, train_counts: np.ndarray, head: np.ndarray, tok) -> dict[str, np.ndarray]:
    """{type: bool mask over calib tokens}; a token may have several types."""
    ids = calib["token_ids"]
    words = [tok.decode([int(i)]).strip() for i in ids]
    nll = np.zeros(len(ids))
    has_next = calib["next_ids"] >= 0
    for s in range(0, len(ids), 512):  # the model's loss on the next token, from the cached final state
        logits = calib["final"][s:s + 512].astype(np.float32) @ head.T
        logits -= logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits).sum(-1))
        nxt = np.maximum(calib["next_ids"][s:s + 512], 0)
        nll[s:s + 512] = lse - logits[np.arange(len(nxt)), nxt]
    cut = np.quantile(nll[has_next], 1 - HIGH_LOSS_SHARE) if has_next.any() else np.inf
    return {
        "punctuation": np.array([bool(w) and all(c in string.punctuation for c in w) for w in words]),
        "stop word": np.array([w.lower() in STOP_WORDS for w in words]),
        "digits": np.array([bool(w) and w.isdigit() for w in words]),
        "rare id": train_counts[ids] < RARE_COUNT,
        "high loss": has_next & (nll >= cut),
        "all": np.ones(len(ids), dtype=bool),
    }


def type_counts(types: dict[str, np.ndarray]) -> dict[str, int]:
    return {t: int(m.sum()) for t, m in types.items()}


def skip_by_type(skip_share: np.ndarray, types: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Mean share of the routed layers skipped by the tokens of each type (None: no such token)."""
    return {t: (float(skip_share[m].mean().round(6)) if m.any() else None) for t, m in types.items()}
