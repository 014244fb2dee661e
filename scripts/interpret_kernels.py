"""The CUDA decode's Triton kernels run in Triton's interpreter on the CPU (no GPU), each against float64 or the
torch ops they stand for: what tests/test_triton_interpreter.py runs in CI. The interpreter runs no inline PTX, so
the kernels take their ASM-free forms (the same tiles, masks, groups, K slices and epilogues in fp32; the PTX itself
is tests/test_f16x2.py's, through f16x2.emulate), and their dots run in fp32 there (DOT_DTYPE): the checks against
float64 read fp32 partial sums (split K), the bf16 outputs get a bf16 tolerance (the interpreter's fp32 -> bf16 is
made to round as a GPU does: _interpreter_fix). Checks:

  w4_tc    the tensor-core 4-bit kernel (above GEMV_ROWS rows): every tile of its list, weights made in fp32 or
           (PAIRS) in bf16 pairs, the scales a tile ahead or not, groups 32 / 64 / 128
  w4_gemv  the 4-bit GEMVs (up to GEMV_ROWS rows): fp32 words, fp16 pairs from prep_x, nested at depth 8
  w8       int8: the GEMV (fp32 and fp16 pairs) and the tensor-core path
  block    triton_block's int8 and 4-bit block GEMVs (RMS norm, SwiGLU, residual add) against block_op's ops
  gates    the decisions taken on the device: matmul_partials' gated columns, select_linear's two heads
  attention  the decode attention kernel (RoPE, the cache written at the step's slot, GQA) against attention_op

    pip install --no-deps --target .venv/triton triton==3.6.0   # `make test` does; torch's CPU wheel has none
    TRITON_INTERPRET=1 PYTHONPATH=.venv/triton python scripts/interpret_kernels.py [--only w4_tc ...]

Prints one line a case and exits 1 if any error passes its tolerance.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

CHECKS = ("w4_tc", "w4_gemv", "w8", "block", "gates", "attention")
EXACT, BF16 = 1e-5, 1.2e-2  # tolerances: fp32 partial sums against float64; a bf16 output against its reference


def _interpreter_fix() -> None:
    """Two things of Triton 3.6's interpreter made as a GPU does them: a scalar's __index__ (int() on a 1-element
    array, which numpy 2 refuses: range() over a tensor bound failed) and fp32 -> bf16, which it truncated (a
    GPU rounds to nearest even; truncation biased the block kernels' bf16 x and outputs by up to 2x their error)."""
    import triton.language as tl
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched
    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            bits = (bits + 0x7FFF + (bits >> 16 & 1)) >> 16  # to nearest, ties to even (finite values)
            return interpreter.TensorHandle(bits.astype(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max()).item()


def packed4(rng, n: int, k: int, group: int, fmt: str = "int4", depth: int = 4):
    """(quant.py weight, w4_linear's tensors on the CPU, float64 weight at depth)."""
    from adaptive_inference import quant, quant_cuda

    p = quant.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05 + 0.01, fmt, group_size=group)
    tensors = quant_cuda.prepare(p, depth=depth, device="cpu", kernel="triton").tensors
    return p, tensors, torch.from_numpy(quant.dequantize(p, depth=depth)).double()


def bf16_x(rng, m: int, k: int, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32) * scale).to(torch.bfloat16)


def check_w4_tc(rng):
    from adaptive_inference import triton_kernels as tk

    for n, k, group, m, splits in [(96, 256, 32, 9, 2), (72, 512, 64, 16, 3), (40, 512, 128, 5, 2)]:
        _, tensors, w = packed4(rng, n, k, group)
        x = bf16_x(rng, m, k)
        want = x.double() @ w.T
        for cfg in tk.w4_tc_configs((0, 1), tk._W4_TC_TILES):
            if cfg.kwargs["BLOCK_K"] < group:
                continue  # pruned by the autotuner (_w4_prune)
            tk._w4_kernel.configs = [cfg]
            tk._w4_kernel.cache.clear()
            y = tk.w4_linear_partials(x, x.new_empty(0), *tensors, group, False, splits).sum(0)
            yield f"w4_tc N {n} K {k} group {group} rows {m} {cfg.kwargs} warps {cfg.num_warps}", rel_err(y, want), EXACT


