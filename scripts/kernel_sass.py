"""Instructions a weight in the K loop of the block ops' Triton kernels, compiled for sm_90 on this machine (no GPU
needed: Triton's bundled ptxas, nvdisasm and cuobjdump), by opcode, and each kernel's registers a thread, shared
memory and the warps an SM can hold by both. Compiled as a launch specializes them: the pointers, N and K
16-byte aligned (without that every code word loads alone and the counts run about twice too high).

    pip install triton==3.6.0   # with its CUDA tools; torch's CPU wheel does not bring it
    python scripts/kernel_sass.py --kernels w4 w4n --tiles 16x512 32x512
    python scripts/kernel_sass.py --kernels g4 g4n --gluon-tiles 2x8 4x4 --k 4096 14336   # gluon_block's

w8, w4, w4n: triton_block's int8, 4-bit and nested (depth 8) kernels; g4, g4n: gluon_block's 4-bit kernel at
depth 4 and 8 (tiles ROWSxWARPS, one K a compile); t4, t4p: triton_kernels' tensor-core 4-bit kernel (batch >
4; --tiles 32x256 --warps 4 --stages 4 as its first autotune tile), the scales loaded where used or a tile ahead;
t4b, t4bp: the same with its weights made in bf16 pairs (PAIRS, f16x2.W4_BF16).
"""

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

FORMS = {"norm": dict(NORM=1, GLU=0, BIAS=0, ADD=0), "norm-glu": dict(NORM=1, GLU=1, BIAS=0, ADD=0),
         "plain-add": dict(NORM=0, GLU=0, BIAS=0, ADD=1)}
OPS = ("LDG", "LDGSTS", "STL", "LDL", "SHFL", "HADD2", "HFMA2", "FFMA", "FADD", "IMAD", "LOP3", "PRMT", "SHF", "SGXT",
       "F2FP", "HMMA", "STS", "LDS", "LDSM", "BAR")


