"""The benchmark stages: `benchmark` measures one (backend, configuration) job against the baseline of
the same backend in one process; `benchmark-reference` pairs our baseline with the library's generate.
Each writes results.json + MANIFEST.json into its own folder; the report collects them."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .. import atomic, manifest, techniques
from ..backends import load_backend
from ..errors import UserError
from ..model_config import ModelConfig
from ..plan import StaticPolicy
from . import bandwidth, measure, reference
from .data import prepare
from .jobs import config_backends, job_params

RESULTS = "results.json"


def _phase(what: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    print(f"benchmark: {what} {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def _environment(lm) -> dict:
    env = {"cpu": platform.processor() or platform.machine(), "platform": platform.platform(),
           "threads": _threads(lm), "device": str(lm.device)}
    if lm.name == "torch":
        env["decode_matmul"], env["compiled_decode"], env["cuda_graphs"] = lm.matmul_name, lm.compile, lm.cuda_graphs
        if str(lm.device).startswith("cuda"):
            import torch

            env["gpu"], env["cuda_block_ops"] = torch.cuda.get_device_name(lm.device), lm.cuda_block_ops
    if lm.name == "mlx":
        from ..blas import blas_info

        env["decode_matmul"], env["blas"] = lm.matmul_name, blas_info()
    return env


def _threads(lm) -> int:
    if lm.name == "torch":
        import torch

        return torch.get_num_threads()
    return os.cpu_count() or 1


def _memory_probe(job: dict) -> dict:
    """Peak memory of a fresh process that loads the model and runs one decode and the largest batch."""
    p = job["params"]
    lm = load_backend(job["backend"], Path(job["model"]), p["dtype"], runtime=p["runtime"])
    specs = p["config"]["techniques"]
    new = lambda: techniques.make_policy(specs, [Path(a) for a in job["artifacts"]], lm.cfg)  # noqa: E731
    from ..generation import generate, generate_batch

    generate(lm, job["prompts"][0], max_new_tokens=p["decode"]["new_tokens"], policy=new())
    bs = max(p["batch"]["sizes"])
    generate_batch(lm, np.array([job["prompts"][i % len(job["prompts"])] for i in range(bs)]),
                   max_new_tokens=p["batch"]["new_tokens"], policy=new())
    return measure.peak_memory_mb(lm)


def _in_fresh_process(fn, job: dict):
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, job).result()


def _check(params: dict, backend: str, model_dir: Path, corpus_dir: Path, artifacts: list[Path]) -> dict:
    if backend not in params["backends"]:
        raise UserError(f"backend {backend!r} is not in benchmark.backends ({', '.join(params['backends'])})")
    model_m = manifest.verify(model_dir, stage="prepare_model")
    manifest.verify(corpus_dir, stage="build_corpus")
    for a in artifacts:
        manifest.verify(a)
    return model_m


def _model(model_m: dict, model_dir: Path, dtype: str) -> dict:
    wb = ModelConfig.from_dir(model_dir).weight_bytes(4 if dtype == "float32" else 2)
    out = model_m["outputs"]
    return {"name": out.get("name"), "params": out.get("params"), "num_layers": out.get("num_layers"),
            "weight_bytes": wb["layers"] + wb["lm_head"]}


def build(params: dict, backend: str, config: str, model_dir: Path, corpus_dir: Path, artifacts: list[Path],
          out_dir: Path) -> dict:
    """One (backend, configuration) job: decode paired with the baseline, batch throughput, quality against
    the baseline, GSM8K (on params' gsm8k.backends), structural bound, peak memory."""
    if config not in params["configs"]:
        raise UserError(f"unknown configuration {config!r} (benchmark.configs: {', '.join(params['configs'])})")
    if "baseline" not in params["configs"] or params["configs"]["baseline"]["techniques"]:
        raise UserError("benchmark.configs: a 'baseline' configuration with no techniques is required")
    model_m = _check(params, backend, model_dir, corpus_dir, artifacts)
    if backend not in config_backends(params, config):
        raise UserError(f"configuration {config!r} runs on {', '.join(config_backends(params, config))} only "
                        f"(benchmark.configs.{config}.backends)")
    specs = params["configs"][config]["techniques"]
    techniques.check({config: {"techniques": specs}})
    p = job_params(params, config)
    lm = load_backend(backend, model_dir, p["dtype"], runtime=p["runtime"])
    new_config = lambda: techniques.make_policy(specs, artifacts, lm.cfg)  # noqa: E731
    new_config()  # a missing or corrupt artifact fails before minutes of timing
    data = prepare(p, model_dir, corpus_dir, gsm8k=backend in params["gsm8k"]["backends"],
                   gpqa=backend in params["gpqa"]["backends"], all_texts=backend in params["quality"]["backends"])
    is_base = not specs
    policies = {"baseline": StaticPolicy} if is_base else {"baseline": StaticPolicy, "config": new_config}
    bw_samples = [bandwidth.read_gbs()]  # read bandwidth on a shared VM moves by up to ~1.8x within seconds:
    reader = bandwidth.Reader()  # sampled before each decode pair (the limit of that pair), around and after
    decode = _phase(f"{backend}/{config}: decode", measure.decode_pairs, lm, data, policies, p["decode"], reader)
    reader.close()
    bw_samples.append(bandwidth.read_gbs())
    mine = decode["baseline" if is_base else "config"]
    batch = _phase(f"{backend}/{config}: batch", measure.batch_speed, lm, data, new_config, p["batch"])
    qual, top1 = _phase(f"{backend}/{config}: quality", measure.quality, lm, data, None if is_base else new_config,
                        p["decode"]["prompt_tokens"])
    if is_base and p["dtype"] != "float32":  # what the cheaper precision costs against the fp32 reference
        fp32 = load_backend(backend, model_dir, "float32", runtime=p["runtime"])
        qual["vs_float32"] = _phase(f"{backend}/{config}: quality vs float32", measure.quality_vs, lm, fp32, data)
        del fp32
    qual.update(_phase(f"{backend}/{config}: gsm8k", measure.gsm8k_accuracy, lm, data, new_config,
                       p["gsm8k"]["max_new_tokens"]))
    qual.update(_phase(f"{backend}/{config}: gpqa", measure.gpqa_choice, lm, data, None if is_base else new_config))
    memory = _phase(f"{backend}/{config}: memory probe", _in_fresh_process, _memory_probe,
                    {"backend": backend, "model": str(model_dir), "artifacts": [str(a) for a in artifacts],
                     "params": p, "prompts": data["prompts"]})
    bw_samples.append(_phase(f"{backend}/{config}: read bandwidth", bandwidth.read_gbs))
    bw = {**max(bw_samples, key=lambda b: b["read_gbs"]), "samples_gbs": [b["read_gbs"] for b in bw_samples]}
    speedup = mine["paired_speedup"] if not is_base else {"median": 1.0, "ci95": [1.0, 1.0], "pairs": 0}
    context = p["decode"]["prompt_tokens"] + p["decode"]["new_tokens"] // 2
    run = {"backend": backend, "config": config, "techniques": specs, "device": str(lm.device),
           "speed": {"decode_tps": mine["decode_tps"], "baseline_decode_tps": decode["baseline"]["decode_tps"],
                     "prefill_tps": mine["prefill_tps"], "latency_ms": mine["latency_ms"], "batch": batch,
                     "paired_speedup": speedup, **memory},
           "speedup_vs_baseline": speedup["median"], "speedup_ci95": speedup["ci95"],
           "quality": qual, "structural": measure.structural(lm, mine["executed"], context)}
    model = _model(model_m, model_dir, p["dtype"])
    per_token = model["weight_bytes"] * run["structural"]["weight_bytes_fraction"]
    run["speed"]["bandwidth"] = {**bw, "weight_bytes_per_token": per_token,
                                 **bandwidth.paired_share(mine["per_token_s"], decode["between"], per_token),
                                 "share_of_best_sample": mine["decode_tps"]["median"] * per_token / (bw["read_gbs"] * 1e9)}
    heads = run["structural"]["head_usage"]
    if "common" in heads:
        run["speed"]["common_head_rate"] = heads["common"]
    results = {"run": run, "model": model, "environment": _environment(lm),
               "top1": top1, "greedy": mine["greedy"]}
    with atomic.output_dir(out_dir) as tmp:
        atomic.write_json(tmp / RESULTS, results)
        inputs = {"model": model_dir, "corpus": corpus_dir, **{f"artifact_{a.name}": a for a in artifacts}}
        return manifest.write(tmp, stage="benchmark", inputs=inputs, params=p,
                              outputs={"backend": backend, "config": config, "speedup": speedup})


def build_reference(params: dict, backend: str, model_dir: Path, corpus_dir: Path, out_dir: Path) -> dict:
    """Our baseline decode against the library's own generate, paired per prompt."""
    model_m = _check(params, backend, model_dir, corpus_dir, [])
    p = job_params(params, None)
    lm = load_backend(backend, model_dir, p["dtype"], runtime=p["runtime"])
    data = prepare(p, model_dir, corpus_dir, gsm8k=False, gpqa=False)
    ref = _phase(f"{backend}/reference: decode", reference.measure, lm, data, model_dir, p)
    results = {"reference": ref, "model": _model(model_m, model_dir, p["dtype"]), "environment": _environment(lm)}
    with atomic.output_dir(out_dir) as tmp:
        atomic.write_json(tmp / RESULTS, results)
        return manifest.write(tmp, stage="benchmark_reference", inputs={"model": model_dir, "corpus": corpus_dir},
                              params=p, outputs={"backend": backend,
                                                 "ours_over_reference": ref["paired_ours_over_reference"]})
