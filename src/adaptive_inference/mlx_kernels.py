"""MLX CPU kernels: one C++ extension (an MLX custom primitive, bound with nanobind) built at first use into
a cache folder, keyed by its source, flags and the mlx / nanobind / Python versions.

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
from .cpu_gemv_source import SOURCE
from .errors import UserError

mx = import_mlx()

MODULE = "adaptive_inference_mlx_cpu"
MAX_ROWS = 8  # the most input rows dense_linear takes; larger inputs go to MLX's matmul (BLAS sgemm)
CACHE_ENV = "ADAPTIVE_INFERENCE_MLX_EXTENSIONS"

_EXT_SRC = r"""
#include <nanobind/nanobind.h>
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
  array y(Shape{x.shape(0), N}, float32, std::make_shared<DenseLinear>(s), {x, contiguous(w, false, s)});
  Shape shape = x_in.shape();
  shape.back() = N;
  return astype(reshape(y, shape, s), x_in.dtype(), s);
}
}  // namespace

NB_MODULE(adaptive_inference_mlx_cpu, m) {
  m.def("dense_linear", &dense_linear, nanobind::arg("x"), nanobind::arg("w"));
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
