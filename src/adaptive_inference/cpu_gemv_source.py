"""C++ of the CPU decode matmul, shared by the torch extension (torch_kernels) and the MLX one (mlx_kernels):
dense fp32 / bf16 weights [N, K] times 1-8 fp32 rows, split by output rows (each caller brings its threads).
Without AVX2+FMA+F16C the same source builds plain loops with the same arithmetic."""

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
// MKL's sgemv reached 13 GB/s on this project's 2-core CPU where a plain read runs at 27; four weight rows
// per pass with one FMA chain each reads at ~22. bf16 weights widen to fp32 exactly (a 16-bit shift).
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

template <int B, typename W>
void dense_rows(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
#ifdef AI_AVX2
  const int64_t K8 = K / 8 * 8;
  if (B == 1) {
    for (; n + 4 <= n1; n += 4) {
      const W *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t k = 0; k < K8; k += 8) {
        const __m256 xv = _mm256_loadu_ps(x + k);
        s0 = _mm256_fmadd_ps(load8(w0 + k), xv, s0);
        s1 = _mm256_fmadd_ps(load8(w1 + k), xv, s1);
        s2 = _mm256_fmadd_ps(load8(w2 + k), xv, s2);
        s3 = _mm256_fmadd_ps(load8(w3 + k), xv, s3);
      }
      float t[4] = {hsum(s0), hsum(s1), hsum(s2), hsum(s3)};
      for (int64_t k = K8; k < K; ++k)
        for (int j = 0; j < 4; ++j) t[j] += widen(w[(n + j) * K + k]) * x[k];
      for (int j = 0; j < 4; ++j) y[n + j] = t[j];
    }
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

}  // namespace
"""
