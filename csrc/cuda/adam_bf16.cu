// Adam kernels for __nv_bfloat16 storage: the instantiations of adam.cuh for one dtype, in a
// translation unit of their own so a change rebuilds in parallel and in bounded time.
#include "cuda/adam.cuh"

namespace fused_optim {
namespace cuda {

cudaError_t launch_adam_bf16(const AdamLaunch& launch, cudaStream_t stream) {
  return launch_adam_typed<__nv_bfloat16>(launch, stream);
}

}  // namespace cuda
}  // namespace fused_optim
