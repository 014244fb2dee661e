"""PyTorch backend: a small Llama / Qwen2 / Mistral decoder that loads HF safetensors directly.

It owns the forward pass so a per-step StepPlan can skip blocks or zero MLPs; a plan that changes
nothing runs exactly the baseline ops. Device and dtype are chosen by the caller (the driver).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from .errors import UserError
from .model_config import ModelConfig
from .plan import FULL, HeadDecision, StaticPolicy, StepPlan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class Layer:
    ln1: torch.Tensor
    wqkv: torch.Tensor  # [(H + 2 Hkv) * D, hidden]: one matmul for q, k and v
    wo: torch.Tensor
    ln2: torch.Tensor
    w_gate_up: torch.Tensor  # [2 * inter, hidden]
    w_down: torch.Tensor
    bqkv: torch.Tensor | None = None


class KVCache:
    """Static cache: k, v [L, B, Hkv, max_len, D] allocated up front.

    `valid` [L, B, max_len] is created only once some layer is skipped for a step: the skipped
    layer never writes those positions, so later queries must not attend to them.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid: torch.Tensor | None = None
        self.length = 0
        self.max_len = max_len

    def mark_skipped(self, layer: int, start: int, end: int) -> None:
        if self.valid is None:
            L, B, _, S, _ = self.k.shape
            self.valid = torch.ones((L, B, S), dtype=torch.bool, device=self.k.device)
        self.valid[layer, :, start:end] = False


