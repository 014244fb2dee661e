"""Adding a technique touches only its own package (plus params, schema, rule and dvc stage): a trivial
technique written into a temp folder is picked up by the registry, the CLI, the policy machinery, the
teacher-forced evaluation, the cost model and the report summaries, with no edit anywhere else."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from adaptive_inference import cli, cost, techniques
from adaptive_inference import params as params_mod
from adaptive_inference.backends import load_backend
from adaptive_inference.generation import generate, teacher_forced

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = {
    "__init__.py": '''
        """Trivial technique (test only): blend one layer's output halfway with its input."""
        from .. import Stage, Technique

        TECHNIQUES = [Technique("halfblend", artifacts={"halfblend": "make_halfblend"},
                                policy=".halfblend.apply:policy", options={"alpha": 0.5})]
        STAGES = [Stage("make-halfblend", "make_halfblend", ".halfblend.apply:build", "Pick the layer.",
                        out="halfblend", inputs={"model": "model"})]
        SUMMARIES = {"make_halfblend": ".halfblend.apply:summary"}
    ''',
    "apply.py": '''
        import json

        from ... import atomic, manifest
        from ...plan import StaticPolicy, StepPlan


        def build(params, model_dir, out):
            with atomic.output_dir(out) as tmp:
                atomic.write_json(tmp / "plan.json", {"layer": params["layer"]})
                return manifest.write(tmp, stage="make_halfblend", inputs={}, params=params)


        def policy(artifacts, cfg, options):
            layer = json.loads((artifacts["halfblend"] / "plan.json").read_text())["layer"]
            return StaticPolicy(StepPlan(blend=((layer, options["alpha"]),)))


        def summary(artifact):
            return [("p", "halfblend on layer %d" % json.loads((artifact / "plan.json").read_text())["layer"])]
    ''',
}


@pytest.fixture
def halfblend(tmp_path, monkeypatch):
    pkg = tmp_path / "ext" / "halfblend"
    pkg.mkdir(parents=True)
    for name, body in PACKAGE.items():
        (pkg / name).write_text(textwrap.dedent(body))
    monkeypatch.setattr(techniques, "__path__", [*techniques.__path__, str(pkg.parent)])
    return pkg


def test_a_new_package_is_all_a_technique_needs(halfblend, tiny_llama, tmp_path, monkeypatch):
    assert "halfblend" in techniques.registry()
    assert "make-halfblend" in cli.parser()._subparsers._group_actions[0].choices
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["make_halfblend"] = {"layer": 2}  # its params section ...
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(p))
    schema = params_mod.schema()
    schema["properties"]["make_halfblend"] = {"type": "object"}  # ... and its schema section
    monkeypatch.setattr(params_mod, "schema", lambda: schema)
    art = tmp_path / "artifacts" / "halfblend"
    assert cli.main(["make-halfblend", "--params", str(params), "--model", str(tiny_llama[1]), "--out", str(art)]) == 0

    specs = [{"name": "halfblend", "alpha": 0.25}]
    techniques.check({"c": {"techniques": specs}})
    assert techniques.artifact_folders(specs + ["halfblend"]) == ["halfblend"]
    lm = load_backend("torch", tiny_llama[1], "float32")
    policy = techniques.make_policy(specs, [art], lm.cfg)
    ids = [5, 17, 99, 3, 64, 12]
    logits, executed = teacher_forced(lm, ids, policy)
    assert not np.allclose(logits, lm.logits(ids), atol=1e-4)
    assert cost.structural(lm.cfg, executed, context=6)["weight_bytes_fraction"] == pytest.approx(1.0)
    assert generate(lm, ids, max_new_tokens=3, policy=policy).executed[1].head == "full"
    assert techniques.summaries(art) == [("p", "halfblend on layer 2")]
    assert json.loads((art / "plan.json").read_text()) == {"layer": 2}


def test_unknown_option_is_refused(halfblend):
    from adaptive_inference.errors import UserError

    with pytest.raises(UserError, match="technique 'halfblend' has no option 'alfa'"):
        techniques.check({"c": {"techniques": [{"name": "halfblend", "alfa": 1}]}})
