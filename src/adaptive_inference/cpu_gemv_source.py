"""C++ of the CPU decode matmul, shared by the torch extension (torch_kernels) and the MLX one (mlx_kernels):
dense fp32 / bf16 weights [N, K] times 1-8 fp32 rows, split by output rows (each caller brings its threads).
Without AVX2+FMA+F16C the same source builds plain loops with the same arithmetic. The row order of
single-row decode is timed on first use (choose_layout). LAYER_SOURCE: the rest of an fp32 decode block
(norms, SiLU gate, attention over a static cache, a whole block over a caller's matmul), also shared."""

from __future__ import annotations

import statistics
import time

from .errors import env_choice

SOURCE = r"""
#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define AI_AVX2 1
#endif

namespace {

#ifdef AI_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// ---- dense weights (fp32 or bf16) times a few fp32 rows: the decode matmul -------------------------
// MKL's sgemv reached 13 GB/s on this project's 2-core CPU where a plain read runs at 27; streaming the rows
// with two FMA chains each reads at 22-44. Which order streams best depends on the CPU (2-thread reads of
// 576-wide rows, GB/s): an Intel Xeon reads four rows side by side at 22-25 and one row after another at
// 18-20; an AMD EPYC the reverse (23-30 vs 28-44). Both orders give every row the same sum (chains a / b
// over alternate 8-wide blocks, then the tail), so the order is a speed choice only (dense_layout, timed
// on first use by the Python side). bf16 weights widen to fp32 exactly (a 16-bit shift).
int g_dense_layout = 0;  // 0: four rows side by side, 1: one row after another
#ifdef AI_AVX2
template <typename W> inline __m256 load8(const W* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<uint16_t>(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
#endif
inline float widen(float v) { return v; }
inline float widen(uint16_t v) { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; }

#ifdef AI_AVX2
// R rows from wn (K apart) against x: a[r] takes the 8-blocks at k % 16 == 0 (and a last lone block), b[r]
// the others; y[r] = hsum(a + b) + the scalar tail. R = 1 and R = 4 give each row the same float sum.
template <int R, typename W>
inline void dot_rows(const float* x, const W* wn, float* y, int64_t K) {
  const int64_t K16 = K / 16 * 16, K8 = K / 8 * 8;
  __m256 a[R], b[R];
  for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int r = 0; r < R; ++r) {
      a[r] = _mm256_fmadd_ps(load8(wn + r * K + k), x0, a[r]);
      b[r] = _mm256_fmadd_ps(load8(wn + r * K + k + 8), x1, b[r]);
    }
  }
  if (K8 > K16)
    for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(load8(wn + r * K + K16), _mm256_loadu_ps(x + K16), a[r]);
  for (int r = 0; r < R; ++r) {
    float t = hsum(_mm256_add_ps(a[r], b[r]));
    for (int64_t k = K8; k < K; ++k) t += widen(wn[r * K + k]) * x[k];
    y[r] = t;
  }
}
#endif

template <int B, typename W>
void dense_rows(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
#ifdef AI_AVX2
  const int64_t K8 = K / 8 * 8;
  if (B == 1) {
    if (g_dense_layout == 0)
      for (; n + 4 <= n1; n += 4) dot_rows<4>(x, w + n * K, y + n, K);
    for (; n < n1; ++n) dot_rows<1>(x, w + n * K, y + n, K);
    return;
  }
  for (; n < n1; ++n) {
    const W* wn = w + n * K;
    __m256 s[B];
    for (int b = 0; b < B; ++b) s[b] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256 wv = load8(wn + k);
      for (int b = 0; b < B; ++b) s[b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * K + k), s[b]);
    }
    for (int b = 0; b < B; ++b) {
      float t = hsum(s[b]);
      for (int64_t k = K8; k < K; ++k) t += widen(wn[k]) * x[b * K + k];
      y[b * N + n] = t;
    }
  }
#else
  for (; n < n1; ++n)
    for (int b = 0; b < B; ++b) {
      float t = 0.f;
      for (int64_t k = 0; k < K; ++k) t += widen(w[n * K + k]) * x[b * K + k];
      y[b * N + n] = t;
    }
#endif
}

#define AI_DISPATCH(B, CALL) switch (B) { \
  case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
  case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(8); }

void set_dense_layout(int64_t layout) { g_dense_layout = int(layout); }

}  // namespace
"""

