// SGD on CUDA: the functor the multi-tensor engine calls, and the launcher that turns
// run-time options into template flags. The math is fused_optim/math/sgd.h.
//
// What it computes, per element: grads are divided by *grad_scale (when given) and
// written back unscaled; then math::sgd_update with g = grad * (maximize ? -1 : 1).
// Bytes per element (fp32; halve for fp16/bf16, double for fp64):
//   with momentum      reads param, grad, momentum_buffer 12 B (8 B on the first step,
//                      where the buffer is only written), writes param, buffer 8 B
//   without momentum   reads param, grad 8 B, writes param 4 B
//   with grad_scale    +4 B written (the unscaled grad)
//
// Template flags: MOMENTUM, NESTEROV, FIRST_STEP (only with momentum), WEIGHT_DECAY
// (an L2 term is skipped, not multiplied by 0, so inf/NaN params behave as in torch),
// UNSCALE. maximize is a multiplication by -1. 20 kernels per storage dtype.
#pragma once

#include "cuda/kernel_api.h"
#include "cuda/multi_tensor_apply.cuh"
#include "fused_optim/math/sgd.h"

namespace fused_optim {
namespace cuda {

template <typename T, bool MOMENTUM, bool NESTEROV, bool FIRST_STEP, bool WEIGHT_DECAY,
          bool UNSCALE>
struct SgdFunctor {
  using storage_t = T;
  using opmath_t = typename Storage<T>::opmath;
  static constexpr int kDepth = MOMENTUM ? 3 : 2;
  static constexpr int kTensorScalars = 0;
  // On the buffer's first step its old contents are never used: do not load them.
  static constexpr FO_HOST_DEVICE bool reads(int list) {
    return !(FIRST_STEP && list == cpu::kSgdMomentumBuffer);
  }
  static constexpr FO_HOST_DEVICE bool writes(int list) {
    return list != cpu::kSgdGrad || UNSCALE;
  }

  struct BlockScalars {
    math::SgdScalars<opmath_t> sgd;
    opmath_t grad_scale;
    opmath_t grad_sign;
  };

  math::SgdHyper hyper;
  DeviceScalar lr;
  const float* grad_scale;
  const float* found_inf;

  __device__ FO_INLINE bool skip() const { return found_inf_set(found_inf); }

  __device__ BlockScalars block_scalars(const void* const*) const {
    math::SgdHyper h = hyper;
    h.lr = read_scalar(lr);
    BlockScalars b;
    b.sgd = math::sgd_scalars<opmath_t>(h);
    b.grad_scale = UNSCALE ? static_cast<opmath_t>(*grad_scale) : opmath_t(1);
    b.grad_sign = hyper.maximize ? opmath_t(-1) : opmath_t(1);
    return b;
  }

  __device__ FO_INLINE void operator()(opmath_t (&x)[kDepth], const BlockScalars& b) const {
    const opmath_t grad = math::unscale_grad<UNSCALE>(x[cpu::kSgdGrad], b.grad_scale);
    opmath_t unused = opmath_t(0);
    opmath_t& buffer = MOMENTUM ? x[kDepth - 1] : unused;
    math::sgd_update<MOMENTUM, NESTEROV, FIRST_STEP, /*MAXIMIZE=*/false, WEIGHT_DECAY>(
        x[cpu::kSgdParam], grad * b.grad_sign, buffer, b.sgd);
  }
};

template <typename T>
cudaError_t launch_sgd_typed(const SgdLaunch& launch, cudaStream_t stream) {
  const math::SgdHyper& h = launch.hyper;
  const bool momentum = h.momentum != 0.0;
  return dispatch_bool(momentum, [&](auto momentum_c) {
    return dispatch_bool(h.nesterov && momentum, [&](auto nesterov_c) {
      return dispatch_bool(h.is_first_step && momentum, [&](auto first_c) {
        return dispatch_bool(h.weight_decay != 0.0, [&](auto wd_c) {
          return dispatch_bool(launch.grad_scale != nullptr, [&](auto unscale_c) {
            constexpr bool MOMENTUM = decltype(momentum_c)::value;
            constexpr bool NESTEROV = decltype(nesterov_c)::value;
            constexpr bool FIRST = decltype(first_c)::value;
            // Flags that cannot matter without momentum collapse to one instantiation.
            if constexpr (!MOMENTUM && (NESTEROV || FIRST)) {
              return cudaErrorInvalidValue;  // unreachable: both are masked by `momentum`
            } else {
              using Op = SgdFunctor<T, MOMENTUM, NESTEROV, FIRST, decltype(wd_c)::value,
                                    decltype(unscale_c)::value>;
              Op op;
              op.hyper = h;
              op.lr = launch.lr;
              op.grad_scale = launch.grad_scale;
              op.found_inf = launch.found_inf;
              return multi_tensor_apply<Op>(launch.rows, {}, op, stream);
            }
          });
        });
      });
    });
  });
}

}  // namespace cuda
}  // namespace fused_optim
