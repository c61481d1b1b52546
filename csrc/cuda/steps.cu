// Step counters on CUDA: adds 1 to every counter of a call, unless found_inf is set.
//
// Reads and writes 4 B (float) or 8 B (double) per tensor, plus found_inf; one thread
// per counter, up to ~4,000 counters per launch (pointers passed by value, see
// [note: launch metadata by value] in multi_tensor_apply.cuh).
//
// [note: step counters]
// Each counter must advance exactly once per call, however many blocks and launches
// read it, and not at all when found_inf is set. The algorithm's kernels therefore
// never write a counter: every block reads the counter as it was before the call and
// computes with counter + 1, rounded in the counter's own dtype (a float32 counter
// stops at 2^24 exactly as torch's `step += 1` does). Once all of the algorithm's
// launches are enqueued, increment_steps stores counter + 1 into every counter. Stream
// order makes the increment run after every block that read the old value, so no
// block can see a half-updated set of counters; no atomics between blocks, no
// "last block" counters, no host sync, and the sequence captures into a CUDA graph as
// is. The alternative (a first launch that increments, then the algorithm reading the
// new value) costs the same one launch; we chose this order so that a call whose
// algorithm launch fails leaves the counters unchanged. The increment itself is an
// atomicAdd, so a counter passed twice in one call (torch never does this) still ends
// up incremented twice, as on the CPU.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/kernel_api.h"
#include "fused_optim/macros.h"

namespace fused_optim {
namespace cuda {
namespace {

constexpr int kStepsBlockSize = 256;

struct StepTable {
  static constexpr int kMaxSteps = (32764 - 64) / 8;
  void* steps[kMaxSteps];
  int32_t n;
};

__global__ void __launch_bounds__(kStepsBlockSize)
    increment_steps_kernel(const __grid_constant__ StepTable table, const float* found_inf,
                           bool are_double) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int i = static_cast<int>(blockIdx.x) * kStepsBlockSize + static_cast<int>(threadIdx.x);
  if (i >= table.n) return;
  if (are_double) {
    atomicAdd(static_cast<double*>(table.steps[i]), 1.0);
  } else {
    atomicAdd(static_cast<float*>(table.steps[i]), 1.0f);
  }
}

}  // namespace

cudaError_t increment_steps(void* const* steps, int64_t n, bool are_double,
                            const float* found_inf, cudaStream_t stream) {
  StepTable table;
  for (int64_t begin = 0; begin < n; begin += StepTable::kMaxSteps) {
    const int64_t count = n - begin < StepTable::kMaxSteps ? n - begin : StepTable::kMaxSteps;
    for (int64_t i = 0; i < count; ++i) table.steps[i] = steps[begin + i];
    table.n = static_cast<int32_t>(count);
    const unsigned int blocks =
        static_cast<unsigned int>((count + kStepsBlockSize - 1) / kStepsBlockSize);
    increment_steps_kernel<<<blocks, kStepsBlockSize, 0, stream>>>(table, found_inf, are_double);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace fused_optim
