"""Token router on a tiny model: the training stage (loss falls, skip share moves to its target,
deterministic bytes), the gate on both backends (keep-all is the baseline bit for bit, decode with the KV
cache equals a one-shot forward with the same decisions under both KV policies, the training forward is the
inference forward, same decisions on both backends), the cost of K/V writes, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_stage_inputs

from adaptive_inference import techniques
from adaptive_inference.backends import load_backend
from adaptive_inference.errors import UserError
from adaptive_inference.generation import teacher_forced
from adaptive_inference.plan import StaticPolicy, StepPlan
from adaptive_inference.techniques.token_router import apply, train

PARAMS = {"first_layers": 1, "targets": [0.5], "kv_policy": "project", "init_logit": 3.0, "hidden": 16, "texts": 6, "seq_len": 24, "epochs": 8,
          "batch_size": 2, "lr": 0.02, "tau": 1.0, "sparsity": 0.0, "ratio_weight": 4.0, "teacher_topk": 16,
          "seed": 0}
IDS = [5, 17, 99, 3, 64, 12, 7, 80, 33, 2, 41, 9]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tiny_stage_inputs(
        tmp_path_factory.mktemp("token"),
        {"seed": 0, "categories": ["code", "prose"], "train": 3, "calib": 2, "eval": 1, "max_chars": 400},
        {"seq_len": 32, "batch_size": 4, "early_layer": 1, "layer_inputs": [1], "dtype": "float32"})
    train.build(PARAMS, root / "hidden", root / "model", root / "token_router")
    train.build({**PARAMS, "kv_policy": "hole"}, root / "hidden", root / "model", root / "token_router_hole")
    return root


@pytest.fixture(scope="module", params=["torch", "mlx"])
def lm(request, inputs):
    return load_backend(request.param, inputs / "model", "float32")


def test_training_lowers_the_loss_and_reaches_toward_the_target(inputs, tmp_path):
    r = json.loads((inputs / "token_router" / "token_router.json").read_text())
    t = r["targets"]["0.5"]
    curve = t["curve"]
    assert abs(curve[-1]["hard_skip"] - 0.5) < 0.2 and 0.2 < t["calib_skip"] < 0.8  # at the target
    assert t["calib_skip_by_layer"][0] is None and t["prior_layer_kd"][0] is None
    prior = np.asarray(t["prior_layer_kd"][1:])
    assert (prior > 0).all()  # every routed layer costs something when skipped alone
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert set(t["calib_skip_by_token_type"]) >= {"punctuation", "stop word", "digits", "rare id", "high loss", "all"}
    train.build(PARAMS, inputs / "hidden", inputs / "model", tmp_path / "again")
    for f in ("router_0.5.safetensors", "token_router.json"):
        assert (tmp_path / "again" / f).read_bytes() == (inputs / "token_router" / f).read_bytes()


def test_training_moves_the_skip_share_to_its_target(inputs, tmp_path):
    p = {**PARAMS, "targets": [0.15], "init_logit": 0.0, "lr": 0.05, "epochs": 12}  # start at 50% skipped
    train.build(p, inputs / "hidden", inputs / "model", tmp_path / "r")
    curve = json.loads((tmp_path / "r" / "token_router.json").read_text())["targets"]["0.15"]["curve"]
    assert curve[0]["hard_skip"] > 0.3 and abs(curve[-1]["hard_skip"] - 0.15) < 0.1


def _gate(lm, bias: float | None, inputs, kv_policy: str = "project"):
    gate = apply.load(inputs / ("token_router" if kv_policy == "project" else "token_router_hole"), 0.5, lm.cfg)
    if bias is not None:  # force every decision
        gate.w = {**gate.w, "w2": np.zeros_like(gate.w["w2"]), "b2": np.full_like(gate.w["b2"], bias)}
    return gate


def _varied_gate(lm, inputs, kv_policy: str = "project"):
    """The trained gate with random, token-dependent decisions: a tiny trained router may learn one layer
    prior for every token, and a layer that every token skips cannot tell the KV policies apart."""
    gate = _gate(lm, None, inputs, kv_policy)
    w2 = np.random.default_rng(0).normal(size=gate.w["w2"].shape).astype(np.float32) * 10
    gate.w = {**gate.w, "w2": w2, "b2": np.zeros_like(gate.w["b2"])}
    at = gate.after_layer + 1  # the gate reads the input of the first routed layer
    ids = lm.ids_array(np.asarray(_text(inputs))[None])
    keep = gate.decide(lm.hidden(ids, lm.new_cache(1, ids.shape[1]), capture={at})[1][at], lm).keep[0]
    mixed = [(~keep[:-1, j]).any() and keep[1:, j].any() for j in range(at, gate.L)]
    assert any(mixed)  # some token skips a layer that a later token runs
    return gate


class _EveryStep(StaticPolicy):
    static = False


def test_keep_all_router_is_the_baseline_bit_for_bit(lm, inputs):
    logits, executed = teacher_forced(lm, IDS, apply.TokenPolicy(_gate(lm, 10.0, inputs)), prompt_tokens=4)
    base, _ = teacher_forced(lm, IDS, _EveryStep(), prompt_tokens=4)
    assert np.array_equal(logits, base) and all(e.row_layer_share == 1.0 for e in executed)


def _text(inputs, n: int = 16) -> list[int]:
    from adaptive_inference.hidden_cache import load_split

    return load_split(inputs / "hidden", "calib", ["token_ids"])["token_ids"][:n].tolist()


def _once(lm, ids, gate):
    t = lm.ids_array(np.asarray(ids)[None])
    return lm.to_numpy(lm.forward(t, lm.new_cache(1, len(ids)), StepPlan(gate=gate)).out.logits[0])


@pytest.mark.parametrize("kv_policy", ["project", "hole"])
def test_decode_with_the_kv_cache_equals_one_forward_with_the_same_decisions(lm, inputs, kv_policy):
    policy = apply.TokenPolicy(_varied_gate(lm, inputs, kv_policy))
    ids = _text(inputs)
    stepwise, executed = teacher_forced(lm, ids, policy, prompt_tokens=3)
    assert 0 < np.mean([1 - e.row_layer_share for e in executed]) < 1  # some layers skipped, not all
    kv_written = any(e.kv_only_layers for e in executed)
    assert kv_written == (kv_policy == "project")  # decode steps that skip a layer write its K/V, or not
    once = _once(lm, ids, policy.gate)
    np.testing.assert_allclose(stepwise, once, atol=1e-4)
    assert not np.allclose(once, lm.logits(ids), atol=1e-3)


def test_kv_policies_differ_only_in_what_later_tokens_see(lm, inputs):
    gate = _varied_gate(lm, inputs)
    hole = apply.TokenGate(gate.w, gate.after_layer + 1, gate.L, writes_kv=False)
    ids = _text(inputs)
    a, b = _once(lm, ids, gate), _once(lm, ids, hole)
    assert not np.allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)  # the first token attends only to itself either way


@pytest.mark.parametrize("kv_policy", ["project", "hole"])
def test_the_training_forward_is_the_inference_forward(inputs, kv_policy):
    import torch

    lm = load_backend("torch", inputs / "model", "float32")
    gate = _gate(lm, None, inputs, kv_policy)
    ids = lm.ids_array(np.asarray(_text(inputs))[None])
    _, captured = lm.hidden(ids, lm.new_cache(1, ids.shape[1]), capture={1})
    hard = torch.from_numpy(gate.decide(captured[1], lm).keep[:, :, 1:].astype(np.float32))
    with torch.no_grad():
        trained = train._frozen_forward(lm, captured[1], hard, hard, torch.arange(ids.shape[1]), kv_policy == "hole")
    served, _ = lm.hidden(ids, lm.new_cache(1, ids.shape[1]), StepPlan(gate=gate))
    assert 0 < hard.mean() < 1
    torch.testing.assert_close(trained, served, atol=1e-5, rtol=1e-5)


def test_kv_writes_are_counted_in_the_structural_bound(inputs):
    from dataclasses import replace

    from adaptive_inference import cost
    from adaptive_inference.model_config import ModelConfig
    from adaptive_inference.plan import ExecutedStep

    cfg = ModelConfig.from_dir(inputs / "model")
    L, head = cfg.num_hidden_layers, cfg.vocab_size * cfg.hidden_size
    skip = ExecutedStep(frozenset(range(L - 1)), frozenset(range(L - 1)), "full", "full", head, 1)
    write = replace(skip, kv_only_layers=frozenset({L - 1}))
    full = ExecutedStep(frozenset(range(L)), frozenset(range(L)), "full", "full", head, 1)
    frac = {name: cost.structural(cfg, [s], 8)["weight_bytes_fraction"] for name, s in
            {"skip": skip, "write": write, "full": full}.items()}
    assert frac["skip"] < frac["write"] < frac["full"] == pytest.approx(1.0)


def test_backends_take_the_same_decisions(inputs):
    lms = {b: load_backend(b, inputs / "model", "float32") for b in ("torch", "mlx")}
    from adaptive_inference.hidden_cache import load_split

    x = load_split(inputs / "hidden", "calib", ["layer_input.1"])["layer_input.1"][:20].reshape(2, 10, -1)
    keeps = {b: _gate(lm, None, inputs).decide(lm.asarray(x), lm).keep for b, lm in lms.items()}
    assert np.array_equal(keeps["torch"], keeps["mlx"]) and keeps["torch"][:, :, 0].all()
    assert 0 < keeps["torch"].mean() < 1


def test_bad_inputs_are_one_line_errors(inputs, tmp_path):
    from adaptive_inference.model_config import ModelConfig

    cfg = ModelConfig.from_dir(inputs / "model")
    with pytest.raises(UserError, match="no router for target 0.35"):
        techniques.make_policy([{"name": "token_router", "target": 0.35}], [inputs / "token_router"], cfg)
    with pytest.raises(UserError, match="no layer_input.3"):
        train.build({**PARAMS, "first_layers": 3}, inputs / "hidden", inputs / "model", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(inputs / "token_router", bad)
    (bad / "router_0.5.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="corrupt artifact"):
        techniques.make_policy([{"name": "token_router", "target": 0.5}], [bad], cfg)


def test_report_blocks_show_skip_rates_by_layer_and_by_token_type(inputs):
    from adaptive_inference.techniques.token_router import summary

    blocks = summary.blocks(inputs / "token_router")
    images = {b[1]: b[3] for b in blocks if b[0] == "img"}
    assert set(images) == {"token_router_layers.png", "token_router_types.png"}
    assert all(png.startswith(b"\x89PNG") for png in images.values())
    types = next(b for b in blocks if b[0] == "table" and b[1][0] == "target" and "all" in b[1][-1])
    assert len(types[2]) == len(PARAMS["targets"])  # one row per target
