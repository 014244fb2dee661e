"""The router's apply layer, written once against the decoder's op set (both backends run this code).

Per position the router MLP gives P(rare); at or below the threshold the step multiplies by a pre-sliced
common head only. The output stays a distribution over every id: common ids get (1 - p) softmax(common
logits), the rest share p evenly, so KL and perplexity stay finite. Decode picks among the common logits
and maps back to vocab ids; the 49k-wide spread is only built when read (lazy on MLX).

Where the backend can (Decoder.select_linear: MLX's CPU kernel, a Triton kernel on CUDA with bf16 weights), the
decision is taken on the device: the router and a matmul that reads only the head each row needs run in the
same graph as the blocks, and the host reads P(rare) only after the token (one evaluation per step, nothing
to wait for in between). Elsewhere (torch on CPU, prefill and teacher-forced texts) the host reads P(rare)
first and runs the head it chose. Both take the same decisions (on MLX with bit-identical logits; tests).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ... import manifest
from ...errors import UserError
from ...plan import HeadOutput, StaticPolicy, StepPlan


@dataclass(eq=False)
class GatedHead:
    """Backend-neutral router + common head; each backend's arrays are made once and kept per backend."""

    common_ids: np.ndarray  # [C] int64, sorted
    w1: np.ndarray  # [hidden_r, hidden]
    b1: np.ndarray
    w2: np.ndarray  # [1, hidden_r]
    b2: np.ndarray
    threshold: float
    _arrays: dict = field(default_factory=dict, repr=False)

    @property
    def router_params(self) -> int:
        return self.w1.size + self.b1.size + self.w2.size + self.b2.size

    def _on(self, lm) -> dict:
        key = (lm.name, str(lm.device), str(lm.dtype))
        if key not in self._arrays:
            ids = lm.asarray(self.common_ids)
            self._arrays[key] = {"w1": lm.asarray(self.w1), "b1": lm.asarray(self.b1), "w2": lm.asarray(self.w2),
                                 "b2": lm.asarray(self.b2, "float32"), "ids": ids, "head": lm.take_rows(lm.lm_head, ids)}
        return self._arrays[key]

    def p_rare(self, lm, h):
        """P(rare) per position, float32 [...]."""
        w = self._on(lm)
        return lm.sigmoid(lm.logits32(lm.silu(lm.linear(h, w["w1"], w["b1"])), w["w2"]) + w["b2"])[..., 0]

    @functools.cached_property
    def cut(self) -> float:
        """The largest float32 at or below the threshold: for a float32 P(rare) p, p > cut exactly when p >
        threshold, so a decision taken on the device in float32 equals the host's in float64."""
        t = np.float32(self.threshold)
        return float(np.nextafter(t, np.float32(-np.inf)) if t > self.threshold else t)

    def common_out(self, lm, h, p):
        """(the common head's logits z on h [..., C], their full-vocab spread)."""
        z = lm.logits32(h, self._on(lm)["head"])
        return z, self.spread(lm, z, p)

    def spread(self, lm, z, p):
        """The distribution over every id [..., V] from the common logits z: common ids get (1 - p) softmax(z),
        the rest share p evenly."""
        w, V, C = self._on(lm), lm.cfg.vocab_size, len(self.common_ids)
        lc = lm.log_softmax(z) + lm.log(1 - p)[..., None]
        return lm.spread(lc, w["ids"], lm.log(p) - math.log(max(V - C, 1)), V)

    def common_pick(self, lm, z):
        """What a common row picks from, over every id: its common logits z, -inf at the other ids."""
        never = lm.asarray(np.full(tuple(z.shape[:-1]), -np.inf), "float32")
        return lm.spread(z, self._on(lm)["ids"], never, lm.cfg.vocab_size)

    def decision(self, cfg, p: np.ndarray) -> tuple[str, int, dict]:
        """(head name, weight elements read, info) of P(rare) p per row: common rows at or below the threshold."""
        V, H, C = cfg.vocab_size, cfg.hidden_size, len(self.common_ids)
        common = p <= self.threshold
        info = {"p_rare": p.ravel().tolist(), "common_head": common.ravel().tolist()}
        full = V * H + self.router_params
        if not common.any():
            return "full", full, info
        if common.all():
            return "common", C * H + self.router_params, info
        return "mixed", full + C * H, info

    def decide(self, lm, h):
        """(P(rare), rare, common logits, full logits, the distribution over every id) in one piece of the step:
        the head a row needs is chosen on the device (Decoder.select_linear)."""
        w = self._on(lm)
        p = self.p_rare(lm, h)
        rare = p > self.cut  # the rows that need the full head
        zc, zf = lm.select_linear(h, w["head"], lm.lm_head, rare)
        return p, rare, zc, zf, lm.where_rows(rare, zf, self.spread(lm, zc, p))

    def apply(self, h, lm) -> HeadOutput:
        w = self._on(lm)
        if lm.select_linear_ok(h, w["head"], lm.lm_head):
            # one graph runs the chosen head, no host read; the decision is read once the step is evaluated
            p_dev, rare, zc, zf, logits = lm.segment(("decide", self), functools.partial(self.decide, lm), h)
            read = lm.fetch(p_dev)  # its copy queued now, so reading it does not wait for a step queued later
            return HeadOutput(logits, "", 0, pick=zc, pick_ids=w["ids"], pick_alt=(rare, zf, None),
                              settle=lambda: self.decision(lm.cfg, read().astype(np.float64)))
        p_dev = lm.segment(("p_rare", self), functools.partial(self.p_rare, lm), h)
        # decided on the host: both device parts run as backend segments (captured and replayed under CUDA
        # graphs); between them the host reads P(rare), the one sync of the decision
        name, params, info = self.decision(lm.cfg, lm.to_numpy(p_dev).astype(np.float64))
        if name == "full":
            return HeadOutput(lm.logits32(h, lm.lm_head), name, params, info=info)
        zc, spread = lm.segment(("common", self), functools.partial(self.common_out, lm), h, p_dev)
        if name == "common":
            return HeadOutput(spread, name, params, pick=zc, pick_ids=w["ids"], info=info)
        # rows of a batch decide alone
        common = np.asarray(info["common_head"]).reshape(tuple(h.shape[:-1]))
        full_logits = lm.logits32(h, lm.lm_head)
        return HeadOutput(lm.where_rows(common, spread, full_logits), name, params,
                          pick=lm.where_rows(common, self.common_pick(lm, zc), full_logits), info=info)


@functools.lru_cache(maxsize=8)
def load_head(artifact: Path, vocab: int, hidden: int) -> GatedHead:
    """Cached per process, so every policy of a run shares one head and its backend arrays."""
    from safetensors.numpy import load_file

    manifest.verify(artifact, stage="train_vocab_router")
    try:
        meta = json.loads((artifact / "router.json").read_text())
        w = load_file(str(artifact / "router.safetensors"))
        common = np.load(artifact / "common_ids.npy")
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"corrupt router artifact {artifact}: {e}") from None
    if common.max() >= vocab or w["w1"].shape[1] != hidden:
        raise UserError(f"router artifact {artifact} does not fit this model (vocab {vocab}, hidden {hidden})")
    return GatedHead(common.astype(np.int64), w["w1"], w["b1"], w["w2"], w["b2"], float(meta["threshold"]))


def policy(artifacts: dict[str, Path], cfg, options: dict) -> StaticPolicy:
    return StaticPolicy(StepPlan(head=load_head(artifacts["router"], cfg.vocab_size, cfg.hidden_size)))
