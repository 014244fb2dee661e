"""Torch CPU kernels: one C++ extension built at first use (torch.utils.cpp_extension; needs g++, ninja and
the Python headers, e.g. Debian build-essential, ninja-build, python3-dev) into torch's extension cache.

- w8_linear / w4_linear: the packed gears' matmuls (quant_torch wraps them).
- dense_linear: full-precision (fp32 / bf16) weights times 1-8 fp32 rows, the decode matmul (cpu_gemv_source,
  shared with mlx_kernels). TorchLM uses it on CPU for decode-sized inputs; it is registered as a torch custom
  op so a compiled decode step keeps it.
- decode_attention, silu_mul, rms_norm_rows: the rest of an fp32 decode step in few calls (RoPE + cache write
  + attention over the static cache is one call instead of ~25 torch ops): the eager step's per-op dispatch,
  not its arithmetic, is what they save.
- decode_layer: a whole block of that step in one call (the same helpers in the same order, so the same bits
  as the per-op calls): TorchLM's fp32 eager decode runs one call per block, ~15 fewer dispatches each.
Without AVX2+FMA+F16C the same source builds plain C++ loops with the same arithmetic.
"""

from __future__ import annotations

import os

import torch

from . import cpu_gemv_source
from .cpu_gemv_source import LAYER_SOURCE, SOURCE
from .errors import UserError

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cfloat>
#include <cmath>
#include <vector>
""" + SOURCE + r"""

namespace {

constexpr int64_t QB = 32;  // activation block: one int8 scale per 32 inputs (llama.cpp's Q8_0)

inline float h2f(uint16_t h) {
#ifdef AI_AVX2
  return _cvtsh_ss(h);
#else
  c10::Half v; std::memcpy(&v, &h, 2); return static_cast<float>(v);
#endif
}

// Activations of one batch chunk: int8 codes, a scale per 32-block, and per weight group the sum of the
// rounded activations (the offset term then sees the same x~ as the codes: y = x~ . w~ exactly).
struct Act {
  std::vector<int8_t> q;  // [B, K]
  std::vector<float> d;   // [B, K / 32]
  std::vector<float> gsum;  // [B, K / gs]
};

// x [B, K] -> xq = rint(x / d), d = max|x_block| / 127 (the same arithmetic as the scalar path and the test)
Act quantize_act(const float* x, int64_t B, int64_t K, int64_t gs) {
  const int64_t NB = K / QB, G = K / gs;
  Act a{std::vector<int8_t>(B * K), std::vector<float>(B * NB), std::vector<float>(B * G, 0.f)};
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < NB; ++j) {
      const float* v = x + b * K + j * QB;
      int8_t* q = a.q.data() + b * K + j * QB;
#ifdef AI_AVX2  // the same arithmetic as the scalar loop below: max is exact, cvtps rounds half to even
      const __m256 sign = _mm256_set1_ps(-0.f);
      __m256 x0 = _mm256_loadu_ps(v), x1 = _mm256_loadu_ps(v + 8), x2 = _mm256_loadu_ps(v + 16),
             x3 = _mm256_loadu_ps(v + 24);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, x0), _mm256_andnot_ps(sign, x1)),
                                _mm256_max_ps(_mm256_andnot_ps(sign, x2), _mm256_andnot_ps(sign, x3)));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
      const float d = amax / 127.f, id = d >= FLT_MIN ? 1.f / d : 0.f;  // a ~zero block: codes 0
      const __m256 iv = _mm256_set1_ps(id);
      __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(x0, iv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(x1, iv)),
              i2 = _mm256_cvtps_epi32(_mm256_mul_ps(x2, iv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(x3, iv));
      __m256i t = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
      __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
      t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
      const int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1)));
      __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
      packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), packed);
#else
      float amax = 0.f;
      for (int i = 0; i < QB; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.f, id = d >= FLT_MIN ? 1.f / d : 0.f;  // a ~zero block: codes 0
      int32_t sum = 0;
      for (int i = 0; i < QB; ++i) {
        q[i] = static_cast<int8_t>(std::nearbyint(v[i] * id));
        sum += q[i];
      }
#endif
      a.d[b * NB + j] = d;
      a.gsum[b * G + j * QB / gs] += d * float(sum);
    }
  }
  return a;
}

