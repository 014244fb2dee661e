"""Properties every backend owes the decode loop, run once per backend on each tiny shape."""

import numpy as np
import pytest

from adaptive_inference.benchmark import load_backend
from adaptive_inference.generation import generate
from adaptive_inference.plan import StepPlan

IDS = [5, 17, 99, 3, 64, 12, 7, 120, 33, 2, 41, 8]


@pytest.fixture(params=["torch", "mlx"])
def lm(request, tiny):
    return load_backend(request.param, tiny[1], "float32")


def test_batch_rows_match_single(lm):
    prompts = np.array([IDS[:6], IDS[6:]])
    batched = [tok for tok, _ in lm.generate_step(prompts, max_new_tokens=5)]
    for row in range(2):
        alone = [int(t[0]) for t, _ in lm.generate_step(prompts[row:row + 1], max_new_tokens=5)]
        assert [int(t[row]) for t in batched] == alone


def test_empty_plan_is_exactly_baseline(lm):
    assert np.array_equal(lm.logits(IDS), lm.logits(IDS, StepPlan()))


def test_generate_times_every_step(lm):
    res = generate(lm, IDS[:6], max_new_tokens=4)
    assert len(res.tokens) == len(res.token_latencies_s) == 4
    assert res.prefill_s == res.token_latencies_s[0] > 0
