"""MLX CPU kernels: one C++ extension (an MLX custom primitive, bound with nanobind) built at first use into
a cache folder, keyed by its source, flags and the mlx / nanobind / Python versions.

- decode_layer: a whole fp32 decode block as one graph node (cpu_gemv_source.LAYER_SOURCE, the torch
  extension's code): ~15 fewer MLX ops per block to build and evaluate. It returns the new cache slot's k, v
  rather than the cache: the caller's slice update then writes them in place (a node with several outputs
  never gets its input's buffer donated, so returning the cache would copy it every step).
- select_linear: two dense_linears of which only the needed ones run, chosen by a bool per row computed
  in the same graph (a decision on the device: one evaluation per step, no host read).
- dense_linear: x @ w.T for full-precision (fp32 / bf16) weights [N, K] and at most 8 input rows: the decode
  matmul, the same AVX2 gemv as torch_kernels.dense_linear (cpu_gemv_source), on OpenMP threads. MLX's CPU
  matmul goes to BLAS, whose gemv reads 11-19 GB/s here where this one reads 33-42 (measured in the session
  that added it: 49152x576 fp32 2.7 ms vs 10.4 ms). It is a graph node like any MLX op, so mx.compile'd
  blocks keep it.

Needs a C++ compiler, the Python headers and nanobind built with the internals ABI of the installed mlx
(nanobind 3.x for mlx 0.32). Cache: $ADAPTIVE_INFERENCE_MLX_EXTENSIONS, else ~/.cache/adaptive_inference.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from . import cpu_gemv_source
from .blas import import_mlx
from .cpu_gemv_source import LAYER_SOURCE, SOURCE
from .errors import UserError

mx = import_mlx()

MODULE = "adaptive_inference_mlx_cpu"
MAX_ROWS = 8  # the most input rows dense_linear takes; larger inputs go to MLX's matmul (BLAS sgemm)
CACHE_ENV = "ADAPTIVE_INFERENCE_MLX_EXTENSIONS"

_EXT_SRC = r"""
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/tuple.h>
#include <omp.h>
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "mlx/backend/cpu/encoder.h"
""" + SOURCE + r"""
namespace {
using namespace mlx::core;

constexpr int64_t SERIAL_BYTES = 1 << 17;  // smaller weights are read by one thread (a fork costs more)

template <typename W>
void dense(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N) {
  const int threads = N * K * int64_t(sizeof(W)) < SERIAL_BYTES ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    // contiguous blocks of output rows, a multiple of 4 each (the B = 1 path reads 4 rows per pass)
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t chunk = ((N + T - 1) / T + 3) / 4 * 4;
    const int64_t n0 = std::min(N, t * chunk), n1 = std::min(N, n0 + chunk);
#define AI_DF(b) dense_rows<b>(x, w, y, K, N, n0, n1)
    AI_DISPATCH(M, AI_DF)
#undef AI_DF
  }
}

class DenseLinear : public UnaryPrimitive {
 public:
  explicit DenseLinear(Stream s) : UnaryPrimitive(s) {}
  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& x = inputs[0];
    const array& w = inputs[1];
    if (!x.flags().row_contiguous || !w.flags().row_contiguous)
      throw std::runtime_error("dense_linear: inputs are not row-contiguous");
    out.set_data(allocator::malloc(out.nbytes()));
    auto& enc = cpu::get_command_encoder(stream());
    enc.set_input_array(x);
    enc.set_input_array(w);
    enc.set_output_array(out);
    const int64_t M = x.shape(0), K = x.shape(1), N = w.shape(0);
    float* yp = out.data<float>();
    const float* xp = x.data<float>();
    if (w.dtype() == float32) {
      enc.dispatch([=, wp = w.data<float>()]() { dense(xp, wp, yp, M, K, N); });
    } else {
      const auto* wp = reinterpret_cast<const uint16_t*>(w.data<bfloat16_t>());
      enc.dispatch([=]() { dense(xp, wp, yp, M, K, N); });
    }
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("dense_linear: a CPU kernel");
  }
  const char* name() const override { return "AdaptiveInferenceDenseLinear"; }
  bool is_equivalent(const Primitive&) const override { return true; }
};

