"""The decoder, written once: how a plan is interpreted (which blocks run, blend, gate, weight set, head),
on top of a small set of array operations that each backend implements (torch_backend, mlx_backend).

Backends name no technique: they load weights, own a static KV cache and implement the op set below.
Techniques reach the forward only through the plan (plan.py). A plan that changes nothing runs exactly
the baseline ops.
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass, fields, replace

import numpy as np

from .errors import UserError
from .model_config import ModelConfig
from .plan import FULL, FULL_WEIGHTS, ExecutedStep, HeadOutput, StepPlan, WeightSet, weights_name


@dataclass
class Layer:
    """One block's weights; fused where the backends fuse (one matmul for q/k/v, one for gate/up)."""

    ln1: object
    wqkv: object  # [(H + 2 Hkv) * D, hidden]
    wo: object
    ln2: object
    w_gate_up: object  # [2 * inter, hidden]
    w_down: object
    bqkv: object | None = None


LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")  # the matrices a packed weight set may replace
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
PART = {"wqkv": "attention", "wo": "attention", "w_gate_up": "mlp", "w_down": "mlp"}


@dataclass
class Forward:
    """One forward: the head's output, the final-normed hidden, captured layer inputs, and what the blocks ran
    (ExecutedStep's fields but the head's, or "settle": a callable giving them once the step is evaluated)."""

    out: HeadOutput
    hidden: object
    captured: dict
    blocks: dict

    @functools.cached_property
    def executed(self) -> ExecutedStep:
        """What ran. A head that decided on the device is read here: after the step's tokens, at no cost."""
        out, blocks = self.out.settled(), dict(self.blocks)
        settle = blocks.pop("settle", None)  # blocks that decided on the device
        if settle is not None:
            blocks.update(settle())
        info = {**blocks.pop("info"), **out.info}
        return ExecutedStep(**blocks, head=out.name, head_params=out.params_read, info=info)


