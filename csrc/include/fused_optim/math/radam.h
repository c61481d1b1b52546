// RAdam: the element-wise math, written once for every C++ backend.
//
//   m_t   = lerp(m_{t-1}, g_t, 1 - beta1)
//   v_t   = beta2 * v_{t-1} + (1 - beta2) * g_t^2
//   rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t),  rho_inf = 2 / (1 - beta2) - 1
//   p_t   = p_{t-1} - ((m_t / (1 - beta1^t) * lr) * (sqrt(1 - beta2^t) / (sqrt(v_t) + eps)))
//                     * r_t                             where rho_t > 5 (rectified)
//   p_t   = p_{t-1} - m_t / (1 - beta1^t) * lr           elsewhere (plain momentum)
//   r_t   = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
//
// with g_t = -grad for maximize, g_t += weight_decay * p for the L2 penalty, and
// p *= 1 - lr * weight_decay first for decoupled_weight_decay, as
// torch.optim.radam._single_tensor_radam computes it (capturable=False: the path torch
// takes by default on the CPU), operation by operation: exp_avg / bias_correction1 is a
// true division, `sqrt(1 - beta2^t) / tensor` is torch's reciprocal-then-multiply, and
// the products round left to right. The CUDA and Triton backends compute the same math;
// torch's foreach path (its default on CUDA) folds lr, r_t and the bias corrections
// into one factor per tensor and multiplies m_t by 1 / ((sqrt(v_t) + eps) / factor), a
// few ulps from this per step. rho_t depends on each tensor's own step, so the
// branch is per tensor: scalars() computes rho_t in double, as torch does in Python
// floats, and update() takes the branch its `rectified` field says, alike for every
// element of the tensor. Per element: reads param, grad, exp_avg, exp_avg_sq (16 B
// fp32), writes param, exp_avg, exp_avg_sq (12 B). The spec is fused_optim/radam.py's.
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/optimizer.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

template <typename opmath_t>
struct RAdamScalars {
  opmath_t one_minus_beta1;
  opmath_t beta2;
  opmath_t one_minus_beta2;
  opmath_t bias_correction1;       // 1 - beta1^step
  opmath_t lr;
  opmath_t bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  opmath_t rect;                   // r_t
  opmath_t rectified;              // 1 where rho_t > 5, else 0: the tensor's branch
  opmath_t eps;
  opmath_t weight_decay;
  opmath_t decay_factor;           // 1 - lr * weight_decay
};

// The optimizer (see [note: an optimizer is its spec and its math] in optimizer.h):
// its weight-decay variants (L2 or decoupled) come from WithWeightDecayModes.
struct RAdam : WithWeightDecayModes<RAdam> {
  static constexpr const char* kOp = "radam_";
  enum List : int { kParam, kGrad, kExpAvg, kExpAvgSq, kLists };
  static constexpr std::array<const char*, kLists> kListNames = {"params", "grads", "exp_avgs",
                                                                 "exp_avg_sqs"};
  enum Float : int { kBeta1, kBeta2, kEps, kWeightDecay, kFloats };
  static constexpr std::array<const char*, kFloats> kFloatNames = {"beta1", "beta2", "eps",
                                                                   "weight_decay"};
  enum Flag : int { kMaximize, kDecoupledWeightDecay, kFlags };
  static constexpr std::array<const char*, kFlags> kFlagNames = {"maximize",
                                                                 "decoupled_weight_decay"};

  template <typename S>
  using Scalars = RAdamScalars<S>;

  template <uint32_t LISTS, uint32_t V, typename S>
  FO_HOST_DEVICE static Scalars<S> scalars(const Args& a, const double* state) {
    const double step = state[0];
    const double beta1 = a.floats[kBeta1];
    const double beta2 = a.floats[kBeta2];
    const double beta2_t = ::pow(beta2, step);
    const double bias_correction2 = 1.0 - beta2_t;
    const double rho_inf = 2.0 / (1.0 - beta2) - 1.0;
    const double rho_t = rho_inf - 2.0 * step * beta2_t / bias_correction2;
    const bool rectified = rho_t > 5.0;
    Scalars<S> s;
    s.one_minus_beta1 = static_cast<S>(1.0 - beta1);
    s.beta2 = static_cast<S>(beta2);
    s.one_minus_beta2 = static_cast<S>(1.0 - beta2);
    s.bias_correction1 = static_cast<S>(1.0 - ::pow(beta1, step));
    s.lr = static_cast<S>(a.lr);
    s.bias_correction2_sqrt = static_cast<S>(::pow(bias_correction2, 0.5));
    s.rect = rectified ? static_cast<S>(::pow((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                                                  ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t),
                                              0.5))
                       : S(0);
    s.rectified = rectified ? S(1) : S(0);
    s.eps = static_cast<S>(a.floats[kEps]);
    s.weight_decay = static_cast<S>(a.floats[kWeightDecay]);
    s.decay_factor = static_cast<S>(decay_factor(a));
    return s;
  }

  template <uint32_t LISTS, uint32_t V, typename Vt, typename S>
  FO_HOST_DEVICE FO_INLINE static void update(Vt (&x)[kLists], Vt grad, const Scalars<S>& s) {
    grad = decayed<V>(grad, x[kParam], s.weight_decay, s.decay_factor);
    x[kExpAvg] = lerp(x[kExpAvg], grad, s.one_minus_beta1);
    x[kExpAvgSq] = average_square(x[kExpAvgSq], grad, s.beta2, s.one_minus_beta2);
    const Vt step = (x[kExpAvg] / s.bias_correction1) * s.lr;
    if (s.rectified != S(0)) {
      const Vt adaptive_lr = (S(1) / (sqrt_op(x[kExpAvgSq]) + s.eps)) * s.bias_correction2_sqrt;
      x[kParam] = x[kParam] - (step * adaptive_lr) * s.rect;
    } else {
      x[kParam] = x[kParam] - step;
    }
  }
};

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
