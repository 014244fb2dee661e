import numpy as np
import pytest

from adaptive_inference.bench.stats import paired_speedup


def test_paired_speedup_cancels_shared_drift():
    """A machine that slows down 40% over the run: each pair shares the slowdown, so the paired median
    finds the true 1.10x with a tight interval, where separate medians of the two series would not."""
    rng = np.random.default_rng(0)
    drift = np.linspace(1.0, 1.4, 40) * (1 + 0.01 * rng.standard_normal(40))
    base = 0.040 * drift
    config = 0.040 / 1.10 * drift * (1 + 0.01 * rng.standard_normal(40))
    s = paired_speedup(base.tolist(), config.tolist())
    assert s["median"] == pytest.approx(1.10, abs=0.01) and s["pairs"] == 40
    lo, hi = s["ci95"]
    assert lo <= s["median"] <= hi and hi - lo < 0.02


def test_paired_speedup_interval_widens_with_noise():
    rng = np.random.default_rng(1)
    base = np.full(20, 0.04)
    quiet = paired_speedup(base, base / 1.05 * (1 + 0.005 * rng.standard_normal(20)))
    noisy = paired_speedup(base, base / 1.05 * (1 + 0.05 * rng.standard_normal(20)))
    width = lambda s: s["ci95"][1] - s["ci95"][0]  # noqa: E731
    assert width(noisy) > 3 * width(quiet)


def test_gpqa_choice_scores_options_under_the_policy(tiny_llama):
    from adaptive_inference import metrics
    from adaptive_inference.backends import load_backend
    from adaptive_inference.bench.measure import gpqa_choice
    from adaptive_inference.plan import StaticPolicy, StepPlan

    lm = load_backend("torch", tiny_llama[1], "float32")
    rng = np.random.default_rng(0)
    items = [{"prompt": rng.integers(0, 128, 9).tolist(), "options": [rng.integers(0, 128, k).tolist() for k in (2, 3, 4, 5)],
              "answer": a, "category": "science"} for a in (0, 1, 2, 3, 1, 2)]

    def mean_lp(item, opt, plan):
        ids = item["prompt"] + opt
        lp = metrics.log_softmax(lm.logits(ids, plan)[len(item["prompt"]) - 1:-1])
        return lp[np.arange(len(opt)), opt].mean()

    base = gpqa_choice(lm, {"gpqa": items}, None)
    picks = [int(np.argmax([mean_lp(it, o, StepPlan()) for o in it["options"]])) for it in items]
    assert base["gpqa_picks"] == picks and base["gpqa_n"] == len(items)
    assert base["gpqa_accuracy"] == np.mean([p == it["answer"] for p, it in zip(picks, items, strict=True)])
    assert gpqa_choice(lm, {"gpqa": items}, StaticPolicy)["gpqa_picks"] == picks  # a policy that changes nothing
    skip = StepPlan(skip_layers=frozenset({1, 2}))
    other = gpqa_choice(lm, {"gpqa": items}, lambda: StaticPolicy(skip))
    assert other["gpqa_picks"] == [int(np.argmax([mean_lp(it, o, skip) for o in it["options"]])) for it in items]
    assert gpqa_choice(lm, {"gpqa": []}, StaticPolicy) == {}


def test_quality_vs_float32_reference(tiny_llama):
    """A bf16 baseline against the same model in fp32: a small positive KL; fp32 against itself: zero."""
    from adaptive_inference.bench.measure import quality_vs
    from adaptive_inference.torch_backend import TorchLM

    fp32, bf16 = TorchLM.load(tiny_llama[1]), TorchLM.load(tiny_llama[1], dtype="bfloat16")
    data = {"eval": [[5, 17, 99, 3, 64, 12, 7, 120, 33, 2], [8, 41, 2, 33, 120, 7]]}
    same = quality_vs(fp32, fp32, data)
    assert same["kl_to_baseline"] == 0.0 and same["top1_agreement"] == 1.0 and same["eval_tokens"] == 14
    cheap = quality_vs(bf16, fp32, data)
    assert 0 < cheap["kl_to_baseline"] < 0.05


def test_backends_outside_quality_backends_score_the_first_texts(tmp_path):
    from conftest import tiny_stage_inputs

    from adaptive_inference.bench.data import prepare

    root = tiny_stage_inputs(tmp_path, {"seed": 0, "categories": ["code", "prose"], "train": 1, "calib": 1, "eval": 4,
                                        "max_chars": 300})
    p = {"quality": {"seq_len": 16, "max_texts": 6, "backends": ["torch"], "check_texts": 3},
         "decode": {"prompt_tokens": 4, "prompts": 1}, "gsm8k": {"samples": 0}, "gpqa": {"samples": 0, "max_prompt_tokens": 8}}
    full = prepare(p, root / "model", root / "corpus", gsm8k=False, gpqa=False)
    check = prepare(p, root / "model", root / "corpus", gsm8k=False, gpqa=False, all_texts=False)
    assert len(full["eval"]) == 6 and check["eval"] == full["eval"][:3]
    assert check["eval_categories"] == full["eval_categories"][:3] and len(set(check["eval_categories"])) == 2
