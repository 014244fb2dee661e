"""The category map's blocks in the report: map accuracy (k-NN vs nearest centroid) and the importance
heat map with the skip sets."""

from __future__ import annotations

import json
from pathlib import Path


def _tag(artifact: Path) -> str:
    from ... import manifest

    m = manifest.read(artifact)
    return f"[{m['stage']}:{m['digest'][:12]}]"


def map_blocks(artifact: Path) -> list[tuple]:
    m = json.loads((artifact / "map.json").read_text())
    ev = m["eval"]
    rows = [[c, *row] for c, row in zip(m["categories"], ev["knn"]["confusion"], strict=True)]
    return [("h3", f"Category map {_tag(artifact)}"),
            ("p", f"{m['entries']} entries (windows of {m['window']} tokens of the train split, embedded at layer "
                  f"{m['early_layer']}), k = {m['k']}. On {ev['prompts']} eval prompts: k-NN accuracy "
                  f"{ev['knn']['accuracy']:.1%}, nearest-centroid baseline {ev['nearest_centroid']['accuracy']:.1%}, "
                  f"mean vote share {ev['mean_confidence']:.2f}. Confusion (rows: true, columns: predicted):"),
            ("table", ["true \\ predicted", *m["categories"]], rows)]


def importance_blocks(artifact: Path) -> list[tuple]:
    from .importance import heat_map

    r = json.loads((artifact / "importance.json").read_text())
    rows = [[budget, group, " ".join(map(str, s)), f"{r['set_kl'][f'{group}@{budget}']:.3f}"]
            for budget, sets in r["skip_sets"].items() for group, s in sets.items()]
    return [("h3", f"Layer importance {_tag(artifact)}"),
            ("img", "layer_importance.png", "KL when one layer is skipped, per category (calib)", heat_map(r)),
            ("table", ["budget", "category", "skipped layers", "calib KL of the set"], rows)]
