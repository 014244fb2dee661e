import json

import numpy as np
import pytest

from adaptive_inference.bench.stats import paired_speedup, realized_share


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


def test_realized_share_needs_a_saving_to_realize():
    assert realized_share(1.5, 2.0) == pytest.approx(0.5) and realized_share(0.9, 1.25) == pytest.approx(-0.4)
    assert realized_share(0.970, 1.0036) is None and realized_share(1.2, 1.0) is None  # bound under 1% or none
    assert realized_share(None, 2.0) is None and realized_share(1.1, None) is None


def test_paired_speedup_interval_widens_with_noise():
    rng = np.random.default_rng(1)
    base = np.full(20, 0.04)
    quiet = paired_speedup(base, base / 1.05 * (1 + 0.005 * rng.standard_normal(20)))
    noisy = paired_speedup(base, base / 1.05 * (1 + 0.05 * rng.standard_normal(20)))
    width = lambda s: s["ci95"][1] - s["ci95"][0]  # noqa: E731
    assert width(noisy) > 3 * width(quiet)


def test_paired_share_holds_each_pair_against_its_own_bandwidth_sample():
    """A VM that switches between a slow and a fast bandwidth state: a decode that reads 80% of whatever the
    machine gives has share 0.8 per pair, where the best sample would call it 0.4 in the slow state."""
    from adaptive_inference.bench.bandwidth import paired_share

    bytes_per_token = 5e8
    gbs = [30.0, 60.0, 30.0, 60.0, 30.0]
    seconds = [bytes_per_token / (0.8 * g * 1e9) for g in gbs]
    got = paired_share(seconds, gbs, bytes_per_token)
    assert got["share_of_limit"] == pytest.approx(0.8) and got["pair_read_gbs"] == gbs
    assert got["limit_tps"] == pytest.approx(30e9 / bytes_per_token)
    with pytest.raises(ValueError, match="2 decode samples, 1 bandwidth"):
        paired_share([0.1, 0.1], [30.0], bytes_per_token)


def test_decode_pairs_samples_between_pairs_in_order(tiny_llama):
    from adaptive_inference.backends import load_backend
    from adaptive_inference.bench.measure import decode_pairs
    from adaptive_inference.plan import StaticPolicy

    lm = load_backend("torch", tiny_llama[1], "float32")
    data = {"prompts": [[5, 17, 99, 3], [8, 41, 2, 33]], "prompt_categories": ["a", "b"]}
    calls = []
    out = decode_pairs(lm, data, {"baseline": StaticPolicy}, {"new_tokens": 3, "warmup": 1, "repeats": 2},
                       between=lambda: calls.append(len(calls)) or len(calls))
    assert out["between"] == [1, 2, 3, 4] and len(out["baseline"]["per_token_s"]) == 4


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


def test_first_change_is_the_first_layer_a_plan_runs_differently():
    from adaptive_inference.bench.measure import first_change
    from adaptive_inference.plan import StepPlan, WeightSet

    assert first_change(StepPlan(zero_mlp=frozenset({7, 3})), 30) == 3
    assert first_change(StepPlan(skip_layers=frozenset({12}), blend=((9, 0.5),)), 30) == 9
    assert first_change(StepPlan(head=object()), 30) == 30  # only the head differs
    assert first_change(StepPlan(weights=WeightSet("low", "x.safetensors", 4), zero_mlp=frozenset({5})), 30) == 0


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_quality_resumes_gate_free_plans_with_the_whole_forwards_numbers(tiny_llama, backend):
    """quality() runs a gate-free plan from the baseline forward's input of its first changed layer (only
    the head for a head-only plan): the same KL / top-1 / perplexity and argmax ids as whole forwards."""
    from adaptive_inference import metrics
    from adaptive_inference.backends import load_backend
    from adaptive_inference.bench.measure import quality
    from adaptive_inference.plan import FULL, HeadOutput, StaticPolicy, StepPlan

    lm = load_backend(backend, tiny_llama[1], "float32")
    L = lm.cfg.num_hidden_layers

    class HalfHead:  # a head that answers differently from the full one
        def apply(self, h, lm):
            return HeadOutput(lm.logits32(h, lm.head_weights()) * 0.5, "half", 1)

    rng = np.random.default_rng(0)
    data = {"eval": [rng.integers(0, 128, n).tolist() for n in (12, 9, 15)], "eval_categories": ["a", "b", "a"]}
    resumed = []
    whole_logits = lm.logits

    def logits(ids, plan=FULL, *, resume=None):
        resumed.append(None if resume is None else resume[0])
        return whole_logits(ids, plan, resume=resume)

    lm.logits = logits
    for plan, first in ((StepPlan(zero_mlp=frozenset({L - 1})), L - 1), (StepPlan(head=HalfHead()), L),
                        (StepPlan(skip_layers=frozenset({1}), zero_mlp=frozenset({L - 1})), 1)):
        resumed.clear()
        got, top1 = quality(lm, data, lambda plan=plan: StaticPolicy(plan), 4)
        assert resumed == [first] * len(data["eval"])
        parts = [metrics.compare(whole_logits(ids, plan), metrics.log_softmax(whole_logits(ids)), ids) for ids in data["eval"]]
        want = metrics.summarize(parts)
        assert {k: got[k] for k in want} == want and got["kl_to_baseline"] > 0
        assert top1 == [whole_logits(ids, plan).argmax(-1).tolist() for ids in data["eval"]]


