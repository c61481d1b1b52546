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
// The spec (lists, state keys, arguments) is fused_optim/adam.py's.
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/optimizer.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

template <typename opmath_t>
struct AdamScalars {
  opmath_t beta2;
  opmath_t one_minus_beta1;
  opmath_t one_minus_beta2;
  opmath_t weight_decay;
  opmath_t decay_factor;           // 1 - lr * weight_decay
  opmath_t neg_step_size;          // -lr / (1 - beta1^step)
  opmath_t inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^step)
  opmath_t eps;
};

// The optimizer (see [note: an optimizer is its spec and its math] in optimizer.h).
// Adam and AdamW are one op: AdamW passes decoupled_weight_decay=True.
struct Adam : CountsSteps {
  static constexpr const char* kOp = "adam_";
  enum List : int { kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kLists };
  static constexpr std::array<const char*, kLists> kListNames = {
      "params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"};
  static constexpr uint32_t kOptionalLists = bit(kMaxExpAvgSq);  // amsgrad
  enum Float : int { kBeta1, kBeta2, kWeightDecay, kEps, kFloats };
  static constexpr std::array<const char*, kFloats> kFloatNames = {"beta1", "beta2",
                                                                   "weight_decay", "eps"};
  enum Flag : int { kAmsgrad, kMaximize, kDecoupledWeightDecay, kFlags };
  static constexpr std::array<const char*, kFlags> kFlagNames = {"amsgrad", "maximize",
                                                                 "decoupled_weight_decay"};

  // The one variant bit: Adam's L2 penalty. Otherwise the decay is decoupled, and
  // without weight decay it is decoupled decay by a factor of exactly 1: one template
  // fewer.
  static constexpr uint32_t kL2 = 1;
  static constexpr int kVariantBits = 1;
  static uint32_t variant(const Args& a) {
    return !a.flags[kDecoupledWeightDecay] && a.floats[kWeightDecay] != 0.0 ? kL2 : 0;
  }

  template <typename S>
  using Scalars = AdamScalars<S>;

  // `state[0]` is the tensor's step count after this step's increment (1 on the first).
  template <uint32_t LISTS, uint32_t V, typename S>
  FO_HOST_DEVICE static Scalars<S> scalars(const Args& a, const double* state) {
    const double step = state[0];
    const double beta1 = a.floats[kBeta1];
    const double beta2 = a.floats[kBeta2];
    const double weight_decay = a.floats[kWeightDecay];
    const LrMath lr = lr_math(a);
    const double bias_correction1 = 1.0 - ::pow(beta1, step);
    const double bias_correction2 = 1.0 - ::pow(beta2, step);
    Scalars<S> s;
    s.beta2 = static_cast<S>(beta2);
    s.one_minus_beta1 = static_cast<S>(1.0 - beta1);
    s.one_minus_beta2 = static_cast<S>(1.0 - beta2);
    s.weight_decay = static_cast<S>(weight_decay);
    s.decay_factor = static_cast<S>(lr.sub(1.0, lr.mul(a.lr, weight_decay)));
    s.neg_step_size = static_cast<S>(-lr.div(a.lr, bias_correction1));
    s.inv_bias_correction2_sqrt = static_cast<S>(1.0 / sqrt_op(bias_correction2));
    s.eps = static_cast<S>(a.floats[kEps]);
    return s;
  }

  // One element. Without weight decay the decay is decoupled by a factor of exactly 1.
  template <uint32_t LISTS, uint32_t V, typename Vt, typename S>
  FO_HOST_DEVICE FO_INLINE static void update(Vt (&x)[kLists], Vt grad, const Scalars<S>& s) {
    if constexpr ((V & kL2) != 0) {
      grad = add_l2_penalty(grad, x[kParam], s.weight_decay);
    } else {
      x[kParam] = decay_weights(x[kParam], s.decay_factor);
    }
    // update_moments
    x[kExpAvg] = lerp(x[kExpAvg], grad, s.one_minus_beta1);
    x[kExpAvgSq] = x[kExpAvgSq] * s.beta2 + s.one_minus_beta2 * (grad * grad);
    Vt second_moment = x[kExpAvgSq];
    if constexpr (has<LISTS>(kMaxExpAvgSq)) {
      x[kMaxExpAvgSq] = maximum(x[kMaxExpAvgSq], x[kExpAvgSq]);
      second_moment = x[kMaxExpAvgSq];
    }
    // bias_correct + apply_update: param.addcdiv_(exp_avg, denom, value=-step_size).
    // torch divides sqrt(v) by sqrt(1 - beta2^t); multiplying by the per-tensor
    // reciprocal (computed in double) differs by at most an ulp and leaves one division
    // per element instead of two: on the AVX2 CPU we test on, division and sqrt
    // throughput bound the fp32 kernel near the memory limit (0.67 ns/element in cache,
    // 1 thread).
    const Vt denom = sqrt_op(second_moment) * s.inv_bias_correction2_sqrt + s.eps;
    x[kParam] = x[kParam] + s.neg_step_size * (x[kExpAvg] / denom);
  }
};

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
