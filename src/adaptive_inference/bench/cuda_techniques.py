"""Router, lobotomy, layer skip, a token gate, packed int8 / int4 weights and the gears on a CUDA GPU: decode speedup
against the structural bound, torch backend.

The GPU host has no model hub and no copy of the embedded model, so this builds models of a given
shape with random weights (decode speed depends on shapes, not values) and applies the techniques
at set rates: the lobotomy cut of the pipeline (MLPs 16 and 25 of 30, scaled to the layer count) and
a gated head with a common set of the pipeline's size (5.2% of the vocab) taking a set share of the
steps (a trained router's decisions on random weights would mean nothing); the category map's global
25% skip set (layers 12-14, 16-18, 25, 26 of 30, scaled); a token gate that skips that set on a set share of
the steps, writing the skipped layers' K/V (the token router's default policy; its decision needs the
residual on the host, one sync per step); token-router: the token router's own gate (its MLP, random weights
set to skip that same set on about half of the tokens) decided on the device inside the one captured step, the
later layers run through gated_linear (no weight read where no row runs the layer); token-router-host: the
same gate decided on the host. Under CUDA graphs a host-decided gate replays one graph
per block, picked by the host after the decision; the gated head decides on the device (router MLP and a Triton
select_linear that reads only the head a row needs, one captured segment, no host read), and router-host /
stacked-host measure the earlier host decision (router and common-head segments on either side of the P(rare)
read) beside it. Timing is paired per repeat
as in the benchmark stage (bench.stats.paired_speedup); the bound comes from what the decoder executed
(cost.structural).

Each shape runs under the decode modes asked for (--modes): eager; graphs (the decode step of a gate-free
plan replayed as a CUDA graph per plan); compiled (torch.compile'd step, replayed as a CUDA graph; per-block
graphs of gated plans are not compiled). The baseline runs at batch 1 and 8 in every mode; the techniques run
beside it in the last mode (or those of --technique-modes). The device's
read bandwidth is measured in the same run (a timed sum over a buffer far larger than L2), and each decode
is reported as a share of its limit: bytes read per token (weights + the KV cache) / bandwidth.

    python scripts/cuda_techniques.py [--shapes smollm2-135m llama3-8b] [--modes eager graphs compiled] [--out F]

The pipeline's gpu_bench stage (`adaptive-inference gpu-bench`, in the DAG where params gpu_bench.enabled) runs
the same measurement for the params' shapes and configurations and writes results.json with a manifest; the
report shows it in its GPU section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import atomic, manifest, quant, quant_cuda
from ..cost import structural
from ..decoder import LINEARS, PART
from ..errors import UserError
from ..generation import generate, runs_ahead, stream
from ..model_config import ModelConfig
from ..plan import GateDecision, StaticPolicy, StepPlan
from ..techniques.gears import monitor
from ..techniques.gears.apply import GearsPolicy
from ..techniques.token_router.apply import TokenGate
from ..techniques.vocab_router.head import GatedHead
from ..torch_backend import DTYPES, TorchLM
from .stats import paired_speedup, realized_share

SHAPES = {  # the embedded default, a 1B Llama, and the Llama-3-8B and Qwen2.5-14B shapes (random weights)
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500000.0),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "qwen2.5-14b": dict(model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, rope_theta=1000000.0),
}
MODES = {"eager": dict(cuda_graphs=False), "graphs": dict(cuda_graphs=True),
         "compiled": dict(cuda_graphs=True, compile=True)}


class RatePolicy:
    """The gated head on every step, forced to the common head on `rate` of them (spread evenly); the
    router runs on every step as it would for real. Its plans follow the step index alone, so generation runs
    them ahead as it does the pipeline's router (one static plan whose head decides on the device)."""

    static = False
    plans_ahead = True

    def __init__(self, common: GatedHead, full: GatedHead, rate: float, zero_mlp=frozenset()):
        self.heads, self.rate, self.zero_mlp = (full, common), rate, frozenset(zero_mlp)

    def plan(self, step: int) -> StepPlan:
        take = int((step + 1) * self.rate) > int(step * self.rate)
        return StepPlan(zero_mlp=self.zero_mlp, head=self.heads[take])

    def observe(self, executed, logits) -> None:
        pass


class RateGate:
    """Skips `layers` on `rate` of the forwards (spread evenly), writing their K/V; reads the residual to the
    host first, as the token router does."""

    writes_kv = True

    def __init__(self, layers: frozenset, num_layers: int, rate: float):
        self.layers, self.L, self.rate, self.after_layer, self.calls = layers, num_layers, rate, min(layers) - 1, 0

    def decide(self, x, lm) -> GateDecision:
        lm.to_numpy(x[:, -1:, :1])  # the host round trip of a real router
        take = int((self.calls + 1) * self.rate) > int(self.calls * self.rate)
        self.calls += 1
        keep = np.ones((x.shape[0], x.shape[1], self.L), dtype=bool)
        if take:
            keep[:, :, sorted(self.layers)] = False
        return GateDecision(keep)