# The rest of an fp32 decode block, shared by both extensions (each defines ai_parallel_for(n, grain, f), f(i0, i1),
# before this source, on its own threads): RMSNorm, SiLU gate, RoPE + cache write + attention over a static
# cache, and decode_layer_into, a whole block over a caller's matmul.
LAYER_SOURCE = r"""
#include <cmath>
#include <vector>

namespace {

// RMSNorm of each row of x [M, K] times w [K], fp32 (torch's rms_norm arithmetic: mean of squares in fp32).
void rms_into(const float* xp, const float* wp, float* yp, int64_t M, int64_t K, double eps) {
  for (int64_t m = 0; m < M; ++m) {
    float ss = 0.f;
    for (int64_t k = 0; k < K; ++k) ss += xp[m * K + k] * xp[m * K + k];
    const float r = 1.f / std::sqrt(ss / K + static_cast<float>(eps));
    for (int64_t k = 0; k < K; ++k) yp[m * K + k] = xp[m * K + k] * r * wp[k];
  }
}

// silu(a) * b for x = [a | b] along the last dim: [M, 2I] -> [M, I], fp32.
void silu_mul_into(const float* xp, float* yp, int64_t M, int64_t I) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < I; ++i) {
      const float a = xp[m * 2 * I + i];
      yp[m * I + i] = a / (1.f + std::exp(-a)) * xp[m * 2 * I + I + i];
    }
}

// q . k over D floats: 8-wide FMA lanes, then their sum (a scalar loop without AVX2 or when D % 8 != 0)
inline float dot(const float* q, const float* k, int64_t D) {
#ifdef AI_AVX2
  if (D % 8 == 0) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), a);
    return hsum(a);
  }
#endif
  float t = 0.f;
  for (int64_t d = 0; d < D; ++d) t += q[d] * k[d];
  return t;
}

// o += e v over D floats
inline void axpy(float e, const float* v, float* o, int64_t D) {
  int64_t d = 0;
#ifdef AI_AVX2
  const __m256 ev = _mm256_set1_ps(e);
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(o + d, _mm256_fmadd_ps(ev, _mm256_loadu_ps(v + d), _mm256_loadu_ps(o + d)));
#endif
  for (; d < D; ++d) o[d] += e * v[d];
}

// a slot's mask: an additive bias (-inf: never written) or a written flag
inline bool open_slot(float b) { return !(std::isinf(b) && b < 0); }
inline float slot_bias(float b) { return b; }
inline bool open_slot(bool w) { return w; }
inline float slot_bias(bool) { return 0.f; }

// One decode step of attention for one layer, fp32: RoPE on q and k; the new slot's k (rotated) and v go to
// knew, vnew [B, Hkv, D] (the caller writes them into its cache at pos), then softmax(q k^T / sqrt(D) + bias) v
// over the open slots of mask [B, S] (the caller opens pos), slot pos read from knew / vnew and the others from
// the cache k, v [B, Hkv, S, D]. x = qkv [B, (H + 2 Hkv) D]; cos, sin [D] at pos; o [B, H D]. The unfused ops'
// math.
template <typename Mask>
void attention_into(const float* x, const float* kp, const float* vp, float* knew, float* vnew, const Mask* mask,
                    const float* c, const float* sn, float* o, int64_t B, int64_t S, int64_t D, int64_t pos,
                    int64_t H, int64_t Hkv) {
  const int64_t half = D / 2, G = H / Hkv, row = (H + 2 * Hkv) * D;
  auto rope = [&](const float* in, float* dst) {
    for (int64_t i = 0; i < half; ++i) {
      dst[i] = in[i] * c[i] - in[i + half] * sn[i];
      dst[i + half] = in[i + half] * c[i + half] + in[i] * sn[i + half];
    }
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Hkv; ++g) {
      const float* kin = x + b * row + H * D + g * D;
      rope(kin, knew + (b * Hkv + g) * D);
      std::memcpy(vnew + (b * Hkv + g) * D, kin + Hkv * D, D * sizeof(float));
    }
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S * D));  // tiny steps stay on one thread
  ai_parallel_for(B * H, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> q(D), p(S);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / G;
      rope(x + b * row + h * D, q.data());
      const float* kb = kp + (b * Hkv + g) * S * D;
      const float* vb = vp + (b * Hkv + g) * S * D;
      const float *kn = knew + (b * Hkv + g) * D, *vn = vnew + (b * Hkv + g) * D;
      const Mask* mb = mask + b * S;
      float mx = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        if (!open_slot(mb[s])) { p[s] = -INFINITY; continue; }
        p[s] = dot(q.data(), s == pos ? kn : kb + s * D, D) * scale + slot_bias(mb[s]);
        mx = std::max(mx, p[s]);
      }
      float* oh = o + b * H * D + h * D;
      std::fill(oh, oh + D, 0.f);
      float sum = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        if (p[s] == -INFINITY) continue;
        const float e = std::exp(p[s] - mx);
        sum += e;
        axpy(e, s == pos ? vn : vb + s * D, oh, D);
      }
      for (int64_t d = 0; d < D; ++d) oh[d] /= sum;
    }
  });
}

// knew, vnew [B, Hkv, D] into slot pos of a cache k, v [B, Hkv, S, D]
inline void write_slot(float* kp, float* vp, const float* knew, const float* vnew, int64_t B, int64_t Hkv, int64_t S,
                       int64_t D, int64_t pos) {
  for (int64_t bg = 0; bg < B * Hkv; ++bg) {
    std::memcpy(kp + (bg * S + pos) * D, knew + bg * D, D * sizeof(float));
    std::memcpy(vp + (bg * S + pos) * D, vnew + bg * D, D * sizeof(float));
  }
}

struct Block {  // one decode block's shapes and scalars
  int64_t B, E, H, Hkv, D, S, I, pos;
  double eps;
  bool mlp;
};

// One block of an fp32 decode step (one position per row, B <= 8): rms, q/k/v (mm 0, bias included),
// attention (the caller opened slot pos in mask; the new slot's k, v into knew, vnew), o (mm 1), the residual add, and when the MLP runs rms,
// gate/up (mm 2), the SiLU gate, down (mm 3), the add: the per-op path's order and arithmetic.
// mm(which, x [B, K], y [B, N]) multiplies by the block's matrix `which`.
template <typename Mask, typename MM>
void decode_layer_into(const Block& d, const float* x, const float* ln1, const float* ln2, const float* kp,
                       const float* vp, float* knew, float* vnew, const Mask* mask, const float* c, const float* sn,
                       float* y, const MM& mm) {
  const int64_t B = d.B, E = d.E;
  std::vector<float> h(B * E), qkv(B * (d.H + 2 * d.Hkv) * d.D), att(B * d.H * d.D), o(B * E);
  rms_into(x, ln1, h.data(), B, E, d.eps);
  mm(0, h.data(), qkv.data());
  attention_into(qkv.data(), kp, vp, knew, vnew, mask, c, sn, att.data(), B, d.S, d.D, d.pos, d.H, d.Hkv);
  mm(1, att.data(), o.data());
  for (int64_t i = 0; i < B * E; ++i) y[i] = x[i] + o[i];
  if (!d.mlp) return;
  std::vector<float> gu(B * 2 * d.I), act(B * d.I);
  rms_into(y, ln2, h.data(), B, E, d.eps);
  mm(2, h.data(), gu.data());
  silu_mul_into(gu.data(), act.data(), B, d.I);
  mm(3, act.data(), o.data());
  for (int64_t i = 0; i < B * E; ++i) y[i] += o[i];
}

}  // namespace
"""

