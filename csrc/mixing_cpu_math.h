// Float hot loops of the CPU mixing kernels (mixing_cpu.cpp), free of torch headers so they can
// be compiled and inspected on their own (e.g. g++ -O3 -fopenmp -fopt-info-vec).
//
// They are branch-free and carry target_clones, so GCC auto-vectorises them for AVX-512 / AVX2
// and picks the clone at load time; exp and log are Cephes-style polynomials (~2 ulp) because
// libm's expf/logf do not vectorise without -ffast-math.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

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


// ---- AVX-512 exp (hand-written: GCC's auto-vectorised fast_exp_nonpos costs ~22 vector ops per
// 16 floats; vscalefps and vrndscaleps do the 2^n scaling and rounding in one op each, 13 in all)
#if defined(__x86_64__) && defined(__GNUC__)
#define BTM_HAVE_AVX512_PATH 1
#define BTM_AVX512 __attribute__((target("avx512f")))

// BTM_MIXING_NO_AVX512=1 forces the auto-vectorised loops (the tests run both paths).
inline bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f") && !std::getenv("BTM_MIXING_NO_AVX512");
  return has;
}

// exp(x) for x <= 0 (as fast_exp_nonpos): exact 0 below -87 and for -inf, NaN propagates.
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6 near-minimax polynomial
// (relative error 2e-9 before fp32 rounding) and p * 2^n by vscalefps.
BTM_AVX512 inline __m512 exp_nonpos_avx512(__m512 x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  // NaN in x stays NaN
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.3829420786e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3747711033e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1668359190e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666421294e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.9999991059e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// The 4 cache lines (64 floats) at p, into L2. A prefetch never faults, past the end of the
// tensor included.
inline void prefetch_l2_4_lines(const float* p) {
  const char* c = reinterpret_cast<const char*>(p);
  _mm_prefetch(c, _MM_HINT_T1);
  _mm_prefetch(c + 64, _MM_HINT_T1);
  _mm_prefetch(c + 128, _MM_HINT_T1);
  _mm_prefetch(c + 192, _MM_HINT_T1);
}

// Lanes [0, left) of a 16-float vector (all 16 when left >= 16): the loops' tails.
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
}

// One pass over a chunk: its max (-> *max_out) and sum exp(x - shift). In the stats kernel the
// shift is the running max of the row's earlier chunks, not yet this chunk's max: exp arguments
// may then be positive, and the caller redoes the chunk with its own max when that max exceeds
// `shift` by more than ONE_PASS_HEADROOM (no overflow: each term stays below e^64 and the chunk's
// sum below 2048 e^64). Saves the second (L1) read of the two-pass max-then-sum-exp scheme.
// `ahead` > 0 prefetches x[ahead + i] into L2 while summing x[i]: the kernels pass two chunk
// lengths, so the chunk after next (of this row or the next: rows are contiguous) streams in from
// memory while this one is exp-bound. Measured (k=8, N=4096, V=32k fp32, 2 threads): L2 hints
// two chunks ahead 0.22-0.24 s, L1 hints one chunk ahead 0.25-0.26 s, no prefetch 0.29 s, a
// bare max pass 0.19 s. 4 independent accumulator chains hide the polynomial's latency.
constexpr float ONE_PASS_HEADROOM = 64.0f;
BTM_AVX512 inline float max_sumexp_f32_avx512(const float* x, int64_t n, float shift, int64_t ahead,
                                              float* max_out) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  __m512 m0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    if (ahead > 0) prefetch_l2_4_lines(x + i + ahead);
    const __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
    const __m512 v2 = _mm512_loadu_ps(x + i + 32), v3 = _mm512_loadu_ps(x + i + 48);
    m0 = _mm512_max_ps(m0, v0);
    m1 = _mm512_max_ps(m1, v1);
    m2 = _mm512_max_ps(m2, v2);
    m3 = _mm512_max_ps(m3, v3);
    a0 = _mm512_add_ps(a0, exp_nonpos_avx512(_mm512_sub_ps(v0, sh)));
    a1 = _mm512_add_ps(a1, exp_nonpos_avx512(_mm512_sub_ps(v1, sh)));
    a2 = _mm512_add_ps(a2, exp_nonpos_avx512(_mm512_sub_ps(v2, sh)));
    a3 = _mm512_add_ps(a3, exp_nonpos_avx512(_mm512_sub_ps(v3, sh)));
  }
  for (; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    m0 = _mm512_mask_max_ps(m0, m, m0, v);
    a0 = _mm512_mask_add_ps(a0, m, a0, exp_nonpos_avx512(_mm512_sub_ps(v, sh)));
  }
  *max_out = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// sum exp(x - shift) (shift >= max x): the same pass, its max unused (one vmaxps per 16 floats).
BTM_AVX512 inline float sumexp_f32_avx512(const float* x, int64_t n, float shift,
                                          int64_t ahead = 0) {
  float unused_max;
  return max_sumexp_f32_avx512(x, n, shift, ahead, &unused_max);
}

BTM_AVX512 inline void scaled_exp_f32_avx512(const float* x, int64_t n, float shift, float coef,
                                             float* out) {
  const __m512 sh = _mm512_set1_ps(shift), c = _mm512_set1_ps(coef);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(c, exp_nonpos_avx512(_mm512_sub_ps(v, sh))));
  }
}

BTM_AVX512 inline void running_sum_f32_avx512(const float* x, int64_t n, float shift, float b,
                                              const float* mx, float* s) {
  const __m512 sh = _mm512_set1_ps(shift), bb = _mm512_set1_ps(b);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    const __m512 arg = _mm512_sub_ps(_mm512_add_ps(bb, _mm512_sub_ps(v, sh)),
                                     _mm512_maskz_loadu_ps(m, mx + i));
    _mm512_mask_storeu_ps(s + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, s + i),
                                                  exp_nonpos_avx512(arg)));
  }
}
#endif

}  // namespace btm_mixing
