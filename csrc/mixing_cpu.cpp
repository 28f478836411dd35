// CPU kernels of the fused ensemble-logit mixing op (see megatron_btm/ops/mixing.py for the math
// and the autograd wiring; DESIGN.md "The math").
//
// Three primitives, each one streaming pass over the [K, N, V] logits (V contiguous):
//   stats        per (expert, token) row: running max, sum-exp relative to it, target logit
//   grad_logits  coef_kn * (softmax(L_kn)_v - 1[v = y_n])
//   logprobs     log sum_k exp(b_kn + (L_knv - shift_kn))   (the "full" mode's second pass)
// The row's log-normaliser is passed as (shift = max, logsum = log sum exp(L - max)) rather than
// as one lse: L - max is exact in floating point, L - lse is not when |L| ~ 1e4. grad_logits
// requires shift >= the row max (exp arguments are non-positive; see mixing_cpu_math.h).
// The reductions over K and the vocab-parallel all-reduces are O(K*N) and stay in Python.
//
// Rows are processed in chunks of CHUNK elements converted to the accumulation type (fp32 for
// fp32/bf16/fp16, fp64 for fp64) in a stack buffer, so memory is read once and the chunk's
// second touch (max, then sum-exp) hits L1. The float hot loops are branch-free and carry
// target_clones so GCC auto-vectorises them for AVX-512 / AVX2 with a runtime dispatch; exp is
// a Cephes-style polynomial (about 2 ulp) because libm's expf does not vectorise without
// -ffast-math. On AVX-512 and on AVX2+FMA CPUs the exp loops use hand-written intrinsics instead
// (mixing_cpu_simd.h, chosen at run time), and stats reads each chunk once (max and sum-exp in
// one pass). Nothing of size K*N*V is allocated except the gradient that autograd asks for.
#include <torch/extension.h>

#include "mixing_cpu_math.h"
#include "mixing_cpu_simd.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

using namespace btm_mixing;

constexpr int64_t CHUNK = 2048;

// ---- generic versions (fp64 path, used by float64 tests and gradcheck) ----
template <typename acc_t>
struct Math {
  static acc_t max(const acc_t* x, int64_t n) {
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
    return m;
  }
  static acc_t sumexp(const acc_t* x, int64_t n, acc_t shift, int64_t /*ahead*/ = 0) {
    acc_t s = 0;
    for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - shift);
    return s;
  }
  static void scaled_exp(const acc_t* x, int64_t n, acc_t shift, acc_t coef, acc_t* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = coef * std::exp(x[i] - shift);
  }
  static void running_max(const acc_t* x, int64_t n, acc_t shift, acc_t b, acc_t* mx) {
    for (int64_t i = 0; i < n; ++i) mx[i] = std::max(mx[i], b + (x[i] - shift));
  }
  static void running_sum(const acc_t* x, int64_t n, acc_t shift, acc_t b, const acc_t* mx,
                          acc_t* s) {
    for (int64_t i = 0; i < n; ++i) s[i] += std::exp(b + (x[i] - shift) - mx[i]);
  }
  static void finish_lse(const acc_t* mx, const acc_t* s, int64_t n, acc_t* out) {
    for (int64_t i = 0; i < n; ++i)
      out[i] = (mx[i] == -std::numeric_limits<acc_t>::infinity()) ? mx[i] : mx[i] + std::log(s[i]);
  }
};
// Fallbacks with the signatures of the SIMD loops (mixing_cpu_simd_loops.inc).
float sumexp_auto(const float* x, int64_t n, float shift, int64_t /*ahead*/) {
  return sumexp_f32(x, n, shift);
}
float max_sumexp_auto(const float* x, int64_t n, float shift, int64_t /*ahead*/, float* mx) {
  *mx = max_f32(x, n);  // not used by stats (one_pass() is false on this path)
  return sumexp_f32(x, n, shift);
}

