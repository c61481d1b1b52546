// Adam / AdamW on CUDA: the functor the multi-tensor engine calls, and the launcher that
// turns run-time options into template flags. The math is fused_optim/math/adam.h.
//
// What it computes, per element: grads are divided by *grad_scale (when given) and
// written back unscaled; then math::adam_update with g = grad * (maximize ? -1 : 1):
// param, exp_avg, exp_avg_sq (and max_exp_avg_sq) are updated in place.
// Bytes per element (fp32; halve for fp16/bf16, double for fp64):
//   reads  param, grad, exp_avg, exp_avg_sq            16 B  (+4 B max_exp_avg_sq)
//   writes param, exp_avg, exp_avg_sq                  12 B  (+4 B max_exp_avg_sq,
//                                                             +4 B grad with grad_scale)
// Per block: one step counter, lr (when a device tensor), found_inf and grad_scale.
//
// Template flags: AMSGRAD (a fifth list), WD (L2 or decoupled; no weight decay runs as
// decoupled decay by a factor of exactly 1, as on the CPU), UNSCALE (grads read, divided
// and written back). maximize is a multiplication by -1 (exact), lr a value or pointer:
// both are uniform and cost nothing in a memory-bound loop, and each would double the
// instantiations. 8 kernels per storage dtype.
#pragma once

#include "cuda/kernel_api.h"
#include "cuda/multi_tensor_apply.cuh"
#include "fused_optim/math/adam.h"

namespace fused_optim {
namespace cuda {

template <typename T, bool AMSGRAD, math::WeightDecay WD, bool UNSCALE>
struct AdamFunctor {
  using storage_t = T;
  using opmath_t = typename Storage<T>::opmath;
  static constexpr int kDepth = AMSGRAD ? 5 : 4;
  static constexpr int kTensorScalars = 1;  // the step counter
  static constexpr FO_HOST_DEVICE bool reads(int) { return true; }
  static constexpr FO_HOST_DEVICE bool writes(int list) {
    return list != cpu::kAdamGrad || UNSCALE;
  }

  struct BlockScalars {
    math::AdamTensorScalars<opmath_t> adam;
    opmath_t grad_scale;
    opmath_t grad_sign;
  };

  math::AdamHyper hyper;  // weight_decay already folded for WD (see launch_adam_typed)
  DeviceScalar lr;
  const float* grad_scale;
  const float* found_inf;
  bool steps_are_double;

  __device__ FO_INLINE bool skip() const { return found_inf_set(found_inf); }

  // [note: step counters] in steps.cu: the counter is read before this call's increment,
  // and every block of the call uses counter + 1, rounded as the counter's own dtype
  // rounds it, which is exactly the value increment_steps stores afterwards.
  __device__ BlockScalars block_scalars(const void* const* tensor_scalars) const {
    const double step =
        steps_are_double
            ? *static_cast<const double*>(tensor_scalars[0]) + 1.0
            : static_cast<double>(*static_cast<const float*>(tensor_scalars[0]) + 1.0f);
    math::AdamHyper h = hyper;
    h.lr = read_scalar(lr);
    BlockScalars b;
    b.adam = math::adam_tensor_scalars<opmath_t>(h, step);
    b.grad_scale = UNSCALE ? static_cast<opmath_t>(*grad_scale) : opmath_t(1);
    b.grad_sign = hyper.maximize ? opmath_t(-1) : opmath_t(1);
    return b;
  }

  __device__ FO_INLINE void operator()(opmath_t (&x)[kDepth], const BlockScalars& b) const {
    const opmath_t grad = math::unscale_grad<UNSCALE>(x[cpu::kAdamGrad], b.grad_scale);
    opmath_t unused = opmath_t(0);
    opmath_t& max_exp_avg_sq = AMSGRAD ? x[kDepth - 1] : unused;
    math::adam_update<AMSGRAD, /*MAXIMIZE=*/false, WD>(
        x[cpu::kAdamParam], grad * b.grad_sign, x[cpu::kAdamExpAvg], x[cpu::kAdamExpAvgSq],
        max_exp_avg_sq, b.adam);
  }
};

template <typename T>
cudaError_t launch_adam_typed(const AdamLaunch& launch, cudaStream_t stream) {
  const math::AdamHyper& h = launch.hyper;
  // No weight decay is decoupled decay by a factor of exactly 1: one fewer template.
  const bool decoupled = h.weight_decay_mode != math::WeightDecay::kL2 || h.weight_decay == 0.0;
  return dispatch_bool(h.amsgrad, [&](auto amsgrad_c) {
    return dispatch_bool(decoupled, [&](auto decoupled_c) {
      return dispatch_bool(launch.grad_scale != nullptr, [&](auto unscale_c) {
        constexpr bool AMSGRAD = decltype(amsgrad_c)::value;
        constexpr auto WD = decltype(decoupled_c)::value ? math::WeightDecay::kDecoupled
                                                         : math::WeightDecay::kL2;
        using Op = AdamFunctor<T, AMSGRAD, WD, decltype(unscale_c)::value>;
        Op op;
        op.hyper = h;
        if (h.weight_decay_mode != math::WeightDecay::kDecoupled) {
          op.hyper.weight_decay = WD == math::WeightDecay::kL2 ? h.weight_decay : 0.0;
        }
        op.lr = launch.lr;
        op.grad_scale = launch.grad_scale;
        op.found_inf = launch.found_inf;
        op.steps_are_double = launch.steps_are_double;
        return multi_tensor_apply<Op>(launch.rows, {launch.steps}, op, stream);
      });
    });
  });
}

}  // namespace cuda
}  // namespace fused_optim
