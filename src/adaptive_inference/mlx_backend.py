"""MLX backend: weights, a static KV cache and the op set decoder.Decoder interprets plans over.

MLX is lazy: a step builds a graph that is evaluated once, when the next token is read. The pure per-layer
pieces are mx.compile'd for decode (elementwise ops fused; one trace for T = 1; decode 9% faster on
SmolLM2-135M here). MLX is imported through blas.import_mlx (OpenBLAS on Linux).

cpu_matmul (params benchmark.runtime, as for torch): "kernel" sends decode-sized matmuls (<= 8 rows) of full
weights on the CPU device to mlx_kernels.dense_linear (an AVX2 gemv inside the graph; weights stay row-major);
"library" keeps MLX's matmul (BLAS), with tall weights stored column-major (fast_layout).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from . import mlx_kernels
from .blas import import_mlx
from .cpu_gemv_source import kernel_name
from .decoder import LINEARS, Decoder, Layer
from .errors import UserError
from .model_config import ModelConfig

mx = import_mlx()

CPU_MATMULS = ("kernel", "library")

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class KVCache:
    """Per layer k[i], v[i] [B, Hkv, max_len, D] allocated up front, filled by slice assignment (in place:
    the cache holds the only reference); written [L, B, max_len]: slots holding a key."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [mx.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [mx.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.written = mx.zeros((cfg.num_hidden_layers, batch, max_len), dtype=mx.bool_)
        mx.eval(self.k, self.v, self.written)
        self.length = 0
        self.max_len = max_len


# ---- the pure per-layer pieces (no cache), compiled for decode ------------------------------------

def _apply_rope(x, cos, sin):
    half = x.shape[-1] // 2  # non-interleaved (rotate-half) RoPE, as HF Llama
    return x * cos + mx.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def fast_layout(w):
    """A matrix with more rows (outputs) than columns, stored column-major: the same [N, K] array to every reader,
    but x @ w.T then multiplies by a row-major [K, N] buffer, which OpenBLAS's gemv streams faster on x86:
    measured at batch 1 on the 2-core VM, 960x576 13.4 -> 15.3 GB/s, 3072x576 13.5 -> 18.4, 49152x576 12.6 ->
    19.0; a wider-than-tall matrix is slower that way (576x1536 16.8 -> 14.0) and stays row-major."""
    if w.ndim == 2 and w.shape[0] > w.shape[1]:
        return mx.contiguous(w.T).T
    return w


def mm(x, w):
    """x @ w.T for a full weight or a packed one (quant_mlx); packed weights take the uncompiled path."""
    if isinstance(w, mx.array):
        return x @ w.T
    from . import quant_mlx

    return quant_mlx.linear(x, w)


def mm_kernel(x, w):
    """mm, with decode-sized matmuls of full weights through the gemv kernel."""
    return mlx_kernels.dense_linear(x, w) if mlx_kernels.dense_ok(x, w) else mm(x, w)


def blocks(matmul) -> tuple:
    """The pure per-layer pieces (project_qkv, attention_out, mlp_out, mlp_act) over a matmul."""

    def project_qkv(x, ln1, wqkv, bqkv, cos, sin, n_heads: int, n_kv_heads: int, eps: float):
        """x [B, T, hidden] -> q [B, H, T, D], k, v [B, Hkv, T, D] (input norm, fused projection, RoPE)."""
        B, T, _ = x.shape
        qkv = matmul(mx.fast.rms_norm(x, ln1, eps), wqkv)
        if bqkv is not None:
            qkv = qkv + bqkv
        qkv = qkv.reshape(B, T, n_heads + 2 * n_kv_heads, -1).transpose(0, 2, 1, 3)  # [B, H + 2 Hkv, T, D]
        qk = _apply_rope(qkv[:, :n_heads + n_kv_heads], cos, sin)  # one RoPE for q and k
        return qk[:, :n_heads], qk[:, n_heads:], qkv[:, n_heads + n_kv_heads:]

    def attention_out(attn, wo):
        """o_proj of attn [B, H, T, D] -> [B, T, hidden]."""
        B, _, T, _ = attn.shape
        return matmul(attn.transpose(0, 2, 1, 3).reshape(B, T, -1), wo)

    def mlp_act(x, ln2, w_gate_up, eps: float):
        gate, up = mx.split(matmul(mx.fast.rms_norm(x, ln2, eps), w_gate_up), 2, axis=-1)
        return gate * mx.sigmoid(gate) * up

    def mlp_out(x, ln2, w_gate_up, w_down, eps: float):
        return matmul(mlp_act(x, ln2, w_gate_up, eps), w_down)

    return project_qkv, attention_out, mlp_out, mlp_act


