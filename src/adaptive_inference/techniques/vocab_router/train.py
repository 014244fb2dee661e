"""train_vocab_router: common ids, router MLP and its threshold, from the hidden cache only (never the model).

Common ids from train-split token counts (the text's next tokens and the model's own argmax); the router is
trained on cached final hidden states with label "model argmax is rare"; its threshold is calibrated on the
calib split to a target recall of rare steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ... import atomic, manifest
from ...errors import UserError
from ...hidden_cache import load_split

KEYS = ["final", "next_ids", "model_argmax"]


def choose_common_ids(next_ids: np.ndarray, argmax: np.ndarray, vocab: int, coverage: float) -> tuple[np.ndarray, dict]:
    """Smallest id set covering `coverage` of the counted tokens (text next-tokens + model predictions)."""
    counts = np.bincount(np.concatenate([next_ids[next_ids >= 0], argmax]), minlength=vocab)
    order = np.argsort(-counts, kind="stable")
    share = np.cumsum(counts[order]) / counts.sum()
    k = int(np.searchsorted(share, coverage) + 1)
    curve = {str(n): float(share[n - 1]) for n in (256, 1024, 2048, 4096, 8192, 16384) if n <= vocab}
    return np.sort(order[:k]).astype(np.int64), {"ids": k, "share_of_vocab": k / vocab, "coverage_curve": curve,
                                                 "coverage": float(share[k - 1])}


def _router_forward(params: dict, x):
    import torch.nn.functional as F

    return F.linear(F.silu(F.linear(x, params["w1"], params["b1"])), params["w2"], params["b2"])[:, 0]


def train(x: np.ndarray, y: np.ndarray, p: dict) -> tuple[dict, list[float]]:
    """Logistic MLP with a positive-class weight (rare steps are the minority)."""
    import torch

    g = torch.Generator().manual_seed(p["seed"])
    X, Y = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
    H = X.shape[1]
    params = {
        "w1": (torch.randn(p["hidden"], H, generator=g) / H**0.5).requires_grad_(),
        "b1": torch.zeros(p["hidden"], requires_grad=True),
        "w2": (torch.randn(1, p["hidden"], generator=g) / p["hidden"] ** 0.5).requires_grad_(),
        "b2": torch.zeros(1, requires_grad=True),
    }
    opt = torch.optim.Adam(params.values(), lr=p["lr"])
    pos_weight = torch.tensor((len(Y) - Y.sum().item()) / max(Y.sum().item(), 1.0))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    curve = []
    for _ in range(p["epochs"]):
        perm, total = torch.randperm(len(X), generator=g), 0.0
        for i in range(0, len(X), p["batch_size"]):
            idx = perm[i:i + p["batch_size"]]
            loss = loss_fn(_router_forward(params, X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        curve.append(total / len(X))
    return {k: v.detach() for k, v in params.items()}, curve


def predict(params: dict, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.sigmoid(_router_forward(params, torch.from_numpy(x.astype(np.float32)))).numpy()


def calibrate(prob: np.ndarray, rare: np.ndarray, target_recall: float) -> float:
    """Largest threshold whose recall of rare steps (P(rare) > threshold) reaches the target."""
    if not rare.any():
        raise UserError("calib split has no rare steps: raise train_vocab_router.coverage's complement")
    k = int(np.ceil(target_recall * rare.sum()))
    return float(np.sort(prob[rare])[::-1][k - 1]) - 1e-7


def stats(prob: np.ndarray, rare: np.ndarray, threshold: float) -> dict:
    flag = prob > threshold
    tp = int((flag & rare).sum())
    return {"recall": tp / max(int(rare.sum()), 1), "precision": tp / max(int(flag.sum()), 1),
            "common_head_rate": float((~flag).mean()), "rare_rate": float(rare.mean()), "tokens": int(len(rare))}


def build(params: dict, hidden_dir: Path, out_dir: Path) -> dict:
    """Common ids + router + calibrated threshold, all from the hidden cache."""
    from safetensors.torch import save_file

    hm = manifest.verify(hidden_dir, stage="cache_hidden")
    train_s, calib_s = load_split(hidden_dir, "train", KEYS), load_split(hidden_dir, "calib", KEYS)
    vocab = hm["outputs"]["vocab_size"]
    common, cov = choose_common_ids(train_s["next_ids"], train_s["model_argmax"], vocab, params["coverage"])
    is_rare = lambda ids: ~np.isin(ids, common)  # noqa: E731
    weights, curve = train(train_s["final"], is_rare(train_s["model_argmax"]), params)
    calib_rare = is_rare(calib_s["model_argmax"])
    calib_prob = predict(weights, calib_s["final"])
    threshold = calibrate(calib_prob, calib_rare, params["target_recall"])
    meta = {
        "technique": "router",
        "threshold": threshold,
        "sizes": {"hidden": int(train_s["final"].shape[1]), "router_hidden": params["hidden"], "vocab": vocab,
                  "common_ids": int(len(common)), "router_params": int(sum(v.numel() for v in weights.values()))},
        "common": cov,
        "training_loss": curve,
        "train": stats(predict(weights, train_s["final"]), is_rare(train_s["model_argmax"]), threshold),
        "calib": stats(calib_prob, calib_rare, threshold),
    }
    with atomic.output_dir(out_dir) as tmp:
        np.save(tmp / "common_ids.npy", common)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "router.safetensors"))
        atomic.write_json(tmp / "router.json", meta)
        return manifest.write(tmp, stage="train_vocab_router", inputs={"hidden": hidden_dir}, params=params,
                              outputs={"common_ids": len(common), "threshold": threshold, "calib": meta["calib"],
                                       "coverage_curve": cov["coverage_curve"]})
