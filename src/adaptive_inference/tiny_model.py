"""A seeded random tiny checkpoint with its own byte-level BPE tokenizer, built here from nothing:
`model.source: tiny` runs the whole pipeline in minutes with no download (the CI configuration in ci/,
smoke tests of a new machine or cluster, the test suite). Same seed and packages -> same bytes."""

from __future__ import annotations

import json
from pathlib import Path

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)
SHAPES = {
    "llama": dict(model_type="llama", rope_theta=10000.0, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=False),
    "llama3": dict(model_type="llama", rope_theta=500000.0, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}
TEXT = ("def add(a, b):\n    return a + b\n"
        "The answer is 42. Janet has 3 eggs and buys 4 more, so she has 7 eggs.\n"
        "Light scatters off molecules; shorter wavelengths scatter more.\n")
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_model(path: Path, shape: str = "llama", seed: int = 0):
    """A random tiny checkpoint (config.json + safetensors) in `path`; returns the transformers model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .prepare_model import clean_config

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
    (Path(path) / "config.json").write_text(json.dumps(clean_config(model.config.to_dict(), "float32")))
    return model


def write_tokenizer(path: Path) -> None:
    """A 128-entry byte-level BPE trained on TEXT, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"],
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  # alphabet() comes from a set: unsorted, its first 100 differed per process
                                  initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[:100])
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT
    fast.save_pretrained(path)


def write(path: Path, shape: str = "llama", seed: int = 0):
    """Model and tokenizer in one HF folder."""
    model = write_model(path, shape, seed)
    write_tokenizer(path)
    return model
