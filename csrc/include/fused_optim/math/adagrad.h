// Adagrad: the element-wise math, written once for every C++ backend.
//
//   g_t     = -grad (maximize) ; g_t += weight_decay * p (weight decay)
//   clr     = lr / (1 + (t - 1) * lr_decay)             per tensor, t its step count
//   sum_t   = sum_{t-1} + g_t * g_t
//   p_t     = p_{t-1} + (-clr * g_t) / (sqrt(sum_t) + eps)
//
// as torch.optim.Adagrad's single-tensor path computes it (addcmul_, sqrt().add_(eps),
// addcdiv_(value=-clr)), operation by operation. Per element: reads param, grad, sum
// (12 B fp32), writes param and sum (8 B). The spec is fused_optim/adagrad.py's.
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/optimizer.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

template <typename opmath_t>
struct AdagradScalars {
  opmath_t neg_clr;  // -lr / (1 + (step - 1) * lr_decay)
  opmath_t weight_decay;
  opmath_t eps;
};

// The optimizer (see [note: an optimizer is its spec and its math] in optimizer.h):
// its step count and its weight-decay variant come from CountsSteps and WithL2Decay.
struct Adagrad : WithL2Decay<Adagrad> {
  static constexpr const char* kOp = "adagrad_";
  enum List : int { kParam, kGrad, kSum, kLists };
  static constexpr std::array<const char*, kLists> kListNames = {"params", "grads",
                                                                 "state_sums"};
  enum Float : int { kLrDecay, kWeightDecay, kEps, kFloats };
  static constexpr std::array<const char*, kFloats> kFloatNames = {"lr_decay", "weight_decay",
                                                                   "eps"};
  enum Flag : int { kMaximize, kFlags };
  static constexpr std::array<const char*, kFlags> kFlagNames = {"maximize"};

  template <typename S>
  using Scalars = AdagradScalars<S>;

  template <uint32_t LISTS, uint32_t V, typename S>
  FO_HOST_DEVICE static Scalars<S> scalars(const Args& a, const double* state) {
    const LrMath lr = lr_math(a);
    Scalars<S> s;
    s.neg_clr = static_cast<S>(-lr.div(a.lr, 1.0 + (state[0] - 1.0) * a.floats[kLrDecay]));
    s.weight_decay = static_cast<S>(a.floats[kWeightDecay]);
    s.eps = static_cast<S>(a.floats[kEps]);
    return s;
  }

  template <uint32_t LISTS, uint32_t V, typename Vt, typename S>
  FO_HOST_DEVICE FO_INLINE static void update(Vt (&x)[kLists], Vt grad, const Scalars<S>& s) {
    grad = decayed<V>(grad, x[kParam], s.weight_decay);
    x[kSum] = x[kSum] + grad * grad;                         // addcmul_(grad, grad, value=1)
    const Vt std = sqrt_op(x[kSum]) + s.eps;                  // sqrt().add_(eps)
    x[kParam] = x[kParam] + (s.neg_clr * grad) / std;         // addcdiv_(grad, std, value=-clr)
  }
};

// Adagrad on a sparse grad's rows ([note: row math] in optimizer.h), as torch.optim's
// sparse path computes it, op by op on the coalesced values: its constants are eps and
// -clr. A row's add_(values, alpha) is one fused multiply-add in torch's vectorized add
// kernel (the rows of an embedding), so it is one here.
//   state_sum.add_(sparse(g.pow(2)))  std = sqrt(sum at g's rows) + eps
//   param.add_(sparse(g / std), alpha=-clr)
struct AdagradRows {
  static constexpr const char* kMath = "adagrad";
  static constexpr int kStates = 1, kConstants = 2;
  static constexpr bool kCoalesce = true;
  template <typename R, typename O = typename R::opmath>
  FO_HOST_DEVICE FO_INLINE static void update(O& p, O g, O* s, const O* c) {
    s[0] = R::r(s[0] + R::r(g * g));
    const O std = R::r(R::r(sqrt_op(s[0])) + c[0]);
    p = R::add_scaled(p, c[1], R::r(g / std));
  }
};

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
