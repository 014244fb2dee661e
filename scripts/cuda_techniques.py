"""Router, lobotomy, layer skip and a token gate on a CUDA GPU: decode speedup against the structural
bound, torch backend (packed int8 / int4 weights have CPU kernels only: gears are not measured here).

The GPU host has no model hub and no copy of the embedded model, so this builds models of a given
shape with random weights (decode speed depends on shapes, not values) and applies the techniques
at set rates: the lobotomy cut of the pipeline (MLPs 16 and 25 of 30, scaled to the layer count) and
a gated head with a common set of the pipeline's size (5.2% of the vocab) taking a set share of the
steps (a trained router's decisions on random weights would mean nothing); the category map's global
25% skip set (layers 12-14, 16-18, 25, 26 of 30, scaled); a token gate that skips that set on a set share of
the steps, writing the skipped layers' K/V (the token router's default policy; its decision needs the
residual on the host, one sync per step, as the real router). Timing is paired per repeat
as in the benchmark stage (bench.stats.paired_speedup); the bound comes from what the decoder executed
(cost.structural).

    python scripts/cuda_techniques.py [--shapes smollm2-135m llama-1b] [--dtype bfloat16] [--common-rate 0.47] [--compile]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from adaptive_inference.bench.stats import paired_speedup  # noqa: E402
from adaptive_inference.cost import structural  # noqa: E402
from adaptive_inference.generation import generate  # noqa: E402
from adaptive_inference.plan import GateDecision, StaticPolicy, StepPlan  # noqa: E402
from adaptive_inference.prepare_model import clean_config  # noqa: E402
from adaptive_inference.torch_backend import TorchLM  # noqa: E402
from adaptive_inference.techniques.vocab_router.head import GatedHead  # noqa: E402

SHAPES = {  # Llama-architecture shapes: the embedded default and a 1B model with a 128k vocabulary
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}


class RatePolicy:
    """The gated head on every step, forced to the common head on `rate` of them (spread evenly); the
    router runs on every step as it would for real."""

    static = False

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


class GatePolicy(StaticPolicy):
    static = False

    def __init__(self, gate: RateGate):
        super().__init__(StepPlan(gate=gate))


def build(shape: str, dtype: str, device: str, compile: bool = False) -> TorchLM:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape], rope_theta=100000.0)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        (Path(d) / "config.json").write_text(json.dumps(clean_config(hf.config.to_dict(), "float32")))
        return TorchLM.load(d, device=device, dtype=dtype, compile=compile)


def heads(lm: TorchLM, common_share: float) -> tuple[GatedHead, GatedHead]:
    rng = np.random.default_rng(0)
    H, V = lm.cfg.hidden_size, lm.cfg.vocab_size
    ids = np.sort(rng.choice(V, int(common_share * V), replace=False)).astype(np.int64)
    w = dict(w1=rng.normal(size=(256, H)).astype(np.float32) * 0.05, b1=np.zeros(256, np.float32),
             w2=rng.normal(size=(1, 256)).astype(np.float32) * 0.05, b2=np.zeros(1, np.float32))
    shared: dict = {}  # both share the converted weights, as one head would
    return GatedHead(ids, **w, threshold=2.0, _arrays=shared), GatedHead(ids, **w, threshold=-1.0, _arrays=shared)


def measure(shape: str, a) -> dict:
    lm = build(shape, a.dtype, a.device, a.compile)
    L = lm.cfg.num_hidden_layers
    cut = frozenset(round(i * L / 30) for i in (16, 25))
    skip = frozenset(round(i * L / 30) for i in (12, 13, 14, 16, 17, 18, 25, 26))
    common, full = heads(lm, a.common_share)
    configs = {"baseline": lambda: StaticPolicy(), "lobotomy": lambda: StaticPolicy(StepPlan(zero_mlp=cut)),
               "router": lambda: RatePolicy(common, full, a.common_rate),
               "stacked": lambda: RatePolicy(common, full, a.common_rate, cut),
               "router_all_common": lambda: RatePolicy(common, full, 1.0),
               "skip-25": lambda: StaticPolicy(StepPlan(skip_layers=skip)),
               "token-gate": lambda: GatePolicy(RateGate(skip, L, a.gate_rate))}
    prompt = list(range(1, 1 + a.prompt_tokens))
    for name in configs:  # warm-up (and CUDA context, cuBLAS handles)
        generate(lm, prompt, max_new_tokens=a.new_tokens, policy=configs[name]())
    per_token = {n: [] for n in configs}
    executed: dict = {n: [] for n in configs}
    for rep in range(a.repeats):
        names = list(configs)[rep % len(configs):] + list(configs)[:rep % len(configs)]
        for name in names:
            pol = configs[name]()
            res = generate(lm, prompt, max_new_tokens=a.new_tokens, policy=pol)
            steps = res.token_latencies_s[1:]
            per_token[name].append(sum(steps) / len(steps))
            if rep == 0:
                executed[name] = res.executed[1:]
    context = a.prompt_tokens + a.new_tokens // 2
    out = {"shape": shape, "skip_set": sorted(skip), "gate_rate": a.gate_rate, "dtype": a.dtype, "compiled_decode": a.compile, "device": torch.cuda.get_device_name() if a.device == "cuda" else a.device, "lobotomy_cut": sorted(cut),
           "common_ids": len(common.common_ids), "configs": {}}
    for name in configs:
        decisions = [e.head == "common" for e in executed[name]]
        frac = structural(lm.cfg, executed[name], context)["weight_bytes_fraction"]
        s = paired_speedup(per_token["baseline"], per_token[name])
        bound = 1 / frac
        out["configs"][name] = {
            "decode_tps": 1 / float(np.median(per_token[name])), "speedup": s["median"], "speedup_ci95": s["ci95"],
            "bound": bound, "speedup_over_bound": s["median"] / bound,
            "realized_share": (s["median"] - 1) / (bound - 1) if bound > 1.0001 else None,
            "common_rate": float(np.mean(decisions)) if decisions else None}
    del lm
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--common-rate", type=float, default=0.47, help="share of steps on the common head")
    ap.add_argument("--common-share", type=float, default=0.052, help="common ids as a share of the vocab")
    ap.add_argument("--gate-rate", type=float, default=0.5, help="share of steps the token gate skips its set")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda", help="cpu for a smoke run")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step of gate-free plans")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("cuda_techniques: no CUDA device")
    results = [measure(s, a) for s in a.shapes]
    text = json.dumps(results, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
