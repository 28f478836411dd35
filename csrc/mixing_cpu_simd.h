// Hand-written SIMD exp loops of the CPU mixing kernels, for AVX-512 and AVX2+FMA, chosen at run
// time (simd_path()). The loops themselves (one-pass max + sum-exp with L2 prefetch, sum-exp,
// scaled exp, running sum) are written once in mixing_cpu_simd_loops.inc against a small ISA
// struct `S` and included twice below, each time inside a `#pragma GCC target` region so every
// function of that copy is compiled for its ISA. Without either ISA (or off x86-64 / GCC) the
// auto-vectorised loops of mixing_cpu_math.h run.
//
// exp(x) for x <= 0 (as fast_exp_nonpos): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a
// degree-6 near-minimax polynomial (relative error 2e-9 before fp32 rounding), then p * 2^n:
// vscalefps on AVX-512, on AVX2 an integer add of n into p's exponent field (exact: see
// avx2::S::exp_nonpos). Both round n to nearest even, so the two paths agree bit for bit.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BTM_HAVE_SIMD_PATHS 1
#include <immintrin.h>
#endif

namespace btm_mixing {

enum class SimdPath { kAvx512, kAvx2, kAuto };

// Decided once per process from the CPU: AVX-512F, else AVX2 + FMA, else the auto-vectorised
// loops. BTM_MIXING_NO_AVX512=1 skips AVX-512 and BTM_MIXING_NO_AVX2=1 skips the AVX2 intrinsics
// (both set: the auto-vectorised loops), so the tests can run every path on one machine.
inline SimdPath simd_path() {
#ifdef BTM_HAVE_SIMD_PATHS
  static const SimdPath path = [] {
    if (__builtin_cpu_supports("avx512f") && !std::getenv("BTM_MIXING_NO_AVX512"))
      return SimdPath::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        !std::getenv("BTM_MIXING_NO_AVX2"))
      return SimdPath::kAvx2;
    return SimdPath::kAuto;
  }();
  return path;
#else
  return SimdPath::kAuto;
#endif
}

inline const char* simd_path_name() {
  switch (simd_path()) {
    case SimdPath::kAvx512: return "avx512-intrinsics";
    case SimdPath::kAvx2: return "avx2-intrinsics";
    default: return "auto-vectorised";
  }
}

// The stats kernel's one-pass scheme: sum-exp relative to the running max of the row's earlier
// chunks, redone with the chunk's own max when that exceeds the shift by more than this (each
// term then stays below e^64, the chunk's sum below 2048 e^64: no overflow).
constexpr float ONE_PASS_HEADROOM = 64.0f;

#ifdef BTM_HAVE_SIMD_PATHS

// Cephes / AVX-512 path constants, shared by both ISAs.
namespace simd_consts {
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP6 = 1.3829420786e-3f, kP5 = 8.3747711033e-3f, kP4 = 4.1668359190e-2f,
                kP3 = 1.6666421294e-1f, kP2 = 4.9999991059e-1f;
}  // namespace simd_consts

