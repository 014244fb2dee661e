"""Token router on a tiny model: the training stage (loss falls, skip share moves to its target,
deterministic bytes), the gate on both backends (keep-all is the baseline bit for bit, the KV cache with
holes equals a one-shot forward with the same decisions, same decisions on both backends), bad inputs."""

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

PARAMS = {"first_layers": 1, "targets": [0.5], "hidden": 16, "texts": 6, "seq_len": 24, "epochs": 8,
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
    return root


@pytest.fixture(scope="module", params=["torch", "mlx"])
def lm(request, inputs):
    return load_backend(request.param, inputs / "model", "float32")


def test_training_lowers_the_loss_and_reaches_toward_the_target(inputs, tmp_path):
    r = json.loads((inputs / "token_router" / "token_router.json").read_text())
    t = r["targets"]["0.5"]
    curve = t["curve"]
    assert curve[0]["hard_skip"] < 0.2  # routers start near keep-all ...
    assert abs(curve[-1]["hard_skip"] - 0.5) < abs(curve[0]["hard_skip"] - 0.5) - 0.2  # ... and move to the target
    assert 0.2 < t["calib_skip"] < 0.8 and t["calib_skip_by_layer"][0] is None
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert set(t["calib_skip_by_token_type"]) >= {"punctuation", "stop word", "digits", "rare id", "high loss", "all"}
    train.build(PARAMS, inputs / "hidden", inputs / "model", tmp_path / "again")
    for f in ("router_0.5.safetensors", "token_router.json"):
        assert (tmp_path / "again" / f).read_bytes() == (inputs / "token_router" / f).read_bytes()


def _gate(lm, bias: float | None, inputs):
    gate = apply.load(inputs / "token_router", 0.5, lm.cfg)
    if bias is not None:  # force every decision
        gate.w = {**gate.w, "w2": np.zeros_like(gate.w["w2"]), "b2": np.full_like(gate.w["b2"], bias)}
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


def test_decode_with_holes_equals_one_forward_with_the_same_decisions(lm, inputs):
    policy = apply.TokenPolicy(_gate(lm, None, inputs))
    ids = _text(inputs)
    stepwise, executed = teacher_forced(lm, ids, policy, prompt_tokens=3)
    assert 0 < np.mean([1 - e.row_layer_share for e in executed]) < 1  # some layers skipped, not all
    t = lm.ids_array(np.asarray(ids)[None])
    once = lm.to_numpy(lm.forward(t, lm.new_cache(1, len(ids)), StepPlan(gate=policy.gate)).out.logits[0])
    np.testing.assert_allclose(stepwise, once, atol=1e-4)
    assert not np.allclose(once, lm.logits(ids), atol=1e-3)


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
