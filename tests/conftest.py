"""Tiny random HF checkpoints (Llama, Qwen2, Llama-3 RoPE scaling) shared by the backend tests."""

from __future__ import annotations

import pytest

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)
SHAPES = {
    "llama": dict(model_type="llama", rope_theta=10000.0, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=False),
    "llama3": dict(model_type="llama", rope_theta=500000.0, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


def make_tiny_model(path, shape: str = "llama", seed: int = 0):
    """Write a random tiny checkpoint in the layout prepare_model produces; returns the HF model."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from adaptive_inference.prepare_model import clean_config

    spec = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(spec.pop("model_type"), **TINY, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random init has tiny norms; make the layers matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(clean_config(model.config.to_dict(), "float32")))
    return model


@pytest.fixture(scope="session", params=sorted(SHAPES))
def tiny(request, tmp_path_factory):
    """(shape, model folder, transformers model) for each tiny shape."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return request.param, path, make_tiny_model(path, request.param)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """One tiny Llama, for technique tests whose subject is the technique, not the architecture."""
    path = tmp_path_factory.mktemp("tiny-llama-one")
    return "llama", path, make_tiny_model(path, "llama")


def tiny_stage_inputs(root, corpus_params: dict, hidden_params: dict | None = None):
    """A tiny Llama with its own tokenizer (a prepare_model manifest), a real corpus and optionally the hidden
    cache: the inputs of the technique stages. Returns root (model/, corpus/, hidden/ under it)."""
    from test_pipeline import tiny_tokenizer

    from adaptive_inference import corpus, hidden_cache, manifest

    model = root / "model"
    model.mkdir()
    make_tiny_model(model, "llama")
    tiny_tokenizer(model)
    manifest.write(model, stage="prepare_model", inputs={}, params={})
    corpus.build(corpus_params, root / "corpus")
    if hidden_params is not None:
        hidden_cache.build(hidden_params, model, root / "corpus", root / "hidden")
    return root