LAYOUTS = {"rows4": 0, "sequential": 1}  # four rows side by side | one row after another
LAYOUT_NAMES = {"rows4": "rows side by side", "sequential": "one row after another"}
TUNE_SHAPE = (65536, 512)  # 128 MiB of fp32 weights: past the last-level cache of the CPUs this runs on
LAYOUT_ENV = "ADAPTIVE_INFERENCE_DENSE_LAYOUT"


def choose_layout(set_layout, one_pass, rounds: int = 5) -> str:
    """The faster row order on this CPU for single-row decode, by timing it: one_pass() runs the kernel once
    over weights larger than the caches; the two orders alternate for `rounds` rounds (a shared machine's
    read speed drifts) and the lower median wins. $ADAPTIVE_INFERENCE_DENSE_LAYOUT (rows4 | sequential)
    fixes it instead. Both orders compute the same sums, so the choice moves speed, never a result."""
    forced = env_choice(LAYOUT_ENV, tuple(LAYOUTS), None)
    if forced:
        set_layout(LAYOUTS[forced])
        return forced
    times = {name: [] for name in LAYOUTS}
    for _ in range(rounds):
        for name, code in LAYOUTS.items():
            set_layout(code)
            one_pass()
            t0 = time.perf_counter()
            one_pass()
            times[name].append(time.perf_counter() - t0)
    best = min(times, key=lambda n: statistics.median(times[n]))
    set_layout(LAYOUTS[best])
    return best



def kernel_name(layout: str) -> str:
    """What a backend records as its decode matmul when the kernel runs with this row order."""
    return f"adaptive_inference dense_linear (AVX2 gemv, {LAYOUT_NAMES[layout]})"
