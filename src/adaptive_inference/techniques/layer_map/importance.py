"""layer_importance: per category and per decoder layer, the KL to the baseline's next-token distribution on
calib texts of that category when only that layer is skipped; then skip sets per category for each budget
(a fraction of the layers), grown greedily on the measured KL of the whole set, and the global set of the
same size chosen on all calib texts (the control that category conditioning has to beat).

Only layers at or after the map's early layer are candidates: the category is known once the prompt has
reached that layer, so the layers before it always run (for the global control too, for a fair contest)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ... import atomic, manifest, metrics, plots
from ...errors import UserError
from ...hidden_cache import read_split, tokenize
from ...plan import StepPlan
from ...progress import Progress


def _texts(model_dir: Path, corpus_dir: Path, params: dict) -> dict[str, list[list[int]]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    by: dict[str, list[list[int]]] = {}
    for r in read_split(corpus_dir, "calib"):
        if len(by.setdefault(r["category"], [])) < params["texts_per_category"]:
            ids = tokenize(tok, [r["text"]], params["seq_len"])[0]
            if len(ids) >= 2:
                by[r["category"]].append(ids)
    if not any(by.values()):
        raise UserError(f"layer_importance: calib split of {corpus_dir} has no text of 2+ tokens")
    return {c: t for c, t in sorted(by.items()) if t}


def _kl(lm, texts: list[list[int]], base: list[metrics.Reference], inputs: list[dict], skip: set[int]) -> float:
    """KL of skipping `skip` on texts; each forward resumes at the first skipped layer from the input the
    baseline forward captured there (the layers before it are the baseline's: same logits, fewer layers run)."""
    plan, first = StepPlan(skip_layers=frozenset(skip)), min(skip)
    return metrics.summarize([metrics.compare(lm.logits(ids, plan, resume=(first, x[first])), b, ids)
                              for ids, b, x in zip(texts, base, inputs, strict=True)])["kl_to_baseline"]


def _baseline(lm, texts: list[list[int]], layers: set[int]) -> tuple[list[metrics.Reference], list[dict]]:
    """Baseline log-probs of each text and the inputs of `layers` its forward saw."""
    import torch

    base, inputs = [], []
    for ids in texts:
        fw = lm.forward(torch.tensor([ids], device=lm.device), lm.new_cache(1, len(ids)), capture=layers)
        base.append(metrics.reference(metrics.log_softmax(lm.to_numpy(fw.out.logits[0])).astype(np.float32)))
        inputs.append(fw.captured)
    return base, inputs


def greedy(kl_of, single: dict[int, float], size: int, tries: int) -> tuple[list[int], list[dict]]:
    """Grow a set to `size` layers: at each step measure the whole set with each of the `tries` cheapest
    remaining layers (by single-layer KL) and keep the best; returns the set and the search trail."""
    chosen, trail = [], []
    while len(chosen) < size:
        cands = sorted((i for i in single if i not in chosen), key=single.get)[:tries]
        if not cands:
            break
        measured = {i: kl_of(set(chosen) | {i}) for i in cands}
        best = min(measured, key=measured.get)
        chosen.append(best)
        trail.append({"set": sorted(chosen), "kl": measured[best], "tried": {str(k): v for k, v in measured.items()}})
    return sorted(chosen), trail


def build(params: dict, model_dir: Path, corpus_dir: Path, map_dir: Path, out_dir: Path) -> dict:
    import torch

    from ...torch_backend import TorchLM, default_device

    manifest.verify(model_dir, stage="prepare_model")
    manifest.verify(corpus_dir, stage="build_corpus")
    manifest.verify(map_dir, stage="build_layer_map")
    early = json.loads((map_dir / "map.json").read_text())["early_layer"]
    texts = _texts(model_dir, corpus_dir, params)
    lm = TorchLM.load(model_dir, device=default_device())
    L = lm.cfg.num_hidden_layers
    layers = list(range(early, L))
    sizes = {f"{b:g}": min(round(b * L), len(layers)) for b in params["budgets"]}
    groups = {**texts, "global": [t for ts in texts.values() for t in ts]}
    work = len(groups) * (len(layers) + params["tries"] * max(sizes.values(), default=0) * len(sizes))
    progress = Progress("layer_importance forwards x texts", work, "sets")
    matrix, sets, trails = {}, {f"{b:g}": {} for b in params["budgets"]}, {}
    with torch.inference_mode():
        for group, ts in groups.items():
            base, inputs = _baseline(lm, ts, set(layers))

            def kl_of(skip, ts=ts, base=base, inputs=inputs):
                progress.step()
                return _kl(lm, ts, base, inputs, skip)

            single = {i: kl_of({i}) for i in layers}
            matrix[group] = [single.get(i) for i in range(L)]
            for budget, size in sizes.items():
                sets[budget][group], trails[f"{group}@{budget}"] = greedy(kl_of, single, size, params["tries"])
    progress.finish(f"{len(texts)} categories, {sum(map(len, texts.values()))} calib texts, {len(layers)} candidate "
                    f"layers, budgets {', '.join(sizes)}")
    result = {"categories": list(texts), "early_layer": early, "layers": L, "kl": matrix, "skip_sets": sets,
              "set_kl": {k: v[-1]["kl"] if v else 0.0 for k, v in trails.items()}, "search": trails}
    with atomic.output_dir(out_dir) as tmp:
        atomic.write_json(tmp / "importance.json", result)
        return manifest.write(tmp, stage="layer_importance",
                              inputs={"model": model_dir, "corpus": corpus_dir, "map": map_dir}, params=params,
                              outputs={"skip_sets": sets})


def heat_map(result: dict) -> bytes:
    """Categories x layers heat map of the single-layer skip KL (log colour scale)."""
    from matplotlib.colors import LogNorm

    groups = list(result["kl"])
    m = np.array([[np.nan if v is None else v for v in result["kl"][g]] for g in groups], dtype=float)
    fig = plots.figure(8, 0.5 * len(groups) + 1.6)
    ax = fig.add_subplot()
    im = ax.imshow(m, aspect="auto", cmap="viridis", norm=LogNorm(vmin=np.nanmin(m), vmax=np.nanmax(m)))
    ax.set(yticks=range(len(groups)), yticklabels=groups, xlabel="layer skipped alone",
           title="KL to the baseline when one layer is skipped (calib)")
    fig.colorbar(im, ax=ax, label="KL (nats / token)")
    return plots.png(fig)