// LINES cache lines (16 floats each) at p, into L2. A prefetch never faults, past the end
// included.
template <int LINES>
inline void prefetch_l2(const float* p) {
  const char* c = reinterpret_cast<const char*>(p);
#pragma GCC unroll 8
  for (int l = 0; l < LINES; ++l) _mm_prefetch(c + 64 * l, _MM_HINT_T1);
}

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
struct S {
  using vec = __m512;
  using mask = __mmask16;
  static constexpr int W = 16;
  static vec set1(float v) { return _mm512_set1_ps(v); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static vec max(vec a, vec b) { return _mm512_max_ps(a, b); }
  // Lanes [0, left) (all W when left >= W): the loops' tails.
  static mask tail(int64_t left) {
    return left >= W ? mask(0xffff) : mask((1u << left) - 1u);
  }
  static vec load_tail(mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void store_tail(float* p, mask m, vec v) { _mm512_mask_storeu_ps(p, m, v); }
  static vec add_masked(vec acc, mask m, vec v) { return _mm512_mask_add_ps(acc, m, acc, v); }
  static vec max_masked(vec acc, mask m, vec v) { return _mm512_mask_max_ps(acc, m, acc, v); }
  static float reduce_add(vec v) { return _mm512_reduce_add_ps(v); }
  static float reduce_max(vec v) { return _mm512_reduce_max_ps(v); }
  // 13 vector ops per 16 floats: vrndscaleps rounds, vscalefps applies 2^n.
  static vec exp_nonpos(vec x) {
    using namespace simd_consts;
    const mask keep = _mm512_cmp_ps_mask(x, set1(-87.0f), _CMP_NLT_UQ);  // NaN kept
    const vec xc = _mm512_max_ps(set1(-87.0f), x);  // NaN in x stays NaN
    const vec n = _mm512_roundscale_ps(mul(xc, set1(kLog2e)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vec r = _mm512_fnmadd_ps(n, set1(kLn2Hi), xc);
    r = _mm512_fnmadd_ps(n, set1(kLn2Lo), r);
    vec p = _mm512_fmadd_ps(set1(kP6), r, set1(kP5));
    p = _mm512_fmadd_ps(p, r, set1(kP4));
    p = _mm512_fmadd_ps(p, r, set1(kP3));
    p = _mm512_fmadd_ps(p, r, set1(kP2));
    p = _mm512_fmadd_ps(p, r, set1(1.0f));
    p = _mm512_fmadd_ps(p, r, set1(1.0f));
    return _mm512_maskz_scalef_ps(keep, p, n);
  }
};
#include "mixing_cpu_simd_loops.inc"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct S {
  using vec = __m256;
  using mask = __m256;  // all-ones / all-zeros lanes
  static constexpr int W = 8;
  static vec set1(float v) { return _mm256_set1_ps(v); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
  static mask tail(int64_t left) {
    const int l = left >= W ? W : static_cast<int>(left);
    return _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(l), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }
  static vec load_tail(mask m, const float* p) {  // masked-off lanes read nothing, give 0
    return _mm256_maskload_ps(p, _mm256_castps_si256(m));
  }
  static void store_tail(float* p, mask m, vec v) {
    _mm256_maskstore_ps(p, _mm256_castps_si256(m), v);
  }
  static vec add_masked(vec acc, mask m, vec v) { return _mm256_add_ps(acc, _mm256_and_ps(m, v)); }
  static vec max_masked(vec acc, mask m, vec v) {
    return _mm256_blendv_ps(acc, _mm256_max_ps(acc, v), m);
  }
  static float reduce_add(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float reduce_max(vec v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  // 14 vector ops per 8 floats, 9 of them on the FMA ports (the bound on AVX2 cores).
  // n = round(x log2e) by the 1.5 * 2^23 magic-number add (|x log2e| < 2^22 in every kept lane);
  // the low mantissa bits of t are then n itself, and t << 23 is n in the exponent field, which
  // an integer add applies to p: p * 2^n without a multiply. The result is normal in every kept
  // lane (x >= -87 gives n >= -126 with p > 1.4 when n = -126), so the add is exact. Lanes below
  // -87 (incl. -inf) hold garbage until the final AND zeroes them. A NaN lane stays NaN (the
  // quiet NaNs torch produces have no low payload bits, so t << 23 adds 0 to p's NaN).
  static vec exp_nonpos(vec x) {
    using namespace simd_consts;
    const vec keep = _mm256_cmp_ps(x, set1(-87.0f), _CMP_NLT_UQ);
    const vec magic = set1(12582912.0f);
    const vec t = _mm256_fmadd_ps(x, set1(kLog2e), magic);
    const vec n = _mm256_sub_ps(t, magic);
    vec r = _mm256_fnmadd_ps(n, set1(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, set1(kLn2Lo), r);
    vec p = _mm256_fmadd_ps(set1(kP6), r, set1(kP5));
    p = _mm256_fmadd_ps(p, r, set1(kP4));
    p = _mm256_fmadd_ps(p, r, set1(kP3));
    p = _mm256_fmadd_ps(p, r, set1(kP2));
    p = _mm256_fmadd_ps(p, r, set1(1.0f));
    p = _mm256_fmadd_ps(p, r, set1(1.0f));
    const __m256i e = _mm256_add_epi32(_mm256_castps_si256(p),
                                       _mm256_slli_epi32(_mm256_castps_si256(t), 23));
    return _mm256_and_ps(keep, _mm256_castsi256_ps(e));
  }
};
#include "mixing_cpu_simd_loops.inc"
}  // namespace avx2
#pragma GCC pop_options

#endif  // BTM_HAVE_SIMD_PATHS

}  // namespace btm_mixing
