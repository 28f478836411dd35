// Float hot loops of the CPU mixing kernels (mixing_cpu.cpp), free of torch headers so they can
// be compiled and inspected on their own (e.g. g++ -O3 -fopenmp -fopt-info-vec).
//
// They are branch-free and carry target_clones, so GCC auto-vectorises them for AVX-512 / AVX2
// and picks the clone at load time; exp and log are Cephes-style polynomials (~2 ulp) because
// libm's expf/logf do not vectorise without -ffast-math. They are the fallback of the
// hand-written AVX-512 / AVX2 exp loops (mixing_cpu_simd.h) and the loops those do not cover.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>


namespace btm_mixing {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BTM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BTM_CLONES
#endif

__attribute__((always_inline)) inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}
__attribute__((always_inline)) inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

// exp for x <= 0: every kernel argument is (value - running max) <= 0, so there is no overflow
// path to guard (saves a clamp and a select per element). Exact 0 below the normal range and
// for -inf; NaN propagates. Branch-free so the loops that call it vectorise.
__attribute__((always_inline)) inline float fast_exp_nonpos(float x) {
  const float xc = std::max(x, -87.0f);
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  float r = xc - n * 0.693359375f;                  // Cody-Waite split of ln 2
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  float out = y * scale;
  out = (x < -87.0f) ? 0.0f : out;
  return (x != x) ? x : out;
}

// log for x > 0 (Cephes logf); 0 -> -inf, NaN/negative -> NaN, +inf -> +inf.
__attribute__((always_inline)) inline float fast_logf(float x) {
  // Only float selects (no int ternaries, no short-circuit ||): GCC if-converts those.
  const int32_t bits = float_to_bits(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const float small = (m < 0.707106781186547524f) ? 1.0f : 0.0f;
  e -= small;
  m = m + m * small - 1.0f;  // 2m - 1 when small, else m - 1
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float y = p * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  float out = m + y + 0.693359375f * e;
  out = (x == 0.0f) ? -std::numeric_limits<float>::infinity() : out;
  out = (x == std::numeric_limits<float>::infinity()) ? x : out;
  out = (x < 0.0f) ? std::numeric_limits<float>::quiet_NaN() : out;
  return (x != x) ? x : out;
}

// ---- dtype conversions (the generic static_cast loops vectorise only at the baseline SSE width)
BTM_CLONES static void bf16_to_f32(const uint16_t* src, int64_t n, float* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_float(static_cast<int32_t>(src[i]) << 16);
}
// Round to nearest even, NaN stays NaN (as c10::BFloat16's constructor does).
BTM_CLONES static void f32_to_bf16(const float* src, int64_t n, uint16_t* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(float_to_bits(src[i]));
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    dst[i] = static_cast<uint16_t>(src[i] != src[i] ? 0x7fc0u : rounded);
  }
}

// ---- float hot loops (vectorised) ----
// 64 independent lanes: GCC turns the inner loop into 4 (AVX-512) or 8 (AVX2) vmaxps chains,
// which an `omp simd reduction(max)` loop did not reach (measured 3x slower than sumexp_f32).
BTM_CLONES static float max_f32(const float* x, int64_t n) {
  constexpr int W = 64;
  float acc[W];
  for (int j = 0; j < W; ++j) acc[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int j = 0; j < W; ++j) acc[j] = acc[j] > x[i + j] ? acc[j] : x[i + j];
  float m = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < W; ++j) m = m > acc[j] ? m : acc[j];
  for (; i < n; ++i) m = m > x[i] ? m : x[i];
  return m;
}
// Same 32-lane layout: independent partial sums (shorter add chains, and more accurate).
BTM_CLONES static float sumexp_f32(const float* x, int64_t n, float shift) {
  constexpr int W = 32;
  float acc[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int j = 0; j < W; ++j) acc[j] += fast_exp_nonpos(x[i + j] - shift);
  float s = 0.0f;
  for (int j = 0; j < W; ++j) s += acc[j];
  for (; i < n; ++i) s += fast_exp_nonpos(x[i] - shift);
  return s;
}
BTM_CLONES static void scaled_exp_f32(const float* x, int64_t n, float shift, float coef, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = coef * fast_exp_nonpos(x[i] - shift);
}
BTM_CLONES static void running_max_f32(const float* x, int64_t n, float shift, float b, float* mx) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {  // value selects, not std::max's reference (not if-converted)
    const float v = b + (x[i] - shift), cur = mx[i];
    mx[i] = cur > v ? cur : v;
  }
}
BTM_CLONES static void running_sum_f32(const float* x, int64_t n, float shift, float b, const float* mx,
                                float* s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s[i] += fast_exp_nonpos(b + (x[i] - shift) - mx[i]);
}
BTM_CLONES static void finish_lse_f32(const float* mx, const float* s, int64_t n, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = mx[i] + fast_logf(s[i]);
    out[i] = (mx[i] == -std::numeric_limits<float>::infinity()) ? mx[i] : v;
  }
}


}  // namespace btm_mixing
