"""PyTorch backend: weights, a static KV cache and the op set decoder.Decoder interprets plans over.

Decode has static shapes so it can be compiled: positions are a tensor, the KV cache is written with
index_copy_, and the attention mask always exists (a slot is attended only once written, so the mask is
causal by construction and a skipped layer's slot stays a hole). Device and dtype are the caller's choice.

Runtime choices (params benchmark.runtime), the same for a job's baseline and its configuration:
- cpu_matmul "kernel": decode-sized matmuls (<= 8 rows) on CPU go to torch_kernels.dense_linear (an AVX2
  gemv reading weights near memory speed; MKL's sgemv reads at about half of it here); "library": F.linear.
- compile: decode steps of gate-free plans, and of gated plans whose gate decides on the device (device_gate,
  on by default on CUDA), run as one torch.compile'd graph per distinct plan (inductor fuses norms, RoPE,
  residuals; no per-op dispatch), on full weights or packed ones that say they are `capturable`. Other gated
  plans run per block (below) or eagerly, packed weights opaque to the compiler eagerly. The cache length is
  rounded up to a multiple of CACHE_BUCKET so prompts of other lengths reuse a graph.
- cuda_graphs (CUDA only): the same static steps (compiled or eager) are captured once per (plan, cache
  storage) and replayed, so a step costs one launch instead of hundreds. A captured graph holds the cache's
  addresses, so caches come from a pool: a cache handed out again after its holder dropped it is the same
  storage, reset (decode_pairs keeps two alive: two storages, each with its graphs).
- cuda_block_ops (CUDA, on by default): a decode block on int8 or 4-bit weights (quant_cuda) runs as block_op's
  ops, its norms, SwiGLU and residual adds folded into the matmuls: 5 launches, not 10. On an H100 at batch 1
  this took int8 from 0.74 to 0.85 of its structural saving on 8B shapes (0.83 to 0.93 on 14B), int4 from 0.44
  to 0.50 (docs/measurements, 2026-12-07).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from . import attention_op, block_op, gated_linear_op, torch_kernels
from .cpu_gemv_source import kernel_name
from .decoder import LINEARS, Decoder, Forward, Layer
from .errors import UserError
from .model_config import ModelConfig
from .plan import FULL, StepPlan, weights_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_MATMULS = ("kernel", "library")
# CUDA decode attention: one Triton kernel a layer (16-bit, the default: the compiled 8B step 153 -> 168 tok/s on
# an H100, docs/measurements) or RoPE, cache writes and SDPA as ops
CUDA_ATTENTION = ("sdpa", "kernel")
RUN_GRAPHS = 64  # captured block sequences per KV cache storage (TorchLM.run_layers)
CACHE_BUCKET = 128  # compiled decode: cache lengths rounded up to this (one graph per bucket and batch size)


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclasses.dataclass
class _LayerCache:
    """One layer of a KVCache as a one-layer cache (k, v [1, B, Hkv, S, D], bias [1, B, S]: views, written in
    place), so a per-block function compiled once serves every layer."""

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor


class KVCache:
    """k, v [L, B, Hkv, max_len, D] allocated up front. bias [L, B, max_len]: the additive attention mask,
    0 where a slot holds a key, -inf elsewhere (SDPA on CPU runs 2-3x faster with an additive mask than with
    a boolean one or none, measured on a 112-slot decode step here)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device, storage: tuple | None = None):
        """storage: (k, v, bias) of a cache dropped earlier, reset here to a fresh cache's values."""
        if storage is None:
            shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
            storage = (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device),
                       torch.empty((cfg.num_hidden_layers, batch, max_len), dtype=dtype, device=device))
        self.k, self.v, self.bias = storage
        self.k.zero_()
        self.v.zero_()
        self.bias.fill_(float("-inf"))
        self.length = 0
        self.max_len = max_len

    @property
    def written(self) -> torch.Tensor:
        return self.bias == 0