// x [..., K] (any float dtype) @ w.T for w [N, K] fp32 / bf16, at most 8 rows; returns x's dtype
array dense_linear(const array& x_in, const array& w) {
  if (w.ndim() != 2 || x_in.ndim() < 1 || x_in.shape(-1) != w.shape(1))
    throw std::invalid_argument("dense_linear: expected x [..., K] and w [N, K]");
  if (w.dtype() != float32 && w.dtype() != bfloat16)
    throw std::invalid_argument("dense_linear: w must be float32 or bfloat16");
  const auto s = default_stream(Device::cpu);
  const int K = w.shape(1), N = w.shape(0);
  array x = contiguous(astype(reshape(x_in, {-1, K}, s), float32, s), false, s);
  if (x.shape(0) < 1 || x.shape(0) > 8) throw std::invalid_argument("dense_linear: 1 to 8 rows");
  // an evaluated row-contiguous weight (every loaded one) goes in as it is: no graph node on every call
  const array wc = w.is_available() && w.flags().row_contiguous ? w : contiguous(w, false, s);
  array y(Shape{x.shape(0), N}, float32, std::make_shared<DenseLinear>(s), {x, wc});
  Shape shape = x_in.shape();
  shape.back() = N;
  return astype(reshape(y, shape, s), x_in.dtype(), s);
}
// items [0, n) in contiguous chunks of at least `grain` over the OpenMP threads (what at::parallel_for does)
template <typename F>
void ai_parallel_for(int64_t n, int64_t grain, const F& f) {
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), n / std::max<int64_t>(1, grain)));
  if (T == 1) {
    f(0, n);
    return;
  }
#pragma omp parallel num_threads(T)
  {
    const int64_t t = omp_get_thread_num(), chunk = (n + T - 1) / T;
    const int64_t i0 = std::min(n, t * chunk), i1 = std::min(n, i0 + chunk);
    if (i0 < i1) f(i0, i1);
  }
}
}  // namespace
""" + LAYER_SOURCE + r"""
namespace {

// The start of a multi-output primitive's eval_cpu: inputs checked row-contiguous, outputs allocated, both
// registered with the stream's command encoder (which then keeps them alive for the dispatched work).
cpu::CommandEncoder& begin_eval(const Stream& s, const std::vector<array>& in, std::vector<array>& out, const char* what) {
  for (const array& a : in)
    if (!a.flags().row_contiguous) throw std::runtime_error(std::string(what) + ": inputs are not row-contiguous");
  for (array& a : out) a.set_data(allocator::malloc(a.nbytes()));
  auto& enc = cpu::get_command_encoder(s);
  for (const array& a : in) enc.set_input_array(a);
  for (array& a : out) enc.set_output_array(a);
  return enc;
}

// One fp32 decode block (decode_layer_into) as a graph node: inputs x [..., E] (B rows), ln1, wqkv, wo, ln2,
// w_gate_up, w_down, the cache k, v [B, Hkv, S, D] (read only), written [B, S] (slot pos already marked), cos,
// sin [D] (, bqkv); outputs the block's output (x's shape) and the new slot's k, v [B, Hkv, 1, D], which the
// caller writes into the cache (a slice update, in place when the cache holds the only reference).
class DecodeLayer : public Primitive {
 public:
  DecodeLayer(Stream s, int64_t pos, int64_t H, int64_t Hkv, double eps, bool mlp)
      : Primitive(s), pos_(pos), H_(H), Hkv_(Hkv), eps_(eps), mlp_(mlp) {}
  void eval_cpu(const std::vector<array>& in, std::vector<array>& out) override {
    auto& enc = begin_eval(stream(), in, out, "decode_layer");
    const int64_t E = in[0].shape(-1);
    const Block d{int64_t(in[0].size()) / E, E, H_, Hkv_, in[10].shape(-1), in[7].shape(2), in[6].shape(1), pos_,
                  eps_, mlp_};
    const float *x = in[0].data<float>(), *ln1 = in[1].data<float>(), *ln2 = in[4].data<float>(),
                *c = in[10].data<float>(), *sn = in[11].data<float>(), *bq = in.size() > 12 ? in[12].data<float>() : nullptr;
    const float *kp = in[7].data<float>(), *vp = in[8].data<float>();
    const bool* mask = in[9].data<bool>();
    float *y = out[0].data<float>(), *knew = out[1].data<float>(), *vnew = out[2].data<float>();
    const void* w[4];
    bool bf16[4];
    int64_t wn[4], wk[4];
    for (int j = 0; j < 4; ++j) {
      const array& a = in[j == 0 ? 2 : j == 1 ? 3 : j + 3];
      bf16[j] = a.dtype() == bfloat16;
      w[j] = bf16[j] ? static_cast<const void*>(a.data<bfloat16_t>()) : static_cast<const void*>(a.data<float>());
      wn[j] = a.shape(0);
      wk[j] = a.shape(1);
    }
    enc.dispatch([=]() {
      decode_layer_into(d, x, ln1, ln2, kp, vp, knew, vnew, mask, c, sn, y, [&](int j, const float* xi, float* yi) {
        if (bf16[j]) dense(xi, static_cast<const uint16_t*>(w[j]), yi, d.B, wk[j], wn[j]);
        else dense(xi, static_cast<const float*>(w[j]), yi, d.B, wk[j], wn[j]);
        if (j == 0 && bq)
          for (int64_t b = 0; b < d.B; ++b)
            for (int64_t n = 0; n < wn[0]; ++n) yi[b * wn[0] + n] += bq[n];
      });
    });
  }
  void eval_gpu(const std::vector<array>&, std::vector<array>&) override {
    throw std::runtime_error("decode_layer: a CPU kernel");
  }
  const char* name() const override { return "AdaptiveInferenceDecodeLayer"; }
  bool is_equivalent(const Primitive& other) const override {
    const auto& o = static_cast<const DecodeLayer&>(other);
    return pos_ == o.pos_ && H_ == o.H_ && Hkv_ == o.Hkv_ && eps_ == o.eps_ && mlp_ == o.mlp_;
  }