// U independent accumulators per batch row hide the FMA latency at small B; 8 registers in all.
constexpr int unroll(int B) { return B <= 2 ? 4 : (B <= 4 ? 2 : 1); }

#ifdef AI_AVX2

// 32 unsigned codes (< 128) . 32 int8 activations -> 8 int32 partial sums (no int16 saturation below 128)
inline __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// one 32-column block of 4-bit codes (byte i: column i low nibble, column 16 + i high nibble)
inline __m256i unpack4(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), low = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
}
#endif

// int8 per-channel: y[b, n] = scale[n] * sum_j d[b, j] * (q_nj . xq_bj)
template <int B>
void w8_rows(const Act& a, int64_t K, const int8_t* q, const float* scale, float* y, int64_t N,
             int64_t n0, int64_t n1) {
  constexpr int U = unroll(B);
  const int64_t NB = K / QB;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = q + n * K;
#ifdef AI_AVX2
    __m256 acc[B][U];
    for (int b = 0; b < B; ++b) for (int u = 0; u < U; ++u) acc[b][u] = _mm256_setzero_ps();
    auto block = [&](int64_t j, int u) __attribute__((always_inline)) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * QB));
      const __m256i aw = _mm256_sign_epi8(wv, wv);  // |w| as unsigned, sign moved onto x
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + b * K + j * QB));
        const __m256i p = dot_u8s8(aw, _mm256_sign_epi8(xv, wv));
        acc[b][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(a.d[b * NB + j]), acc[b][u]);
      }
    };
    int64_t j = 0;
    for (; j + U <= NB; j += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) block(j + u, u);
    }
    for (; j < NB; ++j) block(j, 0);
    for (int b = 0; b < B; ++b) {
      __m256 t = acc[b][0];
      for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[b][u]);
      y[b * N + n] = hsum(t) * scale[n];
    }
#else
    for (int b = 0; b < B; ++b) {
      float s = 0.f;
      for (int64_t j = 0; j < NB; ++j) {
        int32_t dot = 0;
        for (int64_t k = j * QB; k < (j + 1) * QB; ++k) dot += int32_t(w[k]) * a.q[b * K + k];
        s += float(dot) * a.d[b * NB + j];
      }
      y[b * N + n] = s * scale[n];
    }
#endif
  }
}

// 4-bit codes (+ optional residual plane: code 16 c + r, scale / 16, offset minv - 7.5 scale / 16):
// y[b, n] = sum_j scale[n, g(j)] d[b, j] (codes_nj . xq_bj) + sum_g offset[n, g] gsum[b, g]
template <int B, bool NESTED>
void w4_rows(const Act& a, int64_t K, const uint8_t* c4, const uint8_t* r4, const uint16_t* scale,
             const uint16_t* minv, int64_t gs, float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int U = unroll(B);
  const int64_t NB = K / QB, G = K / gs;
  const int shift = __builtin_ctzll(gs / QB);  // block j lies in group j >> shift (gs: a power of two)
  const float sdiv = NESTED ? 1.f / 16 : 1.f;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = c4 + n * (K / 2);
    const uint8_t* r = NESTED ? r4 + n * (K / 2) : nullptr;
    const uint16_t* sc = scale + n * G;
    const uint16_t* mn = minv + n * G;
    float out[B];
#ifdef AI_AVX2
    __m256 acc[B][U];
    for (int b = 0; b < B; ++b) for (int u = 0; u < U; ++u) acc[b][u] = _mm256_setzero_ps();
    auto block = [&](int64_t j, int u) __attribute__((always_inline)) {
      const __m256i cv = unpack4(c + j * QB / 2);
      const __m256i rv = NESTED ? unpack4(r + j * QB / 2) : cv;
      const __m256 sv = _mm256_set1_ps(h2f(sc[j >> shift]) * sdiv);
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + b * K + j * QB));
        __m256i p = dot_u8s8(cv, xv);
        if (NESTED) p = _mm256_add_epi32(_mm256_slli_epi32(p, 4), dot_u8s8(rv, xv));
        const __m256 d = _mm256_mul_ps(sv, _mm256_set1_ps(a.d[b * NB + j]));
        acc[b][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc[b][u]);
      }
    };
    int64_t j = 0;
    for (; j + U <= NB; j += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) block(j + u, u);
    }
    for (; j < NB; ++j) block(j, 0);
    for (int b = 0; b < B; ++b) {
      __m256 t = acc[b][0];
      for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[b][u]);
      out[b] = hsum(t);
    }
