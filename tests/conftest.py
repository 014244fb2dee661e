"""Tiny random HF checkpoints (Llama, Qwen2, Llama-3 RoPE scaling) shared by the backend tests."""

from __future__ import annotations

import os

import pytest

# the GPU tests' Triton kernels: one tile each, not the fastest of 26 per shape (a minute a test; what a test
# checks is the kernel's arithmetic, and an autotuned kernel runs one tile either way)
os.environ.setdefault("ADAPTIVE_INFERENCE_TRITON_TILES", "1")

from adaptive_inference.tiny_model import SHAPES
from adaptive_inference.tiny_model import write_model as make_tiny_model


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
    from adaptive_inference import corpus, hidden_cache, manifest
    from adaptive_inference.tiny_model import write_tokenizer

    model = root / "model"
    model.mkdir()
    make_tiny_model(model, "llama")
    write_tokenizer(model)
    manifest.write(model, stage="prepare_model", inputs={}, params={})
    corpus.build(corpus_params, root / "corpus")
    if hidden_params is not None:
        hidden_cache.build(hidden_params, model, root / "corpus", root / "hidden")
    return root
