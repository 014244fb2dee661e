"""Torch runtime for the packed gears (quant.py formats): `prepare(packed)` once, then `linear(x, prepared)`.

The matmul is a small C++ extension built at first use (torch.utils.cpp_extension; needs g++, ninja and the
Python headers, e.g. Debian build-essential, ninja-build, python3-dev). On x86 with AVX2+FMA+F16C it widens
the packed codes to fp32 in registers (activations stay fp32, so a gear's error is its weights' alone) and
splits output rows over torch's threads; elsewhere the same source builds a plain C++ loop. Stock kernels
were measured slower than fp32 on this CPU (DESIGN.md; scripts/bench_quant_kernels.py); fbgemm's dynamic
int8 is fast but also quantizes the activations.
Decode batches (1..8 rows) run in one pass over the weights; larger batches go 8 rows at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from . import quant
from .errors import UserError

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define AI_AVX2 1
#endif

namespace {

inline float h2f(uint16_t h) {
  c10::Half v; std::memcpy(&v, &h, 2); return static_cast<float>(v);
}

// acc[b][u] layout: U independent accumulators per batch row hide the FMA latency at small B.
constexpr int unroll(int B) { return B <= 2 ? 4 : (B <= 4 ? 2 : 1); }

#ifdef AI_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// y[b, n] = scale[n] * sum_k q[n, k] x[b, k]  for rows n in [n0, n1)
template <int B>
void w8_rows(const float* x, int64_t K, const int8_t* q, const float* scale, float* y, int64_t N,
             int64_t n0, int64_t n1) {
  constexpr int U = unroll(B);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = q + n * K;
    float tail[B] = {0};
    int64_t k = 0;
#ifdef AI_AVX2
    __m256 acc[B][U];
    for (int b = 0; b < B; ++b) for (int u = 0; u < U; ++u) acc[b][u] = _mm256_setzero_ps();
    for (; k + 8 * U <= K; k += 8 * U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k + 8 * u))));
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b)
          acc[b][u] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + b * K + k + 8 * u), acc[b][u]);
      }
    }
#endif
    for (; k < K; ++k)
      for (int b = 0; b < B; ++b) tail[b] += float(w[k]) * x[b * K + k];
    for (int b = 0; b < B; ++b) {
      float s = tail[b];
#ifdef AI_AVX2
      __m256 t = acc[b][0];
      for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[b][u]);
      s += hsum(t);
#endif
      y[b * N + n] = s * scale[n];
    }
  }
}

// 4-bit codes (+ optional 4-bit residual plane: code = 16 c + r, scale / 16, offset - 7.5 scale / 16).
// y[b, n] = sum_g scale[n, g] * (codes . x)_g + offset[n, g] * xsum[b, g]
template <int B, bool NESTED>
void w4_rows(const float* x, int64_t K, const uint8_t* c4, const uint8_t* r4, const uint16_t* scale,
             const uint16_t* minv, int64_t gs, const float* xsum, float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int U = unroll(B);
  const int64_t G = K / gs;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = c4 + n * (K / 2);
    const uint8_t* r = NESTED ? r4 + n * (K / 2) : nullptr;
    const uint16_t* sc = scale + n * G;
    const uint16_t* mn = minv + n * G;
    float out[B] = {0};
#ifdef AI_AVX2
    const __m128i low = _mm_set1_epi8(0x0F);
    __m256 tot[B][U];
    for (int b = 0; b < B; ++b) for (int u = 0; u < U; ++u) tot[b][u] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m256 acc[B][U];
      for (int b = 0; b < B; ++b) for (int u = 0; u < U; ++u) acc[b][u] = _mm256_setzero_ps();
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
        __m128i v = _mm_loadu_si128((const __m128i*)(c + k / 2));
        __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
        if (NESTED) {
          __m128i rv = _mm_loadu_si128((const __m128i*)(r + k / 2));
          lo = _mm_or_si128(_mm_slli_epi16(lo, 4), _mm_and_si128(rv, low));
          hi = _mm_or_si128(_mm_slli_epi16(hi, 4), _mm_and_si128(_mm_srli_epi16(rv, 4), low));
        }
        __m256 wf[4] = {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)))};
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j)
#pragma GCC unroll 8
          for (int b = 0; b < B; ++b)
            acc[b][j % U] = _mm256_fmadd_ps(wf[j], _mm256_loadu_ps(x + b * K + k + 8 * j), acc[b][j % U]);
      }
      __m256 s = _mm256_set1_ps(NESTED ? h2f(sc[g]) * 0.0625f : h2f(sc[g]));
      for (int b = 0; b < B; ++b)
        for (int u = 0; u < U; ++u) tot[b][u] = _mm256_fmadd_ps(acc[b][u], s, tot[b][u]);
    }
    for (int b = 0; b < B; ++b) {
      __m256 t = tot[b][0];
      for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, tot[b][u]);
      out[b] = hsum(t);
    }
#else
    for (int64_t g = 0; g < G; ++g) {
      float dot[B] = {0};
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
        int64_t blk = k / 32 * 16, i = k % 32;
        int code = i < 16 ? (c[blk + i] & 15) : (c[blk + i - 16] >> 4);
        if (NESTED) code = code * 16 + (i < 16 ? (r[blk + i] & 15) : (r[blk + i - 16] >> 4));
        for (int b = 0; b < B; ++b) dot[b] += float(code) * x[b * K + k];
      }
      float s = NESTED ? h2f(sc[g]) * 0.0625f : h2f(sc[g]);
      for (int b = 0; b < B; ++b) out[b] += s * dot[b];
    }
#endif
    for (int64_t g = 0; g < G; ++g) {
      float m = NESTED ? h2f(mn[g]) - 7.5f * (h2f(sc[g]) * 0.0625f) : h2f(mn[g]);
      for (int b = 0; b < B; ++b) out[b] += m * xsum[b * G + g];
    }
    for (int b = 0; b < B; ++b) y[b * N + n] = out[b];
  }
}

constexpr int64_t GRAIN = 16;  // output rows per task: small shapes still split over both threads

template <int B>
void w8_batch(const float* x, int64_t K, const int8_t* q, const float* s, float* y, int64_t N) {
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) { w8_rows<B>(x, K, q, s, y, N, n0, n1); });
}

template <int B>
void w4_batch(const float* x, int64_t K, const uint8_t* c, const uint8_t* r, const uint16_t* sc,
              const uint16_t* mn, int64_t gs, const float* xs, float* y, int64_t N) {
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    if (r) w4_rows<B, true>(x, K, c, r, sc, mn, gs, xs, y, N, n0, n1);
    else w4_rows<B, false>(x, K, c, r, sc, mn, gs, xs, y, N, n0, n1);
  });
}

#define AI_DISPATCH(B, CALL) switch (B) { \
  case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
  case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(8); }

}  // namespace

// x [M, K] fp32; q [N, K] int8; scale [N] fp32 -> [M, N]
torch::Tensor w8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({M, N}, x.options());
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int64_t B = std::min<int64_t>(8, M - m0);
    const float* xp = x.data_ptr<float>() + m0 * K;
    float* yp = y.data_ptr<float>() + m0 * N;
#define AI_W8(b) w8_batch<b>(xp, K, q.data_ptr<int8_t>(), scale.data_ptr<float>(), yp, N)
    AI_DISPATCH(B, AI_W8)
  }
  return y;
}

// x [M, K] fp32; codes/residual [N, K/2] uint8 (residual may be empty); scale/minv [N, K/gs] fp16
torch::Tensor w4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor residual, torch::Tensor scale,
                        torch::Tensor minv, int64_t gs) {
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), G = K / gs;
  auto y = torch::empty({M, N}, x.options());
  auto xsum = x.view({M, G, gs}).sum(2).contiguous();
  const uint8_t* r = residual.numel() ? residual.data_ptr<uint8_t>() : nullptr;
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* mn = reinterpret_cast<const uint16_t*>(minv.data_ptr<at::Half>());
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int64_t B = std::min<int64_t>(8, M - m0);
    const float* xp = x.data_ptr<float>() + m0 * K;
    const float* xs = xsum.data_ptr<float>() + m0 * G;
    float* yp = y.data_ptr<float>() + m0 * N;
#define AI_W4(b) w4_batch<b>(xp, K, codes.data_ptr<uint8_t>(), r, sc, mn, gs, xs, yp, N)
    AI_DISPATCH(B, AI_W4)
  }
  return y;
}
"""

