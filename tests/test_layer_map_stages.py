"""build_layer_map and layer_importance on a tiny model with a real (stdlib + pydoc) corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_stage_inputs

from adaptive_inference.errors import UserError
from adaptive_inference.techniques.layer_map import importance
from adaptive_inference.techniques.layer_map import map as layer_map


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_stage_inputs(
        tmp_path_factory.mktemp("layer_map"),
        {"seed": 0, "categories": ["code", "prose"], "train": 3, "calib": 2, "eval": 2, "max_chars": 400},
        {"seq_len": 48, "batch_size": 4, "early_layer": 1, "layer_inputs": [], "dtype": "float32"})


def test_map_build_is_deterministic_and_scored(inputs, tmp_path):
    params = {"window": 8, "k": 3}
    for out in ("a", "b"):
        layer_map.build(params, inputs / "hidden", inputs / "corpus", inputs / "model", tmp_path / out)
    assert (tmp_path / "a" / "index.faiss").read_bytes() == (tmp_path / "b" / "index.faiss").read_bytes()
    m = json.loads((tmp_path / "a" / "map.json").read_text())
    assert m["categories"] == ["code", "prose"] and m["early_layer"] == 1 and m["entries"] >= 6
    for kind in ("knn", "nearest_centroid"):
        assert 0 <= m["eval"][kind]["accuracy"] <= 1 and np.sum(m["eval"][kind]["confusion"]) == m["eval"]["prompts"]
    with pytest.raises(UserError, match="no train text has 4096 tokens"):
        layer_map.build({"window": 4096, "k": 3}, inputs / "hidden", inputs / "corpus", inputs / "model", tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_importance_matrix_and_budgets(inputs, tmp_path):
    layer_map.build({"window": 8, "k": 3}, inputs / "hidden", inputs / "corpus", inputs / "model", tmp_path / "map")
    importance.build({"texts_per_category": 2, "seq_len": 24, "budgets": [0.25, 0.5], "tries": 2},
                     inputs / "model", inputs / "corpus", tmp_path / "map", tmp_path / "imp")
    r = json.loads((tmp_path / "imp" / "importance.json").read_text())
    assert set(r["kl"]) == {"code", "prose", "global"}
    for row in r["kl"].values():
        assert row[0] is None and all(v > 0 for v in row[1:])  # layer 0 runs before the category is known
    for budget, size in (("0.25", 1), ("0.5", 2)):
        for group, s in r["skip_sets"][budget].items():
            assert len(s) == size and min(s) >= 1
            assert r["set_kl"][f"{group}@{budget}"] == pytest.approx(r["search"][f"{group}@{budget}"][-1]["kl"])
    assert importance.heat_map(r)[:4] == b"\x89PNG"
    # the stage resumes each skip from the baseline's captured layer input: the same KL as a whole forward
    from adaptive_inference import metrics
    from adaptive_inference.plan import StepPlan
    from adaptive_inference.torch_backend import TorchLM

    lm = TorchLM.load(inputs / "model")
    texts = importance._texts(inputs / "model", inputs / "corpus", {"texts_per_category": 2, "seq_len": 24})["code"]
    base = [metrics.log_softmax(lm.logits(ids)).astype(np.float32) for ids in texts]
    for i in (1, 3):
        plan = StepPlan(skip_layers=frozenset({i}))
        direct = metrics.summarize([metrics.compare(lm.logits(ids, plan), b, ids) for ids, b in zip(texts, base, strict=True)])
        assert r["kl"]["code"][i] == direct["kl_to_baseline"]


def test_greedy_picks_the_measured_best():
    single = {1: 0.1, 2: 0.2, 3: 0.3}
    measured = {frozenset({1}): 0.1, frozenset({2}): 0.2, frozenset({1, 2}): 0.9, frozenset({1, 3}): 0.35}
    chosen, trail = importance.greedy(lambda s: measured[frozenset(s)], single, 2, tries=2)
    assert chosen == [1, 3] and trail[-1]["kl"] == 0.35  # {1, 2} measured worse than {1, 3}