class Decoder(abc.ABC):
    """Plan interpretation over an op set. Subclasses set cfg, embed, norm, lm_head, weight_sets, dtype."""

    name = ""
    device = "cpu"
    # whether generation may queue the next step before reading this one's token (generation.stream): where
    # the device runs asynchronously from the host (CUDA)
    runs_ahead = False
    cfg: ModelConfig
    weight_sets: dict[str, list[Layer]]

    # ---- the op set each backend implements -------------------------------------------------

    @abc.abstractmethod
    def new_cache(self, batch: int, max_len: int):
        """A static cache with .length, .max_len and a per-layer record of written (row, position) slots."""

    @abc.abstractmethod
    def positions(self, start: int, T: int):
        """Positions start..start+T-1 as a backend int array [T]."""

    @abc.abstractmethod
    def rope(self, positions) -> tuple:
        """(cos, sin) [T, head_dim] for these positions, shared by every layer of the step."""

    @abc.abstractmethod
    def embed_ids(self, ids):
        """ids [B, T] -> x [B, T, hidden]."""

    @abc.abstractmethod
    def attention(self, x, lw: Layer, layer: int, cache, rope: tuple, positions, rows):
        """Input norm, q/k/v, RoPE, KV write, attention over the written slots of this layer, o_proj.
        Returns the block's attention output [B, T, hidden]. rows: None (all) or numpy bool [B, T]:
        only those (row, position) slots are marked written; the others stay holes."""

    @abc.abstractmethod
    def write_kv(self, x, lw: Layer, layer: int, cache, rope: tuple, positions):
        """Input norm, k/v projection and RoPE of x written to this layer's cache, no attention: the keys of
        rows that skip the layer under a gate that writes_kv (about 6% of a Llama layer's bytes)."""

    @abc.abstractmethod
    def mlp(self, x, lw: Layer, layer: int, observe=None):
        """Post-attention norm + SwiGLU MLP output [B, T, hidden]; observe(layer, act) sees the activation."""

    @abc.abstractmethod
    def final_norm(self, x): ...

    @abc.abstractmethod
    def linear(self, x, w, b=None): ...

    @abc.abstractmethod
    def logits32(self, h, w):
        """h @ w.T in float32: [..., rows of w]."""

    @abc.abstractmethod
    def pack(self, state, depth: int | None):
        """A quant.py packed state -> what `linear` and `logits32` accept in place of a weight (no float copy)."""

    @abc.abstractmethod
    def weight_shape(self, w) -> tuple[int, int]: ...

    @abc.abstractmethod
    def where_rows(self, mask, a, b):
        """a where mask [...] else b, mask (numpy or a backend bool array) broadcast over the last axis."""

    def select_linear_ok(self, x, w_no, w_yes) -> bool:
        """Whether select_linear skips the weight no row needs for these arrays (by default it does not, so a
        caller that wants the saving decides on the host instead)."""
        return False

    def select_linear(self, x, w_no, w_yes, take):
        """float32 (x @ w_no.T, x @ w_yes.T) for take [...] (a backend bool array per row, True = w_yes): each
        exact where some row needs it. Where select_linear_ok, an output no row needs is not computed (zeros) and
        the choice is made on the device, which the host never reads; this default computes both."""
        return self.logits32(x, w_no), self.logits32(x, w_yes)

    def device_gate_ok(self, gate) -> bool:
        """Whether a decode step this backend runs as one unit (compiled / captured: static_blocks) takes the
        gate's decision on the device (gate.keep_device), so the host reads nothing mid-step; by default the host
        decides (gate.decide) and the step runs in pieces around that read."""
        return False

    def gated_layer(self, lw: Layer, run, gated_qkv: int) -> Layer:
        """lw for a layer that only the rows in run [B, T] (a backend bool array) run: a backend may skip its
        matmuls when no row runs (all of wo, w_gate_up, w_down and the first gated_qkv output columns of wqkv).
        By default nothing is skipped: the rows that do not run discard the layer's output all the same."""
        return lw

    @abc.abstractmethod
    def rms32(self, x):
        """x in float32 over its root mean square on the last axis (eps 1e-6): how routers read the residual."""

    @abc.abstractmethod
    def asarray(self, a: np.ndarray, dtype: str | None = None):
        """numpy -> backend array; dtype None keeps integers as they are and casts floats to the model dtype."""

    @abc.abstractmethod
    def to_numpy(self, x) -> np.ndarray: ...

    def fetch(self, x):
        """A callable giving x as numpy. Where the device runs ahead of the host (runs_ahead), the copy is queued
        now and the call waits for it alone, not for work queued after it (generation.stream's next step)."""
        return lambda: self.to_numpy(x)

    @abc.abstractmethod
    def silu(self, x): ...

    @abc.abstractmethod
    def sigmoid(self, x): ...

    @abc.abstractmethod
    def log_softmax(self, x): ...

    @abc.abstractmethod
    def log(self, x): ...

    @abc.abstractmethod
    def take_rows(self, w, ids):
        """w[ids] as a contiguous array (a pre-sliced head)."""

    @abc.abstractmethod
    def spread(self, values, ids, fill, width: int):
        """[..., width] array: `values` [..., C] at columns ids, `fill` [...] everywhere else."""

    @abc.abstractmethod
    def pick(self, logits, temperature: float, state):
        """Next ids [B] from logits [B, V]: argmax at temperature 0, else a seeded sample. Returns (ids, state)."""

    @abc.abstractmethod
    def sampler_state(self, seed: int): ...

    @abc.abstractmethod
    def take(self, ids_table, idx):
        """ids_table[idx] (map candidate positions back to vocab ids)."""

    @abc.abstractmethod
    def ids_array(self, ids: np.ndarray):
        """numpy int [B, T] -> backend token ids."""

    def segment(self, key, fn, *arrays):
        """fn(*arrays) -> an array or a tuple of arrays: a piece of a decode step that is a pure function of its
        arrays and of state at fixed addresses (weights). A backend may capture it once per (key, shapes) and
        replay it (CUDA graphs, mx.compile); by default it just runs. key holds the owner of that state (not its
        id(), which a later object may reuse): the backend keeps it alive with the capture."""
        return fn(*arrays)

    @abc.abstractmethod
    def materialize(self, *arrays) -> None:
        """Finish pending work (MLX evaluates lazily; CUDA runs asynchronously)."""

    # ---- the interpretation of a plan, shared by every backend ------------------------------

    def hidden(self, ids, cache, plan: StepPlan = FULL, capture: set[int] | None = None, observe_mlp=None, *,
               resume: tuple | None = None):
        """Run the blocks on ids [B, T]; returns the final-normed hidden [B, T, hidden] and the inputs of
        the layers in `capture` (index num_layers = the un-normed final residual). resume=(layer, x) starts
        at that layer with x as its input (as captured by an earlier forward of the same ids): the layers
        before it neither run nor write the cache, so a plan that differs only from that layer on gives
        the full forward's outputs for the cost of the layers after it."""
        h, captured, _ = self._blocks(ids, cache, plan, capture, observe_mlp, resume)
        return h, captured

    def _blocks(self, ids, cache, plan: StepPlan, capture=None, observe_mlp=None, resume=None):
        B, T = ids.shape
        start = cache.length
        if start + T > cache.max_len:
            raise ValueError(f"KV cache full: {start}+{T} > {cache.max_len}")
        if resume is not None and plan.gate is not None:
            raise ValueError("resume: a gated plan decides on the residual of its own layers; run it whole")
        layers = self.resolve_weights(plan.weights)
        pos = self.positions(start, T)
        rope = self.rope(pos)
        first, x = (0, self.embed_ids(ids)) if resume is None else resume
        blend, gate = dict(plan.blend), plan.gate
        writes_kv = gate is not None and getattr(gate, "writes_kv", False)
        keep, info, captured, run, mlps, kv_only = None, {}, {}, set(), set(), set()
        ran = np.zeros((B, T))  # layers run per (row, position)
        for i, lw in enumerate(layers):
            if i < first:
                continue
            if gate is not None and i == gate.after_layer + 1:
                decision = gate.decide(x, self)
                keep, info = decision.keep, decision.info
                blend.update(decision.blend)
                if observe_mlp is None and not any(j >= i for j in capture or ()) \
                        and all(keep[:, :, j].all() or not keep[:, :, j].any() for j in range(i, len(layers))):
                    # every row takes the same decision for every later layer (always at batch 1): the rest
                    # of the step is one known sequence the backend may run as a unit
                    actions = []
                    for j in range(i, len(layers)):
                        if j in plan.skip_layers:
                            continue
                        if not keep[:, :, j].any():
                            if writes_kv:
                                actions.append((j, "kv", False, 1.0))
                                kv_only.add(j)
                            continue
                        run.add(j)
                        if j not in plan.zero_mlp:
                            mlps.add(j)
                        actions.append((j, "block", j not in plan.zero_mlp, blend.get(j, 1.0)))
                    ran += sum(kind == "block" for _, kind, _, _ in actions)
                    x = self.run_layers(x, layers, tuple(actions), cache, rope, pos)
                    break
            if capture and i in capture:
                captured[i] = x
            if i in plan.skip_layers:
                continue
            rows = None
            if keep is not None:
                rows = keep[:, :, i]
                if not rows.any():
                    if writes_kv:
                        self.write_kv(x, lw, i, cache, rope, pos)
                        kv_only.add(i)
                    continue
                rows = None if rows.all() else rows
            run.add(i)
            ran += 1 if rows is None else rows
            if i not in plan.zero_mlp:
                mlps.add(i)
            y = self._block(x, lw, i, cache, rope, pos, None if writes_kv else rows, i not in plan.zero_mlp,
                            blend.get(i, 1.0), observe_mlp)
            x = y if rows is None else self.where_rows(rows, y, x)
        if capture and len(layers) in capture:
            captured[len(layers)] = x
        cache.length = start + T
        executed = dict(layers_run=frozenset(run), mlps_run=frozenset(mlps), weights=weights_name(plan.weights), tokens=B * T,
                        row_layer_share=float(ran.mean() / len(layers)), kv_only_layers=frozenset(kv_only),
                        info=info)
        return self.final_norm(x), captured, executed

    def run_layers(self, x, layers: list[Layer], actions: tuple, cache, rope, positions):
        """Layers whose decisions are all known, in order: (i, "block", mlp runs, blend alpha) runs block i on
        every row, (i, "kv", ...) writes only its K/V. Returns the residual after them. A backend may run
        them as one unit (CUDA: one captured graph per sequence)."""
        for i, kind, mlp, alpha in actions:
            if kind == "kv":
                self.write_kv(x, layers[i], i, cache, rope, positions)
            else:
                x = self._block(x, layers[i], i, cache, rope, positions, None, mlp, alpha)
        return x

    def static_blocks(self, ids, positions, cache, layers: list[Layer], run: tuple, gate=None) -> object:
        """The blocks of a plan as a pure function of arrays (what a backend may compile): run is
        ((layer, mlp runs, blend alpha), ...) for the layers that run. Same ops as _blocks; the caller
        advances cache.length. Returns the final-normed hidden [B, T, hidden]; with a gate that decides on the
        device (device_gate_ok), (hidden, the gate's keep flags) and the layers after it run gated."""
        rope = self.rope(positions)
        x = self.embed_ids(ids)
        keep = None
        for i, mlp, alpha in run:
            if gate is not None and keep is None and i > gate.after_layer:
                keep = gate.keep_device(x, self)
            if keep is None:
                x = self._block(x, layers[i], i, cache, rope, positions, None, mlp, alpha)
            else:
                x = self._gated_block(x, layers[i], i, cache, rope, positions, keep[..., i - gate.after_layer - 1],
                                      mlp, alpha, getattr(gate, "writes_kv", False))
        if gate is None:
            return self.final_norm(x)
        if keep is None:  # every layer after the gate is skipped: it decides all the same (what _blocks reports)
            keep = gate.keep_device(x, self)
        return self.final_norm(x), keep

    def _gated_block(self, x, lw: Layer, i: int, cache, rope, positions, run, mlp: bool, alpha: float,
                     writes_kv: bool):
        """Block i on every row, kept where run [B, T] (a backend bool array) says the row runs it: a row that
        does not keeps x, and its K/V at this position is written (writes_kv, as Decoder.write_kv would) or
        left a hole. The backend skips the layer's matmuls when no row runs it (gated_layer)."""
        q_cols = self.cfg.num_attention_heads * self.cfg.head_dim
        lw = self.gated_layer(lw, run, q_cols if writes_kv else self.weight_shape(lw.wqkv)[0])
        y = self._block(x, lw, i, cache, rope, positions, None if writes_kv else run, mlp, alpha)
        return self.where_rows(run, y, x)

    def gate_executed(self, plan: StepPlan, later: np.ndarray) -> dict:
        """The ExecutedStep fields (but tokens) of a step whose gate decided on the device, from its keep flags
        later [B, T, L - K] read back: what _blocks reports for the same decisions."""
        gate, L = plan.gate, self.cfg.num_hidden_layers
        decision, k0 = gate.decision(later), gate.after_layer + 1
        run, kv_only = {i for i in range(k0) if i not in plan.skip_layers}, set()
        ran = len(run) + np.zeros(later.shape[:2])
        for j in range(k0, L):
            if j in plan.skip_layers:
                continue
            rows = decision.keep[:, :, j]
            ran += rows
            if rows.any():
                run.add(j)
            elif getattr(gate, "writes_kv", False):
                kv_only.add(j)
        return dict(layers_run=frozenset(run), mlps_run=frozenset(run - set(plan.zero_mlp)),
                    weights=weights_name(plan.weights), row_layer_share=float(ran.mean() / L),
                    kv_only_layers=frozenset(kv_only), info=decision.info)

    def _block(self, x, lw: Layer, i: int, cache, rope, positions, rows, mlp: bool, alpha: float, observe=None):
        """One block on x: attention, the MLP when it runs, blended toward x when alpha != 1."""
        y = x + self.attention(x, lw, i, cache, rope, positions, rows)
        if mlp:
            y = y + self.mlp(y, lw, i, observe)
        return y if alpha == 1.0 else x + alpha * (y - x)

    def static_run(self, plan: StepPlan) -> tuple[tuple, dict]:
        """(run, executed) of a gate-free plan for static_blocks: what runs, and the ExecutedStep fields
        _blocks would report for one token per row (tokens set by the caller)."""
        blend, L = dict(plan.blend), self.cfg.num_hidden_layers
        run = tuple((i, i not in plan.zero_mlp, blend.get(i, 1.0)) for i in range(L) if i not in plan.skip_layers)
        executed = dict(layers_run=frozenset(i for i, _, _ in run), mlps_run=frozenset(i for i, m, _ in run if m),
                        weights=weights_name(plan.weights), row_layer_share=float(len(run) / L),
                        kv_only_layers=frozenset(), info={})
        return run, executed

    def head_weights(self, weights: str | WeightSet = FULL_WEIGHTS):
        return self.packed_heads.get(weights_name(weights), self.lm_head)

    # ---- weight sets: the full one, and packed ones loaded on first use (precision gears) -------

    @property
    def packed_heads(self) -> dict:
        return self.__dict__.setdefault("_packed_heads", {})

    @property
    def relative_bytes(self) -> dict[str, dict[str, float]]:
        """{weight set: {attention|mlp|head: bytes it reads / bytes of the full weights}} for the cost model."""
        return self.__dict__.setdefault("_relative_bytes", {})

    def resolve_weights(self, weights: str | WeightSet) -> list[Layer]:
        name = weights_name(weights)
        sources = self.__dict__.setdefault("_weight_sources", {})
        if isinstance(weights, WeightSet) and sources.get(name) != weights:
            self.add_weight_set(weights)
            sources[name] = weights
        layers = self.weight_sets.get(name)
        if layers is None:
            raise UserError(f"plan asks for weight set {name!r}; loaded: {sorted(self.weight_sets)}")
        return layers

    def add_weight_set(self, ws: WeightSet) -> None:
        """Load ws.path (quant.py states) as weight set ws.name: its packed matrices replace the full ones,
        everything else (norms, embedding, unpacked matrices) is shared with the full set."""
        from . import quant

        states = quant.load_file(ws.path)
        full, itemsize = self.weight_sets[FULL_WEIGHTS], ITEMSIZE[str(self.dtype).split(".")[-1]]
        read = {"attention": [0, 0], "mlp": [0, 0], "head": [0, 0]}  # [bytes read, full bytes]

        def packed(name: str, w, part: str):
            state = states.pop(name, None)
            n, k = self.weight_shape(w)
            read[part][1] += n * k * itemsize
            if state is None:
                read[part][0] += n * k * itemsize
                return w
            if tuple(state.shape) != (n, k):
                raise UserError(f"packed weights {ws.path}: {name} is {tuple(state.shape)}, the model's is {(n, k)}")
            depth = ws.depth
            if depth is not None and depth not in getattr(state, "depths", (8,)):
                raise UserError(f"packed weights {ws.path}: {name} cannot be read at depth {depth}")
            read[part][0] += quant.bytes_read(state, depth=depth)
            return self.pack(state, depth)

        layers = [replace(lw, **{f.name: packed(f"layers.{i}.{f.name}", getattr(lw, f.name), PART[f.name])
                                 for f in fields(lw) if f.name in LINEARS})
                  for i, lw in enumerate(full)]
        head = packed("lm_head", self.lm_head, "head")
        if states:
            raise UserError(f"packed weights {ws.path}: {sorted(states)[0]} matches no weight of this model")
        self.weight_sets[ws.name] = layers
        if head is not self.lm_head:
            self.packed_heads[ws.name] = head
        self.relative_bytes[ws.name] = {k: r / f for k, (r, f) in read.items()}

    def forward(self, ids, cache, plan: StepPlan = FULL, *, last_only: bool = False, capture=None,
                observe_mlp=None, resume=None) -> Forward:
        """Blocks, then the plan's head (the full LM head when none), on ids [B, T] (resume: see hidden)."""
        h, captured, executed = self._blocks(ids, cache, plan, capture, observe_mlp, resume)
        return self._head(h[:, -1] if last_only else h, plan, executed, captured)

    def _head(self, h, plan: StepPlan, executed: dict, captured: dict) -> Forward:
        """The plan's head (the full LM head when none) on the final-normed hidden h."""
        if plan.head is None:
            w = self.head_weights(plan.weights)
            out = HeadOutput(self.logits32(h, w), "full", self.cfg.vocab_size * self.cfg.hidden_size)
        else:
            out = plan.head.apply(h, self)
        return Forward(out, h, captured, executed)

    def logits(self, ids, plan: StepPlan = FULL, *, resume=None) -> np.ndarray:
        """Teacher-forced logits [T, vocab] float32 for one sequence under one plan (resume: see hidden)."""
        t = self.ids_array(np.asarray(ids)[None])
        return self.to_numpy(self.forward(t, self.new_cache(1, t.shape[1]), plan, resume=resume).out.logits[0])

    # ---- generation in layers: prefill, decode_one_token (generation.py streams them) ---------

    def prefill(self, ids, cache, plan: StepPlan = FULL) -> Forward:
        """The prompt [B, T] in one forward; last-position outputs only."""
        return self.forward(ids, cache, plan, last_only=True)

    def decode_one_token(self, tokens, cache, plan: StepPlan = FULL) -> Forward:
        """One new token per row, tokens [B] -> last-position outputs."""
        return self.forward(tokens[:, None], cache, plan, last_only=True)

    def next_tokens(self, out: HeadOutput, temperature: float, state):
        """Next ids [B] from a step's head output (from its narrower pick logits when it offers them)."""
        ids, state = self._pick_ids(out.logits if out.pick is None else out.pick, out.pick_ids, temperature, state)
        if out.pick_alt is not None:
            rows, logits, alt_ids = out.pick_alt
            alt, state = self._pick_ids(logits, alt_ids, temperature, state)
            ids = self.where_rows(rows, alt[..., None], ids[..., None])[..., 0]
        return ids, state

    def _pick_ids(self, logits, ids, temperature: float, state):
        idx, state = self.pick(logits, temperature, state)
        return (idx if ids is None else self.take(ids, idx)), state
