"""Microbenchmark: fp32 vs packed int8 / int4 matmul paths on decode shapes (batch 1..8), torch and MLX on CPU.

Weights are cold, as in decode of a model larger than the L3: each path cycles through enough copies of
its packed weight to fill `--working-set` bytes, so every call streams its weight from memory.
Paired rotation: every repeat times one call of each path, in an order rotated per repeat, so a path and
its backend's fp32 are timed under the same load; speedup = median over repeats of fp32 time / path time.
rel_err: ||y - y_fp32|| / ||y_fp32|| on the same x (weights N(0, 0.05)).

Usage: PYTHONPATH=src python scripts/bench_quant_kernels.py [--repeats 30] [--out docs/measurements/...]
Run it on a quiet machine (check `uptime`); the load average at start and end goes into the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adaptive_inference import atomic, quant, quant_mlx, quant_torch
from adaptive_inference.blas import blas_info, import_mlx

SHAPES = {  # name: (out N, in K); SmolLM2-135M (hidden 576, 3 KV heads x 64, inter 1536) and 8B-like
    "kv 192x576": (192, 576),
    "q/o 576x576": (576, 576),
    "qkv 960x576": (960, 576),
    "gate|up 1536x576": (1536, 576),
    "gate_up 3072x576": (3072, 576),
    "down 576x1536": (576, 1536),
    "head 49152x576": (49152, 576),
    "8B qo 4096x4096": (4096, 4096),
    "8B up 14336x4096": (14336, 4096),
}
GEAR = {"fp32": "high", "ours_int8": "mid", "ours_nested8": "mid", "fbgemm_dyn_int8": "mid",
        "int_mm_dyn_int8": "mid", "weight_int8pack_mm": "mid", "ours_int4": "low", "int4pack_mm_cpu": "low",
        "mlx_fp32": "high", "mlx_q8": "mid", "mlx_q4": "low"}


@dataclass
class Path_:
    name: str
    backend: str  # torch | mlx
    nbytes: int  # weight bytes one call reads
    make: object  # () -> a fresh copy of the weight state
    call: object  # (state, x) -> y (synchronous)


def torch_paths(w: np.ndarray, group: int, names: set[str]) -> list[Path_]:
    n, k = w.shape
    wt = torch.from_numpy(w)
    out = [Path_("fp32", "torch", w.nbytes, lambda: wt.clone(), lambda s, x: F.linear(x, s))]
    p8 = quant.quantize(w, "int8")
    p4 = quant.quantize(w, "int4", group_size=group)
    pn = quant.quantize(w, "nested", group_size=group)

    def packed(p, depth):
        t = quant_torch.prepare(p, depth=depth)
        return lambda: quant_torch.TorchPacked(t.kind, t.shape, tuple(x.clone() for x in t.tensors), t.group_size)

    ours = lambda s, x: quant_torch.linear(x, s)  # noqa: E731
    out += [Path_("ours_int8", "torch", quant.bytes_read(p8), packed(p8, None), ours),
            Path_("ours_int4", "torch", quant.bytes_read(p4), packed(p4, 4), ours),
            Path_("ours_nested8", "torch", quant.bytes_read(pn, depth=8), packed(pn, 8), ours)]
    q8 = torch.from_numpy(p8.q)
    s8 = torch.from_numpy(p8.scale)
    qw = torch.quantize_per_channel(torch.from_numpy(quant.dequantize(p8)), s8.double().clamp(min=1e-12),
                                    torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    out += [Path_("fbgemm_dyn_int8", "torch", q8.numel() + 4 * n,
                  lambda: torch.ops.quantized.linear_prepack(qw, None),
                  lambda s, x: torch.ops.quantized.linear_dynamic(x, s, True)),
            Path_("int_mm_dyn_int8", "torch", q8.numel() + 4 * n, lambda: (q8.clone(), s8.clone()),
                  _int_mm_dynamic),
            Path_("weight_int8pack_mm", "torch", q8.numel() + 4 * n, lambda: (q8.clone(), s8.clone()),
                  lambda s, x: torch._weight_int8pack_mm(x, s[0], s[1]))]
    # core torch's CPU int4 (tinygemm convention: w = (q - 8) * scale + zero), same codes as ours_int4
    c, sc, mn = quant.codes(p4, 4)
    sz = torch.from_numpy(np.stack([sc, mn + 8 * sc], -1).transpose(1, 0, 2).copy())  # [K/g, N, 2]
    pk = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(c.astype(np.int32)), 2)
    out.append(Path_("int4pack_mm_cpu", "torch", pk.numel() + sz.numel() * 4, lambda: (pk.clone(), sz.clone()),
                     lambda s, x: torch._weight_int4pack_mm_for_cpu(x, s[0], group, s[1])))
    return [p for p in out if p.name in names]


def _int_mm_dynamic(s, x):
    """torchao's CPU dynamic int8 path without compile: per-row int8 activations, torch._int_mm, rescale."""
    xs = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    xq = (x / xs).round().to(torch.int8)
    return torch._int_mm(xq, s[0].t()).float() * xs * s[1]


