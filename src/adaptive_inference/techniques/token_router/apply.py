"""The token router's apply layer (both backends, through a plan gate): after the first K layers, a small
MLP on each token's residual says which later layers that token runs. A (row, position) that skips layer l
does not compute it; under kv_policy 'project' it still writes its K/V there (the gate's writes_kv:
Decoder.write_kv), under 'hole' later tokens see a masked hole in that layer's cache. Training runs the
same policy (train.py), so the router learns the model that runs.

The router is a few hundred thousand multiply-adds: it runs on the host in numpy (the residual is read
back once per step), so torch and MLX take bit-identical decisions from the same residual. Where a decode
step runs as one captured unit (torch on CUDA, Decoder.device_gate_ok) it runs on the device instead
(keep_device, float32) and the host reads the decisions after the token."""

from __future__ import annotations

import functools
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
        self._arrays: dict = {}

    def decide(self, x, lm) -> GateDecision:
        return self.decision(keep_logits(self.w, lm.to_numpy(x)) > 0)  # [B, T, L - K]

    def decision(self, later: np.ndarray) -> GateDecision:
        """The decision of keep flags [B, T, L - K] for the routed layers."""
        keep = np.ones((*later.shape[:2], self.L), dtype=bool)
        keep[:, :, self.after_layer + 1:] = later
        return GateDecision(keep, info={"skip_share": float(1 - later.mean())})

    def keep_device(self, x, lm):
        """keep_logits(x) > 0 on the device, in float32 (a backend bool array [B, T, L - K]): the same
        decisions as decide but where a logit lies within float rounding of 0."""
        key = (lm.name, str(lm.device))
        if key not in self._arrays:
            self._arrays[key] = {k: lm.asarray(v, "float32") for k, v in self.w.items()}
        w = self._arrays[key]
        h = lm.silu(lm.linear(lm.rms32(x), w["w1"], w["b1"]))
        return lm.linear(h, w["w2"], w["b2"]) > 0


class TokenPolicy:
    static = True  # the plan is the same every step; the gate decides inside the forward

    def __init__(self, gate: TokenGate):
        self.gate = gate

    def plan(self, step: int) -> StepPlan:
        return StepPlan(gate=self.gate)

    def observe(self, executed, logits) -> None:
        pass


def load(folder: Path, target: float, cfg) -> TokenGate:
    try:  # a rewritten artifact is loaded anew
        stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(Path(folder).iterdir()))
    except OSError:
        stamp = ()
    return _load(str(folder), float(target), cfg.hidden_size, cfg.num_hidden_layers, stamp)


@functools.lru_cache(maxsize=16)
def _load(folder: str, target: float, hidden: int, num_layers: int, stamp: tuple) -> TokenGate:
    """Cached per process: every policy of a run shares one gate (on CUDA a new gate would be a new plan,
    compiled and captured again) and its device arrays."""
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
    if w["w1"].shape[1] != hidden or w["w2"].shape[0] != num_layers - k:
        raise UserError(f"token router {folder} does not fit this model (hidden {hidden}, {num_layers} layers)")
    if meta.get("kv_policy") not in ("project", "hole"):
        raise UserError(f"corrupt artifact {folder}: token_router.json kv_policy {meta.get('kv_policy')!r}")
    return TokenGate(w, k, num_layers, meta["kv_policy"] == "project")


def policy(artifacts: dict[str, Path], cfg, options: dict) -> TokenPolicy:
    return TokenPolicy(load(artifacts["token_router"], float(options["target"]), cfg))