 private:
  int64_t pos_, H_, Hkv_;
  double eps_;
  bool mlp_;
};

std::tuple<array, array, array> decode_layer(const array& x, const array& ln1, const array& wqkv,
                                             std::optional<array> bqkv, const array& wo, const array& ln2,
                                             const array& w_gate_up, const array& w_down, const array& k,
                                             const array& v, const array& written, const array& cos,
                                             const array& sin, int64_t pos, int64_t H, int64_t Hkv, double eps,
                                             bool mlp) {
  const auto s = default_stream(Device::cpu);
  // a node per input costs graph time on every step: evaluated inputs (weights) go in as they are when
  // row-contiguous, copied otherwise; pending ones (x, RoPE, the cache, the mask slice) are row-contiguous as the
  // backend builds them, and eval_cpu refuses any that is not
  auto c = [&](const array& a) { return !a.is_available() || a.flags().row_contiguous ? a : contiguous(a, false, s); };
  std::vector<array> in = {c(x), c(ln1), c(wqkv), c(wo), c(ln2), c(w_gate_up), c(w_down), c(k), c(v), c(written),
                           c(cos), c(sin)};
  if (bqkv) in.push_back(c(*bqkv));
  for (int j : {0, 1, 4, 7, 8, 10, 11})
    if (in[j].dtype() != float32) throw std::invalid_argument("decode_layer: x, norms, cache and RoPE must be float32");
  const int64_t B = int64_t(x.size()) / x.shape(-1);
  if (B < 1 || B > 8 || written.dtype() != bool_ || k.ndim() != 4 || pos >= k.shape(2))
    throw std::invalid_argument("decode_layer: 1 to 8 rows, a bool written mask, a [B, Hkv, S, D] cache");
  const Shape slot{k.shape(0), k.shape(1), 1, k.shape(3)};
  auto outs = array::make_arrays({x.shape(), slot, slot}, {float32, float32, float32},
                                 std::make_shared<DecodeLayer>(s, pos, H, Hkv, eps, mlp), in);
  return {outs[0], outs[1], outs[2]};
}

// y_no = x @ w_no.T if some row of x does not take, y_yes = x @ w_yes.T if some row takes (zeros otherwise):
// a choice between two weights decided on the device (take is computed in the same graph), so one evaluation
// runs the whole step and only the chosen weight is read. x [M, K] fp32, take [M] bool.
class SelectLinear : public Primitive {
 public:
  explicit SelectLinear(Stream s) : Primitive(s) {}
  void eval_cpu(const std::vector<array>& in, std::vector<array>& out) override {
    auto& enc = begin_eval(stream(), in, out, "select_linear");
    const int64_t M = in[0].shape(0), K = in[0].shape(1);
    const float* x = in[0].data<float>();
    const bool* take = in[3].data<bool>();
    for (int j = 0; j < 2; ++j) {
      const array& w = in[1 + j];
      const int64_t N = w.shape(0);
      const bool want = j == 1;  // output j is needed where some row's take equals want
      const bool bf = w.dtype() == bfloat16;
      const void* wp = bf ? static_cast<const void*>(w.data<bfloat16_t>()) : static_cast<const void*>(w.data<float>());
      float* y = out[j].data<float>();
      enc.dispatch([=]() {
        bool needed = false;
        for (int64_t m = 0; m < M; ++m) needed |= take[m] == want;
        if (!needed) std::fill(y, y + M * N, 0.0f);
        else if (bf) dense(x, static_cast<const uint16_t*>(wp), y, M, K, N);
        else dense(x, static_cast<const float*>(wp), y, M, K, N);
      });
    }
  }
  void eval_gpu(const std::vector<array>&, std::vector<array>&) override {
    throw std::runtime_error("select_linear: a CPU kernel");
  }
  const char* name() const override { return "AdaptiveInferenceSelectLinear"; }
  bool is_equivalent(const Primitive&) const override { return true; }
};

// x [..., K] (any float dtype), w_no [C, K], w_yes [N, K] fp32 / bf16, take [...] bool (one per row of x, at
// most 8 rows) -> float32 (x @ w_no.T [..., C], x @ w_yes.T [..., N]), each computed only where a row needs it
std::tuple<array, array> select_linear(const array& x_in, const array& w_no, const array& w_yes, const array& take_in) {
  for (const array* w : {&w_no, &w_yes}) {
    if (w->ndim() != 2 || x_in.ndim() < 1 || x_in.shape(-1) != w->shape(1))
      throw std::invalid_argument("select_linear: expected x [..., K] and weights [N, K]");
    if (w->dtype() != float32 && w->dtype() != bfloat16)
      throw std::invalid_argument("select_linear: weights must be float32 or bfloat16");
  }
  const auto s = default_stream(Device::cpu);
  const int K = x_in.shape(-1);
  array x = contiguous(astype(reshape(x_in, {-1, K}, s), float32, s), false, s);
  if (x.shape(0) < 1 || x.shape(0) > 8) throw std::invalid_argument("select_linear: 1 to 8 rows");
  if (take_in.dtype() != bool_ || int64_t(take_in.size()) != x.shape(0))
    throw std::invalid_argument("select_linear: take must be bool, one per row of x");
  const array take = contiguous(reshape(take_in, {-1}, s), false, s);
  auto c = [&](const array& w) { return w.is_available() && w.flags().row_contiguous ? w : contiguous(w, false, s); };
  auto outs = array::make_arrays({{x.shape(0), w_no.shape(0)}, {x.shape(0), w_yes.shape(0)}}, {float32, float32},
                                 std::make_shared<SelectLinear>(s), {x, c(w_no), c(w_yes), take});
  Shape s_no = x_in.shape(), s_yes = x_in.shape();
  s_no.back() = w_no.shape(0);
  s_yes.back() = w_yes.shape(0);
  return {reshape(outs[0], s_no, s), reshape(outs[1], s_yes, s)};
}
}  // namespace

