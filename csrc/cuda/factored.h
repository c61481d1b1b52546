// The interface between the CUDA op torch.ops.fused_optim.adafactor_
// (csrc/cuda/factored_cuda.cu) and its kernels (csrc/cuda/factored.cu): plain data and
// the CUDA runtime only, as kernel_api.h. The CPU engine's FactoredTensor and
// FactoredItem ([note: factored engine] in csrc/cpu/kernel_api.h), with every pointer in
// device memory, plus what the device computes per tensor that the CPU op keeps on the
// host.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cpu/kernel_api.h"
#include "fused_optim/math/args.h"

namespace fused_optim {
namespace cuda {

struct FactoredTensorWork {
  cpu::FactoredTensor t;     // weight and step_alpha are written by the kernels
  void* step;                // the state_step, float32 or float64
  int32_t step_is_double;
  int32_t rho_is_lr;         // written by the kernels
  int64_t numel, item_begin, item_end, items_per_batch;
  double step_value;         // the advanced step (written by the kernels)
  double alpha;              // written by the kernels
};

struct FactoredLaunch {
  int64_t n_tensors, n_items;
  FactoredTensorWork* tensors;        // [n_tensors], device
  const cpu::FactoredItem* items;     // [n_items], device
  double* sums;                       // [n_items]
  double* col_partials;
  const void* lr_device;              // a CUDA lr (float32 / float64), else nullptr
  int32_t lr_device_is_double;
  double lr_value;                    // a CPU lr, read on the host
  math::LrDType lr_dtype;
  double beta2_decay, eps1, eps2, d, weight_decay;
  bool maximize;
};

// Rows of one work item at most (a matrix's items take whole rows).
constexpr int64_t kFactoredItemRows = 64;
constexpr int64_t kFactoredItemElements = 65536;

// Enqueues the six launches of one step for storage dtype `dtype`; returns the first
// launch error.
cudaError_t launch_adafactor(cpu::DType dtype, const FactoredLaunch& launch,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_optim