// The hand-written SIMD loop `fn` of the active ISA (simd_path()), else `fallback`.
#ifdef BTM_HAVE_SIMD_PATHS
#define BTM_SIMD_DISPATCH(fn, fallback, ...)                \
  switch (simd_path()) {                                    \
    case SimdPath::kAvx512: return avx512::fn(__VA_ARGS__); \
    case SimdPath::kAvx2: return avx2::fn(__VA_ARGS__);     \
    default: return fallback(__VA_ARGS__);                  \
  }
#else
#define BTM_SIMD_DISPATCH(fn, fallback, ...) return fallback(__VA_ARGS__);
#endif

template <>
struct Math<float> {
  static float max(const float* x, int64_t n) { return max_f32(x, n); }
  static float sumexp(const float* x, int64_t n, float shift, int64_t ahead = 0) {
    BTM_SIMD_DISPATCH(sumexp, sumexp_auto, x, n, shift, ahead)
  }
  // stats' one-pass scheme (max and sum-exp from one read of each chunk) needs a SIMD path.
  static bool one_pass() { return simd_path() != SimdPath::kAuto; }
  static float max_sumexp(const float* x, int64_t n, float shift, int64_t ahead, float* mx) {
    BTM_SIMD_DISPATCH(max_sumexp, max_sumexp_auto, x, n, shift, ahead, mx)
  }
  static void scaled_exp(const float* x, int64_t n, float shift, float coef, float* out) {
    BTM_SIMD_DISPATCH(scaled_exp, scaled_exp_f32, x, n, shift, coef, out)
  }
  static void running_max(const float* x, int64_t n, float shift, float b, float* mx) {
    running_max_f32(x, n, shift, b, mx);
  }
  static void running_sum(const float* x, int64_t n, float shift, float b, const float* mx,
                          float* s) {
    BTM_SIMD_DISPATCH(running_sum, running_sum_f32, x, n, shift, b, mx, s)
  }
  static void finish_lse(const float* mx, const float* s, int64_t n, float* out) {
    finish_lse_f32(mx, s, n, out);
  }
};
#undef BTM_SIMD_DISPATCH

// Returns a pointer to the chunk in the accumulation type: the input itself when the types
// agree, else `buf` filled by conversion (bf16 -> fp32 is a shift, auto-vectorised).
template <typename scalar_t, typename acc_t>
inline const acc_t* load_chunk(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    bf16_to_f32(reinterpret_cast<const uint16_t*>(src), n, buf);
    return buf;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

template <typename scalar_t, typename acc_t>
void stats_kernel(const scalar_t* logits, const int64_t* targets, int64_t K, int64_t N, int64_t V,
                  int64_t vocab_start, int64_t ignore_index, acc_t* max_out, acc_t* sum_out,
                  acc_t* tgt_out) {
  const bool one_pass = std::is_same_v<acc_t, float> && Math<float>::one_pass();
  at::parallel_for(0, K * N, 1, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[CHUNK];
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x = logits + row * V;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      acc_t s = 0;
      for (int64_t c0 = 0; c0 < V; c0 += CHUNK) {
        const int64_t len = std::min(CHUNK, V - c0);
        const acc_t* xc = load_chunk<scalar_t, acc_t>(x + c0, len, buf);
        const int64_t ahead = xc == reinterpret_cast<const acc_t*>(x + c0) ? 2 * CHUNK : 0;
        if constexpr (std::is_same_v<acc_t, float>) {
          // After the first chunk, one pass per chunk: sum-exp relative to the running max m,
          // rescaled when the chunk raises it (redone from L1 if it raises it by > the headroom).
          if (one_pass && std::isfinite(m)) {
            float cm;
            const float cs = Math<float>::max_sumexp(xc, len, m, ahead, &cm);
            if (cm > m + ONE_PASS_HEADROOM) {
              s = s * std::exp(m - cm) + Math<float>::sumexp(xc, len, cm);
              m = cm;
            } else if (cm > m) {
              s = (s + cs) * std::exp(m - cm);
              m = cm;
            } else {
              s += cs;
            }
            continue;
          }
        }
        const acc_t cm = Math<acc_t>::max(xc, len);
        if (cm > m) {  // online rescale of the running sum to the new max
          s = (s == 0) ? s : s * std::exp(m - cm);
          m = cm;
        }
        if (m == -std::numeric_limits<acc_t>::infinity()) continue;  // all -inf so far
        // Prefetch the next chunk while this one is exp-bound (only when reading in place).
        s += Math<acc_t>::sumexp(xc, len, m, ahead);
      }
      max_out[row] = m;
      sum_out[row] = s;
      const int64_t t = targets[row % N];
      const int64_t local = t - vocab_start;
      tgt_out[row] = (t != ignore_index && local >= 0 && local < V)
                         ? static_cast<acc_t>(x[local]) : acc_t(0);
    }
  });
}

