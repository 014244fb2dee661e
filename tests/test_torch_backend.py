import copy

import numpy as np
import pytest
import torch

from adaptive_inference.generation import generate
from adaptive_inference.plan import StaticPolicy, StepPlan
from adaptive_inference.torch_backend import TorchLM

IDS = [5, 17, 99, 3, 64, 12, 7, 120, 33, 2, 41, 8]


def hf_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_matches_transformers(tiny):
    _, path, hf = tiny
    lm = TorchLM.load(path)
    np.testing.assert_allclose(lm.logits(IDS), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)


def test_full_plan_is_exactly_baseline(tiny):
    _, path, _ = tiny
    lm = TorchLM.load(path)
    assert np.array_equal(lm.logits(IDS), lm.logits(IDS, StepPlan(skip_layers=frozenset(), zero_mlp=frozenset())))


def test_incremental_decode_matches_teacher_forced(tiny):
    _, path, _ = tiny
    lm = TorchLM.load(path)
    full = lm.logits(IDS)
    cache = lm.new_cache(1, len(IDS))
    with torch.inference_mode():
        out = [lm.forward(torch.tensor([IDS[:5]]), cache)[0].numpy()]
        out += [lm.forward(torch.tensor([[t]]), cache)[0].numpy() for t in IDS[5:]]
    np.testing.assert_allclose(np.concatenate(out), full, atol=1e-5)


def test_zero_mlp_equals_zeroed_down_proj(tiny):
    _, path, hf = tiny
    lm = TorchLM.load(path)
    zeroed = lm.logits(IDS, StepPlan(zero_mlp=frozenset({1})))
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        ref.model.layers[1].mlp.down_proj.weight.zero_()
    np.testing.assert_allclose(zeroed, hf_logits(ref, IDS), atol=1e-4, rtol=1e-4)
    assert not np.allclose(zeroed, lm.logits(IDS), atol=1e-3)


def _step_after_skip(lm, garbage_layer=None):
    """Prefill 6 tokens, decode token 6 with layer 2 skipped, then decode token 7 normally.
    Optionally overwrite the KV entries of position 6 in `garbage_layer` before the last step."""
    cache = lm.new_cache(1, len(IDS))
    with torch.inference_mode():
        lm.forward(torch.tensor([IDS[:6]]), cache)
        lm.forward(torch.tensor([[IDS[6]]]), cache, StepPlan(skip_layers=frozenset({2})))
        if garbage_layer is not None:
            g = torch.Generator().manual_seed(0)
            cache.k[garbage_layer, :, :, 6] = torch.randn(cache.k[garbage_layer, :, :, 6].shape, generator=g) * 10
            cache.v[garbage_layer, :, :, 6] = torch.randn(cache.v[garbage_layer, :, :, 6].shape, generator=g) * 10
        return cache, lm.forward(torch.tensor([[IDS[7]]]), cache)[0].numpy()


def test_skipped_layer_leaves_masked_kv_hole(tiny):
    """A layer skipped at a step writes no KV there, and later steps must not attend to that slot."""
    _, path, _ = tiny
    lm = TorchLM.load(path)
    cache, clean = _step_after_skip(lm)
    assert not cache.valid[2, 0, 6] and cache.valid[1, 0, 6] and cache.valid[2, 0, 7]
    _, garbage_in_hole = _step_after_skip(lm, garbage_layer=2)
    np.testing.assert_array_equal(clean, garbage_in_hole)  # the hole is invisible
    _, garbage_elsewhere = _step_after_skip(lm, garbage_layer=1)
    assert not np.allclose(clean, garbage_elsewhere, atol=1e-3)  # other layers still attend to step 6
    full = lm.logits(IDS[:8])[-1]
    assert not np.allclose(clean, full, atol=1e-4)


def test_generate_matches_transformers_greedy(tiny):
    _, path, hf = tiny
    lm = TorchLM.load(path)
    res = generate(lm, IDS[:6], max_new_tokens=8, policy=StaticPolicy())
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([IDS[:6]]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert res.tokens == ref[0, 6:].tolist()
    assert len(res.token_latencies_s) == 8 and res.prefill_s > 0


@pytest.mark.parametrize("temperature", [0.7])
def test_sampling_is_seeded(tiny, temperature):
    _, path, _ = tiny
    lm = TorchLM.load(path)
    a = generate(lm, IDS[:4], max_new_tokens=6, temperature=temperature, seed=3).tokens
    b = generate(lm, IDS[:4], max_new_tokens=6, temperature=temperature, seed=3).tokens
    assert a == b
