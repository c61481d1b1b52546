// NAdam: the element-wise math, written once for every C++ backend.
//
//   mu_t  = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))        (per tensor, double)
//   mu_product_t = mu_product_{t-1} * mu_t                       (per-tensor state)
//   m_t   = lerp(m_{t-1}, g_t, 1 - beta1)
//   v_t   = beta2 * v_{t-1} + (1 - beta2) * g_t^2
//   d_t   = sqrt(v_t / (1 - beta2^t)) + eps
//   p_t   = p_{t-1} + (c1 * g_t) / d_t + (c2 * m_t) / d_t
//   c1    = -lr * (1 - mu_t) / (1 - mu_product_t)
//   c2    = -lr * mu_{t+1} / (1 - mu_product_t * mu_{t+1})
//
// with g_t = -grad for maximize, g_t += weight_decay * p for the L2 penalty, and
// p *= 1 - lr * weight_decay first for decoupled_weight_decay, as
// torch.optim.nadam._single_tensor_nadam computes it (capturable=False: the path torch
// takes by default on the CPU), operation by operation: the division by 1 - beta2^t is a
// true division (torch's tensor / Python float), the two addcdiv_ round (c * x) / d. The
// CUDA and Triton backends compute the same math, so every device gives the CPU's
// numbers; torch's foreach path (its default on CUDA) divides sqrt(v_t) by
// sqrt(1 - beta2^t) instead, within an ulp of this per step. mu_product advances as torch's `mu_product *= mu` on a
// float32 tensor does (mu rounded to float32 first), and c1, c2 read it as stored.
// Per element: reads param, grad, exp_avg, exp_avg_sq (16 B fp32), writes param,
// exp_avg, exp_avg_sq (12 B). The spec is fused_optim/nadam.py's.
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/optimizer.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

template <typename opmath_t>
struct NAdamScalars {
  opmath_t one_minus_beta1;
  opmath_t beta2;
  opmath_t one_minus_beta2;
  opmath_t bias_correction2;  // 1 - beta2^step
  opmath_t eps;
  opmath_t weight_decay;
  opmath_t decay_factor;      // 1 - lr * weight_decay
  opmath_t grad_coef;         // c1
  opmath_t exp_avg_coef;      // c2
};

// The optimizer (see [note: an optimizer is its spec and its math] in optimizer.h):
// its weight-decay variants (L2 or decoupled) come from WithWeightDecayModes.
struct NAdam : WithWeightDecayModes<NAdam, OptimizerBase> {
  static constexpr const char* kOp = "nadam_";
  enum List : int { kParam, kGrad, kExpAvg, kExpAvgSq, kLists };
  static constexpr std::array<const char*, kLists> kListNames = {"params", "grads", "exp_avgs",
                                                                 "exp_avg_sqs"};
  enum State : int { kStep, kMuProduct, kStates };
  static constexpr std::array<const char*, kStates> kStateNames = {"state_steps",
                                                                   "mu_products"};
  enum Float : int { kBeta1, kBeta2, kEps, kWeightDecay, kMomentumDecay, kFloats };
  static constexpr std::array<const char*, kFloats> kFloatNames = {
      "beta1", "beta2", "eps", "weight_decay", "momentum_decay"};
  enum Flag : int { kMaximize, kDecoupledWeightDecay, kFlags };
  static constexpr std::array<const char*, kFlags> kFlagNames = {"maximize",
                                                                 "decoupled_weight_decay"};

  // mu_t of step `step`.
  FO_HOST_DEVICE static double mu(const Args& a, double step) {
    return a.floats[kBeta1] * (1.0 - 0.5 * ::pow(0.96, step * a.floats[kMomentumDecay]));
  }

  // step += 1; mu_product *= mu_t, with mu_t rounded to the state's dtype first.
  FO_HOST_DEVICE static void advance(const Args& a, double* state, const bool* is_double) {
    state[kStep] += 1.0;
    const double m = mu(a, state[kStep]);
    state[kMuProduct] *= round_to_float_if(m, !is_double[kMuProduct]);
  }

  template <typename S>
  using Scalars = NAdamScalars<S>;

  template <uint32_t LISTS, uint32_t V, typename S>
  FO_HOST_DEVICE static Scalars<S> scalars(const Args& a, const double* state) {
    const double step = state[kStep];
    const double mu_product = state[kMuProduct];
    const double beta1 = a.floats[kBeta1];
    const double beta2 = a.floats[kBeta2];
    const double m = mu(a, step);
    const double mu_next = mu(a, step + 1.0);
    const LrMath lr = lr_math(a);
    Scalars<S> s;
    s.one_minus_beta1 = static_cast<S>(1.0 - beta1);
    s.beta2 = static_cast<S>(beta2);
    s.one_minus_beta2 = static_cast<S>(1.0 - beta2);
    s.bias_correction2 = static_cast<S>(1.0 - ::pow(beta2, step));
    s.eps = static_cast<S>(a.floats[kEps]);
    s.weight_decay = static_cast<S>(a.floats[kWeightDecay]);
    s.decay_factor = static_cast<S>(decay_factor(a));
    s.grad_coef = static_cast<S>(lr.div(lr.mul(-a.lr, 1.0 - m), 1.0 - mu_product));
    s.exp_avg_coef = static_cast<S>(lr.div(lr.mul(-a.lr, mu_next), 1.0 - mu_product * mu_next));
    return s;
  }

  template <uint32_t LISTS, uint32_t V, typename Vt, typename S>
  FO_HOST_DEVICE FO_INLINE static void update(Vt (&x)[kLists], Vt grad, const Scalars<S>& s) {
    grad = decayed<V>(grad, x[kParam], s.weight_decay, s.decay_factor);
    x[kExpAvg] = lerp(x[kExpAvg], grad, s.one_minus_beta1);
    x[kExpAvgSq] = average_square(x[kExpAvgSq], grad, s.beta2, s.one_minus_beta2);
    const Vt denom = sqrt_op(x[kExpAvgSq] / s.bias_correction2) + s.eps;
    x[kParam] = x[kParam] + (s.grad_coef * grad) / denom;
    x[kParam] = x[kParam] + (s.exp_avg_coef * x[kExpAvg]) / denom;
  }
};

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
