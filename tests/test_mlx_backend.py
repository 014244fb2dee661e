"""MLX-specific: the BLAS preload, compiled decode blocks, and the same cache holes as torch.
(Shared behaviour: test_backend_contract.py.)"""

import ast
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


def test_skipped_layer_matches_torch(lms):
    """Skips in the prefill and in a decode step, then normal steps: the holes stay masked, as in torch."""
    _, lm, tlm, _ = lms
    skip = [StepPlan(skip_layers=frozenset({i})) for i in range(4)]
    plans = [skip[1], StepPlan(), skip[2], StepPlan(), StepPlan(zero_mlp=frozenset({0}))]
    chunks = [IDS[:4], IDS[4:6], [IDS[6]], [IDS[7]], [IDS[8]]]
    cache, tcache = lm.new_cache(1, len(IDS)), tlm.new_cache(1, len(IDS))
    for ids, plan in zip(chunks, plans, strict=True):
        got = np.array(lm.forward(mx.array([ids]), cache, plan).out.logits)
        want = tlm.forward(torch.tensor([ids]), tcache, plan).out.logits.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    written = np.array(cache.written)
    assert not written[2, 0, 6] and not written[1, 0, 3] and written[1, 0, 6] and written[2, 0, 7]
    assert np.array_equal(written, tcache.written.numpy())
    assert not np.allclose(got[0, -1], lm.logits(IDS[:9])[-1], atol=1e-4)


def test_compiled_blocks_match_plain(lms):
    _, lm, _, _ = lms
    lw, cfg = lm.layers[1], lm.cfg
    x = mx.random.normal((1, 1, cfg.hidden_size), key=mx.random.key(0))
    rope = lm.rope(lm.positions(5, 1))
    args = (x, lw.ln1, lw.wqkv, lw.bqkv, *rope, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps)
    for plain, compiled in zip(PLAIN[0](*args), compiled_blocks()[0](*args), strict=True):
        np.testing.assert_allclose(np.array(plain), np.array(compiled), atol=1e-5)
    mlp_args = (x, lw.ln2, lw.w_gate_up, lw.w_down, cfg.rms_norm_eps)
    np.testing.assert_allclose(np.array(PLAIN[2](*mlp_args)), np.array(compiled_blocks()[2](*mlp_args)), atol=1e-5)


class SkipSomeSteps(StaticPolicy):
    """Skips layer 2 at steps 2 and 3 and zeroes MLP 0 at step 5: exercises holes during generation."""

    static = False

    def plan(self, step):
        if step in (2, 3):
            return StepPlan(skip_layers=frozenset({2}))
        return StepPlan(zero_mlp=frozenset({0})) if step == 5 else StepPlan()


def test_greedy_matches_torch(lms):
    _, lm, tlm, _ = lms
    for p in (None, StaticPolicy(StepPlan(zero_mlp=frozenset({3}))), SkipSomeSteps()):
        res = generate(lm, IDS[:6], max_new_tokens=8, policy=p)
        assert res.tokens == generate(tlm, IDS[:6], max_new_tokens=8, policy=p).tokens
