"""Decode steps of several configurations in one process, interleaved step by step (so the machine's drift
touches them alike), split by the head each step ran: the in-situ cost of a technique's step against the
baseline's, which the paired benchmark only shows averaged over a generation. Each step is timed in two parts:
building it (plan, blocks, head, pick: Python and graph building; on torch this runs the kernels too) and
evaluating it (reading the token). Configurations and artifacts come from the pipeline (params.yaml,
artifacts/).

    python scripts/step_anatomy.py --backend mlx --configs baseline router lobotomy stacked [--out F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from adaptive_inference import params as params_mod
from adaptive_inference import techniques
from adaptive_inference.backends import load_backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="mlx", choices=["torch", "mlx"])
    ap.add_argument("--configs", nargs="+", default=["baseline", "router", "lobotomy", "stacked"])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--rounds", type=int, default=6, help="generations per configuration (prompts shift per round)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    p = params_mod.load(a.params)
    bench = p["benchmark"]
    unknown = [c for c in a.configs if c not in bench["configs"]]
    if unknown:
        raise SystemExit(f"step_anatomy: unknown configuration {unknown[0]!r} (benchmark.configs: "
                         f"{', '.join(bench['configs'])})")
    lm = load_backend(a.backend, a.artifacts / "model", bench.get("dtype", "float32"), runtime=bench.get("runtime"))
    specs = {c: bench["configs"][c]["techniques"] for c in a.configs}
    dirs = [a.artifacts / f for s in specs.values() for f in techniques.artifact_folders(s)]
    times: dict = {}
    for rnd in range(a.rounds):
        runs = {}
        for c, spec in specs.items():
            ids = lm.ids_array((np.arange(a.prompt_tokens) * 7 + 100 + rnd) % lm.cfg.vocab_size)[None]
            runs[c] = [techniques.make_policy(spec, dirs, lm.cfg), ids, lm.new_cache(1, a.prompt_tokens + a.new_tokens),
                       lm.sampler_state(0)]
        for step in range(a.new_tokens):
            for c in (a.configs if step % 2 else a.configs[::-1]):
                policy, ids, cache, state = runs[c]
                lm.materialize()
                t0 = time.perf_counter()
                plan = policy.plan(step)
                fwd = lm.prefill(ids, cache, plan) if step == 0 else lm.decode_one_token(ids, cache, plan)
                ids, state = lm.next_tokens(fwd.out, 0.0, state)
                t1 = time.perf_counter()
                lm.to_numpy(ids)
                t2 = time.perf_counter()
                policy.observe(fwd.executed, fwd.out.logits)
                runs[c][1:] = [ids, cache, state]
                if step >= 2:  # the prefill and the first decode step (traces, captures) are not decode speed
                    t = times.setdefault(c, {}).setdefault(fwd.executed.head, {"build": [], "eval": []})
                    t["build"].append((t1 - t0) * 1e3)
                    t["eval"].append((t2 - t1) * 1e3)
    def steps(t: dict) -> list[float]:
        return [b + e for b, e in zip(t["build"], t["eval"], strict=True)]

    base = statistics.median([s for t in times[a.configs[0]].values() for s in steps(t)])
    rows = []
    for c, heads in times.items():
        for head, t in heads.items():
            total = statistics.median(steps(t))
            rows.append({"config": c, "head": head, "steps": len(t["build"]), "step_ms": round(total, 3),
                         "build_ms": round(statistics.median(t["build"]), 3),
                         "eval_ms": round(statistics.median(t["eval"]), 3), f"speedup_vs_{a.configs[0]}": round(base / total, 4)})
            print(f"{c:12s} {head:7s} steps {len(t['build']):4d}  step {total:7.3f} ms (build {rows[-1]['build_ms']:.3f}, "
                  f"eval {rows[-1]['eval_ms']:.3f})  {base / total:.3f}x")
    if a.out:
        a.out.write_text(json.dumps({"backend": a.backend, "matmul": getattr(lm, "matmul_name", ""), "rows": rows},
                                    indent=1) + "\n")


if __name__ == "__main__":
    main()