def mlx_paths(w: np.ndarray, group: int, names: set[str]) -> list[Path_]:
    mx = import_mlx()
    out = [Path_("mlx_fp32", "mlx", w.nbytes, lambda: mx.array(w), lambda s, x: _eval(mx, x @ s.T))]
    for name, p in (("mlx_q8", quant.quantize(w, "int8")), ("mlx_q4", quant.quantize(w, "int4", group_size=group))):
        m = quant_mlx.prepare(p)
        host = [np.array(a) for a in (m.w, m.scales, m.biases)]
        nbytes = sum(a.nbytes for a in host)
        out.append(Path_(name, "mlx", nbytes,
                         lambda m=m, host=host: quant_mlx.MLXPacked(m.shape, *(mx.array(a) for a in host),
                                                                    m.group_size, m.bits),
                         lambda s, x: _eval(mx, quant_mlx.linear(x, s))))
    return [p for p in out if p.name in names]


def _eval(mx, y):
    mx.eval(y)
    return y


def time_shape(paths: list[Path_], k: int, batch: int, repeats: int, working_set: float, seed: int) -> list[dict]:
    """Median us per call per path, cold weights, paired rotation; rel_err vs the backend's fp32."""
    copies = {p.name: [p.make() for _ in range(max(1, int(np.ceil(working_set / p.nbytes))))] for p in paths}
    xn = np.random.default_rng(seed).standard_normal((batch, k)).astype(np.float32)
    xs = {"torch": torch.from_numpy(xn)}
    if any(p.backend == "mlx" for p in paths):
        xs["mlx"] = import_mlx().array(xn)
    first = {p.name: np.asarray(p.call(copies[p.name][0], xs[p.backend]), dtype=np.float64) for p in paths}
    for p in paths:  # warm-up: one pass over every copy (page faults, lazy init)
        for c in copies[p.name]:
            p.call(c, xs[p.backend])
    times = {p.name: [] for p in paths}
    pos = dict.fromkeys(times, 0)
    for r in range(repeats):
        for i in range(len(paths)):
            p = paths[(i + r) % len(paths)]
            cs = copies[p.name]
            pos[p.name] = (pos[p.name] + 1) % len(cs)
            t0 = time.perf_counter_ns()
            p.call(cs[pos[p.name]], xs[p.backend])
            times[p.name].append((time.perf_counter_ns() - t0) / 1e3)
    rows = []
    for p in paths:
        base = "fp32" if p.backend == "torch" else "mlx_fp32"
        t = np.array(times[p.name])
        ref = first[base]
        rows.append({
            "path": p.name, "backend": p.backend, "gear": GEAR[p.name], "weight_bytes": p.nbytes,
            "copies": len(copies[p.name]), "median_us": float(np.median(t)),
            "p10_us": float(np.percentile(t, 10)), "p90_us": float(np.percentile(t, 90)),
            "gb_per_s": p.nbytes / float(np.median(t)) / 1e3,
            "speedup_vs_fp32": float(np.median(np.array(times[base]) / t)) if base in times else None,
            "rel_err": float(np.linalg.norm(first[p.name] - ref) / np.linalg.norm(ref)),
        })
    return rows


SMOLLM2_LINEARS = {  # per layer (x30) and the head: (N, K, count)
    "q_proj": (576, 576, 30), "k_proj": (192, 576, 30), "v_proj": (192, 576, 30), "o_proj": (576, 576, 30),
    "gate_proj": (1536, 576, 30), "up_proj": (1536, 576, 30), "down_proj": (576, 1536, 30),
    "lm_head": (49152, 576, 1),
}