def gluon_signature() -> dict:
    sig = {"x_ptr": "*bf16", "l_ptr": "*bf16", "c_ptr": "*i32", "q_ptr": "*i32", "s_ptr": "*fp16", "m_ptr": "*fp16",
           "b_ptr": "*bf16", "r_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "eps": "fp32"}
    return {**sig, **{c: "constexpr" for c in ["K", "GROUP", "NESTED", "NORM", "GLU", "BIAS", "ADD", "PDL", "ROWS", "CTAS",
                                                  "WARPS"]}}


def signature(kernel: str) -> dict:
    codes = {"w8": ["w_ptr"], "w4": ["c_ptr"], "w4n": ["c_ptr", "q_ptr"]}[kernel]
    scales = ["s_ptr"] if kernel == "w8" else ["s_ptr", "m_ptr"]
    sig = {"x_ptr": "*bf16", "l_ptr": "*bf16", **{p: "*i32" for p in codes},
           **{p: "*fp32" if kernel == "w8" else "*fp16" for p in scales},
           "b_ptr": "*bf16", "r_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "eps": "fp32"}
    flags = ["NORM", "GLU", "BIAS", "ADD", "PAIRS"] if kernel == "w8" else ["GROUP", "NORM", "GLU", "BIAS", "ADD"]
    tile = ["ASM", "BLOCK_N", "BLOCK_K"] + ([] if kernel == "w8" else ["PREFETCH"])
    return {**sig, **{f: "constexpr" for f in flags + tile}}


def loop_body(sass: str) -> list[str]:
    """The opcodes of the longest backward-branch loop (the K loop)."""
    ops, labels, bodies = [], {}, []
    for line in sass.splitlines():
        if m := re.match(r"\.(L_x_\d+):", line.strip()):
            labels[m.group(1)] = len(ops)
        elif m := re.search(r"/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line):
            ops.append(m.group(2))
            if m.group(2).startswith("BRA") and (t := re.search(r"`\(\.(L_x_\d+)\)", line)):
                if labels.get(t.group(1), len(ops)) < len(ops) - 1:
                    bodies.append(ops[labels[t.group(1)]:])
    return max(bodies, key=len) if bodies else []


def compile_sass(src, warps: int, stages: int) -> tuple[str, dict]:
    """(SASS, resources): registers a thread, shared memory, and the warps an SM holds at most by both (sm_90:
    64K registers, 228 KiB shared memory, 64 warps)."""
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    regs, smem = int(re.search(r"REG:(\d+)", usage).group(1)), compiled.metadata.shared
    ctas = min(65536 // (-(-regs // 8) * 8 * 32 * warps), 228 * 1024 // max(smem, 1), 64 // warps)
    return sass, {"regs": regs, "smem_kib": round(smem / 1024), "warps_an_sm": ctas * warps}


def source(fn, sig: dict, consts: dict, aligned: tuple[str, ...], gluon: bool = False):
    """The kernel as a launch compiles it: pointers and the named ints 16-byte aligned."""
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if n.endswith("_ptr") or n in aligned}
    return (GluonASTSource if gluon else ASTSource)(fn, sig, constexprs={(fn.arg_names.index(k),): v
                                                                         for k, v in consts.items()}, attrs=attrs)


def per_weight(compiled: tuple[str, dict], weights: int, warps: int) -> tuple[float, dict]:
    """(instructions a weight in the K loop, its opcode counts and the kernel's resources)."""
    sass, res = compiled
    body = loop_body(sass)
    ops = collections.Counter(op.split(".")[0] for op in body)
    return len(body) * 32 * warps / weights, {**{k: ops[k] for k in OPS if ops[k]}, **res}


def count(kernel: str, form: str, bn: int, bk: int, warps: int, stages: int, group: int) -> tuple[float, dict]:
    from adaptive_inference import triton_block as tb

    fn = {"w8": tb._w8_block_kernel, "w4": tb._w4_block_kernel, "w4n": tb._w4n_block_kernel}[kernel].fn
    consts = {**FORMS[form], "ASM": 1, "BLOCK_N": bn, "BLOCK_K": bk}
    consts.update({"PAIRS": 1} if kernel == "w8" else {"GROUP": group, "PREFETCH": 1})
    sass = compile_sass(source(fn, signature(kernel), consts, ("N", "K")), warps, stages)
    # a tile is BLOCK_N rows of BLOCK_K columns: 1-byte codes; 4-bit words hold BLOCK_K low and BLOCK_K high columns
    weights = bn * bk * (1 if kernel == "w8" else 2) * (2 if FORMS[form]["GLU"] else 1)
    return per_weight(sass, weights, warps)


def count_tensor_core(bn: int, bk: int, warps: int, stages: int, group: int, prefetch: int,
                      pairs: int = 0) -> tuple[float, dict]:
    """triton_kernels' tensor-core 4-bit kernel (above 4 rows of x; a 16-row tile): all 16 rows' instructions."""
    import triton.language as tl

    from adaptive_inference import triton_kernels as tk

    fn = tk._w4_kernel.fn
    sig = {"x_ptr": "*bf16", "c_ptr": "*u8", "r_ptr": "*u8", "s_ptr": "*fp16", "m_ptr": "*fp16", "y_ptr": "*fp32",
           "M": "i32", "N": "i32", "K": "i32"}
    sig = {n: sig.get(n, "constexpr") for n in fn.arg_names}
    consts = {"SPLITS": 1, "GROUP": group, "NESTED": 0, "DOT_DTYPE": tl.bfloat16, "BLOCK_M": 16, "BLOCK_N": bn,
              "BLOCK_K": bk, "PREFETCH": prefetch, "PAIRS": pairs}
    sass = compile_sass(source(fn, sig, consts, ("N", "K")), warps, stages)
    return per_weight(sass, bn * bk * 2, warps)  # BLOCK_K packed bytes: 2 weights each


def count_gluon(kernel: str, form: str, rows: int, warps: int, k: int, group: int) -> tuple[float, dict]:
    """gluon_block's kernel: a K-loop pass is ROWS rows a warp of 32 lanes x WPT words (8 weights a word)."""
    from adaptive_inference import gluon_block as gb

    consts = {**FORMS[form], "K": k, "GROUP": group, "NESTED": int(kernel == "g4n"), "PDL": 1, "ROWS": rows, "CTAS": 4,
              "WARPS": warps}
    sass = compile_sass(source(gb._w4_block_kernel.fn, gluon_signature(), consts, ("N",), gluon=True), warps, 3)
    weights = rows * warps * 32 * gb.WPT.value * 8 * (2 if FORMS[form]["GLU"] else 1)
    return per_weight(sass, weights, warps)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", nargs="+", choices=("w8", "w4", "w4n", "g4", "g4n", "t4", "t4p", "t4b", "t4bp"),
                    default=["w4", "w4n"])
    ap.add_argument("--forms", nargs="+", choices=tuple(FORMS), default=list(FORMS))
    ap.add_argument("--tiles", nargs="+", default=["16x512", "32x512"], help="BLOCK_NxBLOCK_K (triton_block's)")
    ap.add_argument("--gluon-tiles", nargs="+", default=["2x8", "4x4"], help="ROWSxWARPS (gluon_block's)")
    ap.add_argument("--k", type=int, nargs="+", default=[4096], help="in-features (gluon_block's compile for one)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--group", type=int, default=32)
    args = ap.parse_args(argv)
    for kernel in args.kernels:
        for form in args.forms:
            if kernel.startswith("t"):
                if form != args.forms[0]:
                    continue  # no block forms: a plain matmul
                for tile in args.tiles:
                    bn, bk = (int(v) for v in tile.split("x"))
                    got, ops = count_tensor_core(bn, bk, args.warps, args.stages, args.group,
                                                 int(kernel.endswith("p")), int(kernel.startswith("t4b")))
                    print(f"{kernel:4s} {'matmul':10s} {tile:8s} {got:5.2f} instructions a weight  {ops}")
                continue
            if kernel.startswith("g"):
                for k in args.k:
                    for tile in args.gluon_tiles:
                        rows, warps = (int(v) for v in tile.split("x"))
                        got, ops = count_gluon(kernel, form, rows, warps, k, args.group)
                        print(f"{kernel:4s} {form:10s} K {k:<6d} {tile:5s} {got:5.2f} instructions a weight  {ops}")
                continue
            for tile in args.tiles:
                bn, bk = (int(v) for v in tile.split("x"))
                got, ops = count(kernel, form, bn, bk, args.warps, args.stages, args.group)
                print(f"{kernel:4s} {form:10s} {tile:8s} {got:5.2f} instructions a weight  {ops}")


if __name__ == "__main__":
    main()
