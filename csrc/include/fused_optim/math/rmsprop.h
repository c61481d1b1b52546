// RMSprop, optionally centered and with momentum: the element-wise math, written once for
// every C++ backend.
//
//   g_t  = -grad (maximize) ; g_t += weight_decay * p (weight decay)
//   v_t  = alpha * v_{t-1} + (1 - alpha) * g_t^2                  (square_avg)
//   a_t  = lerp(a_{t-1}, g_t, 1 - alpha) ; d = sqrt(v_t - a_t^2) + eps   (centered)
//   d    = sqrt(v_t) + eps                                         (otherwise)
//   b_t  = momentum * b_{t-1} + g_t / d ; p_t = p_{t-1} - lr * b_t     (momentum > 0)
//   p_t  = p_{t-1} + (-lr * g_t) / d                                (otherwise)
//
// as torch.optim.RMSprop's single-tensor path computes it (mul_().addcmul_(), lerp_,
// addcmul(value=-1).sqrt_(), add_(eps), mul_().addcdiv_(), add_(alpha=-lr),
// addcdiv_(value=-lr)), operation by operation. Per element: reads param, grad,
// square_avg (+ grad_avg, + momentum_buffer), writes all but grad: fp32 12 + 8 B plain,
// 20 + 16 B centered with momentum. The spec is fused_optim/rmsprop.py's.
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/optimizer.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

template <typename opmath_t>
struct RMSpropScalars {
  opmath_t alpha;
  opmath_t one_minus_alpha;
  opmath_t eps;
  opmath_t weight_decay;
  opmath_t momentum;
  opmath_t neg_lr;
};

// The optimizer (see [note: an optimizer is its spec and its math] in optimizer.h):
// its step count and its weight-decay variant come from CountsSteps and WithL2Decay.
struct RMSprop : WithL2Decay<RMSprop> {
  static constexpr const char* kOp = "rmsprop_";
  enum List : int { kParam, kGrad, kSquareAvg, kGradAvg, kMomentumBuffer, kLists };
  static constexpr std::array<const char*, kLists> kListNames = {
      "params", "grads", "square_avgs", "grad_avgs", "momentum_buffer_list"};
  // grad_avg with centered, the momentum buffer with momentum > 0.
  static constexpr uint32_t kOptionalLists = bit(kGradAvg) | bit(kMomentumBuffer);
  enum Float : int { kAlpha, kEps, kWeightDecay, kMomentum, kFloats };
  static constexpr std::array<const char*, kFloats> kFloatNames = {"alpha", "eps",
                                                                   "weight_decay", "momentum"};
  enum Flag : int { kCentered, kMaximize, kFlags };
  static constexpr std::array<const char*, kFlags> kFlagNames = {"centered", "maximize"};

  template <typename S>
  using Scalars = RMSpropScalars<S>;

  template <uint32_t LISTS, uint32_t V, typename S>
  FO_HOST_DEVICE static Scalars<S> scalars(const Args& a, const double*) {
    Scalars<S> s;
    s.alpha = static_cast<S>(a.floats[kAlpha]);
    s.one_minus_alpha = static_cast<S>(1.0 - a.floats[kAlpha]);
    s.eps = static_cast<S>(a.floats[kEps]);
    s.weight_decay = static_cast<S>(a.floats[kWeightDecay]);
    s.momentum = static_cast<S>(a.floats[kMomentum]);
    s.neg_lr = static_cast<S>(-a.lr);
    return s;
  }

  template <uint32_t LISTS, uint32_t V, typename Vt, typename S>
  FO_HOST_DEVICE FO_INLINE static void update(Vt (&x)[kLists], Vt grad, const Scalars<S>& s) {
    grad = decayed<V>(grad, x[kParam], s.weight_decay);
    x[kSquareAvg] = average_square(x[kSquareAvg], grad, s.alpha, s.one_minus_alpha);
    Vt avg;
    if constexpr (has<LISTS>(kGradAvg)) {
      x[kGradAvg] = lerp(x[kGradAvg], grad, s.one_minus_alpha);
      avg = sqrt_op(x[kSquareAvg] - x[kGradAvg] * x[kGradAvg]);
    } else {
      avg = sqrt_op(x[kSquareAvg]);
    }
    avg = avg + s.eps;
    if constexpr (has<LISTS>(kMomentumBuffer)) {
      x[kMomentumBuffer] = x[kMomentumBuffer] * s.momentum + grad / avg;
      x[kParam] = x[kParam] + s.neg_lr * x[kMomentumBuffer];
    } else {
      x[kParam] = x[kParam] + (s.neg_lr * grad) / avg;
    }
  }
};

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
