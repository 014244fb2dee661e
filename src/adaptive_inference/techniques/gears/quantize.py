"""quantize: the packed weights of the low and mid gears (seed 002's QuantizedLinear), as an artifact that
both backends load (decoder.add_weight_set) and multiply without a float copy (quant_torch / quant_mlx).

Layouts (params `layout`):
- nested (default): one file; each matrix stored once as 4-bit codes plus a 4-bit residual plane. The low
  gear reads the codes (int4, group-wise affine), the mid gear reads both planes (8-bit codes, step
  scale / 16). Resident beside the full weights: +1 byte per weight instead of +1.5 for separate copies.
- separate: int8 per-channel symmetric (mid) and int4 group-wise (low) in two files, as the seed stores them.
The fused matrices are quantized as the backends hold them (q|k|v one matrix, gate|up one matrix).
quantize.json records per gear the bytes a decode step reads, the memory held, and the round-trip error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ... import atomic, manifest, quant
from ...errors import UserError
from ...model_config import ModelConfig
from ...progress import Progress

PARTS = {"wqkv": "attention", "wo": "attention", "w_gate_up": "mlp", "w_down": "mlp"}
GEARS = {"nested": {"low": ("gears.safetensors", "nested", 4), "mid": ("gears.safetensors", "nested", 8)},
         "separate": {"low": ("int4.safetensors", "int4", None), "mid": ("int8.safetensors", "int8", None)}}


def model_matrices(model_dir: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """{'layers.{i}.{field}' | 'lm_head': float32 [out, in]} fused as the backends fuse them."""
    from safetensors import safe_open

    cfg = ModelConfig.from_dir(model_dir)
    raw = {}
    for f in ModelConfig.weight_files(model_dir):
        with safe_open(str(f), framework="numpy") as sf:
            raw.update({k: sf.get_tensor(k) for k in sf.keys()})
    try:
        out = {f"layers.{i}.{field}": np.concatenate([raw[n] for n in names]).astype(np.float32)
               for i in range(cfg.num_hidden_layers) for field, names in cfg.layer_weight_names(i).items()
               if field in PARTS}
        out["lm_head"] = raw["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    except KeyError as e:
        raise UserError(f"{model_dir}: missing weight {e.args[0]}") from None
    out["lm_head"] = out["lm_head"].astype(np.float32)
    return cfg, out


def part_of(name: str) -> str:
    return "head" if name == "lm_head" else PARTS[name.rsplit(".", 1)[1]]


def build(params: dict, model_dir: Path, out_dir: Path) -> dict:
    manifest.verify(model_dir, stage="prepare_model")
    layout, parts, group = params["layout"], set(params["parts"]), params["group_size"]
    if layout not in GEARS:
        raise UserError(f"quantize.layout must be one of {', '.join(GEARS)}, got {layout!r}")
    unknown = sorted(parts - {"attention", "mlp", "head"})
    if unknown:
        raise UserError(f"quantize.parts: unknown part {unknown[0]!r} (attention, mlp, head)")
    cfg, mats = model_matrices(model_dir)
    chosen = {n: w for n, w in mats.items() if part_of(n) in parts}
    files: dict[str, dict[str, quant.Int8Weight | quant.Int4Weight]] = {}
    error = {g: {p: [] for p in sorted(parts)} for g in ("low", "mid")}
    progress = Progress("quantize matrices", len(chosen), "matrices")
    for name, w in chosen.items():
        for gear, (file, fmt, depth) in GEARS[layout].items():
            state = files.setdefault(file, {}).get(name) or quant.quantize(w, fmt, group_size=group)
            files[file][name] = state
            err = np.linalg.norm(quant.dequantize(state, depth=depth) - w) / max(np.linalg.norm(w), 1e-30)
            error[gear][part_of(name)].append(float(err))
        progress.step()
    progress.finish(f"{len(chosen)} matrices, layout {layout}, group {group}")
    full = {n: w.nbytes for n, w in mats.items()}
    read = {"high": sum(full.values())}
    for gear, (file, _, depth) in GEARS[layout].items():
        read[gear] = sum(quant.bytes_read(files[file][n], depth=depth) if n in chosen else b for n, b in full.items())
    packed = sum(quant.resident_bytes(s) for states in files.values() for s in states.values())
    result = {
        "layout": layout, "group_size": group, "parts": sorted(parts), "matrices": len(chosen),
        "gears": {g: {"file": f, "depth": d} for g, (f, _, d) in GEARS[layout].items()},
        "bytes_read_per_token": read,
        "resident_bytes": {"full": read["high"], "packed": packed, "all_gears": read["high"] + packed},
        "relative_error": {g: {p: {"mean": float(np.mean(v)), "max": float(np.max(v))} for p, v in by.items() if v}
                           for g, by in error.items()},
    }
    with atomic.output_dir(out_dir) as tmp:
        for file, states in files.items():
            quant.save_file(states, tmp / file)
        atomic.write_json(tmp / "quantize.json", result)
        return manifest.write(tmp, stage="quantize", inputs={"model": model_dir}, params=params,
                              outputs={"layout": layout, "bytes_read_per_token": read,
                                       "num_layers": cfg.num_hidden_layers})
