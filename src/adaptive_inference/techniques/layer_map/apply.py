"""The category map's apply layer (both backends, through a plan gate): the prompt's residual entering the
map's early layer, pooled and L2-normalized -> k-NN vote in the FAISS map -> category -> its skip set for
the whole generation. Hard: the set's layers never run for that row (prompt included: no KV written).
Soft: they run and their output is blended with their input (alpha). Rows of a batch keep their own
category: a layer is computed if any row runs it (bytes saved = the intersection of the rows' sets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ... import manifest
from ...errors import UserError
from ...plan import GateDecision, StepPlan


def pool(x: np.ndarray) -> np.ndarray:
    """[B, T, H] -> [B, H]: mean over the prompt, L2-normalized (the map's entries are built the same way)."""
    v = x.astype(np.float32).mean(axis=1)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def vote(index, labels: np.ndarray, emb: np.ndarray, k: int, n_categories: int) -> tuple[np.ndarray, np.ndarray]:
    """Category per row by a similarity-weighted k-NN vote, and its share of the vote (confidence)."""
    sims, idx = index.search(np.ascontiguousarray(emb, dtype=np.float32), k)
    scores = np.zeros((len(emb), n_categories))
    for r in range(len(emb)):
        np.add.at(scores[r], labels[idx[r]], np.maximum(sims[r], 0) + 1e-6)
    best = scores.argmax(-1)
    return best, scores[np.arange(len(emb)), best] / scores.sum(-1)


class MapGate:
    """Decides at the prefill from the prompt, then repeats the rows' decision at every decode step."""

    def __init__(self, layer_map: dict, skip_sets: dict[str, list[int]], mode: str, alpha: float,
                 category: str | None = None):
        self.map, self.skip_sets, self.mode, self.alpha = layer_map, skip_sets, mode, alpha
        self.after_layer = layer_map["early_layer"] - 1
        self.forced = category  # the oracle control: the true category instead of the vote
        self.rows: list[str] | None = None
        self.confidence: list[float] = []

    def decide(self, x, lm) -> GateDecision:
        B, T = x.shape[:2]
        if self.rows is None:
            cats = self.map["categories"]
            if self.forced is not None:
                self.rows, self.confidence = [self.forced] * B, [1.0] * B
            else:
                best, conf = vote(self.map["index"], self.map["labels"], pool(lm.to_numpy(x)), self.map["k"], len(cats))
                self.rows, self.confidence = [cats[i] for i in best], conf.round(4).tolist()
        L = lm.cfg.num_hidden_layers
        keep = np.ones((B, T, L), dtype=bool)
        info = {"category": self.rows, "confidence": self.confidence}
        if self.mode == "hard":
            for r, cat in enumerate(self.rows):
                keep[r, :, self.skip_sets[cat]] = False
            return GateDecision(keep, info=info)
        common = set.intersection(*(set(self.skip_sets[c]) for c in self.rows))  # one blend for all rows
        return GateDecision(keep, blend=tuple((i, self.alpha) for i in sorted(common)), info=info)


class MapPolicy:
    """A fresh policy per generation; `begin(meta)` (called by the benchmark before each prompt) gives the
    oracle control the prompt's true category."""

    static = True  # the plan is the same every step; the gate decides inside the forward

    def __init__(self, layer_map: dict, skip_sets: dict, mode: str, alpha: float, oracle: bool):
        self.layer_map, self.skip_sets, self.mode, self.alpha, self.oracle = layer_map, skip_sets, mode, alpha, oracle
        self.gate = MapGate(layer_map, skip_sets, mode, alpha)

    def begin(self, meta: dict) -> None:
        if self.oracle:
            self.gate = MapGate(self.layer_map, self.skip_sets, self.mode, self.alpha, meta["category"])

    def plan(self, step: int) -> StepPlan:
        return StepPlan(gate=self.gate)

    def observe(self, executed, logits) -> None:
        pass



def load_map(folder: Path) -> dict:
    import faiss

    meta = manifest.read_json(folder, "build_layer_map", "map.json")
    try:
        index, labels = faiss.read_index(str(folder / "index.faiss")), np.load(folder / "labels.npy")
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"corrupt artifact {folder}: {e}") from None
    if index.ntotal != len(labels):
        raise UserError(f"corrupt artifact {folder}: {index.ntotal} index entries but {len(labels)} labels")
    return {**meta, "index": index, "labels": labels, "k": min(meta["k"], index.ntotal)}


def skip_sets(folder: Path, budget: float, cfg) -> dict[str, list[int]]:
    """{category or 'global': sorted layers} for this budget, checked against the model."""
    sets = manifest.read_json(folder, "layer_importance", "importance.json")["skip_sets"].get(f"{budget:g}")
    if sets is None:
        raise UserError(f"layer importance {folder} has no skip sets for budget {budget:g} "
                        "(set layer_importance.budgets)")
    bad = [i for s in sets.values() for i in s if not 0 <= i < cfg.num_hidden_layers]
    if bad:
        raise UserError(f"layer importance {folder} skips layer {bad[0]}, model has {cfg.num_hidden_layers}")
    return {k: sorted(v) for k, v in sets.items()}


def policy(artifacts: dict[str, Path], cfg, options: dict):
    from ...plan import StaticPolicy

    mode, budget, alpha = options["mode"], options["budget"], options["alpha"]
    if mode not in ("hard", "soft"):
        raise UserError(f"category_map: mode must be 'hard' or 'soft', got {mode!r}")
    sets = skip_sets(artifacts["layer_importance"], budget, cfg)
    if options["scope"] == "global":  # the control: one skip set for every prompt, no map
        g = sets["global"]
        return StaticPolicy(StepPlan(skip_layers=frozenset(g)) if mode == "hard"
                            else StepPlan(blend=tuple((i, alpha) for i in g)))
    if options["scope"] not in ("category", "oracle"):
        raise UserError(f"category_map: scope must be 'category', 'oracle' or 'global', got {options['scope']!r}")
    return MapPolicy(load_map(artifacts["layer_map"]), sets, mode, alpha, oracle=options["scope"] == "oracle")
