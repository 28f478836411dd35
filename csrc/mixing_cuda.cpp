// Torch binding of the CUDA mixing kernels (built by setup.py only against a CUDA torch).
// Same Python-facing contract as mixing_cpu.cpp: stats, grad_logits, logprobs. fp64 logits are
// not handled here (the Python side falls back to the reference for them).
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "mixing_kernels.h"

namespace {

int dtype_code(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return BTM_F32;
    case at::kBFloat16: return BTM_BF16;
    case at::kHalf: return BTM_F16;
    default: TORCH_CHECK(false, "mixing_cuda: logits dtype ", logits.scalar_type(),
                         " not supported (fp32, bf16, fp16)");
  }
  return -1;
}

void check(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 3 && logits.is_contiguous(),
              "mixing_cuda: logits must be a contiguous CUDA [K, N, V] tensor");
  TORCH_CHECK(targets.is_cuda() && targets.scalar_type() == at::kLong &&
              targets.numel() == logits.size(1) && targets.is_contiguous(),
              "mixing_cuda: targets must be contiguous int64 [N] on the logits' device");
}

void ok(int err, const char* what) {
  TORCH_CHECK(err == 0, "mixing_cuda: ", what, " failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

std::vector<at::Tensor> stats(const at::Tensor& logits, const at::Tensor& targets,
                              int64_t vocab_start, int64_t ignore_index) {
  check(logits, targets);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t K = logits.size(0), N = logits.size(1), V = logits.size(2);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor mx = at::empty({K, N}, opts), sm = at::empty({K, N}, opts),
             tg = at::empty({K, N}, opts);
  ok(btm_mix_stats(logits.data_ptr(), dtype_code(logits), K, N, V, targets.data_ptr<int64_t>(),
                   vocab_start, ignore_index, mx.data_ptr<float>(), sm.data_ptr<float>(),
                   tg.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
     "btm_mix_stats");
  return {mx, sm, tg};
}

at::Tensor grad_logits(const at::Tensor& logits, const at::Tensor& shift,
                       const at::Tensor& logsum, const at::Tensor& coef,
                       const at::Tensor& targets, int64_t vocab_start, int64_t ignore_index) {
  check(logits, targets);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t K = logits.size(0), N = logits.size(1), V = logits.size(2);
  at::Tensor shift_c = shift.to(at::kFloat).contiguous(),
             logsum_c = logsum.to(at::kFloat).contiguous(),
             coef_c = coef.to(at::kFloat).contiguous();
  TORCH_CHECK(shift_c.numel() == K * N && logsum_c.numel() == K * N && coef_c.numel() == K * N,
              "mixing_cuda: shift/logsum/coef must be [K, N]");
  at::Tensor grad = at::empty_like(logits);
  ok(btm_mix_grad_logits(logits.data_ptr(), dtype_code(logits), K, N, V, shift_c.data_ptr<float>(),
                         logsum_c.data_ptr<float>(), coef_c.data_ptr<float>(), targets.data_ptr<int64_t>(), vocab_start,
                         ignore_index, grad.data_ptr(), at::cuda::getCurrentCUDAStream()),
     "btm_mix_grad_logits");
  return grad;
}

at::Tensor logprobs(const at::Tensor& logits, const at::Tensor& shift, const at::Tensor& b) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 3 && logits.is_contiguous(),
              "mixing_cuda: logits must be a contiguous CUDA [K, N, V] tensor");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t K = logits.size(0), N = logits.size(1), V = logits.size(2);
  at::Tensor shift_c = shift.to(at::kFloat).contiguous(), b_c = b.to(at::kFloat).contiguous();
  TORCH_CHECK(shift_c.numel() == K * N && b_c.numel() == K * N,
              "mixing_cuda: shift/b must be [K, N]");
  at::Tensor out = at::empty({N, V}, logits.options().dtype(at::kFloat));
  ok(btm_mix_logprobs(logits.data_ptr(), dtype_code(logits), K, N, V, shift_c.data_ptr<float>(),
                      b_c.data_ptr<float>(), out.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
     "btm_mix_logprobs");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-btm fused mixing op: CUDA kernels";
  m.def("stats", &stats, py::arg("logits"), py::arg("targets"), py::arg("vocab_start"),
        py::arg("ignore_index"));
  m.def("grad_logits", &grad_logits, py::arg("logits"), py::arg("shift"), py::arg("logsum"), py::arg("coef"),
        py::arg("targets"), py::arg("vocab_start"), py::arg("ignore_index"));
  m.def("logprobs", &logprobs, py::arg("logits"), py::arg("shift"), py::arg("b"));
}
