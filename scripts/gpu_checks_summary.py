"""What one run of scripts/gpu_kernel_checks.sh brought back, as the tables its decisions need, and the commands
those decisions lead to: the steps' exits, the tests' last line, the 4-bit block GEMVs (Triton beside Gluon, per
matrix and summed: which becomes the decode path's), the techniques' rows, Nsight Compute's key counters per
kernel launch, and batch 8's matmuls (the tensor-core 4-bit kernel's weights made in fp32 or in bf16 pairs, int8,
the block GEMV at one row). A step that did not run or left no file is said so; nothing here needs a GPU.

    python scripts/gpu_checks_summary.py OUT   # OUT: the folder gpu_kernel_checks.sh wrote
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# the counters of ncu's text report worth a row (SpeedOfLight, Occupancy, LaunchStats, WarpStateStats, ...)
NCU_METRICS = ("Duration", "DRAM Throughput", "Memory Throughput", "L2 Cache Throughput", "L1/TEX Cache Throughput",
               "Compute (SM) Throughput", "L2 Hit Rate", "Registers Per Thread",
               "Theoretical Occupancy", "Achieved Occupancy", "Block Limit Registers", "Block Limit Shared Mem",
               "Warp Cycles Per Issued Instruction", "Issue Slots Busy", "Grid Size", "Block Size")
NCU_KERNEL = re.compile(r"^\s{0,4}(\w+)\s+\((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\)")
NCU_ROW = re.compile(r"^\s+(\S(?:.*?\S)?)\s{2,}(\S+)\s+([\d,.]+)\s*$")


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def block_gemv(data: dict | None, shape: str = "llama3-8b") -> tuple[list[str], str | None]:
    """(lines, the faster 4-bit block kernel over the four matrices at both depths, or None)."""
    if not data or shape not in data.get("shapes", {}):
        return ["(no block_gemv.json: the gemv step did not finish)"], None
    rows = data["shapes"][shape]
    kernels = [kn for kn in ("triton", "gluon-serial", "gluon") if any(f"{kn}_d4" in r for r in rows.values())]
    lines = [f"| matrix | {' | '.join(f'{kn} d4 us (share) | {kn} d8' for kn in kernels)} |",
             "|---|" + "---|---|" * len(kernels)]
    total = {kn: 0.0 for kn in kernels}
    for name, r in rows.items():
        cells = []
        for kn in kernels:
            for d in (4, 8):
                t = r.get(f"{kn}_d{d}")
                cells.append(f"{t['us']:.1f} ({t['share_of_bandwidth']:.2f})" if t else "-")
                total[kn] += t["us"] if t else float("inf")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines.append("summed over the matrices at both depths: " + ", ".join(f"{kn} {us:.1f} us" for kn, us in total.items()))
    paired = [kn for kn in ("triton", "gluon") if kn in total]
    faster = min(paired, key=total.get) if len(paired) == 2 else None
    return lines, faster


def techniques(data: list | None) -> list[str]:
    if not data:
        return ["(no techniques JSON: the techniques step did not finish)"]
    lines = ["| shape | config | tok/s | speedup | bound | realized share | bandwidth share |", "|---|---|---|---|---|---|---|"]
    for run in data:
        for mode in run.get("modes", {}).values():
            for name, c in mode.get("configs", {}).items():
                share = "-" if c.get("realized_share") is None else f"{c['realized_share']:.2f}"
                lines.append(f"| {run.get('shape')} | {name} | {c['decode_tps']:.1f} | {c['speedup']:.3f} | "
                             f"{c['bound']:.3f} | {share} | {c['bandwidth_share']:.2f} |")
    return lines


def ncu(text: str | None) -> list[str]:
    """Per kernel launch in ncu's text report: NCU_METRICS, and the rule lines that name a stall."""
    if not text:
        return ["(no ncu_gate_up.txt: the ncu step did not finish)"]
    launches: list[dict] = []
    for line in text.splitlines():
        if m := NCU_KERNEL.match(line):
            grid = "x".join(m.group(i) for i in (2, 3, 4))
            launches.append({"kernel": m.group(1), "grid": grid, "block": "x".join(m.group(i) for i in (5, 6, 7)),
                             "stalls": []})
        elif launches and (m := NCU_ROW.match(line)) and m.group(1) in NCU_METRICS:
            launches[-1][m.group(1)] = f"{m.group(3)} {m.group(2)}"
        elif launches and "stall" in line.lower():
            launches[-1]["stalls"].append(line.strip())
    if not launches:
        return ["(ncu_gate_up.txt holds no kernel launch: its tail)"] + text.splitlines()[-8:]
    lines = []
    for i, k in enumerate(launches):
        lines.append(f"- launch {i}: {k['kernel']} grid {k['grid']} block {k['block']}: "
                     + "; ".join(f"{name} {k[name]}" for name in NCU_METRICS if name in k))
        lines += [f"  - {s[:300]}" for s in k["stalls"][:3]]
    return lines


