"""The token router's apply layer (both backends, through a plan gate): after the first K layers, a small
MLP on each token's residual says which later layers that token runs. A (row, position) that skips layer l
does not compute it; under kv_policy 'project' it still writes its K/V there (the gate's writes_kv:
Decoder.write_kv), under 'hole' later tokens see a masked hole in that layer's cache. Training runs the
same policy (train.py), so the router learns the model that runs.

The router is a few hundred thousand multiply-adds: it runs on the host in numpy (the residual is read
back once per step), so torch and MLX take bit-identical decisions from the same residual."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ... import manifest
from ...errors import UserError
from ...plan import GateDecision, StepPlan

KEYS = ("w1", "b1", "w2", "b2")


def rms(x: np.ndarray) -> np.ndarray:
    """Parameter-free RMS normalization of the router's input (the residual's scale grows with depth)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def keep_logits(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """[..., hidden] residual -> [..., L - K] keep logits (> 0: run the layer)."""
    h = rms(x.astype(np.float32)) @ w["w1"].T + w["b1"]
    h = h / (1 + np.exp(-h))  # SiLU
    return h @ w["w2"].T + w["b2"]


class TokenGate:
    def __init__(self, weights: dict[str, np.ndarray], first_layers: int, num_layers: int, writes_kv: bool):
        self.w, self.after_layer, self.L, self.writes_kv = weights, first_layers - 1, num_layers, writes_kv

    def decide(self, x, lm) -> GateDecision:
        z = keep_logits(self.w, lm.to_numpy(x))  # [B, T, L - K]
        keep = np.ones((*z.shape[:2], self.L), dtype=bool)
        keep[:, :, self.after_layer + 1:] = z > 0
        return GateDecision(keep, info={"skip_share": float(1 - keep[:, :, self.after_layer + 1:].mean())})


class TokenPolicy:
    static = True  # the plan is the same every step; the gate decides inside the forward

    def __init__(self, gate: TokenGate):
        self.gate = gate

    def plan(self, step: int) -> StepPlan:
        return StepPlan(gate=self.gate)

    def observe(self, executed, logits) -> None:
        pass


def load(folder: Path, target: float, cfg) -> TokenGate:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    meta = manifest.read_json(folder, "train_token_router", "token_router.json")
    entry = meta["targets"].get(f"{target:g}")
    if entry is None:
        raise UserError(f"token router {folder} has no router for target {target:g} "
                        f"(trained: {', '.join(meta['targets'])}; set train_token_router.targets)")
    try:
        w = load_file(str(Path(folder) / entry["file"]))
        w = {k: w[k].astype(np.float32) for k in KEYS}
    except (OSError, KeyError, SafetensorError) as e:
        raise UserError(f"corrupt artifact {folder}: {entry['file']}: {e}") from None
    k = meta["first_layers"]
    if w["w1"].shape[1] != cfg.hidden_size or w["w2"].shape[0] != cfg.num_hidden_layers - k:
        raise UserError(f"token router {folder} does not fit this model (hidden {cfg.hidden_size}, "
                        f"{cfg.num_hidden_layers} layers)")
    if meta.get("kv_policy") not in ("project", "hole"):
        raise UserError(f"corrupt artifact {folder}: token_router.json kv_policy {meta.get('kv_policy')!r}")
    return TokenGate(w, k, cfg.num_hidden_layers, meta["kv_policy"] == "project")


def policy(artifacts: dict[str, Path], cfg, options: dict) -> TokenPolicy:
    return TokenPolicy(load(artifacts["token_router"], float(options["target"]), cfg))
