"""The category map's apply layer on tiny_llama models: the k-NN vote, hard and soft skip through the plan gate,
the oracle and global controls, batches of mixed categories, torch vs MLX."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adaptive_inference import atomic, manifest, techniques
from adaptive_inference.backends import load_backend
from adaptive_inference.generation import generate, stream, teacher_forced
from adaptive_inference.plan import StepPlan
from adaptive_inference.techniques.layer_map import apply

EARLY = 1
PROMPTS = {"math": [5, 17, 99, 3, 64, 12], "code": [120, 33, 2, 41, 8, 77], "prose": [9, 9, 30, 31, 32, 90]}
SETS = {"math": [2], "code": [3], "prose": [2, 3], "global": [3]}


def early_embedding(lm, ids) -> np.ndarray:
    _, captured = lm.hidden(lm.ids_array(np.array([ids])), lm.new_cache(1, len(ids)), capture={EARLY})
    return apply.pool(lm.to_numpy(captured[EARLY]))


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory):
    """A map whose entries are the tiny_llama model's own prompts (3 categories), and skip sets per category."""
    import faiss

    root = tmp_path_factory.mktemp("map")
    lm = load_backend("torch", tiny_llama[1])
    cats = sorted(PROMPTS)
    emb = np.concatenate([early_embedding(lm, PROMPTS[c]) for c in cats])
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    with atomic.output_dir(root / "layer_map") as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        np.save(tmp / "labels.npy", np.arange(len(cats)))
        atomic.write_json(tmp / "map.json", {"categories": cats, "early_layer": EARLY, "k": 1})
        manifest.write(tmp, stage="build_layer_map", inputs={}, params={})
    with atomic.output_dir(root / "layer_importance") as tmp:
        atomic.write_json(tmp / "importance.json", {"skip_sets": {"0.25": SETS, "0": {c: [] for c in SETS}}})
        manifest.write(tmp, stage="layer_importance", inputs={}, params={})
    return root


def make(artifacts, cfg, **options):
    spec = {"name": "category_map", **options}
    return techniques.make_policy([spec], [artifacts / "layer_map", artifacts / "layer_importance"], cfg)


@pytest.fixture(params=["torch", "mlx"])
def lm(request, tiny_llama):
    return load_backend(request.param, tiny_llama[1])


def test_empty_skip_set_is_exactly_baseline(lm, artifacts):
    ids = PROMPTS["math"]
    got, _ = teacher_forced(lm, ids, make(artifacts, lm.cfg, budget=0), prompt_tokens=len(ids))
    np.testing.assert_array_equal(got, lm.logits(ids))


@pytest.mark.parametrize("category", sorted(PROMPTS))
def test_hard_skip_follows_the_prompts_category(lm, artifacts, category):
    ids = PROMPTS[category]
    got, executed = teacher_forced(lm, ids + [7, 8], make(artifacts, lm.cfg, mode="hard"), prompt_tokens=len(ids))
    assert executed[0].info["category"] == [category] and executed[0].info["confidence"] == [1.0]
    skip = frozenset(SETS[category])
    assert all(e.layers_run == set(range(4)) - skip for e in executed)
    np.testing.assert_allclose(got, lm.logits(ids + [7, 8], StepPlan(skip_layers=skip)), atol=1e-5)


def test_soft_alpha_one_is_baseline_and_zero_is_hard(lm, artifacts):
    ids = PROMPTS["prose"]
    one, _ = teacher_forced(lm, ids, make(artifacts, lm.cfg, mode="soft", alpha=1.0), prompt_tokens=len(ids))
    np.testing.assert_array_equal(one, lm.logits(ids))
    zero, _ = teacher_forced(lm, ids, make(artifacts, lm.cfg, mode="soft", alpha=0.0), prompt_tokens=len(ids))
    hard, _ = teacher_forced(lm, ids, make(artifacts, lm.cfg, mode="hard"), prompt_tokens=len(ids))
    np.testing.assert_allclose(zero, hard, atol=1e-5)


def test_oracle_and_global_controls(lm, artifacts):
    ids = PROMPTS["math"]
    oracle = make(artifacts, lm.cfg, scope="oracle")
    oracle.begin({"category": "prose"})
    res = generate(lm, ids, max_new_tokens=3, policy=oracle)
    assert res.executed[0].info["category"] == ["prose"] and res.executed[1].layers_run == {0, 1}
    glob = make(artifacts, lm.cfg, scope="global")
    assert glob.plan(0) == StepPlan(skip_layers=frozenset(SETS["global"]))


def test_rows_of_a_batch_keep_their_own_category(lm, artifacts):
    prompts = np.array([PROMPTS["math"], PROMPTS["code"]])
    steps = list(stream(lm, prompts, max_new_tokens=4, policy=make(artifacts, lm.cfg, mode="hard")))
    assert steps[0].executed.info["category"] == ["math", "code"]
    assert steps[1].executed.layers_run == {0, 1, 2, 3}  # layer 2 for code, layer 3 for math
    for row, cat in enumerate(["math", "code"]):
        alone = generate(lm, PROMPTS[cat], max_new_tokens=4, policy=make(artifacts, lm.cfg, mode="hard"))
        assert [int(s.tokens[row]) for s in steps] == alone.tokens


def test_torch_and_mlx_decide_alike(tiny_llama, artifacts):
    t, m = load_backend("torch", tiny_llama[1]), load_backend("mlx", tiny_llama[1])
    for cat, ids in PROMPTS.items():
        a = generate(t, ids, max_new_tokens=4, policy=make(artifacts, t.cfg))
        b = generate(m, ids, max_new_tokens=4, policy=make(artifacts, m.cfg))
        assert a.executed[0].info["category"] == b.executed[0].info["category"] == [cat]
        assert a.tokens == b.tokens


def test_bad_artifacts_and_options_are_one_line_errors(tiny_llama, artifacts, tmp_path):
    from adaptive_inference.errors import UserError

    cfg = load_backend("torch", tiny_llama[1]).cfg
    with pytest.raises(UserError, match="no skip sets for budget 0.5"):
        make(artifacts, cfg, budget=0.5)
    with pytest.raises(UserError, match="mode must be 'hard' or 'soft'"):
        make(artifacts, cfg, mode="medium")
    bad = tmp_path / "layer_importance"
    with atomic.output_dir(bad) as tmp:
        (tmp / "importance.json").write_text(json.dumps({"skip_sets": {"0.25": {"math": [9]}}}))
        manifest.write(tmp, stage="layer_importance", inputs={}, params={})
    with pytest.raises(UserError, match="skips layer 9"):
        techniques.make_policy([{"name": "category_map"}], [artifacts / "layer_map", bad], cfg)
