"""The library-reference job of a backend: the library's own generate on the same weights and prompts,
paired per prompt with our baseline decode (transformers.generate for torch, mlx_lm for MLX)."""

from __future__ import annotations

import abc
import time
from pathlib import Path

from ..generation import generate
from .measure import WARMUP_TOKENS
from .stats import paired_speedup, spread


class Reference(abc.ABC):
    """A library's own generate on the same weights and prompts, timed like ours: n tokens always
    (no stop at EOS), decode tok/s = (n - 1) / (time(n tokens) - time(1 token)) by wall clock."""

    impl = ""

    @abc.abstractmethod
    def _timed(self, prompt: list[int], k: int) -> float:
        """Seconds to generate exactly k tokens after `prompt`."""

    def run(self, prompts: list[list[int]], n: int) -> float:
        first = sum(self._timed(p, 1) for p in prompts)
        total = sum(self._timed(p, n) for p in prompts)
        return len(prompts) * (n - 1) / (total - first)


class TransformersReference(Reference):
    impl = "transformers.generate"

    def __init__(self, model_dir: Path, dtype: str):
        from transformers import AutoModelForCausalLM

        from ..torch_backend import DTYPES, default_device

        self.device = default_device()
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype]).to(self.device).eval()

    def _timed(self, prompt: list[int], k: int) -> float:
        import torch

        ids = torch.tensor([prompt], device=self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


class MlxLmReference(Reference):
    """mlx_lm's generate_step (what mlx_lm.generate runs). Its self-reported generation_tps is not
    used: stream_generate stops at EOS and counts n+1 tokens over n steps."""

    impl = "mlx_lm.generate_step"

    def __init__(self, model_dir: Path, dtype: str):
        from ..blas import import_mlx

        self.mx = import_mlx()
        from mlx_lm import load

        self.model, _ = load(str(model_dir))

    def _timed(self, prompt: list[int], k: int) -> float:
        from mlx_lm.generate import generate_step

        t0 = time.perf_counter()
        for _ in zip(range(k), generate_step(self.mx.array(prompt), self.model, max_tokens=k), strict=False):
            pass
        self.mx.synchronize()
        return time.perf_counter() - t0


REFERENCES = {"torch": TransformersReference, "mlx": MlxLmReference}


def measure(lm, data: dict, model_dir: Path, p: dict) -> dict:
    """Per (repeat, prompt): our baseline and the reference back to back (order alternating)."""
    ref = REFERENCES[lm.name](Path(model_dir), p["dtype"])
    n, prompts = p["decode"]["new_tokens"], data["prompts"]
    for _ in range(p["decode"]["warmup"]):
        generate(lm, prompts[0], max_new_tokens=min(n, WARMUP_TOKENS))
        ref.run(prompts[:1], min(n, WARMUP_TOKENS))
    ours, theirs = [], []
    for rep in range(p["decode"]["repeats"]):
        for i, prompt in enumerate(prompts):
            for who in (("ours", "ref") if (rep + i) % 2 == 0 else ("ref", "ours")):
                if who == "ours":
                    steps = generate(lm, prompt, max_new_tokens=n).token_latencies_s[1:]
                    ours.append(sum(steps) / len(steps))
                else:
                    theirs.append(1 / ref.run([prompt], n))
    k = len(prompts)
    per_rep = lambda s: spread([k / sum(s[j:j + k]) for j in range(0, len(s), k)])  # noqa: E731
    return {"backend": lm.name, "impl": ref.impl, "decode_tps": per_rep(theirs), "ours_decode_tps": per_rep(ours),
            "paired_ours_over_reference": paired_speedup(theirs, ours), "per_token_s": {"ours": ours,
                                                                                     "reference": theirs}}
