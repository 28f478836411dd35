// CUDA kernels of the fused mixing op; interface and semantics in mixing_kernels.h.
//
// stats / grad: one block per (expert, token) row, 128-512 threads (fewer for short vocab slices,
// so a TP-sharded row still gives each thread several loads), 16-byte vector loads (8 bf16/fp16
// or 4 fp32) and fp32 math; each thread keeps an online (max, sum-exp) pair, merged per vector
// and then across the block with warp shuffles. grad writes 16-byte vectors and reads nothing
// for a row whose coefficient is 0.
// logprobs: blocks of (token, vocab slice); each thread owns vocab vectors and folds the K
// experts into an online (max, sum) per entry, one pass over the K rows, b and shift staged in
// shared memory.
//
// Loads: __ldg only on global pointers; a loaded vector is unpacked from registers (memcpy into
// a T array, no memory round trip).
#include "mixing_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <math_constants.h>

namespace {

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half(v);
}

// One element from global memory (read-only path).
template <typename T> __device__ __forceinline__ float load1(const T* p) { return to_float(__ldg(p)); }

// Elements per 16-byte vector.
template <typename T> constexpr int kVec = 16 / sizeof(T);

// A 16-byte vector of T at p (16-byte aligned, global) as floats.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  T v[kVec<T>];
  memcpy(v, &raw, sizeof(raw));  // registers only
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = to_float(v[i]);
}

// floats -> one 16-byte store of T at p (16-byte aligned), packed into 32-bit words.
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ uint32_t bits16(__half v) { return __half_as_ushort(v); }
template <typename T>
__device__ __forceinline__ uint32_t word(const float* in, int w) {
  if constexpr (sizeof(T) == 4) {
    return __float_as_uint(in[w]);
  } else {
    return bits16(from_float<T>(in[2 * w])) | (bits16(from_float<T>(in[2 * w + 1])) << 16);
  }
}
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
  // __stwb (a plain write-back store): a plain assignment is split into 4-byte stores too.
  __stwb(reinterpret_cast<uint4*>(p),
         make_uint4(word<T>(in, 0), word<T>(in, 1), word<T>(in, 2), word<T>(in, 3)));
}

// Threads per block for `items` loads per row (vectors, or scalars): ~8 or more per thread
// before the block reduction, 128 threads at least (a TP-sharded V=50k bf16 row is ~800 vectors).
int threads_for(int64_t items) {
  return items >= 8 * 512 ? 512 : items >= 8 * 256 ? 256 : 128;
}

// Online (max, sum) merge: the pair (m, s) means sum_i exp(x_i - m) = s.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -CUDART_INF_F) return;  // both empty
  s = s * __expf(m - mn) + s2 * __expf(m2 - mn);
  m = mn;
}

// Folds n values into (m, s): one rescale per call at most.
template <int n>
__device__ __forceinline__ void add_values(float& m, float& s, const float* v) {
  float vm = v[0];
#pragma unroll
  for (int i = 1; i < n; ++i) vm = fmaxf(vm, v[i]);
  if (vm == -CUDART_INF_F) return;
  if (vm > m) {
    s = s * __expf(m - vm);  // 0 while m is -inf
    m = vm;
  }
#pragma unroll
  for (int i = 0; i < n; ++i) s += __expf(v[i] - m);
}

// Head elements before the first 16-byte boundary of row (at most kVec - 1, at most V).
template <typename T>
__device__ __forceinline__ int64_t head_of(const T* row, int64_t V) {
  const int64_t mis = (reinterpret_cast<uintptr_t>(row) / sizeof(T)) % kVec<T>;
  const int64_t head = mis == 0 ? 0 : kVec<T> - mis;
  return head < V ? head : V;
}

// Block-wide merge of every thread's (m, s); the result is valid in thread 0.
__device__ __forceinline__ void block_merge(float& m, float& s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
  __shared__ float sm_m[kMaxWarps], sm_s[kMaxWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { sm_m[warp] = m; sm_s[warp] = s; }
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x / 32;
    m = lane < nw ? sm_m[lane] : -CUDART_INF_F;
    s = lane < nw ? sm_s[lane] : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
      merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
stats_kernel(const T* __restrict__ logits, int64_t N, int64_t V,
             const int64_t* __restrict__ targets, int64_t vocab_start, int64_t ignore_index,
             float* __restrict__ max_out, float* __restrict__ sum_out,
             float* __restrict__ tgt_out) {
  constexpr int VEC = kVec<T>;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  float m = -CUDART_INF_F, s = 0.0f;
  const int64_t head = head_of(x, V);
  const int64_t nvec = (V - head) / VEC;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
    const float v = load1(x + i);
    add_values<1>(m, s, &v);
  }
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
    float vals[VEC];
    load_vec<T>(x + head + j * VEC, vals);
    add_values<VEC>(m, s, vals);
  }
  for (int64_t i = head + nvec * VEC + threadIdx.x; i < V; i += blockDim.x) {
    const float v = load1(x + i);
    add_values<1>(m, s, &v);
  }
  block_merge(m, s);
  if (threadIdx.x == 0) {
    max_out[row] = m;
    sum_out[row] = s;
    const int64_t t = targets[row % N];
    const int64_t local = t - vocab_start;
    tgt_out[row] = (t != ignore_index && local >= 0 && local < V) ? load1(x + local) : 0.0f;
  }
}

