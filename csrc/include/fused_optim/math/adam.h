// Adam and AdamW: the element-wise math, written once for every C++ backend.
//
//   m_t   = lerp(m_{t-1}, g_t, 1 - beta1)
//   v_t   = beta2 * v_{t-1} + (1 - beta2) * g_t^2
//   vhat  = max(vhat_{t-1}, v_t)                       (amsgrad only)
//   p_t   = p_{t-1} - lr / (1 - beta1^t) * m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)
//
// with g_t = -grad for maximize, g_t += weight_decay * p for Adam's L2 penalty, and
// p *= 1 - lr * weight_decay first for AdamW's decoupled decay. Per element this reads
// param, grad, exp_avg, exp_avg_sq (+ max_exp_avg_sq) and writes param, exp_avg,
// exp_avg_sq (+ max_exp_avg_sq): fp32 AdamW reads 16 B and writes 12 B.
//
// Per-tensor scalars (bias corrections depend on each tensor's own step) are computed
// in double, as torch.optim computes them in Python floats, then rounded to opmath.
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

// Everything the element-wise update needs for one tensor at one step. Fields of
// opmath_t only: the CPU engine's quiet_nans() (csrc/cpu/kernels_impl.h) walks the struct
// as an array of them.
template <typename opmath_t>
struct AdamTensorScalars {
  opmath_t beta2;
  opmath_t one_minus_beta1;
  opmath_t one_minus_beta2;
  opmath_t weight_decay;
  opmath_t decay_factor;           // 1 - lr * weight_decay
  opmath_t neg_step_size;          // -lr / (1 - beta1^step)
  opmath_t inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^step)
  opmath_t eps;
};

// `step` is the tensor's step count after this step's increment (1 on the first step).
template <typename opmath_t>
FO_HOST_DEVICE inline AdamTensorScalars<opmath_t> adam_tensor_scalars(
    const AdamHyper& h, double step) {
  const double bias_correction1 = 1.0 - ::pow(h.beta1, step);
  const double bias_correction2 = 1.0 - ::pow(h.beta2, step);
  AdamTensorScalars<opmath_t> s;
  s.beta2 = static_cast<opmath_t>(h.beta2);
  s.one_minus_beta1 = static_cast<opmath_t>(1.0 - h.beta1);
  s.one_minus_beta2 = static_cast<opmath_t>(1.0 - h.beta2);
  s.weight_decay = static_cast<opmath_t>(h.weight_decay);
  s.decay_factor = static_cast<opmath_t>(1.0 - h.lr * h.weight_decay);
  s.neg_step_size = static_cast<opmath_t>(-(h.lr / bias_correction1));
  s.inv_bias_correction2_sqrt = static_cast<opmath_t>(1.0 / sqrt_op(bias_correction2));
  s.eps = static_cast<opmath_t>(h.eps);
  return s;
}

// One element of one Adam step. `max_exp_avg_sq` is only touched when AMSGRAD.
// V: element values, S: scalars (see stages.h).
template <bool AMSGRAD, bool MAXIMIZE, WeightDecay WD, typename V, typename S>
FO_HOST_DEVICE FO_INLINE void adam_update(
    V& param,
    V grad,
    V& exp_avg,
    V& exp_avg_sq,
    V& max_exp_avg_sq,
    const AdamTensorScalars<S>& s) {
  grad = maybe_negate(grad, MAXIMIZE);
  if constexpr (WD == WeightDecay::kL2) {
    grad = add_l2_penalty(grad, param, s.weight_decay);
  } else if constexpr (WD == WeightDecay::kDecoupled) {
    param = decay_weights(param, s.decay_factor);
  }
  // update_moments
  exp_avg = lerp(exp_avg, grad, s.one_minus_beta1);
  exp_avg_sq = exp_avg_sq * s.beta2 + s.one_minus_beta2 * (grad * grad);
  V second_moment = exp_avg_sq;
  if constexpr (AMSGRAD) {
    max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  // bias_correct + apply_update: param.addcdiv_(exp_avg, denom, value=-step_size).
  // torch divides sqrt(v) by sqrt(1 - beta2^t); multiplying by the per-tensor
  // reciprocal (computed in double) differs by at most an ulp and leaves one division
  // per element instead of two: on the AVX2 CPU we test on, division and sqrt throughput
  // bound the fp32 kernel near the memory limit (0.67 ns/element in cache, 1 thread).
  const V denom = sqrt_op(second_moment) * s.inv_bias_correction2_sqrt + s.eps;
  param = param + s.neg_step_size * (exp_avg / denom);
}

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