#else
    for (int b = 0; b < B; ++b) {
      out[b] = 0.f;
      for (int64_t j = 0; j < NB; ++j) {
        int32_t dot = 0;
        for (int64_t k = j * QB; k < (j + 1) * QB; ++k) {
          const int64_t byte = k / QB * (QB / 2) + k % (QB / 2);
          const int shift = k % QB < QB / 2 ? 0 : 4;
          int code = (c[byte] >> shift) & 15;
          if (NESTED) code = code * 16 + ((r[byte] >> shift) & 15);
          dot += code * a.q[b * K + k];
        }
        out[b] += float(dot) * (h2f(sc[j >> shift]) * sdiv * a.d[b * NB + j]);
      }
    }
#endif
    int64_t g = 0;  // offsets: sum_g offset[n, g] * gsum[b, g]
#ifdef AI_AVX2
    __m256 o[B];
    for (int b = 0; b < B; ++b) o[b] = _mm256_setzero_ps();
    for (; g + 8 <= G; g += 8) {
      __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + g)));
      if (NESTED)
        m = _mm256_fnmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g))),
                             _mm256_set1_ps(7.5f * sdiv), m);
      for (int b = 0; b < B; ++b) o[b] = _mm256_fmadd_ps(m, _mm256_loadu_ps(a.gsum.data() + b * G + g), o[b]);
    }
    for (int b = 0; b < B; ++b) out[b] += hsum(o[b]);
#endif
    for (; g < G; ++g) {
      const float m = NESTED ? h2f(mn[g]) - 7.5f * (h2f(sc[g]) * sdiv) : h2f(mn[g]);
      for (int b = 0; b < B; ++b) out[b] += m * a.gsum[b * G + g];
    }
    for (int b = 0; b < B; ++b) y[b * N + n] = out[b];
  }
}

constexpr int64_t GRAIN = 16;  // output rows per task: small shapes still split over both threads


}  // namespace

// x [M, K] fp32 (K % 32 == 0); q [N, K] int8; scale [N] fp32 -> [M, N]
torch::Tensor w8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({M, N}, x.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int64_t B = std::min<int64_t>(8, M - m0);
    const Act a = quantize_act(x.data_ptr<float>() + m0 * K, B, K, QB);
    float* yp = y.data_ptr<float>() + m0 * N;
#define AI_W8(b) at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) { w8_rows<b>(a, K, qp, sp, yp, N, n0, n1); })
    AI_DISPATCH(B, AI_W8)
  }
  return y;
}

// x [M, K] fp32; codes/residual [N, K/2] uint8 (residual empty: depth 4); scale/minv [N, K/gs] fp16;
// gs a power of two >= 32
torch::Tensor w4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor residual, torch::Tensor scale,
                        torch::Tensor minv, int64_t gs) {
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint8_t* rp = residual.numel() ? residual.data_ptr<uint8_t>() : nullptr;
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* mn = reinterpret_cast<const uint16_t*>(minv.data_ptr<at::Half>());
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int64_t B = std::min<int64_t>(8, M - m0);
    const Act a = quantize_act(x.data_ptr<float>() + m0 * K, B, K, gs);
    float* yp = y.data_ptr<float>() + m0 * N;
#define AI_W4(b) at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) { \
      if (rp) w4_rows<b, true>(a, K, cp, rp, sc, mn, gs, yp, N, n0, n1); \
      else w4_rows<b, false>(a, K, cp, rp, sc, mn, gs, yp, N, n0, n1); })
    AI_DISPATCH(B, AI_W4)
  }
  return y;
}

