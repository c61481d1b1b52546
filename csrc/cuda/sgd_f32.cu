// Sgd kernels for float storage: the instantiations of sgd.cuh for one dtype, in a
// translation unit of their own so a change rebuilds in parallel and in bounded time.
#include "cuda/sgd.cuh"

namespace fused_optim {
namespace cuda {

cudaError_t launch_sgd_f32(const SgdLaunch& launch, cudaStream_t stream) {
  return launch_sgd_typed<float>(launch, stream);
}

}  // namespace cuda
}  // namespace fused_optim
