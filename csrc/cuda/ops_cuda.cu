// CUDA implementations of the fused_optim ops (schemas in csrc/ops.cpp).
//
// One call = one bucket (one device, one dtype). The op checks its inputs with the
// same TORCH_CHECKs as the CPU op (csrc/ops_common.h), builds the bucket's list-major
// pointer table, and enqueues on the current stream of the params' device:
//   adam_: the Adam launches (one per ~600 tensors, see multi_tensor_apply.cuh), then
//          one step-counter launch per ~4,000 tensors (see [note: step counters]);
//   sgd_:  the SGD launches (one per ~900-1,100 tensors).
// Semantics are the CPU op's: found_inf non-zero => nothing changes, steps included;
// grads are divided by grad_scale and written back unscaled; max_exp_avg_sqs is empty
// unless amsgrad, momentum_buffers empty unless momentum != 0; is_first_step => the
// momentum buffer is set to the (unscaled, maximize-signed, decayed) grad.
//
// [note: no host sync]
// step, found_inf, grad_scale and a device lr are read by the kernels from device
// memory; nothing here reads a device tensor on the host. A CPU lr is read on the host
// (lr.item() of a CPU tensor does not touch the GPU). So a step enqueues work and
// returns, and can be captured into a CUDA graph: replaying the graph re-reads lr,
// found_inf, grad_scale and the counters from their (fixed) addresses. The launch
// metadata is a kernel argument (no allocation, no host-to-device copy).
//
// [note: host-only translation unit]
// This file holds no device code, yet nvcc would parse all of torch's headers once per
// target architecture for the device side (86 s instead of 31 s for sm_80 + sm_90 on
// the 2-core CI machine). Its whole body is therefore hidden from the device passes
// (__CUDA_ARCH__ is defined only there); the host pass compiles it as usual. Kernels
// must never be added here: they live in the torch-free kernel units.
#if !defined(__CUDA_ARCH__)

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/kernel_api.h"
#include "ops_common.h"

namespace fused_optim {
namespace {

// Kernel arguments above 4 KB need a CUDA 12.1+ driver (see [note: launch metadata by
// value] in multi_tensor_apply.cuh); an older one would fail every launch.
void check_driver() {
  static const int version = [] {
    int v = 0;
    C10_CUDA_CHECK(cudaDriverGetVersion(&v));
    return v;
  }();
  TORCH_CHECK(version >= 12010,
              "fused_optim: the CUDA kernels need a driver for CUDA 12.1 or newer (they pass "
              "32 KB launch tables by value); this driver supports CUDA ",
              version / 1000, ".", (version % 1000) / 10);
}

cuda::DeviceScalar read_lr(const char* op, const at::Tensor& lr, const at::Device& device) {
  TORCH_CHECK(lr.numel() == 1, op, ": lr must be a one-element tensor, got shape ", lr.sizes());
  if (lr.device().is_cpu()) {
    return cuda::DeviceScalar{nullptr, false, lr.item<double>()};  // host memory: no sync
  }
  TORCH_CHECK(lr.device() == device, op, ": lr is on ", lr.device(), " but the params are on ",
              device, "; pass a CPU tensor or one on the params' device");
  TORCH_CHECK(lr.scalar_type() == c10::ScalarType::Float ||
                  lr.scalar_type() == c10::ScalarType::Double,
              op, ": a CUDA lr must be float32 or float64, got ", lr.scalar_type());
  return cuda::DeviceScalar{lr.data_ptr(), lr.scalar_type() == c10::ScalarType::Double, 0.0};
}

// The kernels index a chunk as int32 (2^31 - 1 chunks of 64K elements per launch).
// The one of four per-dtype launchers (one .cu file each) that runs `dtype`.
template <typename Launcher>
Launcher for_dtype(cpu::DType dtype, Launcher f32, Launcher f64, Launcher f16, Launcher bf16) {
  switch (dtype) {
    case cpu::DType::kFloat32: return f32;
    case cpu::DType::kFloat64: return f64;
    case cpu::DType::kFloat16: return f16;
    case cpu::DType::kBFloat16: return bf16;
  }
  TORCH_CHECK(false, "fused_optim: no CUDA launcher for this dtype");
}

void check_numels(const char* op, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].numel() <= cuda::kChunkSize * int64_t{INT32_MAX}, op, ": params[", i,
                "] has ", params[i].numel(), " elements, more than the kernels index");
  }
}