template <typename scalar_t, typename acc_t>
void grad_kernel(const scalar_t* logits, const acc_t* shift, const acc_t* logsum,
                 const acc_t* coef,
                 const int64_t* targets, int64_t K, int64_t N, int64_t V, int64_t vocab_start,
                 int64_t ignore_index, scalar_t* grad) {
  at::parallel_for(0, K * N, 1, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[CHUNK];
    alignas(64) acc_t res[CHUNK];
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x = logits + row * V;
      scalar_t* g = grad + row * V;
      const acc_t c = coef[row];
      const acc_t c_norm = c * std::exp(-logsum[row]);  // c * softmax = c_norm * exp(L - max)
      if (c == 0) {  // ignored token or pruned expert: zero row, no exp
        std::memset(static_cast<void*>(g), 0, sizeof(scalar_t) * V);
        continue;
      }
      for (int64_t c0 = 0; c0 < V; c0 += CHUNK) {
        const int64_t len = std::min(CHUNK, V - c0);
        const acc_t* xc = load_chunk<scalar_t, acc_t>(x + c0, len, buf);
        Math<acc_t>::scaled_exp(xc, len, shift[row], c_norm, res);
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          f32_to_bf16(res, len, reinterpret_cast<uint16_t*>(g + c0));
        } else {
          for (int64_t i = 0; i < len; ++i) g[c0 + i] = static_cast<scalar_t>(res[i]);
        }
      }
      const int64_t t = targets[row % N];
      const int64_t local = t - vocab_start;
      if (t != ignore_index && local >= 0 && local < V) {
        const acc_t sm = c_norm * std::exp(static_cast<acc_t>(x[local]) - shift[row]);
        g[local] = static_cast<scalar_t>(sm - c);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void logprobs_kernel(const scalar_t* logits, const acc_t* shift, const acc_t* b, int64_t K,
                     int64_t N, int64_t V, acc_t* out) {
  const int64_t num_chunks = (V + CHUNK - 1) / CHUNK;
  at::parallel_for(0, N * num_chunks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[CHUNK];
    alignas(64) acc_t mx[CHUNK];
    alignas(64) acc_t s[CHUNK];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / num_chunks;
      const int64_t c0 = (item % num_chunks) * CHUNK;
      const int64_t len = std::min(CHUNK, V - c0);
      std::fill(mx, mx + len, -std::numeric_limits<acc_t>::infinity());
      std::fill(s, s + len, acc_t(0));
      // Two sweeps over the K chunks (L1/L2-resident): per-v max over experts, then sum-exp, so
      // every entry is exact even when experts disagree by more than the fp32 exp range.
      for (int64_t k = 0; k < K; ++k) {
        const acc_t bk = b[k * N + n];
        if (bk == -std::numeric_limits<acc_t>::infinity()) continue;  // pruned expert
        const acc_t* xc = load_chunk<scalar_t, acc_t>(logits + (k * N + n) * V + c0, len, buf);
        Math<acc_t>::running_max(xc, len, shift[k * N + n], bk, mx);
      }
      for (int64_t k = 0; k < K; ++k) {
        const acc_t bk = b[k * N + n];
        if (bk == -std::numeric_limits<acc_t>::infinity()) continue;
        const acc_t* xc = load_chunk<scalar_t, acc_t>(logits + (k * N + n) * V + c0, len, buf);
        Math<acc_t>::running_sum(xc, len, shift[k * N + n], bk, mx, s);
      }
      Math<acc_t>::finish_lse(mx, s, len, out + n * V + c0);
    }
  });
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu(), "mixing_cpu: logits must be on CPU");
  TORCH_CHECK(logits.dim() == 3, "mixing_cpu: logits must be [K, N, V], got ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), "mixing_cpu: logits must be contiguous");
}

