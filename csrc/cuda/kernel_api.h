// The interface between the torch-facing CUDA ops (csrc/cuda/ops_cuda.cu) and the CUDA
// kernel translation units (csrc/cuda/adam_*.cu, sgd_*.cu, steps.cu).
//
// Plain data and the CUDA runtime's stream type only: the kernel units include no torch
// header, which keeps each of them a short compile, and the ops unit is the only place
// that knows about at::Tensor, the dispatcher, device guards and streams. Launchers
// return the first launch error (cudaGetLastError after each launch); the ops unit turns
// it into a c10::CUDAError with C10_CUDA_CHECK.
//
// The bucket is described by the same list-major table as on the CPU
// (cpu::TensorTable: ptrs[list * n_tensors + t], numels[t], one storage dtype), here
// holding device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cpu/kernel_api.h"
#include "fused_optim/math/hyper.h"

namespace fused_optim {
namespace cuda {

// Elements per chunk, the unit of work of one thread block; a multiple of every vector
// width (16 B / sizeof(T)). ATen's multi_tensor_apply uses the same 64K.
constexpr int64_t kChunkSize = 65536;

// A one-element device tensor read by the kernels (lr), or a value known on the host.
struct DeviceScalar {
  const void* ptr;  // nullptr: use `value`
  bool is_double;   // *ptr is a double, else a float
  double value;
};

struct AdamLaunch {
  cpu::TensorTable rows;         // lists in cpu::AdamList order; device pointers
  math::AdamHyper hyper;         // hyper.lr is ignored when lr.ptr is set
  DeviceScalar lr;
  void* const* steps;            // host array of n_tensors device pointers (one element each)
  bool steps_are_double;         // else float
  const float* grad_scale;       // device; nullptr: grads are not scaled
  const float* found_inf;        // device; nullptr: never skip
};

struct SgdLaunch {
  cpu::TensorTable rows;         // lists in cpu::SgdList order; device pointers
  math::SgdHyper hyper;          // hyper.lr is ignored when lr.ptr is set
  DeviceScalar lr;
  const float* grad_scale;
  const float* found_inf;
};

// One Adam step over the bucket: every tensor is updated with its step counter + 1
// (see [note: step counters] in csrc/cuda/steps.cu); the counters themselves are
// incremented afterwards by increment_steps. One function per storage dtype, each in
// its own translation unit (adam_f32.cu, adam_f64.cu, adam_f16.cu, adam_bf16.cu).
cudaError_t launch_adam_f32(const AdamLaunch& launch, cudaStream_t stream);
cudaError_t launch_adam_f64(const AdamLaunch& launch, cudaStream_t stream);
cudaError_t launch_adam_f16(const AdamLaunch& launch, cudaStream_t stream);
cudaError_t launch_adam_bf16(const AdamLaunch& launch, cudaStream_t stream);

cudaError_t launch_sgd_f32(const SgdLaunch& launch, cudaStream_t stream);
cudaError_t launch_sgd_f64(const SgdLaunch& launch, cudaStream_t stream);
cudaError_t launch_sgd_f16(const SgdLaunch& launch, cudaStream_t stream);
cudaError_t launch_sgd_bf16(const SgdLaunch& launch, cudaStream_t stream);

// Adds 1 to each of the n one-element counters (float or double), unless *found_inf
// is non-zero. Launched after the algorithm's kernels on the same stream.
cudaError_t increment_steps(void* const* steps, int64_t n, bool are_double,
                            const float* found_inf, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_optim