class TorchLM:
    """Weights as plain tensors plus a forward(ids, cache, plan) that honours the plan."""

    name = "torch"

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], device: str, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else weights["lm_head.weight"]
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            parts = {k: [weights[n] for n in names] for k, names in cfg.layer_weight_names(i).items()}
            self.layers.append(Layer(**{k: v[0] if len(v) == 1 else torch.cat(v) for k, v in parts.items()}))
        self.head_log: list[tuple[float, bool]] = []  # (P(rare), common head used) per decoded row
        self.last_head: HeadDecision | None = None  # the gated head's decision on the last decode step
        self.inv_freq = torch.tensor(cfg.rope_inv_freq(), dtype=torch.float32, device=device)
        h, d = cfg.num_attention_heads, cfg.head_dim
        self._split = (h * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d)

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, model_dir: str | Path, *, device: str = "cpu", dtype: str = "float32") -> TorchLM:
        model_dir = Path(model_dir)
        cfg = ModelConfig.from_dir(model_dir)
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise UserError(f"model folder has no *.safetensors: {model_dir}")
        tdtype = DTYPES[dtype]
        weights = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    weights[k] = sf.get_tensor(k).to(device=device, dtype=tdtype)
        try:
            return cls(cfg, weights, device, tdtype)
        except KeyError as e:
            raise UserError(f"{model_dir}: missing weight {e.args[0]}") from None

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch, max_len, self.dtype, self.device)

    # ---- forward -------------------------------------------------------------------------

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _mask(self, cache: KVCache, layer: int, start: int, T: int) -> torch.Tensor | None:
        """Boolean attention mask [B|1, 1, T, start+T], or None when plain causal attention suffices."""
        end = start + T
        if cache.valid is None:
            if T == 1:
                return None
            q = torch.arange(start, end, device=self.device)[:, None]
            k = torch.arange(end, device=self.device)[None, :]
            return (k <= q)[None, None]
        valid = cache.valid[layer, :, :end][:, None, None, :]  # [B, 1, 1, end]
        q = torch.arange(start, end, device=self.device)[:, None]
        k = torch.arange(end, device=self.device)[None, :]
        return valid & (k <= q)[None, None]

    def _attention(self, x, lw: Layer, layer: int, cache: KVCache, cos, sin, start: int):
        B, T, _ = x.shape
        cfg = self.cfg
        qkv = F.linear(x, lw.wqkv, lw.bqkv)
        q, k, v = qkv.split(self._split, dim=-1)
        q = q.view(B, T, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin)
        end = start + T
        cache.k[layer, :, :, start:end] = k
        cache.v[layer, :, :, start:end] = v
        keys, values = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
        mask = self._mask(cache, layer, start, T)
        if mask is None and T > 1 and start == 0:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return F.linear(out.transpose(1, 2).reshape(B, T, -1), lw.wo)

    def _mlp(self, x, lw: Layer, layer: int, observe_mlp=None):
        gate, up = F.linear(x, lw.w_gate_up).chunk(2, dim=-1)
        act = F.silu(gate) * up  # [B, T, inter]
        if observe_mlp is not None:
            observe_mlp(layer, act)
        return F.linear(act, lw.w_down)

    def hidden(self, ids: torch.Tensor, cache: KVCache, plan: StepPlan = FULL,
               capture: set[int] | None = None, observe_mlp=None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the blocks on ids [B, T]; returns the final-normed hidden [B, T, hidden] and the
        inputs of the layers in `capture` (index num_layers = the un-normed final residual).
        `observe_mlp(layer, act)` sees each MLP's intermediate activation (profiling)."""
        B, T = ids.shape
        start = cache.length
        if start + T > cache.max_len:
            raise ValueError(f"KV cache full: {start}+{T} > {cache.max_len}")
        cos, sin = self._rope(torch.arange(start, start + T, device=self.device))
        x = F.embedding(ids, self.embed)
        eps = self.cfg.rms_norm_eps
        captured = {}
        for i, lw in enumerate(self.layers):
            if capture and i in capture:
                captured[i] = x
            if i in plan.skip_layers:
                cache.mark_skipped(i, start, start + T)
                continue
            x = x + self._attention(F.rms_norm(x, (x.shape[-1],), lw.ln1, eps), lw, i, cache, cos, sin, start)
            if i not in plan.zero_mlp:
                x = x + self._mlp(F.rms_norm(x, (x.shape[-1],), lw.ln2, eps), lw, i, observe_mlp)
        if capture and len(self.layers) in capture:
            captured[len(self.layers)] = x
        cache.length = start + T
        return F.rms_norm(x, (x.shape[-1],), self.norm, eps), captured

    def forward(self, ids: torch.Tensor, cache: KVCache, plan: StepPlan = FULL, *, last_only: bool = False):
        """Logits [B, T, vocab] (or [B, vocab] with last_only) in float32."""
        h, _ = self.hidden(ids, cache, plan)
        if last_only:
            h = h[:, -1]
        if plan.head is None:
            return F.linear(h, self.lm_head).float()
        return self._gated_head(h, plan.head, log=last_only)

    def _gated_head(self, h, g, *, log: bool):
        """Router per position: P(rare) <= threshold -> the common head, whose output is still a distribution
        over every id: common ids get (1 - p) softmax(common logits), the others share p evenly."""
        w = g.backend_cache.get(self.name)
        if w is None:
            t = lambda a: torch.as_tensor(a, device=self.device, dtype=self.dtype)  # noqa: E731
            ids = torch.as_tensor(g.common_ids, device=self.device)
            mask = torch.zeros(self.cfg.vocab_size, dtype=torch.bool, device=self.device)
            mask[ids] = True
            w = g.backend_cache[self.name] = {"w1": t(g.w1), "b1": t(g.b1), "w2": t(g.w2), "b2": t(g.b2), "ids": ids,
                                              "mask": mask, "head": self.lm_head[ids].contiguous()}
        p = torch.sigmoid(F.linear(F.silu(F.linear(h, w["w1"], w["b1"])), w["w2"], w["b2"]))[..., 0].float()
        p_np = p.cpu().numpy()  # one transfer for the decision and the log
        common_np = p_np <= g.threshold
        if log:
            self.head_log += list(zip(p_np.ravel().tolist(), common_np.ravel().tolist(), strict=True))
        if not common_np.any():
            if log:
                self.last_head = HeadDecision(common_np, None, w["ids"])
            return F.linear(h, self.lm_head).float()
        lc = F.log_softmax(F.linear(h, w["head"]).float(), dim=-1) + torch.log1p(-p)[..., None]
        if log:
            self.last_head = HeadDecision(common_np, lc, w["ids"])
        rare = torch.log(p) - math.log(max(self.cfg.vocab_size - len(w["ids"]), 1))
        out = rare[..., None].expand(*lc.shape[:-1], self.cfg.vocab_size).clone()
        out[..., w["ids"]] = lc
        if common_np.all():
            return out
        common = torch.as_tensor(common_np, device=self.device)
        return torch.where(common[..., None], out, F.linear(h, self.lm_head).float())

    @torch.inference_mode()
    def logits(self, ids: list[int] | np.ndarray, plan: StepPlan = FULL) -> np.ndarray:
        """Teacher-forced logits [T, vocab] float32 for one sequence."""
        t = torch.as_tensor(np.asarray(ids)[None], device=self.device)
        cache = self.new_cache(1, t.shape[1])
        return self.forward(t, cache, plan)[0].cpu().numpy()

    # ---- generation ----------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def generate_step(self, prompt: np.ndarray, *, max_new_tokens: int, policy=None,
                      temperature: float = 0.0, seed: int = 0) -> Iterator[tuple[np.ndarray, float]]:
        """Yield (next tokens [B], seconds for the step) for a [B, T] prompt of equal-length rows.

        Step 0 is the prefill. The policy picks each step's plan and sees its logits.
        """
        policy = policy or StaticPolicy()
        ids = torch.as_tensor(np.atleast_2d(prompt), device=self.device)
        cache = self.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
        gen = torch.Generator(device=self.device).manual_seed(seed) if temperature > 0 else None
        for step in range(max_new_tokens):
            self._sync()
            t0 = time.perf_counter()
            plan = policy.plan(step)
            self.last_head = None
            logits = self.forward(ids, cache, plan, last_only=True)
            policy.observe(logits)
            head, pick, id_map = self.last_head, logits, None
            if head is not None and head.common.all():  # pick among the common ids, map back to vocab ids
                pick, id_map = head.common_logits, head.ids
            elif head is not None and temperature > 0 and head.common.any():  # mixed rows of a batch
                rows = torch.as_tensor(head.common, device=self.device)[:, None]
                pick = logits.masked_fill(rows & ~plan.head.backend_cache[self.name]["mask"], float("-inf"))
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(pick / temperature, dim=-1), 1, generator=gen)[:, 0]
            else:
                nxt = pick.argmax(dim=-1)
            if id_map is not None:
                nxt = id_map[nxt]
            out = nxt.cpu().numpy()
            dt = time.perf_counter() - t0
            yield out, dt
            ids = nxt[:, None]
