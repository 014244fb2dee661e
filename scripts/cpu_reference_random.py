"""Our torch CPU decode against transformers.generate on a random-weight model of the embedded model's shape
(SmolLM2-135M: decode speed depends on shapes, not weights), for a machine that has no copy of the embedded
model: what `adaptive-inference benchmark-reference --backend torch` measures (bench.reference.measure: per
prompt, ours and generate back to back, order alternating; paired median with its 95% interval).

    taskset -c 0,1 python scripts/cpu_reference_random.py --threads 2 --out reference_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from adaptive_inference import torch_kernels
from adaptive_inference.bench import bandwidth, reference
from adaptive_inference.torch_backend import TorchLM

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, SMOLLM2_135M["vocab_size"], a.prompt_tokens).tolist() for _ in range(a.prompts)]
    read = bandwidth.Reader(threads=a.threads)
    gbs = [read()]
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(tmp)
        lm = TorchLM.load(tmp, dtype="float32")
        p = {"dtype": "float32", "decode": {"new_tokens": a.new_tokens, "warmup": 1, "repeats": a.repeats}}
        res = reference.measure(lm, {"prompts": prompts}, Path(tmp), p)
    gbs.append(read())
    weight_bytes = sum(t.numel() * t.element_size() for t in [lm.embed, lm.norm, *[getattr(lw, f.name) for lw in lm.layers
                       for f in dataclasses.fields(lw) if getattr(lw, f.name) is not None]])
    limit = max(gbs) * 1e9 / weight_bytes  # tok/s if every weight byte were read once per token at that bandwidth
    out = {"cpu": cpu_name(), "threads": a.threads, "torch": torch.__version__, "cpu_capability":
           torch.backends.cpu.get_cpu_capability(), "decode_matmul": lm.matmul_name, "dense_layout": torch_kernels.layout,
           "shape": "smollm2-135m", "read_gbs_before_after": gbs, "weight_bytes": weight_bytes,
           "bandwidth_limit_tps": limit, "ours_share_of_limit": res["ours_decode_tps"]["median"] / limit,
           "reference_share_of_limit": res["decode_tps"]["median"] / limit,
           **{k: v for k, v in res.items() if k != "per_token_s"}}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
