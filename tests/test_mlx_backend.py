"""MLXLM against transformers and against TorchLM (which implements the same plan semantics)."""

import ast
import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptive_inference.blas import blas_info, import_mlx
from adaptive_inference.generation import generate
from adaptive_inference.mlx_backend import MLXLM, PLAIN, compiled_blocks
from adaptive_inference.plan import StaticPolicy, StepPlan
from adaptive_inference.torch_backend import TorchLM

mx = import_mlx()

IDS = [5, 17, 99, 3, 64, 12, 7, 120, 33, 2, 41, 8]


def hf_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def lms(tiny):
    """(shape, MLXLM, TorchLM, transformers model) for each tiny shape."""
    shape, path, hf = tiny
    return shape, MLXLM.load(path), TorchLM.load(path), hf


def test_blas_info_is_recorded():
    info = blas_info()
    assert info["mlx_blas"] and info["how"]


def _blas_info_in_subprocess(code: str, **env) -> dict:
    code = f"{code}; from adaptive_inference.blas import blas_info; print(repr(blas_info()))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True,
                         capture_output=True, text=True).stdout
    return ast.literal_eval(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload is Linux-only")
def test_blas_preload_modes():
    default = _blas_info_in_subprocess("from adaptive_inference.blas import import_mlx; import_mlx()")
    if default["mlx_blas"] == "openblas":
        assert Path(default["path"]).is_file()
    ref = _blas_info_in_subprocess("from adaptive_inference.blas import import_mlx; import_mlx()",
                                   ADAPTIVE_INFERENCE_BLAS="reference")
    assert ref["mlx_blas"] == "reference (netlib)"
    late = _blas_info_in_subprocess("import mlx.core; from adaptive_inference.blas import import_mlx; import_mlx()")
    assert "not applied" in late["how"]


def test_matches_transformers(lms):
    _, lm, _, hf = lms
    np.testing.assert_allclose(lm.logits(IDS), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)


def test_full_plan_is_exactly_baseline(lms):
    _, lm, _, _ = lms
    assert np.array_equal(lm.logits(IDS), lm.logits(IDS, StepPlan(skip_layers=frozenset(), zero_mlp=frozenset())))


def test_incremental_decode_matches_teacher_forced(lms):
    _, lm, _, _ = lms
    full = lm.logits(IDS)
    cache = lm.new_cache(1, len(IDS))
    out = [np.array(lm.forward(mx.array([IDS[:5]]), cache)[0])]
    out += [np.array(lm.forward(mx.array([[t]]), cache)[0]) for t in IDS[5:]]
    np.testing.assert_allclose(np.concatenate(out), full, atol=1e-5)


def test_zero_mlp_equals_zeroed_down_proj(lms):
    _, lm, _, hf = lms
    zeroed = lm.logits(IDS, StepPlan(zero_mlp=frozenset({1})))
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        ref.model.layers[1].mlp.down_proj.weight.zero_()
    np.testing.assert_allclose(zeroed, hf_logits(ref, IDS), atol=1e-4, rtol=1e-4)
    assert not np.allclose(zeroed, lm.logits(IDS), atol=1e-3)


def test_skipped_layer_matches_torch(lms):
    """Skips in the prefill and in a decode step, then normal steps: the holes stay masked, as in torch."""
    _, lm, tlm, _ = lms
    skip = [StepPlan(skip_layers=frozenset({i})) for i in range(4)]
    plans = [skip[1], StepPlan(), skip[2], StepPlan(), StepPlan(zero_mlp=frozenset({0}))]
    chunks = [IDS[:4], IDS[4:6], [IDS[6]], [IDS[7]], [IDS[8]]]
    cache, tcache = lm.new_cache(1, len(IDS)), tlm.new_cache(1, len(IDS))
    with torch.inference_mode():
        for ids, plan in zip(chunks, plans, strict=True):
            got = np.array(lm.forward(mx.array([ids]), cache, plan))
            want = tlm.forward(torch.tensor([ids]), tcache, plan).numpy()
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    valid = np.array(cache.valid)
    assert not valid[2, 0, 6] and not valid[1, 0, 3] and valid[1, 0, 6] and valid[2, 0, 7]
    assert np.array_equal(valid, tcache.valid.numpy())
    assert not np.allclose(got[0, -1], lm.logits(IDS[:9])[-1], atol=1e-4)


class SkipSomeSteps(StaticPolicy):
    """Skips layer 2 at steps 2 and 3 and zeroes MLP 0 at step 5: exercises holes in generate_step."""

    def plan(self, step):
        if step in (2, 3):
            return StepPlan(skip_layers=frozenset({2}))
        return StepPlan(zero_mlp=frozenset({0})) if step == 5 else StepPlan()


def test_greedy_matches_torch(lms):
    _, lm, tlm, _ = lms
    for p in (None, StaticPolicy(StepPlan(zero_mlp=frozenset({3}))), SkipSomeSteps()):
        res = generate(lm, IDS[:6], max_new_tokens=8, policy=p)
        assert res.tokens == generate(tlm, IDS[:6], max_new_tokens=8, policy=p).tokens
        assert len(res.token_latencies_s) == 8 and res.prefill_s > 0


def test_compiled_decode_matches_plain(lms):
    _, lm, _, _ = lms
    out = []
    for blocks in (PLAIN, compiled_blocks()):
        cache = lm.new_cache(1, len(IDS))
        lm.forward(mx.array([IDS[:5]]), cache)
        out.append(np.array(mx.stack([lm.forward(mx.array([[t]]), cache, blocks=blocks) for t in IDS[5:]])))
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)


def test_sampling_is_seeded(lms):
    _, lm, _, _ = lms
    a = generate(lm, IDS[:4], max_new_tokens=6, temperature=0.7, seed=3).tokens
    b = generate(lm, IDS[:4], max_new_tokens=6, temperature=0.7, seed=3).tokens
    assert a == b