def test_compare_against_a_reference_is_the_direct_formula():
    """metrics.compare (one exp over the logits, the reference's p log p computed once) = the textbook
    KL(base || ours), NLL and top-1 on random distributions."""
    from adaptive_inference import metrics

    rng = np.random.default_rng(0)
    logits, base = rng.normal(0, 3, (20, 500)).astype(np.float32), rng.normal(0, 3, (20, 500)).astype(np.float32)
    ids = rng.integers(0, 500, 20).tolist()
    lb = base - np.log(np.exp(base.astype(np.float64)).sum(-1, keepdims=True))
    lp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    got = metrics.compare(logits, metrics.reference(lb.astype(np.float32)), ids)
    kl = (np.exp(lb) * (lb - lp)).sum(-1)[:-1]
    np.testing.assert_allclose(got["kl"], kl, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(got["nll"], -lp[np.arange(19), ids[1:]], rtol=1e-12)
    assert np.array_equal(got["agree"], (lb.argmax(-1) == lp.argmax(-1))[:-1])
    same = metrics.compare(base, lb, ids)["kl"]  # a distribution against itself
    assert same.min() >= 0 and same.max() < 1e-12


def test_quality_vs_float32_reference(tiny_llama):
    """A bf16 baseline against the same model in fp32: a small positive KL; fp32 against itself: zero."""
    from adaptive_inference.bench.measure import quality_vs
    from adaptive_inference.torch_backend import TorchLM

    fp32, bf16 = TorchLM.load(tiny_llama[1]), TorchLM.load(tiny_llama[1], dtype="bfloat16")
    data = {"eval": [[5, 17, 99, 3, 64, 12, 7, 120, 33, 2], [8, 41, 2, 33, 120, 7]]}
    same = quality_vs(fp32, fp32, data)
    assert 0 <= same["kl_to_baseline"] < 1e-12 and same["top1_agreement"] == 1.0 and same["eval_tokens"] == 14
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


def test_bandwidth_probe_runs_no_torch_thread_pool():
    """The probe must not start torch's OpenMP team: once it exists, libgomp throttles the spinning of the
    OpenMP kernels MLX runs on its stream thread and MLX decode in the same process slows by ~30% (bandwidth.py).
    Run in a fresh process so an earlier test's torch import cannot hide it."""
    import subprocess
    import sys

    code = ("import sys; from adaptive_inference.bench import bandwidth as b; before = 'torch' in sys.modules; "
            "r = b.Reader(8 * 2**20, threads=2); g = r(2); r.close(); d = b.read_gbs(8 * 2**20, 2); "
            "print(before, 'torch' in sys.modules, g > 0, d['read_gbs'] > 0, d['threads'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:4] == [out[0], "True", "True"] and int(out[4]) >= 1
    assert out[0] == "False"  # importing the probe loads no torch either


def test_step_profile_is_per_decode_step():
    """cuda_techniques --profile --configs: kernels and wall time of the profiled decode steps, per step (the
    prefill is left out of them), each kernel name's calls and time largest first; no steps is refused."""
    from adaptive_inference.bench.cuda_techniques import step_profile

    kernels = [("gemv", 10.0), ("norm", 2.0), ("gemv", 12.0), ("norm", 2.5)] * 2  # two steps of 26.5 us
    p = step_profile(kernels, [40e-6, 40e-6])
    assert p["steps"] == 2 and p["kernels"] == 4
    assert p["step_ms_wall"] == pytest.approx(0.040) and p["kernel_ms"] == pytest.approx(0.0265)
    assert p["uncovered_ms"] == pytest.approx(0.0135)
    assert p["by_kernel"] == [{"name": "gemv", "calls": 2.0, "us": 22.0}, {"name": "norm", "calls": 2.0, "us": 4.5}]
    with pytest.raises(ValueError, match="no steps"):
        step_profile(kernels, [])


def test_gears_are_timed_beside_their_weight_sets():
    """cuda_techniques: a wanted gears configuration brings its weight sets as static configurations, and its
    mixed speedup is what its steps would give at those sets' own speeds (harmonic, "full" at 1.0); a set not
    timed leaves it unknown rather than guessed."""
    from types import SimpleNamespace

    from adaptive_inference.bench.cuda_techniques import mixed_speedup, wanted_configs

    assert wanted_configs(SimpleNamespace(configs=[])) is None  # everything
    assert wanted_configs(SimpleNamespace(configs=["gears-lag", "int8", "nested4-block"])) == [
        "gears-lag", "int8", "nested4-block", "nested8-block"]
    share = {"nested4-block": 0.5, "nested8-block": 0.25, "full": 0.25}
    assert mixed_speedup(share, {"nested4-block": 2.0, "nested8-block": 1.6}) == pytest.approx(1 / 0.65625)
    assert mixed_speedup({"full": 1.0}, {}) == pytest.approx(1.0)
    assert mixed_speedup(share, {"nested4-block": 2.0}) is None


def test_tile_choices_list_each_autotuned_kernels_pick_per_key():
    """cuda_techniques records the tile each autotuned Triton kernel chose per autotune key (JSON-ready), and
    leaves out kernels that never ran."""
    from types import SimpleNamespace

    from adaptive_inference.bench.cuda_techniques import tile_choices

    cfg = SimpleNamespace(all_kwargs=lambda: {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3})
    tuners = {"triton_block._w4_block_kernel": SimpleNamespace(cache={(4096, 6144, 32, True, "torch.bfloat16"): cfg}),
              "triton_kernels._gemv_kernel": SimpleNamespace(cache={})}
    got = tile_choices(tuners)
    assert got == {"triton_block._w4_block_kernel": [
        {"key": ["4096", "6144", "32", "True", "torch.bfloat16"],
         "tile": {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3}}]}
    assert json.loads(json.dumps(got)) == got
