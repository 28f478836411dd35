// CUDA kernels of the fused mixing op; interface and semantics in mixing_kernels.h.
//
// stats / grad: one block per (expert, token) row, so a row of up to 256k logits is streamed
// by 256-512 threads with 16-byte vector loads (8 bf16/fp16 or 4 fp32) and fp32 math; each
// thread keeps an online (max, sum-exp) pair which the block merges with warp shuffles.
// logprobs: one thread per (token, vocab entry), looping over the K experts twice (max, then
// sum-exp), coalesced along V.
#include "mixing_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <math_constants.h>

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <typename T> struct Io;
template <> struct Io<float> {
  static __device__ __forceinline__ float load(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};
template <> struct Io<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) {
    return __bfloat162float(*p);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) {
    *p = __float2bfloat16(v);
  }
};
template <> struct Io<__half> {
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
};

// Elements per 16-byte vector load.
template <typename T> constexpr int kVec = 16 / sizeof(T);

// Unpacks a 16-byte vector of T into floats.
template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float* out) {
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = Io<T>::load(v + i);
}

// Online (max, sum) merge: the pair (m, s) means sum_i exp(x_i - m) = s.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -CUDART_INF_F) return;  // both empty
  s = s * __expf(m - mn) + s2 * __expf(m2 - mn);
  m = mn;
}

__device__ __forceinline__ void add_value(float& m, float& s, float x) {
  if (x > m) {
    s = s * __expf(m - x) + 1.0f;
    m = x;
  } else if (x != -CUDART_INF_F) {
    s += __expf(x - m);
  }
}

// Visits row[0..V) with aligned 16-byte loads in the body, scalar head and tail.
template <typename T, typename F>
__device__ __forceinline__ void for_each_in_row(const T* row, int64_t V, F&& f) {
  constexpr int VEC = kVec<T>;
  const int64_t mis = (reinterpret_cast<uintptr_t>(row) / sizeof(T)) % VEC;
  const int64_t head = mis == 0 ? 0 : (VEC - mis) < V ? (VEC - mis) : V;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) f(i, Io<T>::load(row + i));
  const int64_t nvec = (V - head) / VEC;
  const uint4* body = reinterpret_cast<const uint4*>(row + head);
  for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
    float vals[VEC];
    unpack<T>(__ldg(body + j), vals);
#pragma unroll
    for (int i = 0; i < VEC; ++i) f(head + j * VEC + i, vals[i]);
  }
  for (int64_t i = head + nvec * VEC + threadIdx.x; i < V; i += blockDim.x)
    f(i, Io<T>::load(row + i));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
stats_kernel(const T* __restrict__ logits, int64_t N, int64_t V,
             const int64_t* __restrict__ targets, int64_t vocab_start, int64_t ignore_index,
             float* __restrict__ max_out, float* __restrict__ sum_out,
             float* __restrict__ tgt_out) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  float m = -CUDART_INF_F, s = 0.0f;
  for_each_in_row<T>(x, V, [&](int64_t, float v) { add_value(m, s, v); });
  // warp, then block reduction of (m, s)
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    merge(m, s, m2, s2);
  }
  __shared__ float sm_m[kWarps], sm_s[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { sm_m[warp] = m; sm_s[warp] = s; }
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x / 32;
    m = lane < nw ? sm_m[lane] : -CUDART_INF_F;
    s = lane < nw ? sm_s[lane] : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
      merge(m, s, m2, s2);
    }
    if (lane == 0) {
      max_out[row] = m;
      sum_out[row] = s;
      const int64_t t = targets[row % N];
      const int64_t local = t - vocab_start;
      tgt_out[row] = (t != ignore_index && local >= 0 && local < V) ? Io<T>::load(x + local)
                                                                    : 0.0f;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
grad_kernel(const T* __restrict__ logits, int64_t N, int64_t V,
            const float* __restrict__ shift, const float* __restrict__ logsum,
            const float* __restrict__ coef, const int64_t* __restrict__ targets,
            int64_t vocab_start, int64_t ignore_index, T* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  T* g = grad + row * V;
  const float c = coef[row], m = shift[row];
  const float c_norm = c * __expf(-logsum[row]);  // c * softmax = c_norm * exp(L - max)
  const int64_t t = targets[row % N];
  const int64_t local = (t != ignore_index) ? t - vocab_start : -1;
  // Same aligned traversal as the loads; stores are scalar but coalesced within a warp.
  for_each_in_row<T>(x, V, [&](int64_t i, float v) {
    const float sm = c == 0.0f ? 0.0f : c_norm * __expf(v - m);
    Io<T>::store(g + i, i == local ? sm - c : sm);
  });
}

template <typename T>
__global__ void logprobs_kernel(const T* __restrict__ logits, int64_t K, int64_t N, int64_t V,
                                const float* __restrict__ shift, const float* __restrict__ b,
                                float* __restrict__ out) {
  const int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (v >= V) return;
  // gridDim.y is capped at 65535, N (batch x sequence) is not: stride over tokens.
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    float mx = -CUDART_INF_F;
    for (int64_t k = 0; k < K; ++k) {
      const float bk = b[k * N + n];
      if (bk == -CUDART_INF_F) continue;  // pruned expert
      mx = fmaxf(mx, bk + (Io<T>::load(logits + (k * N + n) * V + v) - shift[k * N + n]));
    }
    if (mx == -CUDART_INF_F) {
      out[n * V + v] = mx;
      continue;
    }
    float s = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float bk = b[k * N + n];
      if (bk == -CUDART_INF_F) continue;
      s += __expf(bk + (Io<T>::load(logits + (k * N + n) * V + v) - shift[k * N + n]) - mx);
    }
    out[n * V + v] = mx + __logf(s);
  }
}

