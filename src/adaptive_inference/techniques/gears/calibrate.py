"""calibrate_entropy: the model's next-token entropy on the calib split -> the gear thresholds (seed 002's
calibrate_from_logits: percentiles, capped), the prompt classifier, and what they predict.

The logits come from the hidden cache (cached final hidden state @ LM head): no forward pass. Thresholds are
taken on this model's own entropies, so they are already in its vocabulary's scale (the seed's
log2(V)/log2(32768) scaling is for thresholds stated for another vocabulary). Recorded beside them: whether a
cap bit, the entropy histogram per category, the hard / trivial separation ratio (seed target > 2x), the
classifier's cross-validated gear agreement, and the gear occupancy the monitor would run on calib texts
under teacher forcing with full-precision logits (a forecast; the benchmark measures the real one).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ... import atomic, manifest
from ...errors import UserError
from ...hidden_cache import load_split, read_split
from . import classifier, monitor

CHUNK = 512  # rows per logits matmul: [512, vocab] float32 is 100 MB for a 49k vocab


def _head(model_dir: Path) -> np.ndarray:
    from .quantize import model_matrices

    return model_matrices(model_dir)[1]["lm_head"]


def token_entropies(final: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Entropy (bits) of softmax(final @ head.T) per row, in chunks."""
    return np.concatenate([monitor.entropy_bits(final[i:i + CHUNK].astype(np.float32) @ head.T)
                           for i in range(0, len(final), CHUNK)])


def _texts(hidden_dir: Path, corpus_dir: Path, head: np.ndarray) -> list[dict]:
    """Per calib text: category, token ids and entropies in position order."""
    hm = manifest.verify(hidden_dir, stage="cache_hidden")
    s = load_split(hidden_dir, "calib", ["final", "token_ids", "positions", "text_index"])
    if not len(s["final"]):
        raise UserError(f"hidden cache {hidden_dir} has no calib tokens")
    h = token_entropies(s["final"], head)
    cats = {r["id"]: r["category"] for r in read_split(corpus_dir, "calib")}
    order = hm["outputs"]["text_order"]["calib"]
    out = []
    for t in np.unique(s["text_index"]):
        rows = np.flatnonzero(s["text_index"] == t)
        rows = rows[np.argsort(s["positions"][rows])]
        out.append({"category": cats[order[t]], "ids": s["token_ids"][rows].tolist(), "entropy": h[rows]})
    return out


def _classifier(texts: list[dict], prompts: list[str], low: float, high: float, prompt_tokens: int) -> dict:
    """Fit on all calib texts; agreement with the gear of the text's mean entropy after the prompt, 2-fold
    cross-validated (even / odd texts), beside always picking the most common gear (used instead when the
    classifier does not beat it)."""
    target = np.array([float(np.mean(t["entropy"][prompt_tokens:] if len(t["entropy"]) > prompt_tokens
                                     else t["entropy"])) for t in texts])
    truth = [classifier.gear_of(v, low, high) for v in target]
    hits = 0
    for k in (0, 1):
        train = [i for i in range(len(texts)) if i % 2 != k]
        model = classifier.fit([prompts[i] for i in train], target[train])
        hits += sum(classifier.gear_of(classifier.predict_entropy(model, prompts[i]), low, high) == truth[i]
                    for i in range(len(texts)) if i % 2 == k)
    common = max(sorted(set(truth)), key=truth.count)
    majority = truth.count(common) / len(truth)
    # the classifier picks the first gear only where it beat always picking the most common gear
    return {**classifier.fit(prompts, target), "prompt_tokens": prompt_tokens, "texts": len(texts),
            "cv_gear_agreement": hits / len(texts), "majority_gear_agreement": majority,
            "majority_gear": monitor.GEARS[common], "use": hits / len(texts) > majority,
            "true_gears": {monitor.GEARS[g]: truth.count(g) for g in (monitor.LOW, monitor.MID, monitor.HIGH)}}


def build(params: dict, hidden_dir: Path, model_dir: Path, corpus_dir: Path, out_dir: Path) -> dict:
    from transformers import AutoTokenizer

    manifest.verify(model_dir, stage="prepare_model")
    manifest.verify(corpus_dir, stage="build_corpus")
    head = _head(model_dir)
    vocab = head.shape[0]
    texts = _texts(hidden_dir, corpus_dir, head)
    cats = sorted({t["category"] for t in texts})
    for group in ("hard", "trivial"):
        missing = sorted(set(params[group]) - set(cats))
        if missing:
            raise UserError(f"calibrate_entropy.{group}: category {missing[0]!r} not in calib ({', '.join(cats)})")
    all_h = np.concatenate([t["entropy"] for t in texts])
    cal = monitor.calibrate(all_h, vocab, low_percentile=params["low_percentile"],
                            high_percentile=params["high_percentile"], low_cap_frac=params["low_cap_frac"],
                            high_cap_frac=params["high_cap_frac"])
    by_cat = {c: np.concatenate([t["entropy"] for t in texts if t["category"] == c]) for c in cats}
    edges = np.arange(0, math.ceil(float(all_h.max())) + 0.25, 0.25)
    mean_of = lambda group: float(np.mean(np.concatenate([by_cat[c] for c in params[group]])))  # noqa: E731
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    n = params["prompt_tokens"]
    prompts = [tok.decode(t["ids"][:n]) for t in texts]
    mcfg = monitor.MonitorConfig(low=cal.low, high=cal.high, vocab_size=vocab)
    occupancy = np.zeros(3)
    for t in texts:  # the monitor over each text after its prompt, starting from the classifier's usual MID
        occupancy += np.bincount(monitor.run(mcfg, t["entropy"][n:])[1:], minlength=3)
    result = {
        "vocab_size": vocab, "log2_vocab": math.log2(vocab), "tokens": int(all_h.size),
        "thresholds": cal.as_dict(),
        "entropy": {"mean": float(all_h.mean()), "percentiles": {str(p): float(np.percentile(all_h, p))
                                                                  for p in (10, 25, 40, 50, 60, 75, 90)}},
        "by_category": {c: {"mean": float(h.mean()), "median": float(np.median(h)), "tokens": int(h.size),
                            "histogram": np.histogram(h, bins=edges)[0].tolist()} for c, h in by_cat.items()},
        "histogram_edges": edges.tolist(),
        "separation": {"hard": params["hard"], "trivial": params["trivial"],
                       "ratio": mean_of("hard") / max(mean_of("trivial"), 1e-12)},
        "classifier": _classifier(texts, prompts, cal.low, cal.high, n),
        "forecast_occupancy": {monitor.GEARS[g]: float(occupancy[g] / max(occupancy.sum(), 1)) for g in range(3)},
    }
    with atomic.output_dir(out_dir) as tmp:
        atomic.write_json(tmp / "entropy.json", result)
        return manifest.write(tmp, stage="calibrate_entropy",
                              inputs={"hidden": hidden_dir, "model": model_dir, "corpus": corpus_dir},
                              params=params, outputs={"low": cal.low, "high": cal.high,
                                                      "separation": result["separation"]["ratio"]})