const float* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void adam_cuda_(at::TensorList params_, at::TensorList grads_, at::TensorList exp_avgs_,
                at::TensorList exp_avg_sqs_, at::TensorList max_exp_avg_sqs_,
                at::TensorList state_steps_, const at::Tensor& lr, double beta1, double beta2,
                double weight_decay, double eps, bool amsgrad, bool maximize,
                bool decoupled_weight_decay, const c10::optional<at::Tensor>& grad_scale,
                const c10::optional<at::Tensor>& found_inf) {
  static const char* op = "fused_optim::adam_";
  const AdamLists a(op, params_, grads_, exp_avgs_, exp_avg_sqs_, max_exp_avg_sqs_,
                    state_steps_, amsgrad);
  const at::TensorList params = a.params;
  const at::TensorList state_steps = a.state_steps;
  if (params.empty()) {
    TORCH_CHECK(lr.numel() == 1, op, ": lr must be a one-element tensor, got shape ",
                lr.sizes());
    return;
  }
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": CUDA kernel called with tensors on ", device);
  check_scalars(op, "state_steps", state_steps, params.size(), /*allow_cpu=*/false, device);
  const bool steps_are_double = state_steps[0].scalar_type() == c10::ScalarType::Double;
  for (size_t i = 1; i < state_steps.size(); ++i) {
    TORCH_CHECK(state_steps[i].scalar_type() == state_steps[0].scalar_type(), op,
                ": all state_steps of one call must have one dtype; state_steps[", i, "] is ",
                state_steps[i].scalar_type(), ", state_steps[0] is ",
                state_steps[0].scalar_type());
  }
  check_optional_scalar(op, "grad_scale", grad_scale, device);
  check_optional_scalar(op, "found_inf", found_inf, device);
  const cuda::DeviceScalar lr_scalar = read_lr(op, lr, device);
  check_numels(op, params);
  check_driver();

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const cpu::DType dtype = to_kernel_dtype(op, params[0].scalar_type());
  const FlatTable& flat = a.flat;
  std::vector<void*> steps;
  steps.reserve(state_steps.size());
  for (const at::Tensor& s : state_steps) steps.push_back(s.data_ptr());

  cuda::AdamLaunch launch;
  launch.rows = flat.table;
  launch.hyper = adam_hyper(lr_scalar.value, beta1, beta2, weight_decay, eps, amsgrad,
                            maximize, decoupled_weight_decay);
  launch.lr = lr_scalar;
  launch.steps = steps.data();
  launch.steps_are_double = steps_are_double;
  launch.grad_scale = optional_ptr(grad_scale);
  launch.found_inf = optional_ptr(found_inf);

  C10_CUDA_CHECK(for_dtype(dtype, &cuda::launch_adam_f32, &cuda::launch_adam_f64,
                           &cuda::launch_adam_f16, &cuda::launch_adam_bf16)(launch, stream));
  C10_CUDA_CHECK(cuda::increment_steps(steps.data(), static_cast<int64_t>(steps.size()),
                                       steps_are_double, launch.found_inf, stream));
}

void sgd_cuda_(at::TensorList params_, at::TensorList grads_, at::TensorList momentum_buffers_,
               const at::Tensor& lr, double momentum, double dampening, double weight_decay,
               bool nesterov, bool maximize, bool is_first_step,
               const c10::optional<at::Tensor>& grad_scale,
               const c10::optional<at::Tensor>& found_inf) {
  static const char* op = "fused_optim::sgd_";
  const SgdLists a(op, params_, grads_, momentum_buffers_, momentum);
  const at::TensorList params = a.params;
  if (params.empty()) {
    TORCH_CHECK(lr.numel() == 1, op, ": lr must be a one-element tensor, got shape ",
                lr.sizes());
    return;
  }
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": CUDA kernel called with tensors on ", device);
  check_optional_scalar(op, "grad_scale", grad_scale, device);
  check_optional_scalar(op, "found_inf", found_inf, device);
  const cuda::DeviceScalar lr_scalar = read_lr(op, lr, device);
  check_numels(op, params);
  check_driver();

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const cpu::DType dtype = to_kernel_dtype(op, params[0].scalar_type());
  const FlatTable& flat = a.flat;

  cuda::SgdLaunch launch;
  launch.rows = flat.table;
  launch.hyper = math::SgdHyper{lr_scalar.value, momentum, dampening, weight_decay,
                                nesterov, maximize, is_first_step};
  launch.lr = lr_scalar;
  launch.grad_scale = optional_ptr(grad_scale);
  launch.found_inf = optional_ptr(found_inf);

  C10_CUDA_CHECK(for_dtype(dtype, &cuda::launch_sgd_f32, &cuda::launch_sgd_f64,
                           &cuda::launch_sgd_f16, &cuda::launch_sgd_bf16)(launch, stream));
}

}  // namespace
}  // namespace fused_optim

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("adam_", &fused_optim::adam_cuda_);
  m.impl("sgd_", &fused_optim::sgd_cuda_);
}

#endif  // !defined(__CUDA_ARCH__)
