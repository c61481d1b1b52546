// The interface between the torch-facing CUDA ops (csrc/cuda/ops_cuda.cu) and the CUDA
// kernel translation units, which the build generates, one per optimizer and storage
// dtype (csrc/cuda/instantiate.py: `<name>_<dtype>.cu`, each instantiating launch<> of
// csrc/cuda/engine.cuh for one optimizer of fused_optim/optimizers.h).
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
#include "fused_optim/math/args.h"

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

// One call of an optimizer over a bucket.
struct Launch {
  cpu::TensorTable rows;         // the call's lists, op order (cpu::StepCall); device pointers
  uint32_t lists;                // the optimizer's lists present in rows, a bit each
  math::Args args;               // args.lr and args.lr_dtype are set from `lr` on the device
  DeviceScalar lr;
  bool maximize;
  // Per state list j: a host array of rows.n_tensors device pointers (one element each),
  // and whether they are doubles (else floats).
  void* const* states[math::kMaxStates];
  bool states_are_double[math::kMaxStates];
  const float* grad_scale;       // device; nullptr: grads are not scaled
  const float* found_inf;        // device; nullptr: never skip
};

// One step of Optim over the bucket, every tensor with its per-tensor state advanced as
// advance_states will store it ([note: per-tensor state] in csrc/cuda/engine.cuh). D is
// the storage dtype of rows.
template <typename Optim, cpu::DType D>
cudaError_t launch(const Launch& launch, cudaStream_t stream);

// Stores every tensor's advanced per-tensor state, unless *found_inf is non-zero.
// Enqueued after launch<> on the same stream.
template <typename Optim>
cudaError_t advance_states(const Launch& launch, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_optim