def batch8(data: dict | None, shape: str = "llama3-8b") -> tuple[list[str], bool | None]:
    """(lines, whether the bf16-pair weights made the 8-row 4-bit matmuls faster in sum, or None)."""
    if not data or shape not in data.get("shapes", {}):
        return ["(no block_gemv_batch8.json: the batch8 step did not finish)"], None
    cols = ("triton_d4", "triton_int8", "matmul_m8_d4", "matmul-pairs_m8_d4", "matmul_m8_int8")
    lines = ["microseconds (share of the measured read bandwidth); m8: 8 rows of x, the others 1", "",
             f"| matrix | {' | '.join(cols)} | tiles kept (fp32 / pairs) |",
             "|---|" + "---|" * (len(cols) + 1)]
    fp32 = pairs = 0.0
    for name, r in data["shapes"][shape].items():
        cells = [f"{r[c]['us']:.1f} ({r[c]['share_of_bandwidth']:.2f})" if c in r else "-" for c in cols]
        tiles = " / ".join(",".join(f"{t['BLOCK_N']}x{t['BLOCK_K']}p{t['PAIRS']}" for t in r[c].get("tile", []))
                           for c in ("matmul_m8_d4", "matmul-pairs_m8_d4") if c in r)
        lines.append(f"| {name} | {' | '.join(cells)} | {tiles} |")
        fp32 += r.get("matmul_m8_d4", {}).get("us", float("nan"))
        pairs += r.get("matmul-pairs_m8_d4", {}).get("us", float("nan"))
    if fp32 == fp32 and pairs == pairs:  # both summed over every matrix
        lines.append(f"8-row 4-bit matmuls summed: fp32 weights {fp32:.1f} us, bf16 pairs {pairs:.1f} us")
        return lines, pairs < fp32
    return lines, None


STEPS = ("tests", "gemv", "batch8", "techniques", "ncu")  # gpu_kernel_checks.sh's


def unfinished(steps_txt: str) -> list[str]:
    """The steps of STEPS without an `exit 0` line in steps.txt (cut by the call's limit, timed out or failed)."""
    done = {m.group(1) for m in re.finditer(r"^(\w+): exit 0 in", steps_txt, re.M)}
    return [s for s in STEPS if s not in done]


def summary(out: Path) -> str:
    parts = []
    for name in ("device.txt", "steps.txt"):
        text = (out / name).read_text().strip() if (out / name).exists() else f"(no {name})"
        parts.append(f"## {name}\n```\n{text}\n```")
    tests = (out / "tests.log").read_text().strip().splitlines() if (out / "tests.log").exists() else []
    parts.append("## tests\n" + (tests[-1] if tests else "(no tests.log)"))
    lines, faster = block_gemv(_load(out / "block_gemv.json"))
    parts.append("## 4-bit block GEMVs, batch 1 (llama3-8b)\n" + "\n".join(lines))
    runs = [r for f in sorted(out.glob("techniques_*.json")) for r in (_load(f) or [])]
    parts.append("## techniques\n" + "\n".join(techniques(runs)))
    ncu_file = out / "ncu_gate_up.txt"
    parts.append("## ncu: gate_up's kernels\n" + "\n".join(ncu(ncu_file.read_text() if ncu_file.exists() else None)))
    lines, pairs_win = batch8(_load(out / "block_gemv_batch8.json"))
    parts.append("## batch 8 matmuls (llama3-8b)\n" + "\n".join(lines))
    nxt = []
    if faster == "gluon":
        nxt.append("the Gluon 4-bit block kernel was faster: if the tests passed, make it triton_block.W4_BLOCK_KERNEL's "
                   "default and rerun the GPU tables (docs/measurements, README, params report.gpu_results)")
    elif faster == "triton":
        nxt.append("the Triton 4-bit block kernel stays the default (the Gluon one was not faster)")
    if pairs_win:
        nxt.append("the bf16-pair weights were faster at 8 rows: if the tests passed, default "
                   "ADAPTIVE_INFERENCE_W4_PAIRS to 1 and rerun the batch-8 rows: ADAPTIVE_INFERENCE_W4_PAIRS=1 python "
                   "scripts/cuda_techniques.py --shapes llama3-8b --modes compiled --configs int8-block int4-block --packed "
                   "int8-block int4-block --batches 1 8 --technique-batches 8 --repeats 3 (a cold machine: ~6 min)")
    elif pairs_win is False:
        nxt.append("the bf16-pair weights were not faster at 8 rows: keep ADAPTIVE_INFERENCE_W4_PAIRS off")
    left = unfinished((out / "steps.txt").read_text() if (out / "steps.txt").exists() else "")
    if left:
        nxt.append(f"steps that did not finish: a second call, OUT=$OUT STEPS=\"{' '.join(left)}\" bash "
                   "scripts/gpu_kernel_checks.sh")
    parts.append("## next\n" + ("\n".join(f"- {n}" for n in nxt) or "(no decision: a step is missing)"))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the folder scripts/gpu_kernel_checks.sh wrote ($OUT)")
    a = ap.parse_args(argv)
    if not a.out.is_dir():
        raise SystemExit(f"gpu_checks_summary.py: {a.out} is not a folder")
    print(summary(a.out), end="")


if __name__ == "__main__":
    main()
