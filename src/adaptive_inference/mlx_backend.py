"""MLX backend: the same small Llama / Qwen2 / Mistral decoder as torch_backend, on mx arrays.

It owns the forward pass so a per-step StepPlan can skip blocks or zero MLPs; a plan that changes
nothing runs exactly the baseline ops. MLX is imported through blas.import_mlx (OpenBLAS on Linux).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .blas import import_mlx
from .errors import UserError
from .model_config import ModelConfig
from .plan import FULL, HeadDecision, StaticPolicy, StepPlan

mx = import_mlx()

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass
class Layer:
    ln1: mx.array
    wqkv: mx.array  # [(H + 2 Hkv) * D, hidden]: one matmul for q, k and v
    wo: mx.array
    ln2: mx.array
    w_gate_up: mx.array  # [2 * inter, hidden]
    w_down: mx.array
    bqkv: mx.array | None = None


class KVCache:
    """Static cache: per layer, k[i] and v[i] [B, Hkv, max_len, D] allocated up front.

    Filled by slice assignment, which MLX does in place since the cache holds the only reference
    (growing by concatenation would copy the whole cache every step). `valid` [L, B, max_len] is
    created only once some layer is skipped for a step, as in torch_backend.KVCache.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [mx.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [mx.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        mx.eval(self.k, self.v)
        self.valid: mx.array | None = None
        self.length = 0
        self.max_len = max_len

    def mark_skipped(self, layer: int, start: int, end: int) -> None:
        if self.valid is None:
            B, _, S, _ = self.k[0].shape
            self.valid = mx.ones((len(self.k), B, S), dtype=mx.bool_)
        self.valid[layer, :, start:end] = False


# ---- the pure per-layer pieces (no cache, no plan), so a driver can mx.compile them ---------------

def _apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    # non-interleaved (rotate-half) RoPE, as HF Llama
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def project_qkv(x, ln1, wqkv, bqkv, cos, sin, n_heads: int, n_kv_heads: int, eps: float):
    """Input norm, fused q/k/v projection, RoPE: x [B, T, hidden] -> q [B, H, T, D], k, v [B, Hkv, T, D]."""
    B, T, _ = x.shape
    qkv = mx.fast.rms_norm(x, ln1, eps) @ wqkv.T
    if bqkv is not None:
        qkv = qkv + bqkv
    qkv = qkv.reshape(B, T, n_heads + 2 * n_kv_heads, -1).transpose(0, 2, 1, 3)  # [B, H + 2 Hkv, T, D]
    qk = _apply_rope(qkv[:, :n_heads + n_kv_heads], cos, sin)  # one RoPE for q and k
    return qk[:, :n_heads], qk[:, n_heads:], qkv[:, n_heads + n_kv_heads:]


def attention_residual(x, attn, wo):
    """x + o_proj(attn), attn [B, H, T, D]."""
    B, T, _ = x.shape
    return x + attn.transpose(0, 2, 1, 3).reshape(B, T, -1) @ wo.T


def mlp_residual(x, ln2, w_gate_up, w_down, eps: float):
    """x + SwiGLU MLP of the post-attention-normed x."""
    gate, up = mx.split(mx.fast.rms_norm(x, ln2, eps) @ w_gate_up.T, 2, axis=-1)
    return x + (gate * mx.sigmoid(gate) * up) @ w_down.T


@dataclass(frozen=True)
class Blocks:
    """The functions a forward runs per layer: plain by default, mx.compile'd in generate_step's decode."""

    project_qkv: Callable = project_qkv
    attention_residual: Callable = attention_residual
    mlp_residual: Callable = mlp_residual


PLAIN = Blocks()


@functools.cache
def compiled_blocks() -> Blocks:
    """Compiled copies (elementwise ops fused); shapes are fixed per decode, so each traces once."""
    return Blocks(mx.compile(project_qkv), mx.compile(attention_residual), mx.compile(mlp_residual))


class MLXLM:
    """Weights as plain mx arrays plus a forward(ids, cache, plan) that honours the plan."""

    name = "mlx"

    def __init__(self, cfg: ModelConfig, weights: dict[str, mx.array], dtype):
        self.cfg, self.dtype = cfg, dtype
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else weights["lm_head.weight"]
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            parts = {k: [weights[n] for n in names] for k, names in cfg.layer_weight_names(i).items()}
            self.layers.append(Layer(**{k: v[0] if len(v) == 1 else mx.concatenate(v) for k, v in parts.items()}))
        self.head_log: list[tuple[float, bool]] = []  # (P(rare), common head used) per decoded row
        self.last_head: HeadDecision | None = None  # the gated head's decision on the last decode step
        self.inv_freq = mx.array(cfg.rope_inv_freq().astype(np.float32))
        self.scale = cfg.head_dim ** -0.5
        mx.eval(self.embed, self.norm, self.lm_head, self.inv_freq, [list(vars(lw).values()) for lw in self.layers])

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, model_dir: str | Path, *, dtype: str = "float32") -> MLXLM:
        model_dir = Path(model_dir)
        cfg = ModelConfig.from_dir(model_dir)
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise UserError(f"model folder has no *.safetensors: {model_dir}")
        mdtype = DTYPES[dtype]
        weights = {}
        for f in files:
            weights.update({k: w.astype(mdtype) for k, w in mx.load(str(f)).items()})
        try:
            return cls(cfg, weights, mdtype)
        except KeyError as e:
            raise UserError(f"{model_dir}: missing weight {e.args[0]}") from None

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch, max_len, self.dtype)

    # ---- forward -------------------------------------------------------------------------

    def _rope(self, start: int, T: int) -> tuple[mx.array, mx.array]:
        # once per step, shared by all layers (mx.fast.rope on CPU recomputes them per call: 4 ms/token here)
        freqs = mx.arange(start, start + T, dtype=mx.float32)[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = mx.concatenate([freqs, freqs], axis=-1)
        return mx.cos(emb).astype(self.dtype), mx.sin(emb).astype(self.dtype)

    @staticmethod
    def _mask(cache: KVCache, layer: int, start: int, T: int):
        """Boolean attention mask [B, 1, T, start+T], or None / "causal" when plain causal attention suffices."""
        if cache.valid is None:
            return None if T == 1 else "causal"  # "causal" aligns the last query with the last key
        end = start + T
        valid = cache.valid[layer, :, :end][:, None, None, :]  # [B, 1, 1, end]
        if T == 1:
            return valid
        return valid & (mx.arange(end)[None, :] <= mx.arange(start, end)[:, None])

    def _attention(self, x, lw: Layer, layer: int, cache: KVCache, cos, sin, start: int, blocks: Blocks):
        cfg = self.cfg
        q, k, v = blocks.project_qkv(x, lw.ln1, lw.wqkv, lw.bqkv, cos, sin, cfg.num_attention_heads,
                                     cfg.num_key_value_heads, cfg.rms_norm_eps)
        end = start + x.shape[1]
        cache.k[layer][:, :, start:end] = k
        cache.v[layer][:, :, start:end] = v
        keys, values = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]  # [B, Hkv, end, D]
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale,
                                                   mask=self._mask(cache, layer, start, x.shape[1]))
        return blocks.attention_residual(x, out, lw.wo)

    def hidden(self, ids: mx.array, cache: KVCache, plan: StepPlan = FULL, capture: set[int] | None = None,
               *, blocks: Blocks = PLAIN) -> tuple[mx.array, dict[int, mx.array]]:
        """Run the blocks on ids [B, T]; returns the final-normed hidden [B, T, hidden] and the
        inputs of the layers in `capture` (index num_layers = the un-normed final residual)."""
        B, T = ids.shape
        start = cache.length
        if start + T > cache.max_len:
            raise ValueError(f"KV cache full: {start}+{T} > {cache.max_len}")
        cos, sin = self._rope(start, T)
        x = self.embed[ids]
        eps = self.cfg.rms_norm_eps
        captured = {}
        for i, lw in enumerate(self.layers):
            if capture and i in capture:
                captured[i] = x
            if i in plan.skip_layers:
                cache.mark_skipped(i, start, start + T)
                continue
            x = self._attention(x, lw, i, cache, cos, sin, start, blocks)
            if i not in plan.zero_mlp:
                x = blocks.mlp_residual(x, lw.ln2, lw.w_gate_up, lw.w_down, eps)
        if capture and len(self.layers) in capture:
            captured[len(self.layers)] = x
        cache.length = start + T
        return mx.fast.rms_norm(x, self.norm, eps), captured

    def forward(self, ids: mx.array, cache: KVCache, plan: StepPlan = FULL, *, last_only: bool = False,
                blocks: Blocks = PLAIN) -> mx.array:
        """Logits [B, T, vocab] (or [B, vocab] with last_only) in float32, lazy: the caller evaluates."""
        h, _ = self.hidden(ids, cache, plan, blocks=blocks)
        if last_only:
            h = h[:, -1]
        if plan.head is None:
            return (h @ self.lm_head.T).astype(mx.float32)
        return self._gated_head(h, plan.head, log=last_only)

    def _gated_head(self, h: mx.array, g, *, log: bool) -> mx.array:
        """As torch_backend._gated_head: P(rare) <= threshold -> common head, spread to a full distribution.
        The router's decision needs P(rare) evaluated before the head is chosen (one sync per step). The
        spread stays lazy: a decode step whose rows all chose the common head picks its token from
        `last_head.common_logits` (2.5k ids), so the 49k-wide spread is never computed unless read."""
        w = g.backend_cache.get(self.name)
        if w is None:
            t = lambda a: mx.array(a).astype(self.dtype)  # noqa: E731
            ids = mx.array(g.common_ids.astype(np.int32))
            mask = np.zeros(self.cfg.vocab_size, dtype=bool)
            mask[g.common_ids] = True
            w = g.backend_cache[self.name] = {"w1": t(g.w1), "b1": t(g.b1), "w2": t(g.w2), "b2": t(g.b2), "ids": ids,
                                              "mask": mx.array(mask), "head": self.lm_head[ids]}
            mx.eval(list(w.values()))
        hid = h @ w["w1"].T + w["b1"]
        p = mx.sigmoid((hid * mx.sigmoid(hid)) @ w["w2"].T + w["b2"])[..., 0].astype(mx.float32)
        p_np = np.array(p)  # the one sync: evaluates the blocks and the router
        common_np = p_np <= g.threshold
        if log:
            self.head_log += list(zip(p_np.ravel().tolist(), common_np.ravel().tolist(), strict=True))
        if not common_np.any():
            if log:
                self.last_head = HeadDecision(common_np, None, w["ids"])
            return (h @ self.lm_head.T).astype(mx.float32)
        lc = (h @ w["head"].T).astype(mx.float32)
        lc = lc - mx.logsumexp(lc, axis=-1, keepdims=True) + mx.log1p(-p)[..., None]
        if log:
            self.last_head = HeadDecision(common_np, lc, w["ids"])
        rare = mx.log(p) - math.log(max(self.cfg.vocab_size - w["ids"].size, 1))
        shape = (*lc.shape[:-1], self.cfg.vocab_size)
        out = mx.zeros((lc.size // lc.shape[-1], shape[-1]), dtype=mx.float32) + rare.reshape(-1, 1)
        out[:, w["ids"]] = lc.reshape(-1, lc.shape[-1])
        out = out.reshape(shape)
        if common_np.all():
            return out
        return mx.where(mx.array(common_np)[..., None], out, (h @ self.lm_head.T).astype(mx.float32))

    def logits(self, ids: list[int] | np.ndarray, plan: StepPlan = FULL) -> np.ndarray:
        """Teacher-forced logits [T, vocab] float32 for one sequence."""
        t = mx.array(np.asarray(ids)[None])
        cache = self.new_cache(1, t.shape[1])
        return np.array(self.forward(t, cache, plan)[0])

    # ---- generation ----------------------------------------------------------------------

    def generate_step(self, prompt: np.ndarray, *, max_new_tokens: int, policy=None,
                      temperature: float = 0.0, seed: int = 0) -> Iterator[tuple[np.ndarray, float]]:
        """Yield (next tokens [B], seconds for the step) for a [B, T] prompt of equal-length rows.

        Step 0 is the prefill. The policy picks each step's plan and sees its logits. Decode steps run
        compiled blocks (one trace for T=1; decode 9% faster on SmolLM2-135M here).
        """
        policy = policy or StaticPolicy()
        ids = mx.array(np.atleast_2d(prompt))
        cache = self.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
        key = mx.random.key(seed)
        for step in range(max_new_tokens):
            t0 = time.perf_counter()
            blocks = compiled_blocks() if step > 0 else PLAIN
            plan = policy.plan(step)
            self.last_head = None
            logits = self.forward(ids, cache, plan, last_only=True, blocks=blocks)
            policy.observe(logits)
            head, pick, id_map = self.last_head, logits, None
            if head is not None and head.common.all():  # pick among the common ids, map back to vocab ids
                pick, id_map = head.common_logits, head.ids
            elif head is not None and temperature > 0 and head.common.any():  # mixed rows of a batch
                pick = mx.where(mx.array(head.common)[:, None] & ~plan.head.backend_cache[self.name]["mask"],
                                -mx.inf, logits)
            if temperature > 0:
                key, sub = mx.random.split(key)
                nxt = mx.random.categorical(pick / temperature, key=sub)
            else:
                nxt = mx.argmax(pick, axis=-1)
            if id_map is not None:
                nxt = id_map[nxt]
            mx.eval(nxt, cache.valid if cache.valid is not None else [])  # valid: a skip's hole, even if unread
            out = np.array(nxt)
            dt = time.perf_counter() - t0
            yield out, dt
            ids = nxt[:, None]
