"""Torch-specific: the static cache's holes. (Shared behaviour: test_backend_contract.py.)"""

import numpy as np
import torch

from adaptive_inference.plan import StepPlan
from adaptive_inference.torch_backend import TorchLM

IDS = [5, 17, 99, 3, 64, 12, 7, 120, 33, 2, 41, 8]


def _step_after_skip(lm, garbage_layer=None):
    """Prefill 6 tokens, decode token 6 with layer 2 skipped, then decode token 7 normally.
    Optionally overwrite the KV entries of position 6 in `garbage_layer` before the last step."""
    cache = lm.new_cache(1, len(IDS))
    lm.forward(torch.tensor([IDS[:6]]), cache)
    lm.decode_one_token(torch.tensor([IDS[6]]), cache, StepPlan(skip_layers=frozenset({2})))
    if garbage_layer is not None:
        g = torch.Generator().manual_seed(0)
        cache.k[garbage_layer, :, :, 6] = torch.randn(cache.k[garbage_layer, :, :, 6].shape, generator=g) * 10
        cache.v[garbage_layer, :, :, 6] = torch.randn(cache.v[garbage_layer, :, :, 6].shape, generator=g) * 10
    return cache, lm.decode_one_token(torch.tensor([IDS[7]]), cache).out.logits[0].numpy()


def test_skipped_layer_leaves_masked_kv_hole(tiny):
    """A layer skipped at a step writes no KV there, and later steps must not attend to that slot."""
    lm = TorchLM.load(tiny[1])
    cache, clean = _step_after_skip(lm)
    assert not cache.written[2, 0, 6] and cache.written[1, 0, 6] and cache.written[2, 0, 7]
    assert not cache.written[:, 0, 8:].any()  # nothing beyond the last step is visible
    _, garbage_in_hole = _step_after_skip(lm, garbage_layer=2)
    np.testing.assert_array_equal(clean, garbage_in_hole)  # the hole is invisible
    _, garbage_elsewhere = _step_after_skip(lm, garbage_layer=1)
    assert not np.allclose(clean, garbage_elsewhere, atol=1e-3)  # other layers still attend to step 6
    assert not np.allclose(clean, lm.logits(IDS[:8])[-1], atol=1e-4)


def test_decode_step_has_static_shapes(tiny):
    """What a compiled decode step needs: positions as a tensor and attention over the whole static cache
    (the same shapes at every step), so one graph serves every position."""
    lm = TorchLM.load(tiny[1])
    shapes = []
    orig = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append((tuple(k.shape), tuple(attn_mask.shape)))
        return orig(q, k, v, attn_mask=attn_mask, **kw)

    cache = lm.new_cache(1, 10)
    lm.forward(torch.tensor([IDS[:4]]), cache)
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        for t in IDS[4:8]:
            lm.decode_one_token(torch.tensor([t]), cache)
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    assert len(set(shapes)) == 1 and shapes[0][0][2] == 10
