import json

import numpy as np
import pytest
from conftest import tiny_stage_inputs

from adaptive_inference import techniques
from adaptive_inference.errors import UserError
from adaptive_inference.model_config import ModelConfig
from adaptive_inference.plan import StepPlan
from adaptive_inference.techniques.lobotomy import stages as lobotomy
from adaptive_inference.torch_backend import TorchLM


def test_gini():
    assert lobotomy.gini(np.ones(10)) == pytest.approx(0.0)
    assert lobotomy.gini(np.r_[np.zeros(99), 1.0]) == pytest.approx(0.99)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """profile_ffn + make_lobotomy on a tiny Llama with a real (stdlib) corpus and its own tokenizer."""
    root = tiny_stage_inputs(tmp_path_factory.mktemp("lobo"), {"seed": 0, "categories": ["code", "prose"], "train": 1,
                                                                "calib": 3, "eval": 1, "max_chars": 300})
    model = root / "model"
    lobotomy.profile({"texts": 4, "seq_len": 24, "fire_threshold": 0.5}, model, root / "corpus", root / "profile")
    return root


def test_profile_has_every_layer(stages):
    prof = json.loads((stages / "profile" / "profile.json").read_text())
    assert [r["layer"] for r in prof["layers"]] == [0, 1, 2, 3]
    for r in prof["layers"]:
        assert 0 < r["fire_rate"] < 1 and 0 <= r["gini"] < 1 and r["kl"] > 0
    assert prof["baseline"]["kl_to_baseline"] == pytest.approx(0.0, abs=1e-6)  # base stored as fp32
    # each ablation resumes from the baseline's captured input of its layer: the numbers of a whole forward
    from adaptive_inference import metrics

    lm = TorchLM.load(stages / "model")
    texts = lobotomy._calib(stages / "model", stages / "corpus", {"texts": 4, "seq_len": 24})
    base = [metrics.log_softmax(lm.logits(ids)).astype(np.float32) for ids in texts]
    for i in (0, 2):
        direct = lobotomy._quality(lm, texts, base, StepPlan(zero_mlp=frozenset({i})))
        assert prof["layers"][i]["kl"] == direct["kl_to_baseline"] and prof["layers"][i]["perplexity"] == direct["perplexity"]


@pytest.mark.parametrize("max_layers, max_kl", [(0, 10.0), (2, 10.0), (4, 0.0)])
def test_cut_respects_budget(stages, tmp_path, max_layers, max_kl):
    m = lobotomy.make({"max_layers": max_layers, "max_kl": max_kl}, stages / "profile", stages / "model",
                      stages / "corpus", tmp_path / "lobo")
    plan = json.loads((tmp_path / "lobo" / "lobotomy.json").read_text())
    assert len(plan["cut"]) <= max_layers and plan["calib_kl"] <= max_kl
    assert m["outputs"]["cut"] == plan["cut"]
    if max_kl == 10.0:
        assert len(plan["cut"]) == max_layers  # a loose budget takes the least sensitive layers in order
        ranked = [r["layer"] for r in plan["ranked"]]
        assert plan["cut"] == sorted(ranked[:max_layers])


def test_policy_applies_cut_and_zero_cut_is_baseline(stages, tmp_path):
    lobotomy.make({"max_layers": 2, "max_kl": 10.0}, stages / "profile", stages / "model", stages / "corpus",
                  tmp_path / "lobo")
    lm = TorchLM.load(stages / "model")
    policy = techniques.make_policy(["lobotomy"], [tmp_path / "lobo"], lm.cfg)
    cut = json.loads((tmp_path / "lobo" / "lobotomy.json").read_text())["cut"]
    assert policy.plan(7) == StepPlan(zero_mlp=frozenset(cut)) and policy.static
    ids = [3, 9, 27, 81, 12]
    lobotomy.make({"max_layers": 0, "max_kl": 10.0}, stages / "profile", stages / "model", stages / "corpus",
                  tmp_path / "none")
    nothing = techniques.make_policy(["lobotomy"], [tmp_path / "none"], lm.cfg)
    assert np.array_equal(lm.logits(ids, nothing.plan(0)), lm.logits(ids))


def test_corrupt_plan_is_a_one_line_error(stages, tmp_path):
    lobotomy.make({"max_layers": 1, "max_kl": 10.0}, stages / "profile", stages / "model", stages / "corpus",
                  tmp_path / "lobo")
    (tmp_path / "lobo" / "lobotomy.json").write_text("{")
    with pytest.raises(UserError, match="corrupt artifact"):
        techniques.make_policy(["lobotomy"], [tmp_path / "lobo"], ModelConfig.from_dir(stages / "model"))


def test_unknown_technique_is_refused():
    with pytest.raises(UserError, match="unknown technique 'lobotomyy'"):
        techniques.check({"x": {"techniques": ["lobotomyy"]}})


def test_chat_applies_configuration_and_logs_decisions(stages, tmp_path):
    import io

    from adaptive_inference import chat

    lobotomy.make({"max_layers": 1, "max_kl": 10.0}, stages / "profile", stages / "model", stages / "corpus",
                  tmp_path / "artifacts" / "lobotomy")
    params = {"benchmark": {"dtype": "float32", "configs": {"baseline": {"techniques": []},
                                                              "lobotomy": {"techniques": ["lobotomy"]}}}}
    out, log = io.StringIO(), tmp_path / "decisions.jsonl"
    rc = chat.run(params, "lobotomy", model_dir=stages / "model", artifacts_dir=tmp_path / "artifacts", backend="torch",
                  log_path=log, max_new_tokens=5, temperature=0.0, stdin=io.StringIO("hello there\nquit\n"), stdout=out)
    assert rc == 0 and "tok/s" in out.getvalue()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    cut = json.loads((tmp_path / "artifacts" / "lobotomy" / "lobotomy.json").read_text())["cut"]
    assert rows and all(r["zero_mlp"] == cut and r["turn"] == 0 and r["head"] == "full" for r in rows)
    assert all(set(r["mlps_run"]) == set(range(4)) - set(cut) for r in rows)
    with pytest.raises(UserError, match="unknown configuration 'stackedd'"):
        chat.run(params, "stackedd", model_dir=stages / "model", artifacts_dir=tmp_path / "artifacts", backend="torch",
                 log_path=None, max_new_tokens=5, temperature=0.0, stdin=io.StringIO("quit\n"), stdout=out)