std::vector<at::Tensor> stats(const at::Tensor& logits, const at::Tensor& targets,
                              int64_t vocab_start, int64_t ignore_index) {
  check_logits(logits);
  const int64_t K = logits.size(0), N = logits.size(1), V = logits.size(2);
  TORCH_CHECK(targets.dtype() == at::kLong && targets.numel() == N && targets.is_contiguous(),
              "mixing_cpu: targets must be contiguous int64 [N]");
  auto opts = logits.options().dtype(acc_type(logits.scalar_type()));
  at::Tensor mx = at::empty({K, N}, opts), sm = at::empty({K, N}, opts),
             tg = at::empty({K, N}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "stats", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    stats_kernel<scalar_t, acc_t>(logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), K, N,
                                  V, vocab_start, ignore_index, mx.data_ptr<acc_t>(),
                                  sm.data_ptr<acc_t>(), tg.data_ptr<acc_t>());
  });
  return {mx, sm, tg};
}

at::Tensor grad_logits(const at::Tensor& logits, const at::Tensor& shift,
                       const at::Tensor& logsum, const at::Tensor& coef,
                       const at::Tensor& targets, int64_t vocab_start, int64_t ignore_index) {
  check_logits(logits);
  const int64_t K = logits.size(0), N = logits.size(1), V = logits.size(2);
  const auto acc = acc_type(logits.scalar_type());
  at::Tensor shift_c = shift.to(acc).contiguous(), logsum_c = logsum.to(acc).contiguous(),
             coef_c = coef.to(acc).contiguous();
  TORCH_CHECK(shift_c.numel() == K * N && logsum_c.numel() == K * N && coef_c.numel() == K * N,
              "mixing_cpu: shift/logsum/coef must be [K, N]");
  at::Tensor grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "grad", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    grad_kernel<scalar_t, acc_t>(logits.data_ptr<scalar_t>(), shift_c.data_ptr<acc_t>(),
                                 logsum_c.data_ptr<acc_t>(), coef_c.data_ptr<acc_t>(), targets.data_ptr<int64_t>(), K, N, V,
                                 vocab_start, ignore_index, grad.data_ptr<scalar_t>());
  });
  return grad;
}

at::Tensor logprobs(const at::Tensor& logits, const at::Tensor& shift, const at::Tensor& b) {
  check_logits(logits);
  const int64_t K = logits.size(0), N = logits.size(1), V = logits.size(2);
  const auto acc = acc_type(logits.scalar_type());
  at::Tensor shift_c = shift.to(acc).contiguous(), b_c = b.to(acc).contiguous();
  TORCH_CHECK(shift_c.numel() == K * N && b_c.numel() == K * N,
              "mixing_cpu: shift/b must be [K, N]");
  at::Tensor out = at::empty({N, V}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    logprobs_kernel<scalar_t, acc_t>(logits.data_ptr<scalar_t>(), shift_c.data_ptr<acc_t>(),
                                     b_c.data_ptr<acc_t>(), K, N, V, out.data_ptr<acc_t>());
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-btm fused mixing op: CPU (OpenMP, auto-vectorised) kernels";
  m.def("stats", &stats, "per-row max, sum-exp (relative to max), target logit",
        py::arg("logits"), py::arg("targets"), py::arg("vocab_start"), py::arg("ignore_index"));
  m.def("grad_logits", &grad_logits, "coef * (softmax - onehot(target))", py::arg("logits"),
        py::arg("shift"), py::arg("logsum"), py::arg("coef"), py::arg("targets"), py::arg("vocab_start"),
        py::arg("ignore_index"));
  m.def("simd_path", [] { return simd_path_name(); },
        "which float exp loops run: avx512-intrinsics, avx2-intrinsics or auto-vectorised");
  m.def("logprobs", &logprobs, "log sum_k exp(b_k + L_k - shift_k)", py::arg("logits"),
        py::arg("shift"), py::arg("b"));
}
