"""Check the torch backend on a CUDA device: logits vs transformers on a random Llama, and greedy
decode speed of our loop vs transformers.generate on the same weights (needs no hub, no data).

    python scripts/cuda_check.py [--layers 16 --hidden 2048 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from adaptive_inference.generation import generate  # noqa: E402
from adaptive_inference.prepare_model import clean_config  # noqa: E402
from adaptive_inference.torch_backend import TorchLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    dev = "cuda"
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.hidden * 4, num_hidden_layers=a.layers,
                      num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 256, vocab_size=32000,
                      rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        (Path(d) / "config.json").write_text(json.dumps(clean_config(hf.config.to_dict(), "float32")))
        lm32 = TorchLM.load(d, device=dev, dtype="float32")
        lm = TorchLM.load(d, device=dev, dtype=a.dtype)
    hf = hf.to(dev)
    ids = list(range(1, 129))
    with torch.inference_mode():
        ref = hf(torch.tensor([ids], device=dev)).logits[0].float().cpu().numpy()
    ours = lm32.logits(ids)
    out = {"device": torch.cuda.get_device_name(), "max_abs_diff_fp32": float(np.abs(ref - ours).max()),
           "top1_agreement_fp32": float((ref.argmax(-1) == ours.argmax(-1)).mean())}
    del lm32
    hf = hf.to(getattr(torch, a.dtype))
    prompt, n = ids[:64], a.new_tokens
    for _ in range(2):
        res = generate(lm, prompt, max_new_tokens=n)
    ours_tps = [generate(lm, prompt, max_new_tokens=n).decode_tps for _ in range(3)]

    def timed(k):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(torch.tensor([prompt], device=dev), max_new_tokens=k, min_new_tokens=k, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(n)
    ref_tps = [(n - 1) / (timed(n) - timed(1)) for _ in range(3)]
    with torch.inference_mode():
        greedy = hf.generate(torch.tensor([prompt], device=dev), max_new_tokens=16, do_sample=False)[0, 64:].tolist()
    out.update(dtype=a.dtype, params_m=round(sum(p.numel() for p in hf.parameters()) / 1e6),
               ours_decode_tps=float(np.median(ours_tps)), transformers_decode_tps=float(np.median(ref_tps)),
               greedy_identical_16=generate(lm, prompt, max_new_tokens=16).tokens == greedy,
               first_run_tokens=len(res.tokens))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