PLAIN = blocks(mm)
KERNEL = blocks(mm_kernel)


@functools.cache
def compiled_blocks(kernel: bool = False) -> tuple:
    """project_qkv, attention_out and mlp_out mx.compile'd (one trace per input shape)."""
    return tuple(mx.compile(f) for f in (KERNEL if kernel else PLAIN)[:3])


class MLXLM(Decoder):
    name = "mlx"

    def __init__(self, cfg: ModelConfig, weights: dict[str, mx.array], dtype, *, cpu_matmul: str = "kernel"):
        if cpu_matmul not in CPU_MATMULS:
            raise UserError(f"cpu_matmul {cpu_matmul!r}: expected one of {', '.join(CPU_MATMULS)}")
        self.cfg, self.dtype = cfg, dtype
        self.dense_kernel = cpu_matmul == "kernel" and mlx_kernels.available() and dtype in (mx.float32, mx.bfloat16)
        if self.dense_kernel:
            mlx_kernels.kernels()  # build (or load) now: a missing compiler fails here, in one line
        self._mm, self._plain = (mm_kernel, KERNEL) if self.dense_kernel else (mm, PLAIN)
        self.fused_layers = self.dense_kernel and dtype == mx.float32  # fp32 decode: a block per graph node
        layout = (lambda w: w) if self.dense_kernel else fast_layout  # the kernel reads row-major [N, K]
        self.embed = layout(weights["model.embed_tokens.weight"])
        self.norm = weights["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else layout(weights["lm_head.weight"])
        layers = []
        for i in range(cfg.num_hidden_layers):
            # weights is consumed: each loaded copy is dropped as its new layout is made
            parts = {k: [weights.pop(n) for n in names] for k, names in cfg.layer_weight_names(i).items()}
            layers.append(Layer(**{k: layout(v[0] if len(v) == 1 else mx.concatenate(v)) for k, v in parts.items()}))
            mx.eval(list(vars(layers[-1]).values()))
        self.weight_sets = {"full": layers}
        self.inv_freq = mx.array(cfg.rope_inv_freq().astype(np.float32))
        self.scale = cfg.head_dim ** -0.5
        self._segments = {}  # key -> mx.compile'd segment
        mx.eval(self.embed, self.norm, self.lm_head, self.inv_freq, [list(vars(lw).values()) for lw in layers])

    @property
    def layers(self) -> list[Layer]:
        return self.weight_sets["full"]

    @property
    def matmul_name(self) -> str:
        """What runs decode-sized dense matmuls (recorded with every benchmark)."""
        if self.dense_kernel:
            return kernel_name(mlx_kernels.layout)
        return "mlx matmul (BLAS)"

    @classmethod
    def load(cls, model_dir: str | Path, *, dtype: str = "float32", cpu_matmul: str = "kernel") -> MLXLM:
        model_dir = Path(model_dir)
        cfg = ModelConfig.from_dir(model_dir)
        files = ModelConfig.weight_files(model_dir)
        weights = {}
        for f in files:
            weights.update({k: w.astype(DTYPES[dtype]) for k, w in mx.load(str(f)).items()})
        try:
            return cls(cfg, weights, DTYPES[dtype], cpu_matmul=cpu_matmul)
        except KeyError as e:
            raise UserError(f"{model_dir}: missing weight {e.args[0]}") from None

    def segment(self, key, fn, *arrays):
        """A decode-sized segment (<= MAX_ROWS rows) runs mx.compile'd, one compiled function per key: its
        elementwise chains fused into single ops (each op of a step costs graph and evaluation time)."""
        if any(a.size > mlx_kernels.MAX_ROWS * a.shape[-1] for a in arrays):
            return fn(*arrays)
        compiled = self._segments.get(key)
        if compiled is None:
            compiled = self._segments[key] = mx.compile(fn)
        return compiled(*arrays)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch, max_len, self.dtype)

    # ---- the op set ----------------------------------------------------------------------------

    def positions(self, start: int, T: int):
        return (start, T)  # slices: MLX does not compile the whole step, so plain ints serve

    def rope(self, positions):
        # once per step, shared by all layers (mx.fast.rope on CPU recomputes them per call: 4 ms/token here)
        start, T = positions
        freqs = mx.arange(start, start + T, dtype=mx.float32)[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = mx.concatenate([freqs, freqs], axis=-1)
        return mx.cos(emb).astype(self.dtype), mx.sin(emb).astype(self.dtype)

    def embed_ids(self, ids):
        return self.embed[ids]

    def attention(self, x, lw: Layer, layer: int, cache: KVCache, rope, positions, rows):
        cfg = self.cfg
        project, out_proj, _ = self._blocks_for(x, lw)
        q, k, v = project(x, lw.ln1, lw.wqkv, lw.bqkv, *rope, cfg.num_attention_heads, cfg.num_key_value_heads,
                          cfg.rms_norm_eps)
        start, T = positions
        end = start + T
        self._write(cache, layer, k, v, positions, rows)
        written = cache.written[layer, :, :end]  # [B, end]
        if T == 1:
            mask = written[:, None, None, :]
        else:
            mask = written[:, None, None, :] & (mx.arange(end)[None, :] <= mx.arange(start, end)[:, None])
        out = mx.fast.scaled_dot_product_attention(q, cache.k[layer][:, :, :end], cache.v[layer][:, :, :end],
                                                   scale=self.scale, mask=mask)
        return out_proj(out, lw.wo)

    def _block(self, x, lw: Layer, i: int, cache, rope, positions, rows, mlp: bool, alpha: float, observe=None):
        if rows is None and observe is None and self.fused_layers and x.shape[1] == 1 \
                and x.shape[0] <= mlx_kernels.MAX_ROWS and all(mlx_kernels.dense_ok(x, getattr(lw, n)) for n in LINEARS):
            # the whole block as one graph node; the new slot's k, v go into the cache as _write puts them
            start, _ = positions
            cache.written[i, :, start] = True
            y, k, v = mlx_kernels.decode_layer(
                x, lw, cache.k[i], cache.v[i], cache.written[i], rope[0], rope[1], start, self.cfg.num_attention_heads,
                self.cfg.num_key_value_heads, self.cfg.rms_norm_eps, mlp)
            cache.k[i][:, :, start:start + 1] = k
            cache.v[i][:, :, start:start + 1] = v
            return y if alpha == 1.0 else x + alpha * (y - x)
        return super()._block(x, lw, i, cache, rope, positions, rows, mlp, alpha, observe)

    def write_kv(self, x, lw: Layer, layer: int, cache: KVCache, rope, positions):
        B, T, _ = x.shape
        cfg = self.cfg
        q_dim, kv_heads = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads
        h = mx.fast.rms_norm(x, lw.ln1, cfg.rms_norm_eps)
        # a full weight: only its k/v rows are read; a packed one is read whole
        kv = self._mm(h, lw.wqkv[q_dim:]) if isinstance(lw.wqkv, mx.array) else mm(h, lw.wqkv)[..., q_dim:]
        if lw.bqkv is not None:
            kv = kv + lw.bqkv[q_dim:]
        kv = kv.reshape(B, T, 2 * kv_heads, -1).transpose(0, 2, 1, 3)  # [B, 2 Hkv, T, D]
        self._write(cache, layer, _apply_rope(kv[:, :kv_heads], *rope), kv[:, kv_heads:], positions, None)

    @staticmethod
    def _write(cache: KVCache, layer: int, k, v, positions, rows) -> None:
        """k, v into the cache; the (row, position) slots in rows (None: all) marked written."""
        start, T = positions
        cache.k[layer][:, :, start:start + T] = k
        cache.v[layer][:, :, start:start + T] = v
        cache.written[layer, :, start:start + T] = True if rows is None else mx.array(rows)

    def mlp(self, x, lw: Layer, layer: int, observe=None):
        if observe is None:
            return self._blocks_for(x, lw)[2](x, lw.ln2, lw.w_gate_up, lw.w_down, self.cfg.rms_norm_eps)
        act = self._plain[3](x, lw.ln2, lw.w_gate_up, self.cfg.rms_norm_eps)
        observe(layer, act)
        return self._mm(act, lw.w_down)

    def _blocks_for(self, x, lw: Layer) -> tuple:
        """Compiled pieces for decode (one trace for T = 1) of full weights; plain ones otherwise."""
        if x.shape[1] == 1 and isinstance(lw.wqkv, mx.array):
            return compiled_blocks(self.dense_kernel)
        return self._plain[:3]

    def final_norm(self, x):
        return mx.fast.rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    def linear(self, x, w, b=None):
        y = self._mm(x, w)
        return y if b is None else y + b

    def logits32(self, h, w):
        return self._mm(h, w).astype(mx.float32)

    def pack(self, state, depth: int | None):
        from . import quant_mlx

        return quant_mlx.prepare(state, depth=depth)

    def weight_shape(self, w) -> tuple[int, int]:
        return tuple(w.shape)

    def where_rows(self, mask, a, b):
        return mx.where((mask if isinstance(mask, mx.array) else mx.array(mask))[..., None], a, b)

    def select_linear_ok(self, x, w_no, w_yes) -> bool:
        return self.dense_kernel and mlx_kernels.dense_ok(x, w_no) and mlx_kernels.dense_ok(x, w_yes)

    def select_linear(self, x, w_no, w_yes, take):
        return mlx_kernels.select_linear(x, w_no, w_yes, take)

    def asarray(self, a: np.ndarray, dtype: str | None = None):
        a = np.asarray(a)
        if dtype is not None:
            return mx.array(a).astype(DTYPES[dtype])
        return mx.array(a).astype(self.dtype) if a.dtype.kind == "f" else mx.array(a)

    def to_numpy(self, x) -> np.ndarray:
        return np.array(x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x)

    def rms32(self, x):
        x = x.astype(mx.float32)
        return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + 1e-6)

    def silu(self, x):
        return x * mx.sigmoid(x)

    def sigmoid(self, x):
        return mx.sigmoid(x)

    def log(self, x):
        return mx.log(x)

    def log_softmax(self, x):
        x = x.astype(mx.float32)
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    def take_rows(self, w, ids):
        out = w[ids]
        mx.eval(out)
        return out

    def spread(self, values, ids, fill, width: int):
        flat = values.reshape(-1, values.shape[-1])
        out = mx.zeros((flat.shape[0], width), dtype=values.dtype) + fill.reshape(-1, 1)
        out[:, ids] = flat
        return out.reshape(*values.shape[:-1], width)

    def sampler_state(self, seed: int):
        return mx.random.key(seed)

    def pick(self, logits, temperature: float, state):
        if temperature <= 0:
            return mx.argmax(logits, axis=-1), state
        state, sub = mx.random.split(state)
        return mx.random.categorical(logits / temperature, key=sub), state

    def take(self, ids_table, idx):
        return ids_table[idx]

    def ids_array(self, ids: np.ndarray):
        return mx.array(np.asarray(ids))

    def materialize(self, *arrays) -> None:
        mx.eval(*arrays)