namespace {

// y [M, N] = x [M, K] . w^T (+ b), M <= 8, for fp32 or bf16 weights [N, K]
void dense_into(const float* xp, const torch::Tensor& w, const float* b, float* yp, int64_t M) {
  const int64_t K = w.size(1), N = w.size(0);
  if (w.scalar_type() == at::kFloat) {
    const float* wp = w.data_ptr<float>();
#define AI_DF(b) at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) { dense_rows<b>(xp, wp, yp, K, N, n0, n1); })
    AI_DISPATCH(M, AI_DF)
  } else {
    TORCH_CHECK(w.scalar_type() == at::kBFloat16, "dense_linear: weights fp32 or bf16");
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
    AI_DISPATCH(M, AI_DF)
  }
  if (b)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) yp[m * N + n] += b[n];
}

}  // namespace

// x [M, K] fp32 contiguous, M <= 8; w [N, K] fp32 or bf16 contiguous -> [M, N] fp32
torch::Tensor dense_linear(torch::Tensor x, torch::Tensor w) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= 8 && w.size(1) == K, "dense_linear: x [1..8, K], w [N, K]");
  auto y = torch::empty({M, N}, x.options());
  dense_into(x.data_ptr<float>(), w, nullptr, y.data_ptr<float>(), M);
  return y;
}

namespace {
template <typename F>
void ai_parallel_for(int64_t n, int64_t grain, const F& f) { at::parallel_for(0, n, grain, f); }
}  // namespace
""" + LAYER_SOURCE + r"""

// decode_attention: qkv [B, (H + 2 Hkv) D]; k, v [B, Hkv, S, D]; bias [B, S] (0 written, -inf a hole: slot pos
// is marked written here); cos, sin [D] at pos -> [B, H D]
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor kc, torch::Tensor vc, torch::Tensor bias,
                               torch::Tensor cos, torch::Tensor sin, int64_t pos, int64_t H, int64_t Hkv) {
  const int64_t B = qkv.size(0), D = cos.size(0), S = kc.size(2);
  TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * D && kc.size(1) == Hkv && kc.size(3) == D && pos < S,
              "decode_attention: shapes");
  auto out = torch::empty({B, H * D}, qkv.options());
  float* bp = bias.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) bp[b * S + pos] = 0.f;
  std::vector<float> knew(B * Hkv * D), vnew(B * Hkv * D);
  attention_into(qkv.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), knew.data(), vnew.data(),
                 static_cast<const float*>(bp), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr<float>(), B,
                 S, D, pos, H, Hkv);
  write_slot(kc.data_ptr<float>(), vc.data_ptr<float>(), knew.data(), vnew.data(), B, Hkv, S, D, pos);
  return out;
}

torch::Tensor silu_mul(torch::Tensor x) {
  auto y = torch::empty({x.size(0), x.size(1) / 2}, x.options());
  silu_mul_into(x.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1) / 2);
  return y;
}

torch::Tensor rms_norm_rows(torch::Tensor x, torch::Tensor w, double eps) {
  auto y = torch::empty_like(x);
  rms_into(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), eps);
  return y;
}

