// Torch binding of the CUDA mixing kernels (built by setup.py only against a CUDA torch).
// Same Python-facing contract as mixing_cpu.cpp: stats, grad_logits, logprobs. fp64 logits are
// not handled here (the Python side falls back to the reference for them).
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
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

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 3 && logits.is_contiguous(),
              "mixing_cuda: logits must be a contiguous CUDA [K, N, V] tensor, got ",
              logits.device(), " ", logits.sizes());
  TORCH_CHECK(logits.size(0) * logits.size(1) < (int64_t{1} << 31),
              "mixing_cuda: K * N must be < 2^31 (one block per row), got ", logits.sizes());
}

// Every other tensor argument: on the logits' CUDA device (a CPU tensor would hand the kernel a
// host pointer), with `numel` elements.
void check_arg(const at::Tensor& t, const char* name, const at::Tensor& logits, int64_t numel) {
  TORCH_CHECK(t.is_cuda() && t.device() == logits.device(), "mixing_cuda: ", name,
              " must be a CUDA tensor on the logits' device ", logits.device(), ", got ",
              t.device());
  TORCH_CHECK(t.numel() == numel, "mixing_cuda: ", name, " must have ", numel,
              " elements, got ", t.sizes());
}

void check_targets(const at::Tensor& targets, const at::Tensor& logits) {
  check_arg(targets, "targets", logits, logits.size(1));
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous(),
              "mixing_cuda: targets must be contiguous int64 [N], got ", targets.scalar_type());
}

// A [K, N] statistic as contiguous fp32 on the logits' device (checked before any copy).
at::Tensor stat_arg(const at::Tensor& t, const char* name, const at::Tensor& logits) {
  check_arg(t, name, logits, logits.size(0) * logits.size(1));
  return t.to(at::kFloat).contiguous();
}

void ok(int err, const char* what) {
  TORCH_CHECK(err == 0, "mixing_cuda: ", what, " failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

std::vector<at::Tensor> stats(const at::Tensor& logits, const at::Tensor& targets,
                              int64_t vocab_start, int64_t ignore_index) {
  check_logits(logits);
  check_targets(targets, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t K = logits.size(0), N = logits.size(1), V = logits.size(2);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor mx = at::empty({K, N}, opts), sm = at::empty({K, N}, opts),
             tg = at::empty({K, N}, opts);
  ok(btm_mix_stats(logits.data_ptr(), dtype_code(logits), K, N, V, targets.data_ptr<int64_t>(),
                   vocab_start, ignore_index, mx.data_ptr<float>(), sm.data_ptr<float>(),
                   tg.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
     "btm_mix_stats");
  return {mx, sm, tg};
}

at::Tensor grad_logits(const at::Tensor& logits, const at::Tensor& shift,
                       const at::Tensor& logsum, const at::Tensor& coef,
                       const at::Tensor& targets, int64_t vocab_start, int64_t ignore_index) {
  check_logits(logits);
  check_targets(targets, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t K = logits.size(0), N = logits.size(1), V = logits.size(2);
  const at::Tensor shift_c = stat_arg(shift, "shift", logits),
                   logsum_c = stat_arg(logsum, "logsum", logits),
                   coef_c = stat_arg(coef, "coef", logits);
  at::Tensor grad = at::empty_like(logits);
  ok(btm_mix_grad_logits(logits.data_ptr(), dtype_code(logits), K, N, V, shift_c.data_ptr<float>(),
                         logsum_c.data_ptr<float>(), coef_c.data_ptr<float>(), targets.data_ptr<int64_t>(), vocab_start,
                         ignore_index, grad.data_ptr(), c10::cuda::getCurrentCUDAStream()),
     "btm_mix_grad_logits");
  return grad;
}

at::Tensor logprobs(const at::Tensor& logits, const at::Tensor& shift, const at::Tensor& b) {
  check_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t K = logits.size(0), N = logits.size(1), V = logits.size(2);
  const at::Tensor shift_c = stat_arg(shift, "shift", logits), b_c = stat_arg(b, "b", logits);
  at::Tensor out = at::empty({N, V}, logits.options().dtype(at::kFloat));
  ok(btm_mix_logprobs(logits.data_ptr(), dtype_code(logits), K, N, V, shift_c.data_ptr<float>(),
                      b_c.data_ptr<float>(), out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
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