def gear_memory(group: int) -> dict:
    """Bytes per gear for SmolLM2-135M's linears + head, read per token and held resident per layout."""
    rows = {"fp32": 0, "int8": 0, "int4": 0, "nested": 0}
    for n, k, count in SMOLLM2_LINEARS.values():
        rows["fp32"] += count * 4 * n * k
        rows["int8"] += count * (n * k + 4 * n)
        rows["int4"] += count * (n * k // 2 + 4 * n * k // group)
        rows["nested"] += count * (n * k + 4 * n * k // group)
    return {"read_per_token": {"high (fp32)": rows["fp32"], "mid (int8 per-channel)": rows["int8"],
                               "mid (nested depth 8)": rows["nested"], "low (int4)": rows["int4"]},
            "resident": {"fp32 + int8 + int4 (separate)": rows["fp32"] + rows["int8"] + rows["int4"],
                         "fp32 + nested (int4 planes shared)": rows["fp32"] + rows["nested"]},
            "group_size": group}


def monitor_cost(vocab: int = 49152, repeats: int = 200) -> dict:
    """us per decode step for the gear decision: entropy of one logits row + one monitor update."""
    from adaptive_inference.techniques.gears import monitor as em

    cfg = em.MonitorConfig(low=0.9, high=2.8, vocab_size=vocab)
    state = em.start(cfg)
    logits = np.random.default_rng(0).standard_normal(vocab).astype(np.float32)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        state = em.update(cfg, state, float(em.entropy_bits(logits)))
        ts.append((time.perf_counter_ns() - t0) / 1e3)
    return {"vocab": vocab, "median_us": float(np.median(ts)),
            "note": "a gear shift itself is picking another resident weight set (no copy, no quantization)"}


def machine_info(threads: int) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": threads,
            "cpus": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next(ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln)
        flags = set(next(ln for ln in cpuinfo.splitlines() if ln.startswith("flags")).split())
        info["isa"] = sorted(f for f in flags if f in {"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni",
                                                       "amx_tile"})
    except (OSError, StopIteration):
        pass
    try:
        info["l3_bytes"] = int(Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
                               .rstrip("K")) * 1024
    except (OSError, ValueError):
        pass
    try:
        import mlx.core as mxc

        info["mlx"] = mxc.__version__
        info["mlx_blas"] = blas_info()
    except ImportError:
        pass
    return info


def table(rows: list[dict]) -> str:
    paths = list(dict.fromkeys(r["path"] for r in rows))
    lines = ["shape | B | " + " | ".join(paths), "|".join(["---"] * (len(paths) + 2))]
    for key in dict.fromkeys((r["shape"], r["batch"]) for r in rows):
        cell = {r["path"]: r for r in rows if (r["shape"], r["batch"]) == key}
        lines.append(f"{key[0]} | {key[1]} | " + " | ".join(
            f"{cell[p]['median_us']:.0f} ({cell[p]['speedup_vs_fp32']:.2f}x)" if p in cell else "-" for p in paths))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names from SHAPES")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--paths", default=",".join(GEAR), help="comma-separated path names")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--working-set", type=float, default=96e6, help="bytes of weight copies cycled per path")
    ap.add_argument("--out", default="docs/measurements/quant_kernels_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)  # torch.ao's deprecation notes (fbgemm path)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    names = set(args.paths.split(","))
    quant_torch.kernels()  # build before timing
    load_start = os.getloadavg()
    t_start = time.time()
    rows = []
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        w = (np.random.default_rng(0).standard_normal((n, k)) * 0.05).astype(np.float32)
        paths = torch_paths(w, args.group_size, names) + mlx_paths(w, args.group_size, names)
        for b in (int(v) for v in args.batches.split(",")):
            for r in time_shape(paths, k, b, args.repeats, args.working_set, seed=b):
                rows.append({"shape": shape, "n": n, "k": k, "batch": b, **r})
            print(table([r for r in rows if r["shape"] == shape and r["batch"] == b]).splitlines()[-1], flush=True)
        del paths
    doc = {"what": __doc__.splitlines()[0], "machine": machine_info(args.threads),
           "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
           "wall_s": round(time.time() - t_start, 1), "monitor_step": monitor_cost(),
           "gear_memory_smollm2_135m": gear_memory(args.group_size), "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out, (json.dumps(doc, indent=1) + "\n").encode())
    print(table(rows))
    print(f"load average start {load_start}, end {doc['load_avg_end']}; wrote {out}")


if __name__ == "__main__":
    main()