template <template <typename> class Launch, typename... Args>
int dispatch(int dtype, Args... args) {
  switch (dtype) {
    case BTM_F32: Launch<float>::run(args...); break;
    case BTM_BF16: Launch<__nv_bfloat16>::run(args...); break;
    case BTM_F16: Launch<__half>::run(args...); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T> struct StatsLaunch {
  static void run(const void* logits, int64_t K, int64_t N, int64_t V, const int64_t* targets,
                  int64_t vocab_start, int64_t ignore_index, float* mx, float* sm, float* tg,
                  cudaStream_t stream) {
    stats_kernel<T><<<static_cast<unsigned>(K * N), kThreads, 0, stream>>>(
        static_cast<const T*>(logits), N, V, targets, vocab_start, ignore_index, mx, sm, tg);
  }
};

template <typename T> struct GradLaunch {
  static void run(const void* logits, int64_t K, int64_t N, int64_t V, const float* shift,
                  const float* logsum, const float* coef, const int64_t* targets,
                  int64_t vocab_start, int64_t ignore_index, void* grad, cudaStream_t stream) {
    grad_kernel<T><<<static_cast<unsigned>(K * N), kThreads, 0, stream>>>(
        static_cast<const T*>(logits), N, V, shift, logsum, coef, targets, vocab_start, ignore_index,
        static_cast<T*>(grad));
  }
};

template <typename T> struct LogprobsLaunch {
  static void run(const void* logits, int64_t K, int64_t N, int64_t V, const float* shift,
                  const float* b, float* out, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>((V + 255) / 256),
                    static_cast<unsigned>(N < 65535 ? N : 65535));
    logprobs_kernel<T><<<grid, 256, 0, stream>>>(static_cast<const T*>(logits), K, N, V, shift, b,
                                                  out);
  }
};

}  // namespace

extern "C" int btm_mix_stats(const void* logits, int dtype, int64_t K, int64_t N, int64_t V,
                             const int64_t* targets, int64_t vocab_start, int64_t ignore_index,
                             float* max_out, float* sum_out, float* tgt_out,
                             cudaStream_t stream) {
  if (K * N == 0) return 0;
  return dispatch<StatsLaunch>(dtype, logits, K, N, V, targets, vocab_start, ignore_index,
                               max_out, sum_out, tgt_out, stream);
}

extern "C" int btm_mix_grad_logits(const void* logits, int dtype, int64_t K, int64_t N,
                                   int64_t V, const float* shift, const float* logsum,
                                   const float* coef, const int64_t* targets,
                                   int64_t vocab_start, int64_t ignore_index, void* grad,
                                   cudaStream_t stream) {
  if (K * N == 0) return 0;
  return dispatch<GradLaunch>(dtype, logits, K, N, V, shift, logsum, coef, targets, vocab_start,
                              ignore_index, grad, stream);
}

extern "C" int btm_mix_logprobs(const void* logits, int dtype, int64_t K, int64_t N, int64_t V,
                                const float* shift, const float* b, float* out,
                                cudaStream_t stream) {
  if (N * V == 0) return 0;
  return dispatch<LogprobsLaunch>(dtype, logits, K, N, V, shift, b, out, stream);
}