NB_MODULE(adaptive_inference_mlx_cpu, m) {
  m.def("dense_linear", &dense_linear, nanobind::arg("x"), nanobind::arg("w"));
  m.def("decode_layer", &decode_layer);
  m.def("select_linear", &select_linear);
  m.def("set_dense_layout", &set_dense_layout, nanobind::arg("layout"));
}
"""

_ext = None
layout = None  # the row order chosen for this CPU (cpu_gemv_source.choose_layout), once loaded


def has_avx2() -> bool:
    """AVX2, FMA and F16C on this CPU (Linux: /proc/cpuinfo)."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


def available() -> bool:
    """Whether this process can use the kernel: Linux (OpenMP, /proc) and MLX on its CPU device."""
    return sys.platform.startswith("linux") and mx.default_device().type == mx.DeviceType.cpu


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for dist in ("mlx", "nanobind"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"mlx_kernels: package {dist!r} is not installed (or set benchmark.runtime.cpu_matmul: "
                            "library)") from None
    return out


def _command(src: Path, out: Path, flags: list[str]) -> list[str]:
    import nanobind

    mlx_dir = Path(mx.__file__).resolve().parent  # the mlx package: include/ and lib/libmlx
    nb = Path(nanobind.__file__).resolve().parent
    return [os.environ.get("CXX", "g++"), "-O3", "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden",
            "-fno-strict-aliasing", "-fopenmp", "-DNDEBUG", "-DNB_COMPACT_ASSERTIONS", "-DNB_DOMAIN=mlx", *flags,
            f"-I{sysconfig.get_paths()['include']}", f"-I{nb / 'include'}", f"-I{nb / 'ext' / 'robin_map' / 'include'}",
            f"-I{mlx_dir / 'include'}", str(src), str(nb / "src" / "nb_combined.cpp"), f"-L{mlx_dir / 'lib'}",
            "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}", "-o", str(out)]


