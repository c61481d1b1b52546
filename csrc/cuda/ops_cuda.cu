// The CUDA implementation of every fused_optim op (schemas: csrc/ops.cpp).
//
// One call = one bucket (one device, one dtype). The op checks its inputs with the
// same TORCH_CHECKs as the CPU op (csrc/ops_common.h), builds the bucket's list-major
// pointer table, and enqueues on the current stream of the params' device: the
// optimizer's launches (one per ~500-1,100 tensors, see multi_tensor_apply.cuh), then,
// when it keeps per-tensor state, one state launch per ~4,000 tensors (see [note:
// per-tensor state] in engine.cuh); both once per run of rows when a state tensor is
// passed for two params ([note: aliased state] in kernel_api.h). Semantics are the CPU
// op's: found_inf non-zero => nothing changes, state included; grads are divided by
// grad_scale and written back unscaled; a list the call's options leave out is empty;
// a memory policy's lists (master_params, rng_states; states of another dtype than the
// params) as the CPU op takes them, with the same results ([note: storage policy] in
// multi_tensor_apply.cuh).
//
// [note: no host sync]
// The per-tensor state, found_inf, grad_scale, a device lr and the rng_states are read
// by the kernels from device memory (and the state and rng_states advanced there);
// nothing here reads a device tensor on the host. A CPU lr is read on the host
// (lr.item() of a CPU tensor does not touch the GPU). So a step enqueues work and
// returns, and can be captured into a CUDA graph: replaying the graph re-reads lr,
// found_inf, grad_scale, the state and the rng_states from their (fixed) addresses. The
// launch metadata is a kernel argument (no allocation, no host-to-device copy).
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

#include <vector>

#include "cuda/kernel_api.h"
#include "fused_optim/optimizers.h"
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

// lr as the kernels read it: the value read on the host (a CPU lr), or the device tensor.
cuda::DeviceScalar device_lr(const at::Tensor& lr, const math::Args& args) {
  if (lr.device().is_cpu()) return cuda::DeviceScalar{nullptr, false, args.lr};
  return cuda::DeviceScalar{lr.data_ptr(), lr.scalar_type() == c10::ScalarType::Double, 0.0};
}

const float* optional_ptr(const at::Tensor* t) {
  return t != nullptr ? t->data_ptr<float>() : nullptr;
}

// The launchers of every optimizer (generated units, csrc/cuda/instantiate.py), by the
// id of fused_optim/optimizers.h.
#define FO_LAUNCHERS(Name) cuda::launchers_of<math::Name>(),
const cuda::Launchers kLaunchers[] = {FO_FOR_EACH_OPTIMIZER(FO_LAUNCHERS)};
#undef FO_LAUNCHERS

void cuda_step(const OpCall& c) {
  const CheckedCall checked(c, c10::DeviceType::CUDA, nullptr, /*policies=*/true);
  if (checked.empty()) return;
  const at::TensorList params = c.params();
  const at::Device device = checked.device;
  // The kernels read each state list as all floats or all doubles.
  for (size_t j = 0; j < c.states.size(); ++j) {
    const at::TensorList s = c.states[j];
    for (size_t i = 1; i < s.size(); ++i) {
      TORCH_CHECK(s[i].scalar_type() == s[0].scalar_type(), c.name(), ": all ",
                  c.op->info->states[j], " of one call must have one dtype; ",
                  c.op->info->states[j], "[", i, "] is ", s[i].scalar_type(), ", ",
                  c.op->info->states[j], "[0] is ", s[0].scalar_type());
    }
  }
  // The kernels index a chunk as int32 (2^31 - 1 chunks of 64K elements per launch).
  const std::vector<int64_t>& numels = checked.lists.flat.numels;
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK(numels[i] <= cuda::kChunkSize * int64_t{INT32_MAX}, c.name(), ": params[", i,
                "] has ", numels[i], " elements, more than the kernels index");
  }
  check_driver();

  cuda::Launch launch{};
  launch.args = checked.args;
  launch.lr = device_lr(*c.lr, checked.args);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  std::vector<std::vector<void*>> states(c.states.size());
  for (size_t j = 0; j < c.states.size(); ++j) {
    states[j].reserve(params.size());
    for (const at::Tensor& s : c.states[j]) states[j].push_back(s.data_ptr());
    launch.states[j] = states[j].data();
    launch.states_are_double[j] = c.states[j][0].scalar_type() == c10::ScalarType::Double;
  }
  launch.rows = checked.lists.flat.table;
  launch.lists = checked.lists.mask;
  launch.maximize = c.maximize;
  launch.grad_scale = optional_ptr(c.grad_scale);
  launch.found_inf = optional_ptr(c.found_inf);
  std::vector<int64_t*> rng;
  if (!c.rng.empty()) {
    rng.reserve(params.size());
    for (const at::Tensor& r : c.rng) rng.push_back(r.data_ptr<int64_t>());
    launch.rng = rng.data();
  }

  const cuda::Launchers& l = kLaunchers[c.op->info->id];
  const cuda::LaunchFn launcher = l.launcher_for(launch);
  TORCH_CHECK(launcher != nullptr, c.name(), ": the CUDA kernels have no memory policy for "
              "this call");  // refused by CheckedCall already
  C10_CUDA_CHECK(
      cuda::run_step(launch, static_cast<int>(c.states.size()), launcher, l.advance, stream));
}

struct RegisterCuda {
  RegisterCuda() { set_device_step(c10::DeviceType::CUDA, &cuda_step); }
} register_cuda;

}  // namespace
}  // namespace fused_optim

#endif  // !defined(__CUDA_ARCH__)
