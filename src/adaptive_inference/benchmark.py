"""benchmark: speed and quality of every configuration on every backend, on the eval split only.

Each (backend, configuration) is measured in a fresh process, so peak memory and library state
(MLX's BLAS preload, torch threads) belong to that measurement alone. Speedups are against the
baseline of the same backend in the same run, beside the structural bound of the plans that ran.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import multiprocessing
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from . import atomic, cost, manifest, metrics, techniques
from .backends import load_backend
from .errors import UserError
from .generation import generate, generate_batch, teacher_forced
from .hidden_cache import read_split
from .model_config import ModelConfig

GSM8K_INSTRUCTION = "Solve the problem. End your reply with 'The answer is N.' where N is a number."


# ---- data (parent process) ---------------------------------------------------------------

def prepare_data(params: dict, model_dir: Path, corpus_dir: Path) -> dict:
    """Token ids for quality, decode timing and GSM8K, all from the eval split."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = read_split(corpus_dir, "eval")
    q = params["quality"]
    texts = rows[: q["max_texts"]] if q["max_texts"] else rows
    enc = lambda t, n: tok(t, add_special_tokens=False, truncation=True, max_length=n)["input_ids"]  # noqa: E731
    eval_ids = [ids for ids in (enc(r["text"], q["seq_len"]) for r in texts) if len(ids) >= 2]
    d = params["decode"]
    long_enough = [ids for ids in (enc(r["text"], d["prompt_tokens"]) for r in rows)
                   if len(ids) == d["prompt_tokens"]]
    if not eval_ids or not long_enough:
        raise UserError(f"eval split has no text of {d['prompt_tokens']} tokens (benchmark.decode.prompt_tokens)")
    gsm = [r for r in rows if r.get("source", "").startswith("gsm8k") and "answer" in r]
    gsm8k = []
    for r in gsm[: params["gsm8k"]["samples"]]:
        msgs = [{"role": "user", "content": f"{r['question']}\n{GSM8K_INSTRUCTION}"}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        gsm8k.append({"prompt": list(ids), "answer": r["answer"]})
    cfg = ModelConfig.from_dir(model_dir)
    return {
        "eval_ids": eval_ids,
        "decode_prompts": long_enough,
        "gsm8k": gsm8k,
        "stop_ids": sorted({*cfg.eos_token_ids, *([tok.eos_token_id] if tok.eos_token_id is not None else [])}),
    }


# ---- measurement helpers (child process) -------------------------------------------------

def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": [round(v, 4) for v in values]}


def peak_memory_mb(lm) -> float:
    if lm.name == "torch" and lm.device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def quality(lm, data: dict, policies: dict) -> dict[str, tuple[dict, list[list[int]]]]:
    """Teacher-forced quality of every configuration against this backend's baseline, text by text (the
    baseline logits are computed once per text); a per-token policy is followed token by token."""
    parts, top1s = {n: [] for n in policies}, {n: [] for n in policies}
    for ids in data["eval_ids"]:
        base = lm.logits(ids)
        base_logp = metrics.log_softmax(base)
        for name, new_policy in policies.items():
            policy = new_policy()
            full = getattr(policy, "static", False) and policy.plan(0).is_full
            logits = base if full else teacher_forced(lm, ids, policy)[0]
            parts[name].append(metrics.compare(logits, base_logp, ids))
            top1s[name].append(logits.argmax(-1).tolist())
    return {n: (metrics.summarize(parts[n]), top1s[n]) for n in policies}


def gsm8k_accuracy(lm, data: dict, new_policy, max_new_tokens: int, tokenizer) -> dict:
    if not data["gsm8k"]:
        return {}
    correct = 0
    for item in data["gsm8k"]:
        res = generate(lm, item["prompt"], max_new_tokens=max_new_tokens, policy=new_policy(),
                       stop_ids=data["stop_ids"])
        numbers = re.findall(r"-?\d[\d,]*\.?\d*", tokenizer.decode(res.tokens))
        got = numbers[-1].replace(",", "").rstrip(".") if numbers else None
        correct += got is not None and float(got) == float(item["answer"])
    return {"gsm8k_accuracy": correct / len(data["gsm8k"]), "gsm8k_n": len(data["gsm8k"])}


def _rotated(names: list[str], k: int) -> list[str]:
    k %= len(names)
    return names[k:] + names[:k]


def paired_speedup(base_s: list[float], config_s: list[float], *, resamples: int = 2000) -> dict:
    """Speedup from paired timings (seconds per token of the same prompt, back to back): the median of
    base/config over pairs, with a 95% bootstrap interval of that median. Pairing cancels the drift of a
    shared machine that separate medians of two configurations would absorb."""
    r = np.asarray(base_s) / np.asarray(config_s)
    boot = np.median(np.random.default_rng(0).choice(r, (resamples, r.size)), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median": float(np.median(r)), "ci95": [float(lo), float(hi)], "pairs": int(r.size)}


def decode_speed(lm, data: dict, policies: dict, p: dict, reference=None) -> tuple[dict, dict | None]:
    """Greedy decode of the eval prompts. For each repeat and prompt, every configuration (and the library's
    own generate) runs back to back in a rotated order, so each gets a baseline run of the same prompt
    under the same machine state to be paired with (see paired_speedup)."""
    n = p["decode"]["new_tokens"]
    prompts = data["decode_prompts"][: p["decode"]["prompts"]]
    names = list(policies) + (["reference"] if reference else [])
    for _ in range(p["decode"]["warmup"]):
        for name in policies:
            generate(lm, prompts[0], max_new_tokens=n, policy=policies[name]())
        if reference:
            reference.run(prompts[:1], n)
    acc = {name: {"prefill": [], "latencies": [], "per_token": [], "executed": [], "greedy": []}
           for name in names}
    for rep in range(p["decode"]["repeats"]):
        for i, prompt in enumerate(prompts):
            for name in _rotated(names, rep * len(prompts) + i):
                a = acc[name]
                if name == "reference":
                    a["per_token"].append(1 / reference.run([prompt], n))
                    continue
                r = generate(lm, prompt, max_new_tokens=n, policy=policies[name]())
                a["executed"] += r.executed[1:]  # decode steps only
                steps = r.token_latencies_s[1:]
                a["per_token"].append(sum(steps) / len(steps))
                a["prefill"].append((r.prompt_tokens, r.prefill_s))
                a["latencies"] += steps
                if rep == 0:
                    a["greedy"].append(r.tokens)
    k = len(prompts)
    per_repeat_tps = lambda per_token: spread([k / sum(per_token[j:j + k])  # noqa: E731
                                               for j in range(0, len(per_token), k)])
    base = acc["baseline"]["per_token"]
    out = {}
    for name in policies:
        a = acc[name]
        lat = np.array(a["latencies"]) * 1e3
        pre = [a["prefill"][j:j + k] for j in range(0, len(a["prefill"]), k)]
        speed = {"prefill_tps": spread([sum(t for t, _ in rep) / sum(s for _, s in rep) for rep in pre]),
                 "decode_tps": per_repeat_tps(a["per_token"]),
                 "paired_speedup": paired_speedup(base, a["per_token"]),
                 "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95))}}
        heads = cost.head_usage(a["executed"])
        if set(heads) != {"full"}:
            speed["head_usage"] = heads
            speed["common_head_rate"] = heads.get("common", 0.0)
        out[name] = {"speed": speed, "executed": a["executed"], "greedy": a["greedy"]}
    reference_result = None
    if reference:
        ref = acc["reference"]["per_token"]
        reference_result = {"backend": lm.name, "impl": reference.impl, "decode_tps": per_repeat_tps(ref),
                            "paired_ours_over_reference": paired_speedup(ref, base)}
    return out, reference_result


def batch_speed(lm, data: dict, policies: dict, p: dict) -> dict[str, list[dict]]:
    """Batched greedy throughput (generated tokens / wall time, prefill included), configurations
    round-robin per repeat like decode_speed."""
    pool, n = data["decode_prompts"], p["batch"]["new_tokens"]
    values = {(name, bs): [] for name in policies for bs in p["batch"]["sizes"]}
    for rep in range(1 + p["batch"]["repeats"]):  # the first round is the warm-up
        for bs in p["batch"]["sizes"]:
            prompt = np.array([pool[i % len(pool)] for i in range(bs)])
            for name in _rotated(list(policies), rep):
                t0 = time.perf_counter()
                generate_batch(lm, prompt, max_new_tokens=n, policy=policies[name]())
                if rep:
                    values[name, bs].append(bs * n / (time.perf_counter() - t0))
    return {name: [{"batch_size": bs, "tps": spread(values[name, bs])} for bs in p["batch"]["sizes"]]
            for name in policies}


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

        from .torch_backend import DTYPES, default_device

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
        from .blas import import_mlx

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


def memory_probe(job: dict) -> float:
    """Peak memory of a process that only loads the model and runs one decode and the largest batch."""
    p, data = job["params"], job["data"]
    lm = load_backend(job["backend"], Path(job["model_dir"]), p["dtype"])
    artifacts = [Path(a) for a in job["artifacts"]]
    policy = lambda: techniques.make_policy(job["techniques"], artifacts, lm.cfg)  # noqa: E731
    generate(lm, data["decode_prompts"][0], max_new_tokens=p["decode"]["new_tokens"], policy=policy())
    bs = max(p["batch"]["sizes"])
    pool = data["decode_prompts"]
    generate_batch(lm, np.array([pool[i % len(pool)] for i in range(bs)]), max_new_tokens=p["batch"]["new_tokens"],
                   policy=policy())
    return peak_memory_mb(lm)


class _Phases:
    """Runs a phase and logs its wall time to stderr, so a user sees where a long benchmark goes."""

    def __init__(self, backend: str):
        self.backend = backend

    def __call__(self, what: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        print(f"benchmark: {self.backend}: {what} {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        return out


def measure(job: dict) -> dict:
    """Every configuration on one backend, in one process, timed round-robin."""
    from transformers import AutoTokenizer

    p, data = job["params"], job["data"]
    lm = load_backend(job["backend"], Path(job["model_dir"]), p["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    artifacts = [Path(a) for a in job["artifacts"]]
    policies = {name: (lambda t=tuple(spec["techniques"]): techniques.make_policy(list(t), artifacts, lm.cfg))
                for name, spec in p["configs"].items()}
    reference = REFERENCES[job["backend"]](Path(job["model_dir"]), p["dtype"]) if p["reference"] else None
    clock = _Phases(job["backend"])
    decode, ref = clock("decode", decode_speed, lm, data, policies, p, reference)
    del reference
    batch = clock("batch", batch_speed, lm, data, policies, p)
    qual = clock("quality", quality, lm, data, policies)
    context = len(data["decode_prompts"][0]) + p["decode"]["new_tokens"] // 2
    runs, extra = {}, {"top1": {}, "greedy": {}}
    for name, spec in p["configs"].items():
        d = decode[name]
        q = dict(qual[name][0])
        q.update(clock(f"gsm8k {name}", gsm8k_accuracy, lm, data, policies[name], p["gsm8k"]["max_new_tokens"],
                       tokenizer))
        runs[name] = {"backend": job["backend"], "device": getattr(lm, "device", "cpu"), "config": name,
                      "techniques": spec["techniques"], "speed": {**d["speed"], "batch": batch[name]}, "quality": q,
                      "structural": cost.structural(lm.cfg, d["executed"], context)}
        extra["top1"][name], extra["greedy"][name] = qual[name][1], d["greedy"]
    if job["backend"] == "mlx":
        from .blas import blas_info

        extra["blas"] = blas_info()
    return {"runs": runs, "reference": ref, **extra}


def _in_fresh_process(fn, job: dict):
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, job).result()


# ---- the stage ---------------------------------------------------------------------------

def agreement(by_backend: dict[str, dict]) -> dict:
    """Torch vs MLX on one configuration: teacher-forced top-1 and greedy continuations."""
    if not {"torch", "mlx"} <= set(by_backend):
        return {}
    t, m = by_backend["torch"], by_backend["mlx"]
    same = [np.array(a) == np.array(b) for a, b in zip(t["top1"], m["top1"], strict=True)]
    greedy = sum(a == b for a, b in zip(t["greedy"], m["greedy"], strict=True))
    return {"torch_vs_mlx_top1": float(np.concatenate(same).mean()), "tokens": int(sum(map(len, same))),
            "greedy_identical": int(greedy), "greedy_prompts": len(t["greedy"])}


def _decode_weight_bytes(model_dir: Path, dtype: str) -> int:
    wb = ModelConfig.from_dir(model_dir).weight_bytes(4 if dtype == "float32" else 2)
    return wb["layers"] + wb["lm_head"]


def build(params: dict, model_dir: Path, corpus_dir: Path, out_dir: Path, *, artifacts: list[Path]) -> dict:
    """Measure every configuration x backend; write results.json and the manifest."""
    model_m = manifest.verify(model_dir, stage="prepare_model")
    manifest.verify(corpus_dir, stage="build_corpus")
    for a in artifacts:
        manifest.verify(a)
    techniques.check(params["configs"])
    if "baseline" not in params["configs"] or params["configs"]["baseline"]["techniques"]:
        raise UserError("benchmark.configs: a 'baseline' configuration with no techniques is required")
    data = prepare_data(params, model_dir, corpus_dir)
    runs, per_backend, references, blas = [], {}, [], {}
    for backend in params["backends"]:
        print(f"benchmark: {backend}: {', '.join(params['configs'])}", file=sys.stderr, flush=True)
        job = {"backend": backend, "model_dir": str(model_dir), "artifacts": [str(a) for a in artifacts],
               "params": params, "data": data}
        out = per_backend[backend] = _in_fresh_process(measure, job)
        for name, spec in params["configs"].items():
            out["runs"][name]["speed"]["peak_rss_mb"] = _in_fresh_process(
                memory_probe, {**job, "techniques": spec["techniques"]})
            runs.append(out["runs"][name])
        blas.update(out.get("blas", {}))
        if out["reference"]:
            references.append(out["reference"])
    for r in runs:  # paired per prompt and repeat (see paired_speedup); the baseline pairs with itself: 1
        r["speedup_vs_baseline"] = r["speed"]["paired_speedup"]["median"]
        r["speedup_ci95"] = r["speed"]["paired_speedup"]["ci95"]
    for ref in references:
        ref["ours_over_reference"] = ref["paired_ours_over_reference"]["median"]
        ref["ours_over_reference_ci95"] = ref["paired_ours_over_reference"]["ci95"]
    model_out = model_m["outputs"]
    by_config = {name: agreement({b: {"top1": o["top1"][name], "greedy": o["greedy"][name]}
                                  for b, o in per_backend.items()}) for name in params["configs"]}
    results = {
        "model": {"name": model_out.get("name"), "params": model_out.get("params"),
                  "num_layers": model_out.get("num_layers"),
                  "weight_bytes": _decode_weight_bytes(model_dir, params["dtype"])},
        "environment": {"cpu": platform.processor() or platform.machine(), "platform": platform.platform(),
                        "blas": blas},
        "runs": runs,
        "references": references,
        "agreement": by_config["baseline"],
        "agreement_by_config": by_config,
    }
    with atomic.output_dir(out_dir) as tmp:
        atomic.write_json(tmp / "results.json", results)
        inputs = {"model": model_dir, "corpus": corpus_dir, **{f"artifact_{a.name}": a for a in artifacts}}
        return manifest.write(tmp, stage="benchmark", inputs=inputs, params=params,
                              outputs={"runs": len(runs), "agreement": results["agreement"]})