// One block of an fp32 decode step in one call (decode_layer_into: the per-op calls' order and arithmetic,
// so the per-op path's output bit for bit). x [B, hidden], B <= 8 -> the block's output.
torch::Tensor decode_layer(torch::Tensor x, torch::Tensor ln1, torch::Tensor wqkv, c10::optional<torch::Tensor> bqkv,
                           torch::Tensor wo, torch::Tensor ln2, torch::Tensor w_gate_up, torch::Tensor w_down,
                           torch::Tensor kc, torch::Tensor vc, torch::Tensor bias, torch::Tensor cos,
                           torch::Tensor sin, int64_t pos, int64_t H, int64_t Hkv, double eps, bool mlp) {
  const Block d{x.size(0), x.size(1), H, Hkv, cos.size(0), kc.size(2), w_down.size(1), pos, eps, mlp};
  TORCH_CHECK(d.B >= 1 && d.B <= 8 && x.is_contiguous() && wqkv.size(0) == (H + 2 * Hkv) * d.D &&
              wqkv.size(1) == d.E && wo.size(0) == d.E && wo.size(1) == H * d.D && kc.size(1) == Hkv &&
              kc.size(3) == d.D && pos < d.S && w_gate_up.size(0) == 2 * d.I && w_gate_up.size(1) == d.E &&
              w_down.size(0) == d.E, "decode_layer: shapes");
  auto y = torch::empty_like(x);
  float* bp = bias.data_ptr<float>();
  for (int64_t b = 0; b < d.B; ++b) bp[b * d.S + pos] = 0.f;
  const torch::Tensor* w[4] = {&wqkv, &wo, &w_gate_up, &w_down};
  const float* bq = bqkv ? bqkv->data_ptr<float>() : nullptr;
  std::vector<float> knew(d.B * Hkv * d.D), vnew(d.B * Hkv * d.D);
  decode_layer_into(d, x.data_ptr<float>(), ln1.data_ptr<float>(), ln2.data_ptr<float>(), kc.data_ptr<float>(),
                    vc.data_ptr<float>(), knew.data(), vnew.data(), static_cast<const float*>(bp), cos.data_ptr<float>(),
                    sin.data_ptr<float>(), y.data_ptr<float>(),
                    [&](int which, const float* in, float* out) { dense_into(in, *w[which], which ? nullptr : bq, out, d.B); });
  write_slot(kc.data_ptr<float>(), vc.data_ptr<float>(), knew.data(), vnew.data(), d.B, Hkv, d.S, d.D, pos);
  return y;
}
"""

_ext = None
layout = None  # the row order chosen for this CPU (cpu_gemv_source.choose_layout), once loaded


def has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def kernels():
    """The compiled extension (built once per source version into torch's extension cache)."""
    global _ext
    if _ext is None:
        from torch.utils import cpp_extension

        flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if has_avx2() else [])
        try:
            ext = cpp_extension.load_inline(
                name="adaptive_inference_cpu_" + ("avx2" if has_avx2() else "generic"),
                cpp_sources=_SRC, functions=["w8_linear", "w4_linear", "dense_linear", "decode_attention", "silu_mul",
                                                "rms_norm_rows", "decode_layer", "set_dense_layout"], extra_cflags=flags,
                extra_ldflags=["-fopenmp"], verbose=bool(os.environ.get("ADAPTIVE_INFERENCE_VERBOSE_BUILD")))
        except (RuntimeError, OSError) as e:  # compiler, ninja or headers missing
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"torch_kernels: cannot build the CPU kernel extension (needs g++, ninja, Python "
                            f"headers; or set benchmark.runtime.cpu_matmul: library): {first}") from None
        global layout
        w, x = torch.full(cpu_gemv_source.TUNE_SHAPE, 0.5), torch.ones(1, cpu_gemv_source.TUNE_SHAPE[1])
        layout = cpu_gemv_source.choose_layout(ext.set_dense_layout, lambda: ext.dense_linear(x, w))
        _ext = ext  # only once built and tuned: a failure leaves nothing half-set
    return _ext


DENSE_ROWS = 8  # the most input rows dense_linear takes; larger inputs go to F.linear (MKL's sgemm)


@torch.library.custom_op("adaptive_inference::dense_linear", mutates_args=())
def _dense_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return kernels().dense_linear(x, w)


@_dense_op.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


def dense_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b) for x [..., K] with at most DENSE_ROWS rows and a contiguous fp32 / bf16 w [N, K]
    on CPU; accumulates in fp32 and returns x's dtype."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.to(torch.float32).contiguous()
    y = _dense_op(x2, w) if torch.compiler.is_compiling() else kernels().dense_linear(x2, w)
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)


def dense_weight(w) -> bool:
    """Whether dense_linear (and decode_layer) read this weight: a contiguous fp32 / bf16 CPU matrix."""
    return (isinstance(w, torch.Tensor) and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)
            and w.dim() == 2 and w.is_contiguous())


def dense_ok(x: torch.Tensor, w) -> bool:
    """Whether dense_linear takes this (x, w): few rows, a dense_weight."""
    return dense_weight(w) and x.numel() <= DENSE_ROWS * x.shape[-1]
