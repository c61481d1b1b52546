// Adadelta: the element-wise math, written once for every C++ backend.
//
//   g_t  = -grad (maximize) ; g_t += weight_decay * p (weight decay)
//   v_t  = rho * v_{t-1} + (1 - rho) * g_t^2                        (square_avg)
//   d_t  = sqrt(u_{t-1} + eps) / sqrt(v_t + eps) * g_t              (the update)
//   u_t  = rho * u_{t-1} + (1 - rho) * d_t^2                        (acc_delta)
//   p_t  = p_{t-1} - lr * d_t
//
// as torch.optim.Adadelta's single-tensor path computes it (mul_().addcmul_(),
// add(eps).sqrt_(), div_().mul_(), add_(alpha=-lr)), operation by operation. Per
// element: reads param, grad, square_avg, acc_delta (16 B fp32), writes param,
// square_avg, acc_delta (12 B). The spec is fused_optim/adadelta.py's.
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/optimizer.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

template <typename opmath_t>
struct AdadeltaScalars {
  opmath_t rho;
  opmath_t one_minus_rho;
  opmath_t eps;
  opmath_t weight_decay;
  opmath_t neg_lr;
};

// The optimizer (see [note: an optimizer is its spec and its math] in optimizer.h):
// its step count and its weight-decay variant come from CountsSteps and WithL2Decay.
struct Adadelta : WithL2Decay<Adadelta> {
  static constexpr const char* kOp = "adadelta_";
  enum List : int { kParam, kGrad, kSquareAvg, kAccDelta, kLists };
  static constexpr std::array<const char*, kLists> kListNames = {"params", "grads",
                                                                 "square_avgs", "acc_deltas"};
  enum Float : int { kRho, kEps, kWeightDecay, kFloats };
  static constexpr std::array<const char*, kFloats> kFloatNames = {"rho", "eps",
                                                                   "weight_decay"};
  enum Flag : int { kMaximize, kFlags };
  static constexpr std::array<const char*, kFlags> kFlagNames = {"maximize"};

  template <typename S>
  using Scalars = AdadeltaScalars<S>;

  template <uint32_t LISTS, uint32_t V, typename S>
  FO_HOST_DEVICE static Scalars<S> scalars(const Args& a, const double*) {
    Scalars<S> s;
    s.rho = static_cast<S>(a.floats[kRho]);
    s.one_minus_rho = static_cast<S>(1.0 - a.floats[kRho]);
    s.eps = static_cast<S>(a.floats[kEps]);
    s.weight_decay = static_cast<S>(a.floats[kWeightDecay]);
    s.neg_lr = static_cast<S>(-a.lr);
    return s;
  }

  template <uint32_t LISTS, uint32_t V, typename Vt, typename S>
  FO_HOST_DEVICE FO_INLINE static void update(Vt (&x)[kLists], Vt grad, const Scalars<S>& s) {
    grad = decayed<V>(grad, x[kParam], s.weight_decay);
    x[kSquareAvg] = average_square(x[kSquareAvg], grad, s.rho, s.one_minus_rho);
    const Vt std = sqrt_op(x[kSquareAvg] + s.eps);
    const Vt delta = (sqrt_op(x[kAccDelta] + s.eps) / std) * grad;
    x[kAccDelta] = average_square(x[kAccDelta], delta, s.rho, s.one_minus_rho);
    x[kParam] = x[kParam] + s.neg_lr * delta;
  }
};

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