def _triton_attention_ok(cfg: ModelConfig, dtype: torch.dtype) -> bool:
    from . import triton_kernels  # noqa: F401  (registers the op's CUDA kernel)

    return attention_op.decode_attention_ok(cfg, dtype)


class TorchLM(Decoder):
    name = "torch"

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], device: str, dtype: torch.dtype, *,
                 cpu_matmul: str = "kernel", compile: bool = False, cuda_graphs: bool = True,
                 cuda_attention: str = "kernel", cuda_block_ops: bool = True):
        if cpu_matmul not in CPU_MATMULS:
            raise UserError(f"cpu_matmul {cpu_matmul!r}: expected one of {', '.join(CPU_MATMULS)}")
        if cuda_attention not in CUDA_ATTENTION:
            raise UserError(f"cuda_attention {cuda_attention!r}: expected one of {', '.join(CUDA_ATTENTION)}")
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.dense_kernel = cpu_matmul == "kernel" and device == "cpu" and dtype in (torch.float32, torch.bfloat16)
        # the same extension runs the rest of an fp32 eager decode step in few calls (norms, attention, SiLU)
        self.fused_decode = self.dense_kernel and dtype == torch.float32
        self.fused_layers = True  # fused decode: a whole block per kernel call (False: one call per op)
        if self.dense_kernel:
            torch_kernels.kernels()  # build (or load) now: a missing compiler fails here, in one line
        self.compile = compile
        self.cuda_graphs = cuda_graphs and torch.device(device).type == "cuda"
        self.runs_ahead = torch.device(device).type == "cuda"  # kernels queue: generation may run a step ahead
        self.attention_kernel = (cuda_attention == "kernel" and torch.device(device).type == "cuda"
                                 and _triton_attention_ok(cfg, dtype))
        self.cuda_block_ops = cuda_block_ops  # packed decode blocks as block_op's ops (module docstring)
        # a plan's gate decides on the device where steps are compiled / captured (on CPU the host reads for free)
        self.device_gate = torch.device(device).type == "cuda"
        self._sms = None  # SMs of the CUDA device: the gated matmuls' split-K (known before any step is traced)
        if self.device_gate:
            from . import triton_block, triton_kernels  # noqa: F401  (register the ops' CUDA kernels)

            self._sms = gated_linear_op.sms(device)
        self.reuse_caches = self.cuda_graphs  # a captured graph holds its cache's addresses
        self.compiled_steps: dict = {}  # plan without its head -> (blocks, executed) or None (eager)
        self.graphs: dict = {}  # (plan without its head, cache storage) -> captured step
        self._free_caches: dict = {}  # (batch, max_len) -> storages of dropped caches
        self._layer_graphs = None  # the cache of a decode step now replaying per-block graphs
        self._layer_fns: dict = {}  # ("block", mlp, alpha) | ("kv", ...) -> the per-block function (_layer_fn)
        self._segments = False  # inside a decode step under cuda_graphs
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else weights["lm_head.weight"]
        layers = []
        for i in range(cfg.num_hidden_layers):
            parts = {k: [weights[n] for n in names] for k, names in cfg.layer_weight_names(i).items()}
            layers.append(Layer(**{k: v[0] if len(v) == 1 else torch.cat(v) for k, v in parts.items()}))
        self.weight_sets = {"full": layers}
        self.inv_freq = torch.tensor(cfg.rope_inv_freq(), dtype=torch.float32, device=device)
        h, d = cfg.num_attention_heads, cfg.head_dim
        self._split = (h * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d)

    @property
    def layers(self) -> list[Layer]:
        return self.weight_sets["full"]

    @classmethod
    def load(cls, model_dir: str | Path, *, device: str = "cpu", dtype: str = "float32", cpu_matmul: str = "kernel",
             compile: bool = False, cuda_graphs: bool = True, cuda_attention: str = "kernel",
             cuda_block_ops: bool = True) -> TorchLM:
        model_dir = Path(model_dir)
        cfg = ModelConfig.from_dir(model_dir)
        files = ModelConfig.weight_files(model_dir)
        weights = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    weights[k] = sf.get_tensor(k).to(device=device, dtype=DTYPES[dtype])
        try:
            return cls(cfg, weights, device, DTYPES[dtype], cpu_matmul=cpu_matmul, compile=compile,
                       cuda_graphs=cuda_graphs, cuda_attention=cuda_attention, cuda_block_ops=cuda_block_ops)
        except KeyError as e:
            raise UserError(f"{model_dir}: missing weight {e.args[0]}") from None

    @property
    def matmul_name(self) -> str:
        """What runs decode-sized dense matmuls (recorded with every benchmark)."""
        if self.dense_kernel:
            return kernel_name(torch_kernels.layout)
        return "torch F.linear"

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if self.compile or self.cuda_graphs:
            max_len = -(-max_len // CACHE_BUCKET) * CACHE_BUCKET
        if not self.reuse_caches:
            return KVCache(self.cfg, batch, max_len, self.dtype, self.device)
        free = self._free_caches.setdefault((batch, max_len), [])
        cache = KVCache(self.cfg, batch, max_len, self.dtype, self.device, free.pop() if free else None)
        weakref.finalize(cache, free.append, (cache.k, cache.v, cache.bias))  # back to the pool when dropped
        return cache

    @torch.inference_mode()
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)

    @torch.inference_mode()
    def decode_one_token(self, tokens, cache: KVCache, plan: StepPlan = FULL) -> Forward:
        if not self.cuda_graphs:
            return self._decode(tokens, cache, plan)
        self._segments = True  # head segments (Decoder.segment) are captured and replayed in decode steps only
        try:
            return self._decode(tokens, cache, plan)
        finally:
            self._segments = False

    def _decode(self, tokens, cache: KVCache, plan: StepPlan) -> Forward:
        step = self._static_step(plan) if self.compile or self.cuda_graphs else None
        if step is None:
            if not (self.cuda_graphs and self._dense(plan.weights)):
                return super().decode_one_token(tokens, cache, plan)
            # a plan that decides inside the forward: every block replays its own graph, the host decides
            # between them (Decoder._blocks drives; _block and write_kv below pick the graph)
            self._layer_graphs = cache
            try:
                return super().decode_one_token(tokens, cache, plan)
            finally:
                self._layer_graphs = None
        key, fn, executed = step
        if cache.length + 1 > cache.max_len:
            raise ValueError(f"KV cache full: {cache.length}+1 > {cache.max_len}")
        if self.cuda_graphs:
            h = self._replay(key, fn, tokens, cache)
        else:
            h = fn(tokens[:, None], self.positions(cache.length, 1), cache)
        cache.length += 1
        blocks = {**executed, "tokens": tokens.shape[0]}
        if plan.gate is not None:  # the gate decided on the device: its flags are read once the step ran
            h, keep = h
            read = self.fetch(keep)  # its copy queued now, so reading it does not wait for a step queued later
            blocks["settle"] = lambda: self.gate_executed(plan, read())
        return self._head(h[:, -1], plan, blocks, {})

    def _dense(self, weights) -> bool:
        """Whether a weight set's matrices are all tensors or packed weights that the compiler and graph capture
        see (`capturable`); once per weight set."""
        known = self.__dict__.setdefault("_capturable_sets", {})
        name = weights_name(weights)
        if name not in known:
            known[name] = all(isinstance(w, torch.Tensor) or w.capturable
                              for lw in self.resolve_weights(weights) for w in (getattr(lw, n) for n in LINEARS))
        return known[name]

    def _static_step(self, plan: StepPlan):
        """(key, blocks, executed) for a plan without a per-row decision or with a gate that decides on the device,
        on full weights (blocks compiled when compile is on); None where the step runs eagerly."""
        if plan.gate is not None and not self.device_gate_ok(plan.gate):
            return None
        key = dataclasses.replace(plan, head=None)  # the head runs eagerly after the blocks
        if key not in self.compiled_steps:
            if not self._dense(plan.weights):
                self.compiled_steps[key] = None
            else:
                run, executed = self.static_run(plan)
                fn = functools.partial(self.static_blocks, layers=self.resolve_weights(plan.weights), run=run,
                                       gate=plan.gate)
                if plan.gate is not None:  # once outside the compiler: a gate may make its device arrays here
                    plan.gate.keep_device(torch.zeros(1, 1, self.cfg.hidden_size, device=self.device,
                                                      dtype=self.dtype), self)
                if self.compile:
                    # graphs are cached per code object: one per (plan, batch size, cache bucket) must fit
                    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                    fn = torch.compile(fn, dynamic=False, fullgraph=True)
                self.compiled_steps[key] = (key, fn, executed)
        return self.compiled_steps[key]

    def _capture(self, fn):
        """(fn's result, its output buffers, replay): fn runs once for real on a side stream (warming cuBLAS
        and compiled code), then is captured as a CUDA graph. Capture executes nothing, so state that fn writes
        (the cache) is written once; replay reruns the kernels on the same addresses. Python's garbage collector
        stays off during the capture (collected just before): torch no longer collects before a capture, and a
        collection inside one can free an earlier model's graphs and buffers, CUDA calls that a capture forbids."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            first = fn()
        torch.cuda.current_stream().wait_stream(side)
        pool = self.__dict__.setdefault("_graph_pool", torch.cuda.graph_pool_handle())
        g = torch.cuda.CUDAGraph()
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(g, pool=pool):
                out = fn()
        finally:
            if enabled:
                gc.enable()
        return first, out, g.replay

    def _replay(self, key, fn, tokens, cache: KVCache):
        """The blocks of one decode step as a graph captured for (plan, cache storage)."""
        graph = self.graphs.get((key, id(cache.k)))
        if graph is not None:
            replay, ids, pos, out = graph[:4]
            ids.copy_(tokens[:, None])
            pos.fill_(cache.length)
            replay()
            return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()
        ids, pos = tokens[:, None].clone(), torch.full((1,), cache.length, device=self.device)
        h, out, replay = self._capture(lambda: fn(ids, pos, cache))
        self.graphs[(key, id(cache.k))] = (replay, ids, pos, out, cache.k)  # the storage stays alive with its graph
        return h

    def _block(self, x, lw: Layer, i: int, cache, rope, positions, rows, mlp: bool, alpha: float, observe=None):
        if rows is None and observe is None and self._block_ops(x, lw):
            return self._packed_block(x, lw, i, cache, rope, positions, mlp, alpha)
        if rows is None and observe is None and self._fused(x) and self._dense_block(lw):
            # the whole block in one kernel call: the per-op path's arithmetic without its ~15 dispatches
            B = x.shape[0]
            y = torch_kernels.kernels().decode_layer(
                x.reshape(B, -1).contiguous(), lw.ln1, lw.wqkv, lw.bqkv, lw.wo, lw.ln2, lw.w_gate_up, lw.w_down,
                cache.k[i], cache.v[i], cache.bias[i], rope[0][0], rope[1][0], cache.length,
                self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.rms_norm_eps, mlp).view_as(x)
            return y if alpha == 1.0 else x + alpha * (y - x)
        if self._layer_graphs is not cache or rows is not None or observe is not None:
            return super()._block(x, lw, i, cache, rope, positions, rows, mlp, alpha, observe)
        return self._layer_replay(("block", id(lw), i, mlp, alpha), x, rope, positions, cache,
                                  self._layer_fn(("block", mlp, alpha), lw, i, cache))

    def _block_ops(self, x, lw: Layer) -> bool:
        """Whether a block runs as block_op's ops: one token of at most block_op.ROWS rows, the decode attention op,
        every matrix packed for them (CudaPacked.block: int8 or 4-bit codes)."""
        return (x.shape[-2] == 1 and x.shape[0] <= block_op.ROWS and self.attention_kernel
                and all(getattr(getattr(lw, n), "block", False) for n in LINEARS))

    def _packed_block(self, x, lw: Layer, i: int, cache, rope, positions, mlp: bool, alpha: float):
        """_block's arithmetic in 5 launches: qkv with its norm, the attention op, o with the residual add,
        gate_up with its norm and the SwiGLU, down with the residual add."""
        B, eps = x.shape[0], self.cfg.rms_norm_eps
        h = x.reshape(B, -1)
        qkv = lw.wqkv.norm_linear(h, lw.ln1, eps, lw.bqkv)
        out = attention_op.decode_attention(qkv, cache.k[i], cache.v[i], cache.bias[i], rope[0], rope[1], positions,
                                              self.cfg.num_attention_heads, self.cfg.num_key_value_heads)
        y = lw.wo.linear_add(out.reshape(B, -1), h)
        if mlp:
            y = lw.w_down.linear_add(lw.w_gate_up.norm_linear(y, lw.ln2, eps, glu=True), y)
        y = y.view_as(x)
        return y if alpha == 1.0 else x + alpha * (y - x)

    def write_kv(self, x, lw: Layer, layer: int, cache: KVCache, rope, positions):
        if self._layer_graphs is not cache:
            return self._write_kv(x, lw, layer, cache, rope, positions)
        self._layer_replay(("kv", id(lw), layer), x, rope, positions, cache,
                           self._layer_fn(("kv", True, 1.0), lw, layer, cache), writes_x=False)

    def run_layers(self, x, layers: list[Layer], actions: tuple, cache, rope, positions):
        """Under per-block graphs, a known sequence of blocks and K/V writes (the rest of a step after its gate
        decided) replays as one graph, captured once per (sequence, weight set, input buffer, batch, cache
        storage): one launch instead of one per block. At most RUN_GRAPHS sequences per storage; others
        replay block by block."""
        if self._layer_graphs is not cache or not actions:
            return super().run_layers(x, layers, actions, cache, rope, positions)
        tag = ("run", actions, id(layers))
        known = self.__dict__.setdefault("_run_graphs", {}).setdefault(id(cache.k), set())
        if tag not in known and len(known) >= RUN_GRAPHS:
            return super().run_layers(x, layers, actions, cache, rope, positions)
        known.add(tag)

        def run(x, r, p):  # called only to capture
            for i, kind, mlp, alpha in actions:
                if kind == "kv":
                    self._layer_fn(("kv", True, 1.0), layers[i], i, cache)(x, r, p)
                else:
                    x = self._layer_fn((kind, mlp, alpha), layers[i], i, cache)(x, r, p)
            return x

        blocks = any(kind == "block" for _, kind, _, _ in actions)
        return self._layer_replay(tag, x, rope, positions, cache, run, writes_x=blocks)

    def _layer_fn(self, kind: tuple, lw: Layer, i: int, cache: KVCache):
        """fn(x, rope, positions) for one block (kind ("block", mlp, alpha)) or its K/V write (("kv", ...)) of a
        decode step, for _layer_replay to capture. With compile on, one compiled function per kind serves every
        layer: the layer's weights and its cache slice are arguments, not constants."""
        def call(x, r, p):  # runs only to capture: a replay needs none of this
            fn = self._layer_fns.get(kind)
            if fn is None:
                what, mlp, alpha = kind
                if what == "block":
                    def fn(x, lw, one, rope, positions):
                        return Decoder._block(self, x, lw, 0, one, rope, positions, None, mlp, alpha)
                else:
                    def fn(x, lw, one, rope, positions):
                        return self._write_kv(x, lw, 0, one, rope, positions)
                if self.compile:
                    fn = torch.compile(fn, dynamic=False, fullgraph=True)
                self._layer_fns[kind] = fn
            return fn(x, lw, _LayerCache(cache.k[i:i + 1], cache.v[i:i + 1], cache.bias[i:i + 1]), r, p)
        return call

    def _layer_replay(self, tag, x, rope, positions, cache: KVCache, fn, writes_x: bool = True):
        """One block (or K/V write) of a decode step as a graph captured per (block, input buffer, batch, cache
        storage). The graphs of a storage share their inputs: two residual buffers that block graphs read one
        of and write the other (consecutive blocks pass the residual on without a copy, and the input stays
        intact for a caller that blends it with the output), and the step's positions and RoPE tables
        (copied in once per step). Returns the output buffer."""
        io = self.graphs.get(("io", x.shape, id(cache.k)))
        if io is None:
            io = self.graphs[("io", x.shape, id(cache.k))] = {
                "x": (torch.empty_like(x), torch.empty_like(x)), "pos": torch.empty_like(positions),
                "rope": tuple(torch.empty_like(t) for t in rope), "src": None, "storage": cache.k}
        bufs = io["x"]
        src = 0 if x is bufs[0] else 1 if x is bufs[1] else None
        if src is None:
            src = 0
            bufs[0].copy_(x)
        if io["src"] is not rope:  # a new step
            io["pos"].copy_(positions)
            for s, t in zip(io["rope"], rope, strict=True):
                s.copy_(t)
            io["src"] = rope
        key = (tag, src, x.shape, id(cache.k))
        if key in self.graphs:
            self.graphs[key]()
        elif writes_x:
            _, _, self.graphs[key] = self._capture(lambda: bufs[1 - src].copy_(fn(bufs[src], io["rope"], io["pos"])))
        else:
            _, _, self.graphs[key] = self._capture(lambda: fn(bufs[src], io["rope"], io["pos"]))
        return bufs[1 - src] if writes_x else bufs[src]

    def segment(self, key, fn, *arrays):
        """Under cuda_graphs, in a decode step: fn captured once per (key, shapes) with its inputs copied into
        fixed buffers, then replayed; returns copies of its outputs (later replays overwrite the buffers)."""
        if not self._segments:
            return fn(*arrays)
        key = ("segment", key, tuple(a.shape for a in arrays))
        if key not in self.graphs:
            inputs = tuple(a.clone() for a in arrays)
            first, out, replay = self._capture(lambda: fn(*inputs))
            self.graphs[key] = (inputs, out, replay)
            return first
        inputs, out, replay = self.graphs[key]
        for buf, a in zip(inputs, arrays, strict=True):
            buf.copy_(a)
        replay()
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

    # ---- the op set ----------------------------------------------------------------------------

    def positions(self, start: int, T: int) -> torch.Tensor:
        return torch.arange(start, start + T, device=self.device)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed)

    _apply_rope = staticmethod(attention_op.apply_rope)

    def _dense_block(self, lw: Layer) -> bool:
        """Whether a block's matrices are all ones decode_layer reads (dense fp32 / bf16 CPU tensors)."""
        return self.fused_layers and all(torch_kernels.dense_weight(getattr(lw, n)) for n in LINEARS)

    def _fused(self, x) -> bool:
        """Whether this step's ops go to the fused CPU kernels: fp32 decode-sized rows, eager."""
        return self.fused_decode and x.shape[-2] == 1 and x.shape[0] <= torch_kernels.DENSE_ROWS \
            and not torch.compiler.is_compiling()

    def _rms(self, x, w):
        if self._fused(x):
            return torch_kernels.kernels().rms_norm_rows(x.reshape(-1, x.shape[-1]), w, self.cfg.rms_norm_eps).view_as(x)
        return F.rms_norm(x, (x.shape[-1],), w, self.cfg.rms_norm_eps)

    def attention(self, x, lw: Layer, layer: int, cache: KVCache, rope, positions, rows):
        B, T, _ = x.shape
        cfg = self.cfg
        qkv = self.linear(self._rms(x, lw.ln1), lw.wqkv, lw.bqkv)
        if rows is None and self._fused(x):  # RoPE, the cache write and attention in one call
            out = torch_kernels.kernels().decode_attention(
                qkv.reshape(B, -1).contiguous(), cache.k[layer], cache.v[layer], cache.bias[layer], rope[0][0],
                rope[1][0], cache.length, cfg.num_attention_heads, cfg.num_key_value_heads)
            return self.linear(out.view(B, 1, -1), lw.wo)
        if rows is None and T == 1 and self.attention_kernel:  # the same as one op (on CUDA one Triton kernel)
            out = attention_op.decode_attention(qkv.reshape(B, -1), cache.k[layer], cache.v[layer], cache.bias[layer],
                                                  rope[0], rope[1], positions, cfg.num_attention_heads,
                                                  cfg.num_key_value_heads)
            return self.linear(out.view(B, 1, -1), lw.wo)
        q, k, v = qkv.split(self._split, dim=-1)
        q = q.view(B, T, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q = self._apply_rope(q, *rope)
        self._write(cache, layer, k, v, rope, positions, rows)
        bias = cache.bias[layer]  # [B, S]
        if T == 1:  # decode: attend over the whole static cache; unwritten slots are masked
            keys, values, mask = cache.k[layer], cache.v[layer], bias[:, None, None, :]
        else:  # prefill: the written prefix, causal inside the chunk
            end = cache.length + T
            keys, values = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
            future = torch.arange(end, device=self.device)[None, :] > positions[:, None]  # [T, end]
            mask = bias[:, None, None, :end].masked_fill(future[None, None], float("-inf"))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return self.linear(out.transpose(1, 2).reshape(B, T, -1), lw.wo)

    def _write_kv(self, x, lw: Layer, layer: int, cache: KVCache, rope, positions):
        B, T, _ = x.shape
        q_dim, (kv_heads, d) = self._split[0], (self.cfg.num_key_value_heads, self.cfg.head_dim)
        h = self._rms(x, lw.ln1)
        if isinstance(lw.wqkv, torch.Tensor):  # read only the k/v rows of the fused weight
            kv = self.linear(h, lw.wqkv[q_dim:], None if lw.bqkv is None else lw.bqkv[q_dim:])
        else:  # a packed weight is read whole
            kv = self.linear(h, lw.wqkv, lw.bqkv)[..., q_dim:]
        k, v = (t.view(B, T, kv_heads, d).transpose(1, 2) for t in kv.chunk(2, dim=-1))
        self._write(cache, layer, k, v, rope, positions, None)

    def _write(self, cache: KVCache, layer: int, k, v, rope, positions, rows) -> None:
        """RoPE on k; k, v into the cache; the (row, position) slots in rows (None: all) marked written."""
        cache.k[layer].index_copy_(2, positions, self._apply_rope(k, *rope))
        cache.v[layer].index_copy_(2, positions, v)
        bias = cache.bias[layer]  # [B, S]
        if rows is None:
            bias.index_fill_(1, positions, 0.0)  # no host tensor: capturable in a CUDA graph
        else:
            bias.index_copy_(1, positions, torch.where(torch.as_tensor(rows, device=self.device), 0.0, float("-inf")).to(bias))

    def mlp(self, x, lw: Layer, layer: int, observe=None):
        gate_up = self.linear(self._rms(x, lw.ln2), lw.w_gate_up)
        if self._fused(x):
            act = torch_kernels.kernels().silu_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(*x.shape[:-1], -1)
        else:
            gate, up = gate_up.chunk(2, -1)
            act = F.silu(gate) * up  # [B, T, inter]
        if observe is not None:
            observe(layer, act)
        return self.linear(act, lw.w_down)

    def final_norm(self, x):
        return self._rms(x, self.norm)

    def linear(self, x, w, b=None):
        if isinstance(w, torch.Tensor):
            if self.dense_kernel and torch_kernels.dense_ok(x, w):
                return torch_kernels.dense_linear(x, w, b)
            return F.linear(x, w, b)
        return w.linear(x, b)  # a packed weight (made by pack) multiplies itself

    def logits32(self, h, w):
        return self.linear(h, w).float()

    def pack(self, state, depth: int | None):
        if torch.device(self.device).type == "cuda":
            from . import quant_cuda

            return quant_cuda.prepare(state, depth=depth, device=self.device, compiled=self.compile,
                                      block=self.cuda_block_ops)
        if self.device != "cpu":
            raise UserError(f"packed weight sets run on CPU (AVX2 C++) and CUDA only; device is {self.device}")
        from . import quant_torch

        return quant_torch.prepare(state, depth=depth)

    def weight_shape(self, w) -> tuple[int, int]:
        return tuple(w.shape)

    def device_gate_ok(self, gate) -> bool:
        return self.device_gate and (self.compile or self.cuda_graphs) and hasattr(gate, "keep_device")

    def gated_layer(self, lw: Layer, run, gated_qkv: int) -> Layer:
        # full 16-bit weights on CUDA: the gated_linear kernel reads no weight of a layer that no row runs (on
        # CPU the op's reference implementation runs: tests); packed weights are read as they are; steps of
        # more rows than GATED_ROWS read their weights as usual (rows still keep or drop the layer's output)
        cuda = self._sms is not None
        if run.numel() > gated_linear_op.GATED_ROWS:
            return lw

        def gated(w, cols=None, whole=False):
            if not isinstance(w, torch.Tensor) or (cuda and w.dtype not in (torch.bfloat16, torch.float16)):
                return w
            splits = gated_linear_op.split_k(*w.shape, self._sms) if cuda and not whole else 1
            return gated_linear_op.GatedWeight(w, run, w.shape[0] if cols is None else cols, splits)

        return dataclasses.replace(lw, wqkv=gated(lw.wqkv, gated_qkv, whole=True), wo=gated(lw.wo),
                                   w_gate_up=gated(lw.w_gate_up), w_down=gated(lw.w_down))

    def add_weight_set(self, ws) -> None:
        from . import quant_cuda

        super().add_weight_set(ws)
        # the CUDA kernels' layout around the attention op (other weights stay as they are)
        self.weight_sets[ws.name] = quant_cuda.around_attention(self.weight_sets[ws.name])

    def select_linear_ok(self, x, w_no, w_yes) -> bool:
        # CUDA: a Triton kernel (bf16 weights). On CPU torch runs eagerly: the host reads a decision at no cost
        if torch.device(self.device).type != "cuda":
            return False
        return all(isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 for w in (w_no, w_yes))

    def select_linear(self, x, w_no, w_yes, take):
        from . import triton_kernels

        return triton_kernels.select_linear(x, w_no, w_yes, take)

    def where_rows(self, mask, a, b):
        return torch.where(torch.as_tensor(mask, device=self.device)[..., None], a, b)

    def asarray(self, a: np.ndarray, dtype: str | None = None):
        t = torch.as_tensor(np.asarray(a), device=self.device)
        if dtype is not None:
            return t.to(DTYPES[dtype])
        return t.to(self.dtype) if t.is_floating_point() else t

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.cpu().numpy()

    def fetch(self, x):
        if self.device != "cuda":
            return super().fetch(x)
        host = x.detach().to("cpu", non_blocking=True)  # into pinned memory, behind the work queued so far
        copied = torch.cuda.Event()
        copied.record()

        def read() -> np.ndarray:
            copied.synchronize()  # this copy only: a step queued after it may still run
            return self.to_numpy(host)
        return read

    def rms32(self, x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def silu(self, x):
        return F.silu(x)

    def sigmoid(self, x):
        return torch.sigmoid(x)

    def log_softmax(self, x):
        return F.log_softmax(x.float(), dim=-1)

    def log(self, x):
        return torch.log(x)

    def take_rows(self, w, ids):
        return w[ids].contiguous()

    def spread(self, values, ids, fill, width: int):
        out = fill[..., None].expand(*values.shape[:-1], width).clone()
        out[..., ids] = values
        return out

    def sampler_state(self, seed: int):
        return torch.Generator(device=self.device).manual_seed(seed)

    def pick(self, logits, temperature: float, state):
        if temperature <= 0:
            return logits.argmax(dim=-1), state
        return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=state)[:, 0], state

    def take(self, ids_table, idx):
        return ids_table[idx]

    def ids_array(self, ids: np.ndarray):
        return torch.as_tensor(np.asarray(ids), device=self.device)

    def materialize(self, *arrays) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
