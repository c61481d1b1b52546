// Adamax: the element-wise math, written once for every C++ backend.
//
//   g_t  = -grad (maximize) ; g_t += weight_decay * p (weight decay)
//   m_t  = lerp(m_{t-1}, g_t, 1 - beta1)
//   u_t  = max(beta2 * u_{t-1}, |g_t| + eps)                        (exp_inf)
//   p_t  = p_{t-1} + (-lr / (1 - beta1^t) * m_t) / u_t
//
// as torch.optim.Adamax's single-tensor path computes it (lerp_, torch.maximum of
// mul_(beta2) and abs().add_(eps), addcdiv_(value=-clr)), operation by operation; the
// maximum propagates NaN from either side, as torch.maximum. Per element: reads param,
// grad, exp_avg, exp_inf (16 B fp32), writes param, exp_avg, exp_inf (12 B). The spec is
// fused_optim/adamax.py's.
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/optimizer.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

template <typename opmath_t>
struct AdamaxScalars {
  opmath_t one_minus_beta1;
  opmath_t beta2;
  opmath_t eps;
  opmath_t weight_decay;
  opmath_t neg_clr;  // -lr / (1 - beta1^step)
};

// The optimizer (see [note: an optimizer is its spec and its math] in optimizer.h):
// its step count and its weight-decay variant come from CountsSteps and WithL2Decay.
struct Adamax : WithL2Decay<Adamax> {
  static constexpr const char* kOp = "adamax_";
  enum List : int { kParam, kGrad, kExpAvg, kExpInf, kLists };
  static constexpr std::array<const char*, kLists> kListNames = {"params", "grads", "exp_avgs",
                                                                 "exp_infs"};
  enum Float : int { kBeta1, kBeta2, kEps, kWeightDecay, kFloats };
  static constexpr std::array<const char*, kFloats> kFloatNames = {"beta1", "beta2", "eps",
                                                                   "weight_decay"};
  enum Flag : int { kMaximize, kFlags };
  static constexpr std::array<const char*, kFlags> kFlagNames = {"maximize"};

  template <typename S>
  using Scalars = AdamaxScalars<S>;

  template <uint32_t LISTS, uint32_t V, typename S>
  FO_HOST_DEVICE static Scalars<S> scalars(const Args& a, const double* state) {
    const LrMath lr = lr_math(a);
    Scalars<S> s;
    s.one_minus_beta1 = static_cast<S>(1.0 - a.floats[kBeta1]);
    s.beta2 = static_cast<S>(a.floats[kBeta2]);
    s.eps = static_cast<S>(a.floats[kEps]);
    s.weight_decay = static_cast<S>(a.floats[kWeightDecay]);
    s.neg_clr = static_cast<S>(-lr.div(a.lr, 1.0 - ::pow(a.floats[kBeta1], state[0])));
    return s;
  }

  template <uint32_t LISTS, uint32_t V, typename Vt, typename S>
  FO_HOST_DEVICE FO_INLINE static void update(Vt (&x)[kLists], Vt grad, const Scalars<S>& s) {
    grad = decayed<V>(grad, x[kParam], s.weight_decay);
    x[kExpAvg] = lerp(x[kExpAvg], grad, s.one_minus_beta1);
    x[kExpInf] = maximum(x[kExpInf] * s.beta2, abs_op(grad) + s.eps);
    x[kParam] = x[kParam] + (s.neg_clr * x[kExpAvg]) / x[kExpInf];
  }
};

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
