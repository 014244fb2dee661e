"""Decoder config read straight from an HF config.json (Llama / Qwen2 / Mistral), shared by both backends."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError

SUPPORTED = {"llama", "qwen2", "mistral"}
_ROPE_TYPES = {"default", "linear", "llama3"}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise UserError(f"unsupported model_type {mt!r}: supported are {sorted(SUPPORTED)}")
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise UserError(f"unsupported rope scaling {rope_type!r}: supported are {sorted(_ROPE_TYPES)}")
        if d.get("mlp_bias"):
            raise UserError(f"unsupported {mt} model: MLP biases (mlp_bias: true) are not loaded by the backends")
        if mt != "qwen2" and d.get("attention_bias"):
            raise UserError(f"unsupported {mt} model: attention_bias also biases o_proj, which the backends "
                            "do not load")
        eos = d.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        heads = d["num_attention_heads"]
        return cls(
            model_type=mt,
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            vocab_size=d["vocab_size"],
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            qkv_bias=d.get("attention_bias", mt == "qwen2"),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise UserError(f"model folder has no config.json: {model_dir}")
        return cls.from_dict(json.loads(path.read_text()))

    @staticmethod
    def weight_files(model_dir: str | Path) -> list[Path]:
        """The model folder's *.safetensors in name order; a folder without any is refused."""
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise UserError(f"model folder has no *.safetensors: {model_dir}")
        return files

    def layer_weight_names(self, i: int) -> dict[str, list[str]]:
        """HF tensor names behind each fused weight of block i (both backends concatenate each list)."""
        q, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        names = {
            "ln1": [q + "input_layernorm.weight"],
            "wqkv": [a + f"{n}_proj.weight" for n in "qkv"],
            "wo": [a + "o_proj.weight"],
            "ln2": [q + "post_attention_layernorm.weight"],
            "w_gate_up": [q + "mlp.gate_proj.weight", q + "mlp.up_proj.weight"],
            "w_down": [q + "mlp.down_proj.weight"],
        }
        if self.qkv_bias:
            names["bqkv"] = [a + f"{n}_proj.bias" for n in "qkv"]
        return names

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies [head_dim/2], float64, with the config's scaling applied."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        s = self.rope_scaling
        if s is None:
            return inv
        if s["rope_type"] == "linear":
            return inv / float(s["factor"])
        # llama3: long wavelengths scaled by `factor`, short kept, a smooth ramp between
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_ctx = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old_ctx / lo, inv / factor, inv)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        return np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)

    def weight_bytes(self, bytes_per_param: int = 4) -> dict[str, int]:
        """Bytes of weights read per decoded token, by part (the structural-bound denominator)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        mlp = 3 * h * i
        return {
            "attention_per_layer": attn * bytes_per_param,
            "mlp_per_layer": mlp * bytes_per_param,
            "layers": (attn + mlp + 2 * h) * self.num_hidden_layers * bytes_per_param,
            "lm_head": self.vocab_size * h * bytes_per_param,
        }
