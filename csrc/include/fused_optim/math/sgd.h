// SGD with momentum, dampening, Nesterov momentum and L2 weight decay: the element-wise
// math, written once for every C++ backend.
//
//   g_t = -grad (maximize) ; g_t += weight_decay * p
//   b_t = g_t                                    on the buffer's first step
//   b_t = momentum * b_{t-1} + (1 - dampening) * g_t  afterwards
//   d_t = g_t + momentum * b_t (nesterov)  or  b_t
//   p_t = p_{t-1} - lr * d_t
//
// Per element, with momentum: reads param, grad, momentum_buffer (12 B fp32), writes
// param and momentum_buffer (8 B). Without momentum: reads 8 B, writes 4 B.
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

// Fields of opmath_t only (see AdamTensorScalars).
template <typename opmath_t>
struct SgdScalars {
  opmath_t neg_lr;
  opmath_t momentum;
  opmath_t one_minus_dampening;
  opmath_t weight_decay;
};

template <typename opmath_t>
FO_HOST_DEVICE inline SgdScalars<opmath_t> sgd_scalars(const SgdHyper& h) {
  SgdScalars<opmath_t> s;
  s.neg_lr = static_cast<opmath_t>(-h.lr);
  s.momentum = static_cast<opmath_t>(h.momentum);
  s.one_minus_dampening = static_cast<opmath_t>(1.0 - h.dampening);
  s.weight_decay = static_cast<opmath_t>(h.weight_decay);
  return s;
}

// One element of one SGD step. `momentum_buffer` is only touched when MOMENTUM.
// V: element values, S: scalars (see stages.h).
template <bool MOMENTUM, bool NESTEROV, bool FIRST_STEP, bool MAXIMIZE, bool WEIGHT_DECAY,
          typename V, typename S>
FO_HOST_DEVICE FO_INLINE void sgd_update(
    V& param,
    V grad,
    V& momentum_buffer,
    const SgdScalars<S>& s) {
  grad = maybe_negate(grad, MAXIMIZE);
  if constexpr (WEIGHT_DECAY) {
    grad = add_l2_penalty(grad, param, s.weight_decay);
  }
  if constexpr (MOMENTUM) {
    if constexpr (FIRST_STEP) {
      momentum_buffer = grad;
    } else {
      momentum_buffer = momentum_buffer * s.momentum + s.one_minus_dampening * grad;
    }
    grad = NESTEROV ? grad + s.momentum * momentum_buffer : momentum_buffer;
  }
  param = param + s.neg_lr * grad;
}

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
