"""build_layer_map: a FAISS map from prompt embeddings to categories.

Embedding of a prompt = the residual entering the cache's early layer (`layer_input.<early>`, read from the
hidden cache, never recomputed), mean-pooled over a window of `window` tokens and L2-normalized: the mean
keeps every token's vote (the last token alone is dominated by its own identity), and windows of the
length of a decode prompt give several entries per train text, so the map matches what it will see.
Eval accuracy uses the same embedding computed on eval prompts by the first layers of the model (what the
apply path computes at inference), beside a nearest-centroid baseline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ... import atomic, manifest
from ...errors import UserError
from ...hidden_cache import load_split, read_split, tokenize
from .apply import pool, vote


def _train_entries(hidden_dir: Path, corpus_dir: Path, early: int, window: int) -> tuple[np.ndarray, list[str]]:
    hm = manifest.verify(hidden_dir, stage="cache_hidden")
    key = f"layer_input.{early}"
    s = load_split(hidden_dir, "train", [key, "text_index", "positions"])
    cats = {r["id"]: r["category"] for r in read_split(corpus_dir, "train")}
    order = hm["outputs"]["text_order"]["train"]
    emb, labels = [], []
    for t in np.unique(s["text_index"]):
        rows = np.flatnonzero(s["text_index"] == t)
        rows = rows[np.argsort(s["positions"][rows])]
        for start in range(0, len(rows) - window + 1, window):  # whole windows only, as prompts are
            emb.append(pool(s[key][rows[start:start + window]][None])[0])
            labels.append(cats[order[t]])
    if not emb:
        raise UserError(f"build_layer_map: no train text has {window} tokens (build_layer_map.window)")
    return np.stack(emb).astype(np.float32), labels


def eval_embeddings(model_dir: Path, corpus_dir: Path, early: int, window: int) -> tuple[np.ndarray, list[str]]:
    """The early-layer embedding of each eval prompt, from a partial forward (layers before `early`)."""
    import torch
    from transformers import AutoTokenizer

    from ...torch_backend import TorchLM

    rows = read_split(corpus_dir, "eval")
    ids = tokenize(AutoTokenizer.from_pretrained(str(model_dir)), [r["text"] for r in rows], window)
    keep = [(x, r["category"]) for x, r in zip(ids, rows, strict=True) if len(x) == window]
    if not keep:
        raise UserError(f"build_layer_map: no eval text has {window} tokens")
    lm = TorchLM.load(model_dir)
    out = []
    with torch.inference_mode():
        for x, _ in keep:
            _, cap = lm.hidden(torch.tensor([x]), lm.new_cache(1, window), capture={early})
            out.append(pool(cap[early].numpy())[0])
    return np.stack(out).astype(np.float32), [c for _, c in keep]


def accuracy(pred: list[str], true: list[str], cats: list[str]) -> dict:
    conf = np.zeros((len(cats), len(cats)), dtype=int)
    for p, t in zip(pred, true, strict=True):
        conf[cats.index(t), cats.index(p)] += 1
    return {"accuracy": float(np.trace(conf) / conf.sum()), "confusion": conf.tolist()}


def build(params: dict, hidden_dir: Path, corpus_dir: Path, model_dir: Path, out_dir: Path) -> dict:
    import faiss

    manifest.verify(corpus_dir, stage="build_corpus")
    manifest.verify(model_dir, stage="prepare_model")
    early = manifest.read(hidden_dir)["outputs"]["early_layer"]
    emb, labels = _train_entries(hidden_dir, corpus_dir, early, params["window"])
    cats = sorted(set(labels))
    lab = np.array([cats.index(c) for c in labels], dtype=np.int64)
    k = min(params["k"], len(lab))
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    ev, ev_true = eval_embeddings(model_dir, corpus_dir, early, params["window"])
    best, conf = vote(index, lab, ev, k, len(cats))
    centroids = np.stack([emb[lab == i].mean(0) for i in range(len(cats))])
    centroid_pred = [cats[i] for i in (ev @ centroids.T).argmax(-1)]
    meta = {"categories": cats, "early_layer": early, "window": params["window"], "k": k, "entries": len(lab),
            "entries_per_category": {c: int((lab == i).sum()) for i, c in enumerate(cats)},
            "eval": {"prompts": len(ev_true), "knn": accuracy([cats[i] for i in best], ev_true, cats),
                     "nearest_centroid": accuracy(centroid_pred, ev_true, cats),
                     "mean_confidence": float(conf.mean())}}
    with atomic.output_dir(out_dir) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        np.save(tmp / "labels.npy", lab)
        atomic.write_json(tmp / "map.json", meta)
        return manifest.write(tmp, stage="build_layer_map",
                              inputs={"hidden": hidden_dir, "corpus": corpus_dir, "model": model_dir}, params=params,
                              outputs={"entries": len(lab), "knn_accuracy": meta["eval"]["knn"]["accuracy"],
                                       "centroid_accuracy": meta["eval"]["nearest_centroid"]["accuracy"]})