_ext = None


def _has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def kernels():
    """The compiled extension (built once per source version into torch's extension cache)."""
    global _ext
    if _ext is None:
        from torch.utils import cpp_extension

        flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if _has_avx2() else [])
        try:
            _ext = cpp_extension.load_inline(
                name="adaptive_inference_quant_" + ("avx2" if _has_avx2() else "generic"),
                cpp_sources=_SRC, functions=["w8_linear", "w4_linear"], extra_cflags=flags,
                extra_ldflags=["-fopenmp"], verbose=bool(os.environ.get("ADAPTIVE_INFERENCE_VERBOSE_BUILD")))
        except (RuntimeError, OSError) as e:  # compiler, ninja or headers missing
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"quant_torch: cannot build the packed-matmul extension (needs g++, ninja, "
                            f"Python headers): {first}") from None
    return _ext


@dataclass(frozen=True)
class TorchPacked:
    """A packed weight in the kernel's layout; shares memory with the numpy state it came from."""

    kind: str  # "int8" or "int4"
    shape: tuple[int, int]  # [N, K]
    tensors: tuple  # int8: (q, scale); int4: (codes, residual or empty, scale, minv)
    group_size: int = 0


def prepare(p: quant.Int8Weight | quant.Int4Weight, *, depth: int | None = None) -> TorchPacked:
    """Kernel layout of a packed weight, read at depth (nested: 4 or 8). No copy and no float weight:
    the two gears of a nested weight share the same tensors."""
    if isinstance(p, quant.Int8Weight):
        return TorchPacked("int8", p.shape, (torch.from_numpy(np.ascontiguousarray(p.q)),
                                             torch.from_numpy(np.ascontiguousarray(p.scale, np.float32))))
    depth = max(p.depths) if depth is None else depth
    if depth not in p.depths:
        raise UserError(f"quant_torch.prepare: depth {depth} not stored (have {p.depths})")
    residual = torch.from_numpy(p.residual) if depth == 8 else torch.empty(0, dtype=torch.uint8)
    return TorchPacked("int4", p.shape, (torch.from_numpy(np.ascontiguousarray(p.codes)), residual,
                                         torch.from_numpy(np.ascontiguousarray(p.scale, np.float16)),
                                         torch.from_numpy(np.ascontiguousarray(p.minv, np.float16))),
                       p.group_size)


def linear(x: torch.Tensor, w: TorchPacked, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp32 -> [..., N], like F.linear(x, dequantized weight, bias)."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise UserError(f"quant_torch.linear: input has {x.shape[-1]} features, weight expects {k}")
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    if w.kind == "int8":
        y = kernels().w8_linear(x2, *w.tensors)
    else:
        y = kernels().w4_linear(x2, *w.tensors, w.group_size)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n).to(x.dtype)
