// Adam kernels for float storage: the instantiations of adam.cuh for one dtype, in a
// translation unit of their own so a change rebuilds in parallel and in bounded time.
#include "cuda/adam.cuh"

namespace fused_optim {
namespace cuda {

cudaError_t launch_adam_f32(const AdamLaunch& launch, cudaStream_t stream) {
  return launch_adam_typed<float>(launch, stream);
}

}  // namespace cuda
}  // namespace fused_optim