def router_gate(lm: TorchLM, layers: frozenset, seed: int = 0) -> TokenGate:
    """The token router's gate (its MLP: hidden -> 128 -> routed layers, the pipeline's width) with random
    weights that skip `layers` together or not at all (one zero-mean output row shared by them; the other
    layers always run), decided per token by its residual: about half of the tokens on random weights."""
    H, L, k = lm.cfg.hidden_size, lm.cfg.num_hidden_layers, min(layers)
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(128).astype(np.float32)
    w2 = np.zeros((L - k, 128), np.float32)
    w2[[j - k for j in sorted(layers)]] = v - v.mean()
    b2 = np.where(np.isin(np.arange(k, L), sorted(layers)), 0.0, 10.0).astype(np.float32)
    w = {"w1": (rng.standard_normal((128, H)) / H ** 0.5).astype(np.float32), "b1": np.zeros(128, np.float32),
         "w2": w2, "b2": b2}
    return TokenGate(w, k, L, writes_kv=True)


class HostGate:
    """A gate decided on the host (no keep_device): the step runs in graphs around the residual's read."""

    def __init__(self, gate):
        self.gate, self.after_layer, self.writes_kv = gate, gate.after_layer, gate.writes_kv

    def decide(self, x, lm) -> GateDecision:
        return self.gate.decide(x, lm)


class Behind:
    """A policy as given, marked not static: generation then reads each token before queuing the next step
    (what every step did before generation ran ahead)."""

    static = plans_ahead = False

    def __init__(self, policy):
        self.policy = policy

    def plan(self, step: int) -> StepPlan:
        return self.policy.plan(step)

    def step_queued(self, logits, lm) -> None:
        if hasattr(self.policy, "step_queued"):
            self.policy.step_queued(logits, lm)

    def observe(self, executed, logits) -> None:
        self.policy.observe(executed, logits)


def with_run_ahead(configs: dict, mode: str) -> dict:
    """--run-ahead: "on" the configurations as they are; "off" each behind (Behind); "both" each beside its
    twin behind, named NAME/behind, so one run pairs what running ahead gains."""
    behind = {(n if mode == "off" else f"{n}/behind"): (lambda make=make: Behind(make())) for n, make in configs.items()}
    return {"on": configs, "off": behind, "both": configs | behind}[mode]


class GatePolicy(StaticPolicy):
    """A token gate's plan, the same every step (as the pipeline's TokenPolicy): generation runs it ahead."""

    def __init__(self, gate: RateGate):
        super().__init__(StepPlan(gate=gate))


def random_model(shape: str, dtype: str, device: str, mode: str, attention: str = "kernel") -> TorchLM:
    """Random weights of the shape, made on the device (an 8B model never passes through the host); attention:
    "sdpa" (RoPE, cache writes and SDPA as ops) or "kernel" (the Triton decode attention where it applies)."""
    cfg = ModelConfig.from_dict(SHAPES[shape])
    g = torch.Generator(device=device).manual_seed(0)
    H, inter, V, d = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    rows = {"q": cfg.num_attention_heads * d, "k": cfg.num_key_value_heads * d, "v": cfg.num_key_value_heads * d}

    def rand(*shape):
        return (torch.randn(shape, generator=g, device=device, dtype=DTYPES[dtype]) * 0.02)

    w = {"model.embed_tokens.weight": rand(V, H), "model.norm.weight": torch.ones(H, device=device, dtype=DTYPES[dtype])}
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = rand(V, H)
    for i in range(cfg.num_hidden_layers):
        q, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        w |= {a + f"{n}_proj.weight": rand(r, H) for n, r in rows.items()}
        w |= {a + f"{n}_proj.bias": rand(r) for n, r in rows.items()} if cfg.qkv_bias else {}
        w |= {a + "o_proj.weight": rand(H, rows["q"]), q + "mlp.gate_proj.weight": rand(inter, H),
              q + "mlp.up_proj.weight": rand(inter, H), q + "mlp.down_proj.weight": rand(H, inter),
              q + "input_layernorm.weight": torch.ones(H, device=device, dtype=DTYPES[dtype]),
              q + "post_attention_layernorm.weight": torch.ones(H, device=device, dtype=DTYPES[dtype])}
    # block ops by name only (NAME-block sets), so int8 / int4 stay the separate ops they are compared with
    lm = TorchLM(cfg, w, device, DTYPES[dtype], **MODES[mode], cuda_attention=attention, cuda_block_ops=False)
    del w
    return lm


