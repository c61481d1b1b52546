// The interface between the CUDA row-sparse op (csrc/cuda/sparse_rows_cuda.cu) and its
// kernels (csrc/cuda/rows.cu): plain data and the CUDA runtime only, as kernel_api.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cpu/kernel_api.h"

namespace fused_optim {
namespace cuda {

// One call of a row math on the device ([note: row math] in fused_optim/math/optimizer.h;
// the CPU's cpu::RowCall, with every array in device memory). `table` is one int64
// array: params[n], states[n_states * n] (state-major), values[n], perm[n] (pointers),
// row_len[n], then constants[n * n_constants] as the bits of doubles. `segments` holds
// four int64 per segment: tensor, row, first and end position in that tensor's perm.
struct RowLaunch {
  int64_t n_tensors;
  int64_t n_segments;
  int64_t max_row_len;
  const int64_t* table;
  const int64_t* segments;
  bool maximize;
};

// Enqueues the kernel of row math `math_id` (its position in FO_FOR_EACH_ROW_MATH) for
// storage dtype `dtype`; returns the launch's error.
cudaError_t launch_rows(int math_id, cpu::DType dtype, const RowLaunch& launch,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_optim