def _cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adaptive_inference" / "mlx_extensions"


def _build() -> Path:
    """The extension's path, compiled first if this (source, flags, versions) has no build in the cache."""
    flags = ["-mavx2", "-mfma", "-mf16c"] if has_avx2() else []
    key = hashlib.sha256(repr((_EXT_SRC, flags, sorted(_versions().items()))).encode()).hexdigest()[:16]
    final = _cache_dir() / key / (MODULE + importlib.machinery.EXTENSION_SUFFIXES[0])
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        src, out = Path(tmp) / "ext.cpp", Path(tmp) / final.name
        src.write_text(_EXT_SRC)
        try:
            cmd = _command(src, out, flags)
            if shutil.which(cmd[0]) is None:
                raise OSError(f"compiler {cmd[0]!r} not found")
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                errors = [ln for ln in run.stderr.splitlines() if "error" in ln] or run.stderr.splitlines() or ["?"]
                raise OSError(errors[0].strip())
        except (OSError, ImportError) as e:
            raise UserError(f"mlx_kernels: cannot build the MLX CPU kernel extension (needs g++, the Python headers "
                            f"and nanobind; or set benchmark.runtime.cpu_matmul: library): {e}") from None
        os.replace(out, final)  # atomic: a concurrent build of the same key writes the same file
    return final


def kernels():
    """The compiled extension module (built once per key, then loaded from the cache)."""
    global _ext
    if _ext is None:
        path = _build()
        spec = importlib.util.spec_from_file_location(MODULE, path)
        ext = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ext)
        try:  # mx.array crosses into the extension only when both share nanobind's internals ABI
            ext.dense_linear(mx.zeros((1, 8)), mx.zeros((4, 8)))
        except TypeError:
            raise UserError(f"mlx_kernels: the extension built with nanobind {_versions()['nanobind']} cannot take "
                            f"arrays of mlx {_versions()['mlx']} (a nanobind ABI mismatch: install the nanobind "
                            "version mlx was built with, or set benchmark.runtime.cpu_matmul: library)") from None
        global layout
        w, x = mx.full(cpu_gemv_source.TUNE_SHAPE, 0.5), mx.ones((1, cpu_gemv_source.TUNE_SHAPE[1]))
        mx.eval(w, x)
        layout = cpu_gemv_source.choose_layout(ext.set_dense_layout, lambda: mx.eval(ext.dense_linear(x, w)))
        _ext = ext
    return _ext


def dense_ok(x, w) -> bool:
    """Whether dense_linear takes this (x, w): at most MAX_ROWS rows and a 2-D fp32 / bf16 weight."""
    return (isinstance(w, mx.array) and w.ndim == 2 and w.dtype in (mx.float32, mx.bfloat16)
            and x.size <= MAX_ROWS * x.shape[-1])


def dense_linear(x, w):
    """x @ w.T for x [..., K] with at most MAX_ROWS rows and w [N, K] fp32 / bf16 (accumulated in fp32;
    returns x's dtype). A row-contiguous w is read in place; any other layout is copied first."""
    return kernels().dense_linear(x, w)


def decode_layer(x, lw, k, v, written, cos, sin, pos: int, n_heads: int, n_kv_heads: int, eps: float, mlp: bool):
    """One fp32 decode block (x [B, 1, hidden], B <= MAX_ROWS) in one graph node, attending over the cache k, v
    [B, Hkv, S, D] with slot pos open in written [B, S] (the caller marks it first): the block's output and the
    new slot's k, v [B, Hkv, 1, D] for the caller to write into its cache at pos."""
    return kernels().decode_layer(x, lw.ln1, lw.wqkv, lw.bqkv, lw.wo, lw.ln2, lw.w_gate_up, lw.w_down, k, v, written,
                                  cos, sin, pos, n_heads, n_kv_heads, eps, mlp)


def select_linear(x, w_no, w_yes, take):
    """float32 (x @ w_no.T, x @ w_yes.T) for x [..., K] with at most MAX_ROWS rows and take [...] bool (one per
    row): the first is computed only if some row does not take, the second only if some row takes (zeros
    otherwise), so a decision made in the same graph picks the weight read without the host reading it."""
    return kernels().select_linear(x, w_no, w_yes, take)
