// C-style launcher interface of the CUDA mixing kernels (csrc/mixing_kernels.cu).
//
// Raw pointers, sizes and a stream only, so the .cu file compiles with plain
// `nvcc -arch=sm_90 -c` (no torch / c10 headers) and the torch binding (mixing_cuda.cpp) stays a
// thin shim. Logits are [K, N, V] row-major (V contiguous) in fp32, bf16 or fp16; every
// statistic is fp32. Each launcher returns a cudaError_t value (0 = success).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

enum BtmDtype : int { BTM_F32 = 0, BTM_BF16 = 1, BTM_F16 = 2 };

extern "C" {

// Per (expert, token) row: max over the local V slice, sum of exp(L - max), and the target logit
// where targets[n] - vocab_start falls in [0, V) and targets[n] != ignore_index (else 0).
int btm_mix_stats(const void* logits, int dtype, int64_t K, int64_t N, int64_t V,
                  const int64_t* targets, int64_t vocab_start, int64_t ignore_index,
                  float* max_out, float* sum_out, float* tgt_out, cudaStream_t stream);

// The row's log-normaliser comes as (shift, logsum) with lse = shift + logsum, shift = max:
// L - shift is exact in fp32 where L - lse is not for |L| ~ 1e4.
// grad[k, n, v] = coef[k, n] * (exp(L[k, n, v] - shift[k, n] - logsum[k, n])
//                               - 1[v = targets[n] - vocab_start]),  in the logits' dtype.
int btm_mix_grad_logits(const void* logits, int dtype, int64_t K, int64_t N, int64_t V,
                        const float* shift, const float* logsum, const float* coef,
                        const int64_t* targets, int64_t vocab_start, int64_t ignore_index,
                        void* grad, cudaStream_t stream);

// out[n, v] = log sum_k exp(b[k, n] + (L[k, n, v] - shift[k, n]))   (fp32 [N, V]).
int btm_mix_logprobs(const void* logits, int dtype, int64_t K, int64_t N, int64_t V,
                     const float* shift, const float* b, float* out, cudaStream_t stream);

}  // extern "C"