def read_bandwidth(device: str, gib: float = 4.0, repeats: int = 10) -> float:
    """Bytes/s of the fastest of `repeats` timed sums over a buffer of `gib` GiB (far beyond L2)."""
    x = torch.ones(int(gib * 2**30) // 4, device=device, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return x.numel() * x.element_size() / best


def step_bytes(cfg: ModelConfig, item: int, context: int) -> tuple[int, int]:
    """(weight bytes, K/V bytes over `context` for one row) a decode step reads."""
    wb = cfg.weight_bytes(item)
    return wb["layers"] + wb["lm_head"], 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * item


class HostDecidedHead(GatedHead):
    """The gated head with its decision read on the host between two captured segments (the path before
    Decoder.select_linear), measured beside the device decision."""

    def apply(self, h, lm):
        lm.select_linear_ok = lambda *a: False
        try:
            return super().apply(h, lm)
        finally:
            del lm.select_linear_ok


def heads(lm: TorchLM, common_share: float, cls=GatedHead) -> tuple[GatedHead, GatedHead]:
    rng = np.random.default_rng(0)
    H, V = lm.cfg.hidden_size, lm.cfg.vocab_size
    ids = np.sort(rng.choice(V, int(common_share * V), replace=False)).astype(np.int64)
    w = dict(w1=rng.normal(size=(256, H)).astype(np.float32) * 0.05, b1=np.zeros(256, np.float32),
             w2=rng.normal(size=(1, 256)).astype(np.float32) * 0.05, b2=np.zeros(1, np.float32))
    shared: dict = {}  # both share the converted weights, as one head would
    return cls(ids, **w, threshold=2.0, _arrays=shared), cls(ids, **w, threshold=-1.0, _arrays=shared)


PACKED = {  # configuration -> (quant.py format, depth read, 4-bit kernel: None = quant_cuda's choice)
    "int8": ("int8", None, None), "int4": ("int4", None, None), "int4-triton": ("int4", None, "triton"),
    "int4-tinygemm": ("int4", None, "tinygemm"),  # torch's own int4 kernel, for reference
    "nested8": ("nested", 8, None), "nested4": ("nested", 4, None),  # the gears' mid / low gear
    "int8-block": ("int8", None, None), "int4-block": ("int4", None, "triton"),  # blocks on block_op's ops
    "nested8-block": ("nested", 8, None), "nested4-block": ("nested", 4, None)}


_STATES: dict = {}
KERNELS: dict = {}  # packed set -> the kernels its matrices run on (results' "kernel")
KERNEL_NAMES = {"w4": "triton", "int8": "triton", "int4": "tinygemm"}  # CudaPacked.kind -> kernel (+ "-block")


def add_packed_set(lm: TorchLM, name: str, group_size: int) -> None:
    """A packed weight set of the shape, made as the pipeline's quantize stage makes one (quant.quantize, then
    the backend's pack: quant_cuda on a GPU) from one random matrix per distinct shape, copied per layer so every
    layer reads its own memory (no L2 reuse between layers). Registered under its name, with the bytes each
    part reads for the structural bound."""
    fmt, depth, kernel = PACKED[name]
    rng, itemsize, made = np.random.default_rng(0), lm.embed.element_size(), {}
    read = {"attention": [0, 0], "mlp": [0, 0], "head": [0, 0]}

    def packed(w, part):
        n, k = w.shape
        if (n, k) not in made:
            key = (fmt, n, k, group_size)  # sets of one format (nested4 / nested8) share the host quantization
            if key not in _STATES:
                _STATES[key] = quant.quantize(rng.standard_normal((n, k), dtype=np.float32) * 0.02, fmt,
                                              group_size=group_size)
            state = _STATES[key]
            p = quant_cuda.prepare(state, depth=depth, kernel=kernel) if kernel else lm.pack(state, depth)
            if name.endswith("-block") and p.kind in ("int8", "w4"):
                p = dataclasses.replace(p, block=True)
            made[(n, k)] = (p, quant.bytes_read(state, depth=depth))
            KERNELS.setdefault(name, set()).add(KERNEL_NAMES[p.kind] + ("-block" if p.block else ""))
        p, nbytes = made[(n, k)]
        read[part][0] += nbytes
        read[part][1] += n * k * itemsize
        return dataclasses.replace(p, tensors=tuple(t.clone() for t in p.tensors))

    layers = [dataclasses.replace(lw, **{f: packed(getattr(lw, f), PART[f]) for f in LINEARS})
              for lw in lm.weight_sets["full"]]
    lm.weight_sets[name] = quant_cuda.around_attention(layers)  # as TorchLM.add_weight_set registers a set
    lm.packed_heads[name] = packed(lm.lm_head, "head")
    lm.relative_bytes[name] = {k: r / f for k, (r, f) in read.items()}


GEAR_SETS = {"gears": ("nested4", "nested8"),  # the pipeline's default layout: one nested copy read at 4 or 8 bits
             "gears-block": ("nested4-block", "nested8-block"),  # the same on block_op's ops
             "gears-lag": ("nested4-block", "nested8-block"),  # gears-block, each decision a step later: runs ahead
             "gears-separate": ("int4", "int8")}  # quantize.layout: separate


def packed_kernels(name: str) -> str | None:
    """The kernels a configuration's packed sets ran on ("triton", "tinygemm", "tinygemm+triton"), None
    without packed sets."""
    found = set().union(*(KERNELS.get(w, set()) for w in GEAR_SETS.get(name, (name,))))
    return "+".join(sorted(found)) or None


def gears_policy(lm: TorchLM, a, low_set: str, mid_set: str, lag: int = 0):
    """The gears' policy (entropy monitor, per-token gear) over low / mid / full weights, its thresholds at
    p40 / p60 of the baseline's own step entropies, as calibrate_entropy sets them. Random weights give
    near-uniform next-token distributions whose entropies differ little: no hysteresis and no catastrophic
    fallback (which would hold the top gear on every near-uniform step), so the monitor moves."""
    prompt = list(range(1, 1 + a.prompt_tokens))
    entropies = []

    class Record(StaticPolicy):
        static = False

        def observe(self, executed, logits):
            entropies.extend(monitor.entropy_bits(logits).reshape(-1).tolist())

    generate(lm, prompt, max_new_tokens=a.new_tokens, policy=Record())
    low, high = (float(np.percentile(entropies, q)) for q in (40, 60))
    cfg = monitor.MonitorConfig(low=low, high=high, vocab_size=lm.cfg.vocab_size, hysteresis=0.0,
                                catastrophic_frac=1.0)
    sets = {monitor.LOW: low_set, monitor.MID: mid_set, monitor.HIGH: "full"}
    return lambda: GearsPolicy(sets, cfg, None, monitor.HIGH, lag)


OTHER_CONFIGS = ("lobotomy", "router", "stacked", "router_all_common", "router-host", "stacked-host", "skip-25",
                 "token-gate", "token-router", "token-router-host")  # besides the packed sets and the gears


def wanted_configs(a) -> list[str] | None:
    """--configs, plus each wanted gears configuration's weight sets as static configurations (they share its
    compiled graphs), so mixed_speedup can say what its steps would give at those sets' own speeds; None: all."""
    if not a.configs:
        return None
    return list(dict.fromkeys([*a.configs, *(s for g in a.configs for s in GEAR_SETS.get(g, ()))]))


def mixed_speedup(gear_share: dict, speedups: dict) -> float | None:
    """The speedup of a gears run whose steps each ran at their weight set's static speed (share of steps per
    set, "full" at 1.0): what the gears would give if switching cost nothing. None when a set was not timed."""
    if any(w != "full" and speedups.get(w) is None for w in gear_share):
        return None
    return 1 / sum(share / (1.0 if w == "full" else speedups[w]) for w, share in gear_share.items())


def technique_configs(lm: TorchLM, a) -> dict:
    L = lm.cfg.num_hidden_layers
    cut = frozenset(round(i * L / 30) for i in (16, 25))
    skip = frozenset(round(i * L / 30) for i in (12, 13, 14, 16, 17, 18, 25, 26))
    common, full = heads(lm, a.common_share)
    token_gate = router_gate(lm, skip)  # one gate object: a new one would be a new plan (compiled, captured again)
    host_common, host_full = heads(lm, a.common_share, HostDecidedHead)
    chosen = wanted_configs(a)
    wanted = lambda n: chosen is None or n in chosen  # noqa: E731
    gear_sets = [s for g, sets in GEAR_SETS.items() if wanted(g) for s in sets]
    static_sets = list(dict.fromkeys([n for n in a.packed if wanted(n)] + gear_sets))
    for name in static_sets:
        add_packed_set(lm, name, a.group_size)
    gears = {g: gears_policy(lm, a, *sets, lag=int(g.endswith("-lag"))) for g, sets in GEAR_SETS.items() if wanted(g)}
    return {**{fmt: (lambda f=fmt: StaticPolicy(StepPlan(weights=f))) for fmt in static_sets}, **gears,
            "lobotomy": lambda: StaticPolicy(StepPlan(zero_mlp=cut)),
            "router": lambda: RatePolicy(common, full, a.common_rate),
            "stacked": lambda: RatePolicy(common, full, a.common_rate, cut),
            "router_all_common": lambda: RatePolicy(common, full, 1.0),
            "router-host": lambda: RatePolicy(host_common, host_full, a.common_rate),
            "stacked-host": lambda: RatePolicy(host_common, host_full, a.common_rate, cut),
            "skip-25": lambda: StaticPolicy(StepPlan(skip_layers=skip)),
            "token-gate": lambda: GatePolicy(RateGate(skip, L, a.gate_rate)),
            "token-router": lambda: GatePolicy(token_gate),
            "token-router-host": lambda: GatePolicy(HostGate(token_gate))}


def batch_step_s(lm: TorchLM, batch: int, a) -> float:
    """Median seconds of a baseline decode step for `batch` rows (after a warm-up generation)."""
    prompts = np.tile(np.arange(1, 1 + a.prompt_tokens), (batch, 1))
    steps = []
    for rep in range(1 + a.batch_repeats):
        got = [st.seconds for st in stream(lm, prompts, max_new_tokens=a.new_tokens)][1:]
        steps += got if rep else []
    return float(np.median(steps))


def _event_ms(fn, n: int) -> float:
    """Milliseconds per call of fn, n calls back to back between CUDA events (no host sync between them)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def _blocks_ms(lm: TorchLM, a, slots: int) -> float:
    """Milliseconds of the baseline's captured blocks at the position after the prompt, replayed back to back,
    on a static cache of `slots` slots."""
    cache = lm.new_cache(1, slots)
    lm.prefill(lm.ids_array(np.arange(1, 1 + a.prompt_tokens)[None]), cache)
    lm.decode_one_token(lm.ids_array(np.array([1])), cache)  # captures the graph for this storage, or replays it
    cache.length -= 1  # the replays below rewrite that slot
    return _event_ms(lm.graphs[(StepPlan(), id(cache.k))][0], 50)


def anatomy(lm: TorchLM, a, step_tps: float) -> dict:
    """Where a batch-1 baseline step goes: the captured blocks replayed back to back, the LM head alone,
    and the rest of the measured step: host work and the per-token sync of the generation loop, as far as
    running a step ahead (generation.stream) does not hide them. With --long-cache, the blocks again on a static
    cache of that many slots at the same position (what a long generation budget costs its first steps)."""
    blocks = _blocks_ms(lm, a, a.prompt_tokens + a.new_tokens)
    h = torch.zeros(1, lm.cfg.hidden_size, device=lm.device, dtype=lm.dtype)
    head = _event_ms(lambda: lm.logits32(h, lm.lm_head).argmax(-1), 50)
    step = 1e3 / step_tps
    out = {"blocks_ms": blocks, "head_ms": head, "step_ms": step, "rest_ms": step - blocks - head}
    if a.long_cache:
        out |= {"long_cache_slots": a.long_cache, "blocks_ms_long_cache": _blocks_ms(lm, a, a.long_cache)}
    return out


def profile(shape: str, a) -> None:
    """Prints the CUDA kernels of one compiled batch-1 baseline step (run without graph capture, so the
    profiler sees each kernel), by total time: what the captured step spends its time on."""
    lm = random_model(shape, a.dtype, a.device, "compiled", a.attention)
    lm.cuda_graphs = False
    cache = lm.new_cache(1, a.prompt_tokens + a.new_tokens)
    lm.prefill(lm.ids_array(np.arange(1, 1 + a.prompt_tokens)[None]), cache)
    tok = lm.ids_array(np.array([1]))
    for _ in range(3):
        lm.decode_one_token(tok, cache)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            lm.decode_one_token(tok, cache)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.profile_rows, max_name_column_width=150))


def step_profile(kernels: list[tuple[str, float]], walls: list[float]) -> dict:
    """What decode steps ran on the GPU, per step: kernels [(name, GPU us)] of len(walls) steps of walls seconds
    each -> wall and kernel ms, kernels, the wall not covered by kernels (host work and gaps the GPU waits
    through), and each kernel name's calls and us, largest first."""
    n = len(walls)
    if not n:
        raise ValueError("step_profile: no steps")
    names: dict[str, list[float]] = {}
    for name, us in kernels:
        names.setdefault(name, []).append(us)
    wall_ms, kernel_ms = 1e3 * sum(walls) / n, sum(us for _, us in kernels) / 1e3 / n
    return {"steps": n, "step_ms_wall": wall_ms, "kernel_ms": kernel_ms, "uncovered_ms": wall_ms - kernel_ms,
            "kernels": len(kernels) / n,
            "by_kernel": [{"name": k, "calls": len(v) / n, "us": sum(v) / n}
                          for k, v in sorted(names.items(), key=lambda kv: -sum(kv[1]))]}


def profile_configs(shape: str, a) -> dict:
    """Per configuration in --configs (and the baseline), compiled + graphs as measured: the wall time of a
    decode step against the GPU time of its kernels (torch.profiler over --profile-tokens decode steps, the
    prefill left out), so a configuration's steps show whether they lose time on the GPU or to host work the
    GPU waits for; then its kernels per step (step_profile)."""
    lm = random_model(shape, a.dtype, a.device, "compiled", a.attention)
    configs = with_run_ahead({"baseline": lambda: StaticPolicy(),
                              **{k: v for k, v in technique_configs(lm, a).items() if k in (wanted_configs(a) or [])}},
                             a.run_ahead)
    prompt = np.arange(1, 1 + a.prompt_tokens)[None]
    out = {}
    for name, make in configs.items():
        generate(lm, list(prompt[0]), max_new_tokens=a.new_tokens, policy=make())  # warm-up: compile, capture
        policy = make()
        steps = stream(lm, prompt, max_new_tokens=a.profile_tokens + 2, policy=policy)
        next(steps)  # the prefill and the first token, outside the profile (running ahead: step 1 queued too)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            walls = [s.seconds for s in steps]
            torch.cuda.synchronize()
        if runs_ahead(lm, policy):
            walls = walls[1:]  # step 1 ran before the profile (its kernels unseen): its interval is only the read
        kernels = [(e.name, e.device_time) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out[name] = row = step_profile(kernels, walls)
        print(f"{shape} {name}: step {row['step_ms_wall']:.3f} ms wall, {row['kernel_ms']:.3f} ms of kernels "
              f"({row['kernels']:.0f} kernels) a decode step")
        for k in row["by_kernel"][:a.profile_rows]:
            print(f"  {k['us']:9.1f} us {k['calls']:6.1f} x  {k['name'][:150]}")
    return out


def batch_configs(lm: TorchLM, configs: dict, a, batch: int, context: int) -> dict:
    """Every configuration at `batch` rows beside the baseline, paired per repeat as at batch 1, the rows with
    other prompts (so per-row decisions differ): tok/s, speedup, and the bound from what ran (a layer's
    weights are read when any row runs it, a head when any row needs it)."""
    prompts = (np.arange(1, 1 + a.prompt_tokens)[None] + 7 * np.arange(batch)[:, None]) % lm.cfg.vocab_size

    def run(name):
        steps = list(stream(lm, prompts, max_new_tokens=a.new_tokens, policy=configs[name]()))[1:]
        return float(np.mean([st.seconds for st in steps])), [st.executed for st in steps]

    for name in configs:  # warm-up: graphs for this batch size
        run(name)
    per_step, executed = {n: [] for n in configs}, {}
    for rep in range(a.batch_repeats):
        for name in list(configs)[rep % len(configs):] + list(configs)[:rep % len(configs)]:
            seconds, ran = run(name)
            per_step[name].append(seconds)
            executed.setdefault(name, ran)
    out = {}
    for name in configs:
        bound = 1 / structural(lm.cfg, executed[name], context, lm.relative_bytes)["weight_bytes_fraction"]
        sp = paired_speedup(per_step["baseline"], per_step[name])
        out[name] = {"tokens_per_s": batch / float(np.median(per_step[name])), "speedup": sp["median"],
                     "speedup_ci95": sp["ci95"], "bound": bound,
                     "realized_share": realized_share(sp["median"], bound),
                     "row_layer_share": float(np.mean([e.row_layer_share for e in executed[name]]))}
    return out


def measure_mode(shape: str, mode: str, techniques: bool, bw: float, a) -> dict:
    t0 = time.perf_counter()
    lm = random_model(shape, a.dtype, a.device, mode, a.attention)
    wanted = wanted_configs(a)
    chosen = {k: v for k, v in (technique_configs(lm, a) if techniques else {}).items()
              if wanted is None or k in wanted}
    configs = with_run_ahead({"baseline": lambda: StaticPolicy(), **chosen}, a.run_ahead)
    prompt = list(range(1, 1 + a.prompt_tokens))
    for name in configs:  # warm-up: CUDA context, cuBLAS handles, compiled code, captured graphs
        generate(lm, prompt, max_new_tokens=a.new_tokens, policy=configs[name]())
    warm_s = time.perf_counter() - t0
    per_token = {n: [] for n in configs}
    executed: dict = {n: [] for n in configs}
    for rep in range(a.repeats):
        names = list(configs)[rep % len(configs):] + list(configs)[:rep % len(configs)]
        for name in names:
            res = generate(lm, prompt, max_new_tokens=a.new_tokens, policy=configs[name]())
            steps = res.token_latencies_s[1:]
            per_token[name].append(sum(steps) / len(steps))
            if rep == 0:
                executed[name] = res.executed[1:]
    context = a.prompt_tokens + a.new_tokens // 2
    weights, kv = step_bytes(lm.cfg, lm.embed.element_size(), context)
    out = {"warmup_s": warm_s, "configs": {}, "batch": {}}
    for name in configs:
        frac = structural(lm.cfg, executed[name], context, lm.relative_bytes)["weight_bytes_fraction"]
        s = paired_speedup(per_token["baseline"], per_token[name])
        tps, bound = 1 / float(np.median(per_token[name])), 1 / frac
        decisions = [e.head == "common" for e in executed[name]]
        gears = {w: float(np.mean([e.weights == w for e in executed[name]]))
                 for w in (*GEAR_SETS.get(name, ()), "full")}
        out["configs"][name] = {
            "decode_tps": tps, "speedup": s["median"], "speedup_ci95": s["ci95"], "bound": bound,
            "speedup_over_bound": s["median"] / bound,
            "realized_share": realized_share(s["median"], bound),
            "bandwidth_share": tps * (frac * weights + kv) / bw,
            "common_rate": float(np.mean(decisions)) if name.startswith(("router", "stacked")) else None,
            "gear_share": gears if name in GEAR_SETS else None,
            "kernel": packed_kernels(name),
            "row_layer_share": float(np.mean([e.row_layer_share for e in executed[name]]))}
    speedups = {n: c["speedup"] for n, c in out["configs"].items()}
    for name in GEAR_SETS.keys() & out["configs"].keys():
        c = out["configs"][name]
        c["mixed_speedup"] = mixed_speedup(c["gear_share"], speedups)  # its steps at their sets' static speeds
    for batch in a.batches:
        step = batch_step_s(lm, batch, a)
        out["batch"][str(batch)] = {"tokens_per_s": batch / step, "step_ms": step * 1e3,
                                    "bandwidth_share": (weights + batch * kv) / step / bw}
    if techniques:
        out["configs_batch"] = {str(b): batch_configs(lm, configs, a, b, context) for b in a.technique_batches}
    out["graphs_captured"] = len(lm.graphs)
    if lm.cuda_graphs:
        out["anatomy"] = anatomy(lm, a, out["configs"]["baseline"]["decode_tps"])
    del lm
    torch.cuda.empty_cache()
    return out


def tile_choices(tuners: dict) -> dict:
    """{kernel: [{"key": its autotune key, "tile": the config it chose}]} of autotuned kernels (objects with
    Triton's Autotuner `cache`): which tiles win on this device, what a tile list can be pruned to."""
    return {name: [{"key": [str(k) for k in key], "tile": cfg.all_kwargs()} for key, cfg in t.cache.items()]
            for name, t in sorted(tuners.items()) if getattr(t, "cache", None)}


def autotuned_kernels() -> dict:
    """This process's autotuned Triton kernels, by module.name (imported only where CUDA runs them)."""
    from triton.runtime.autotuner import Autotuner

    from .. import gluon_block, triton_block, triton_kernels
    return {f"{m.__name__.rsplit('.', 1)[-1]}.{n}": v for m in (triton_kernels, triton_block, gluon_block)
            for n, v in vars(m).items() if isinstance(v, Autotuner)}


def measure(shape: str, a) -> dict:
    bw = read_bandwidth(a.device)
    cfg = ModelConfig.from_dict(SHAPES[shape])
    weights, _ = step_bytes(cfg, DTYPES[a.dtype].itemsize, 0)
    out = {"shape": shape, "dtype": a.dtype, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "read_bandwidth_gbs": bw / 1e9, "weight_bytes": weights,
           "limit_tps_batch1": bw / weights, "prompt_tokens": a.prompt_tokens,
           "new_tokens": a.new_tokens, "repeats": a.repeats, "attention": a.attention, "run_ahead": a.run_ahead,
           "modes": {}}
    for mode in a.modes:
        techniques = mode in (a.technique_modes or a.modes[-1:]) and not a.baseline_only
        out["modes"][mode] = measure_mode(shape, mode, techniques, bw, a)
        print(json.dumps({shape: {mode: out["modes"][mode]}}), flush=True)
    out["tiles"] = tile_choices(autotuned_kernels())  # every shape so far: the keys hold N and K
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cuda_techniques", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama3-8b"], choices=list(SHAPES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                    help="decode modes; the techniques run in the last one")
    ap.add_argument("--technique-modes", nargs="+", choices=list(MODES),
                    help="modes the techniques run in (default: the last of --modes)")
    ap.add_argument("--baseline-only", action="store_true")
    ap.add_argument("--configs", nargs="+", help="technique configurations to run beside the baseline (default: all)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--common-rate", type=float, default=0.47, help="share of steps on the common head")
    ap.add_argument("--common-share", type=float, default=0.052, help="common ids as a share of the vocab")
    ap.add_argument("--gate-rate", type=float, default=0.5, help="share of steps the token gate skips its set")
    ap.add_argument("--packed", nargs="*", default=["int8", "int4"], choices=list(PACKED),
                    help="packed weight sets measured as configurations (quant_cuda kernels)")
    ap.add_argument("--group-size", type=int, default=32, help="int4 group size (the pipeline's default)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--batch-repeats", type=int, default=3)
    ap.add_argument("--technique-batches", type=int, nargs="*", default=[],
                    help="batch sizes at which every configuration is also timed beside the baseline (paired)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", action="store_true",
                    help="print the kernels of a compiled step per shape (with --configs: wall vs kernel time of each)")
    ap.add_argument("--attention", default="kernel", choices=["sdpa", "kernel"],
                    help="CUDA decode attention: the Triton kernel (the backend's default), or RoPE, cache writes "
                         "and SDPA as ops")
    ap.add_argument("--profile-rows", type=int, default=25, help="kernels --profile lists (by total time)")
    ap.add_argument("--profile-tokens", type=int, default=16, help="decode steps --profile --configs records")
    ap.add_argument("--long-cache", type=int, default=0,
                    help="anatomy: also time the baseline's blocks on a static cache of this many slots (0: no)")
    ap.add_argument("--run-ahead", default="on", choices=["on", "off", "both"],
                    help="generation queues a static plan's next step before reading its token (on, as the "
                         "pipeline runs), reads each token first (off), or both side by side (NAME/behind rows)")
    return ap


def _check(a) -> None:
    known = {*a.packed, *OTHER_CONFIGS, *GEAR_SETS}
    if a.configs and not set(a.configs) <= known:
        raise UserError(f"cuda_techniques: unknown configs {sorted(set(a.configs) - known)} (known: {sorted(known)})")
    if a.long_cache and a.long_cache <= a.prompt_tokens:
        raise UserError(f"cuda_techniques: --long-cache {a.long_cache} cannot hold the {a.prompt_tokens}-token prompt "
                        "and a token")
    if not torch.cuda.is_available():
        raise UserError("cuda_techniques: no CUDA device here (torch.cuda.is_available() is False)")


# gpu_bench params -> this script's options (lists as nargs values)
OPTIONS = {"shapes": "--shapes", "modes": "--modes", "configs": "--configs", "packed": "--packed",
           "batches": "--batches", "technique_batches": "--technique-batches", "repeats": "--repeats",
           "attention": "--attention", "new_tokens": "--new-tokens"}


def argv(params: dict) -> list[str]:
    """The command-line options of a gpu_bench params section."""
    out = []
    for key, opt in OPTIONS.items():
        if key in params:
            v = params[key]
            out += [opt, *map(str, v)] if isinstance(v, list) else [opt, str(v)]
    return out


def build(params: dict, out_dir: Path) -> dict:
    """The gpu_bench stage: the measurement of main() for params' shapes and configurations, written as
    results.json (the list main's --out writes) with a manifest. Random weights: no inputs."""
    a = parser().parse_args(argv(params))
    _check(a)
    results = [measure(shape, a) for shape in a.shapes]
    with atomic.output_dir(out_dir) as tmp:
        atomic.write_json(tmp / "results.json", results)
        return manifest.write(tmp, stage="gpu_bench", inputs={}, params=params,
                              outputs={"device": results[0]["device"], "shapes": a.shapes})


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    try:
        _check(a)
    except UserError as e:
        sys.exit(str(e))
    if a.profile:
        profiles = {}
        for shape in a.shapes:
            if a.configs:
                profiles[shape] = profile_configs(shape, a)
            else:
                profile(shape, a)
        if a.out and profiles:  # --configs: the per-step kernel budgets as JSON
            a.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "attention": a.attention, "profile_tokens": a.profile_tokens,
                                         "shapes": profiles}, indent=1) + "\n")
        return
    results = []
    for shape in a.shapes:
        results.append(measure(shape, a))
        if a.out:  # written after each shape: a run cut short keeps what it measured
            a.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