def check_w4_gemv(rng):
    from adaptive_inference import triton_kernels as tk

    for fmt, depth, group, m in [("int4", 4, 32, 1), ("int4", 4, 128, 3), ("nested", 8, 32, 2), ("nested", 4, 64, 1)]:
        _, (codes, residual, scale, minv), w = packed4(rng, 72, 1280, group, fmt, depth)
        x = bf16_x(rng, m, 1280)
        want = x.double() @ w.T
        y = tk.w4_linear_partials(x, x.new_empty(0), codes, residual, scale, minv, group, depth == 8, 2).sum(0)
        yield f"w4_gemv {fmt} depth {depth} group {group} rows {m} fp32", rel_err(y, want), EXACT
        if depth == 4:  # the fp16-pair kernel reads x / 16 in fp16 pairs
            xs, xq = tk.x_for_pairs(x, 1 / 16)
            y = tk.w4_linear_partials(xs, xq, codes, residual, scale, minv, group, False, 2).sum(0)
            yield f"w4_gemv {fmt} depth 4 group {group} rows {m} fp16 pairs", rel_err(y, want), 1e-3


def check_w8(rng):
    from adaptive_inference import triton_kernels as tk

    n, k = 72, 1280
    q = torch.from_numpy(rng.integers(-127, 128, (n, k), dtype=np.int8))
    scale = torch.from_numpy(rng.uniform(1e-3, 1e-2, n).astype(np.float32))
    w = q.double() * scale.double()[:, None]
    for m in (1, 3, 9):
        x = bf16_x(rng, m, k)
        want = x.double() @ w.T
        y = tk.w8_linear_partials(x, x.new_empty(0), q, scale, 2).sum(0)
        yield f"w8 rows {m} {'fp32' if m <= tk.GEMV_ROWS else 'tensor cores'}", rel_err(y, want), EXACT
        if m <= tk.GEMV_ROWS:
            xs, xq = tk.x_for_pairs(x, 1 / 256)
            y = tk.w8_linear_partials(xs, xq, q, scale, 2).sum(0)
            yield f"w8 rows {m} fp16 pairs", rel_err(y, want), 1e-3


def check_block(rng):
    from adaptive_inference import block_op, quant_cuda
    from adaptive_inference.triton_block import w4_block, w8_block

    for op, m in (("norm", 1), ("norm_glu", 3), ("add", 2)):
        glu = op == "norm_glu"
        n, k = 72, 4 * 180  # K: a partial tile of the int8 kernel's
        q = torch.from_numpy(rng.integers(-127, 128, (n, k), dtype=np.int8))
        scale = torch.from_numpy(rng.uniform(1e-3, 1e-2, n).astype(np.float32)).bfloat16()
        x, lnw = bf16_x(rng, m, k, 3.0), torch.from_numpy(rng.uniform(0.5, 1.5, k).astype(np.float32)).bfloat16()
        r, bias = bf16_x(rng, m, n), bf16_x(rng, 1, n)[0]
        for pairs in (True, False):
            if op == "add":
                got = w8_block(x, q, scale, residual=r, pairs=pairs)
                want = block_op.w8_linear_add(x.float(), q, scale.float(), r.float())
            else:
                got = w8_block(x, q, scale, lnw=lnw, eps=1e-5, bias=None if glu else bias, glu=glu, pairs=pairs)
                want = block_op.w8_norm_linear(x.float(), lnw.float(), 1e-5, q, scale.float(),
                                               torch.empty(0) if glu else bias.float(), glu)
            yield f"block w8 {op} rows {m} {'fp16 pairs' if pairs else 'fp32'}", rel_err(got, want), BF16
        for fmt, group, k in (("int4", 32, 2 * 320), ("nested", 64, 2 * 640)):
            p, *_ = packed4(rng, n, k, group, fmt, 8 if fmt == "nested" else 4)
            plane = quant_cuda.split_halves(p.residual) if fmt == "nested" else np.zeros(0, np.uint8)
            t = [torch.from_numpy(a) for a in (quant_cuda.split_halves(p.codes), plane, p.scale, p.minv)]
            x, lnw = bf16_x(rng, m, k, 3.0), torch.from_numpy(rng.uniform(0.5, 1.5, k).astype(np.float32)).bfloat16()
            if op == "add":
                got = w4_block(x, *t, group, residual=r, kernel="triton")
                want = block_op.w4_linear_add(x.float(), *t, group, r.float())
            else:
                got = w4_block(x, *t, group, lnw=lnw, eps=1e-5, glu=glu, kernel="triton")
                want = block_op.w4_norm_linear(x.float(), lnw.float(), 1e-5, *t, group, torch.empty(0), glu)
            yield f"block w4 {fmt} group {group} {op} rows {m}", rel_err(got, want), BF16