// grad[i] = c_norm * exp(L[i] - m) - (i == local ? c : 0); 0 everywhere when c == 0.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
grad_kernel(const T* __restrict__ logits, int64_t N, int64_t V,
            const float* __restrict__ shift, const float* __restrict__ logsum,
            const float* __restrict__ coef, const int64_t* __restrict__ targets,
            int64_t vocab_start, int64_t ignore_index, T* __restrict__ grad) {
  constexpr int VEC = kVec<T>;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  T* g = grad + row * V;
  const float c = coef[row], m = shift[row];
  const float c_norm = c * __expf(-logsum[row]);  // c * softmax = c_norm * exp(L - max)
  const int64_t t = targets[row % N];
  const int64_t local = (t != ignore_index) ? t - vocab_start : -1;
  const bool live = c != 0.0f;
  auto value = [&](int64_t i, float v) {
    const float sm = live ? c_norm * __expf(v - m) : 0.0f;
    return i == local ? sm - c : sm;
  };
  // Vector body only where logits and grad rows share their 16-byte alignment (always for a
  // fresh grad of aligned logits); else the whole row goes through the scalar loops.
  const bool same_align = (reinterpret_cast<uintptr_t>(x) - reinterpret_cast<uintptr_t>(g)) % 16 == 0;
  const int64_t head = same_align ? head_of(x, V) : V;
  const int64_t nvec = (V - head) / VEC;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x)
    g[i] = from_float<T>(value(i, live ? load1(x + i) : 0.0f));
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
    const int64_t base = head + j * VEC;
    float vals[VEC];
    if (live) {
      load_vec<T>(x + base, vals);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) vals[i] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) vals[i] = value(base + i, vals[i]);
    store_vec<T>(g + base, vals);
  }
  for (int64_t i = head + nvec * VEC + threadIdx.x; i < V; i += blockDim.x)
    g[i] = from_float<T>(value(i, live ? load1(x + i) : 0.0f));
}

// out[n, v] = log sum_k exp(b_kn + L_knv - shift_kn): blocks (n, slice of V), VEC entries per
// thread step, one online pass over the K expert rows. The V slices keep a short N (N = 1 while
// generating) from running on a handful of SMs. VEC is kVec<T> when V % kVec<T> == 0 and the logits
// are 16-byte aligned (every row then is), else 1 (scalar, still coalesced).
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
logprobs_kernel(const T* __restrict__ logits, int64_t K, int64_t N, int64_t V,
                const float* __restrict__ shift, const float* __restrict__ b,
                float* __restrict__ out) {
  extern __shared__ float smem[];  // [2, K]: b, shift of this token
  float* b_s = smem;
  float* sh_s = smem + K;
  const int64_t n = blockIdx.x;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    b_s[k] = b[k * N + n];
    sh_s[k] = shift[k * N + n];
  }
  __syncthreads();
  const int64_t nvec = V / VEC;
  for (int64_t j = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < nvec;
       j += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    float mx[VEC], s[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) { mx[i] = -CUDART_INF_F; s[i] = 0.0f; }
    for (int64_t k = 0; k < K; ++k) {
      const float bk = b_s[k];
      if (bk == -CUDART_INF_F) continue;  // pruned expert (uniform over the block)
      const T* p = logits + (k * N + n) * V + j * VEC;
      float v[VEC];
      if constexpr (VEC == 1) {
        v[0] = load1(p);
      } else {
        load_vec<T>(p, v);
      }
      const float off = bk - sh_s[k];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float a = v[i] + off;
        if (a > mx[i]) {
          s[i] = s[i] * __expf(mx[i] - a) + 1.0f;  // 0 * 0 + 1 while mx is -inf
          mx[i] = a;
        } else if (a != -CUDART_INF_F) {
          s[i] += __expf(a - mx[i]);
        }
      }
    }
    float res[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) res[i] = mx[i] == -CUDART_INF_F ? mx[i] : mx[i] + __logf(s[i]);
    float* o = out + n * V + j * VEC;
    if constexpr (VEC == 1) {
      o[0] = res[0];
    } else {
#pragma unroll
      for (int i = 0; i < VEC; i += 4)
        *reinterpret_cast<float4*>(o + i) = make_float4(res[i], res[i + 1], res[i + 2], res[i + 3]);
    }
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
    stats_kernel<T><<<static_cast<unsigned>(K * N), threads_for(V / kVec<T>), 0, stream>>>(
        static_cast<const T*>(logits), N, V, targets, vocab_start, ignore_index, mx, sm, tg);
  }
};

template <typename T> struct GradLaunch {
  static void run(const void* logits, int64_t K, int64_t N, int64_t V, const float* shift,
                  const float* logsum, const float* coef, const int64_t* targets,
                  int64_t vocab_start, int64_t ignore_index, void* grad, cudaStream_t stream) {
    grad_kernel<T><<<static_cast<unsigned>(K * N), threads_for(V / kVec<T>), 0, stream>>>(
        static_cast<const T*>(logits), N, V, shift, logsum, coef, targets, vocab_start, ignore_index,
        static_cast<T*>(grad));
  }
};

template <typename T> struct LogprobsLaunch {
  static void run(const void* logits, int64_t K, int64_t N, int64_t V, const float* shift,
                  const float* b, float* out, cudaStream_t stream) {
    const size_t smem = 2 * static_cast<size_t>(K) * sizeof(float);
    const bool vec = V % kVec<T> == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
    const int64_t items = vec ? V / kVec<T> : V;
    const int threads = threads_for(items);
    const int64_t slices = (items + 4 * threads - 1) / (4 * threads);  // ~4 items per thread
    const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(slices < 65535 ? slices : 65535));
    if (vec) {
      logprobs_kernel<T, kVec<T>><<<grid, threads, smem, stream>>>(
          static_cast<const T*>(logits), K, N, V, shift, b, out);
    } else {
      logprobs_kernel<T, 1><<<grid, threads, smem, stream>>>(
          static_cast<const T*>(logits), K, N, V, shift, b, out);
    }
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
