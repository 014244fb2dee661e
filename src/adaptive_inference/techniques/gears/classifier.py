"""The prompt classifier (seed 002's StatisticalPromptClassifier): picks the first gear before the entropy
window fills, from the prompt's text alone.

The seed scores complexity from math symbols, code keywords, length and average word length with fixed
weights. Here the same features feed a linear model fitted on calib (least squares) to predict the mean
entropy the model will show on that text; the predicted entropy is then read against the calibrated gear
thresholds, so the classifier speaks the monitor's language and needs no weights of its own to tune.
"""

from __future__ import annotations

import math
import re

import numpy as np

from .monitor import HIGH, LOW, MID

FEATURES = ("math_symbols", "code_keywords", "log_chars", "mean_word_len")
MATH = set("0123456789+-*/=^%<>()$\\")
CODE = {"def", "class", "return", "import", "from", "self", "None", "True", "False", "lambda", "yield", "for",
        "while", "if", "elif", "else", "try", "except", "with", "raise", "print", "assert", "async", "await"}


def features(text: str) -> np.ndarray:
    words = re.findall(r"[A-Za-z_]+", text)
    n = max(len(text), 1)
    return np.array([sum(c in MATH for c in text) / n, sum(w in CODE for w in words) / max(len(words), 1),
                     math.log1p(len(text)), float(np.mean([len(w) for w in words])) if words else 0.0])


def fit(texts: list[str], mean_entropy: np.ndarray) -> dict:
    """Least-squares weights (with a bias) from prompt features to mean entropy (bits)."""
    x = np.array([[*features(t), 1.0] for t in texts])
    w, *_ = np.linalg.lstsq(x, np.asarray(mean_entropy, dtype=np.float64), rcond=None)
    pred = x @ w
    ss = float(((mean_entropy - np.mean(mean_entropy)) ** 2).sum())
    return {"features": [*FEATURES, "bias"], "weights": [round(float(v), 10) for v in w],
            "r2": 1 - float(((mean_entropy - pred) ** 2).sum()) / ss if ss > 0 else 0.0}


def predict_entropy(model: dict, text: str) -> float:
    return float(np.dot([*features(text), 1.0], model["weights"]))


def gear_of(entropy: float, low: float, high: float) -> int:
    """The gear a mean entropy asks for, with the monitor's thresholds (no hysteresis: nothing to hold)."""
    return LOW if entropy <= low else HIGH if entropy >= high else MID