def check_gates(rng):
    """The device-side decisions: matmul_partials' gated columns (zero, their weights unread, unless some row's flag
    equals want) and select_linear (the vocab router's two heads, each computed only if some row takes it)."""
    from adaptive_inference import triton_kernels as tk

    n, k, gated = 96, 320, 40
    w = bf16_x(rng, n, k, 0.05)
    for m in (1, 3, 9):  # the CUDA-core GEMV and the tensor-core path
        x = bf16_x(rng, m, k)
        full = x.double() @ w.double().T
        for flags in ([False] * m, [True] * m, [i % 2 == 0 for i in range(m)]):
            run = torch.tensor(flags)
            for want_flag in (True, False):
                want = full.clone()
                if want_flag not in flags:
                    want[:, :gated] = 0
                y = tk.matmul_partials(x, w, None, run, gated, 2, want_flag).sum(0)
                yield f"gates matmul_partials rows {m} flags {flags} want {want_flag}", rel_err(y, want), EXACT
    w_yes = bf16_x(rng, n, k, 0.05)
    x = bf16_x(rng, 3, k)
    for take in ([False] * 3, [True] * 3, [True, False, True]):
        no, yes = tk.select_linear(x, w, w_yes, torch.tensor(take))
        for got, ww, used in ((no, w, False in take), (yes, w_yes, True in take)):
            want = x.double() @ ww.double().T if used else torch.zeros(3, n, dtype=torch.float64)
            err = rel_err(got, want) if used else got.abs().max().item()
            yield f"gates select_linear take {take} {'head used' if used else 'head skipped (zeros)'}", err, 1e-2


def check_attention(rng):
    """The decode attention kernel (RoPE, the cache's slot written, attention over the written slots, GQA) against
    attention_op's torch ops, each on its own copy of the caches."""
    from adaptive_inference import attention_op
    from adaptive_inference import triton_kernels as tk

    b, heads, kv_heads, d, slots = 2, 4, 2, 64, 100
    for pos in (0, 37, 99):
        qkv = bf16_x(rng, b, (heads + 2 * kv_heads) * d)
        k_cache, v_cache = (bf16_x(rng, b * kv_heads * slots, d).reshape(b, kv_heads, slots, d) for _ in range(2))
        bias = torch.full((b, slots), float("-inf"))
        bias[:, :pos] = 0.0
        angle = torch.from_numpy(rng.uniform(0, 6.3, d // 2).astype(np.float32)).repeat(2)[None]
        cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
        positions = torch.tensor([pos])
        ref = [t.clone() for t in (k_cache, v_cache, bias)]
        want = attention_op.decode_attention(qkv, *ref, cos, sin, positions, heads, kv_heads)
        got_caches = [t.clone() for t in (k_cache, v_cache, bias)]
        got = tk._decode_attention_cuda(qkv, *got_caches, cos, sin, positions, heads, kv_heads)
        yield f"attention pos {pos} output", rel_err(got, want), BF16
        for name, g, r in zip(("k cache (RoPE'd: one rounding, the ops' several)", "v cache"), got_caches[:2], ref[:2],
                              strict=True):
            yield f"attention pos {pos} {name}", rel_err(g, r), BF16
        yield f"attention pos {pos} bias (slots written)", float(not torch.equal(got_caches[2], ref[2])), 0.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS))
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("interpret_kernels.py: run it with TRITON_INTERPRET=1 (Triton's interpreter, on the CPU)")
    _interpreter_fix()
    failed = 0
    for name in a.only:
        rng = np.random.default_rng(0)
        for case, err, tol in globals()[f"check_{name}"](rng):
            failed += err > tol
            print(f"{'FAIL' if err > tol else 'ok  '} {err:.1e} (<= {tol:.0e}) {case}", flush=True)
    print(f"{failed} case(s) past tolerance")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
