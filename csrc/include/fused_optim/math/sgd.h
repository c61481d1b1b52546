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
// The spec (lists, state keys, arguments) is fused_optim/sgd.py's.
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/optimizer.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

template <typename opmath_t>
struct SgdScalars {
  opmath_t neg_lr;
  opmath_t momentum;
  opmath_t one_minus_dampening;
  opmath_t weight_decay;
};

// The optimizer (see [note: an optimizer is its spec and its math] in optimizer.h).
// The momentum buffer exists with momentum != 0 only; torch.optim creates it on a
// param's first step as a copy of the (decayed) grad, which the Python class asks for
// with is_first_step.
struct Sgd : WithL2Decay<Sgd, OptimizerBase> {
  static constexpr const char* kOp = "sgd_";
  enum List : int { kParam, kGrad, kMomentumBuffer, kLists };
  static constexpr std::array<const char*, kLists> kListNames = {"params", "grads",
                                                                 "momentum_buffers"};
  static constexpr uint32_t kOptionalLists = bit(kMomentumBuffer);  // momentum != 0
  enum Float : int { kMomentum, kDampening, kWeightDecay, kFloats };
  static constexpr std::array<const char*, kFloats> kFloatNames = {"momentum", "dampening",
                                                                   "weight_decay"};
  enum Flag : int { kNesterov, kMaximize, kIsFirstStep, kFlags };
  static constexpr std::array<const char*, kFlags> kFlagNames = {"nesterov", "maximize",
                                                                 "is_first_step"};

  // Variant bits: WithL2Decay's, then Nesterov and the buffer's first step, which only
  // matter with momentum.
  static constexpr uint32_t kNesterovBit = 2, kFirstStepBit = 4;
  static constexpr int kVariantBits = 3;
  static uint32_t variant(const Args& a) {
    const bool momentum = a.floats[kMomentum] != 0.0;
    return WithL2Decay::variant(a) | (momentum && a.flags[kNesterov] ? kNesterovBit : 0) |
           (momentum && a.flags[kIsFirstStep] ? kFirstStepBit : 0);
  }
  template <uint32_t LISTS, uint32_t V>
  FO_HOST_DEVICE static constexpr bool valid() {
    return has<LISTS>(kMomentumBuffer) || (V & (kNesterovBit | kFirstStepBit)) == 0;
  }
  // On the buffer's first step its old contents are never used: not loaded.
  template <uint32_t LISTS, uint32_t V>
  FO_HOST_DEVICE static constexpr bool reads(int list) {
    return !((V & kFirstStepBit) && list == kMomentumBuffer);
  }

  template <typename S>
  using Scalars = SgdScalars<S>;

  template <uint32_t LISTS, uint32_t V, typename S>
  FO_HOST_DEVICE static Scalars<S> scalars(const Args& a, const double*) {
    Scalars<S> s;
    s.neg_lr = static_cast<S>(-a.lr);
    s.momentum = static_cast<S>(a.floats[kMomentum]);
    s.one_minus_dampening = static_cast<S>(1.0 - a.floats[kDampening]);
    s.weight_decay = static_cast<S>(a.floats[kWeightDecay]);
    return s;
  }

  template <uint32_t LISTS, uint32_t V, typename Vt, typename S>
  FO_HOST_DEVICE FO_INLINE static void update(Vt (&x)[kLists], Vt grad, const Scalars<S>& s) {
    grad = decayed<V>(grad, x[kParam], s.weight_decay);
    if constexpr (has<LISTS>(kMomentumBuffer)) {
      if constexpr ((V & kFirstStepBit) != 0) {
        x[kMomentumBuffer] = grad;
      } else {
        x[kMomentumBuffer] = x[kMomentumBuffer] * s.momentum + s.one_minus_dampening * grad;
      }
      if constexpr ((V & kNesterovBit) != 0) {
        grad = grad + s.momentum * x[kMomentumBuffer];
      } else {
        grad = x[kMomentumBuffer];
      }
    }
    x[kParam] = x[kParam] + s.neg_lr * grad;
  }
};

// SGD on a sparse grad's rows ([note: row math] in optimizer.h), without momentum (torch
// keeps a sparse buffer with it: fused_optim/sgd.py runs torch's ops then). torch's
// param.add_(grad, alpha=-lr) adds each entry of the uncoalesced grad to its row in turn,
// in index order: so does this, one entry per call. Its constant is -lr.
struct SgdRows {
  static constexpr const char* kMath = "sgd";
  static constexpr int kStates = 0, kConstants = 1;
  static constexpr bool kCoalesce = false;
  template <typename R, typename O = typename R::opmath>
  FO_HOST_DEVICE FO_INLINE static void update(O& p, O g, O*, const O* c) {
    p = R::add_scaled(p, c[0], g);
  }
};

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
