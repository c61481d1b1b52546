// ASGD (averaged SGD): the element-wise math, written once for every C++ backend.
//
//   g_t  = -grad (maximize) ; g_t += weight_decay * p (weight decay)
//   p_t  = p_{t-1} * (1 - lambd * eta) - eta * g_t       (eta, mu: the stored values)
//   ax_t = ax_{t-1} + (p_t - ax_{t-1}) * mu   where mu != 1;   ax_t = p_t  where mu == 1
//   then, per tensor, for the next step (t: the advanced step count):
//   eta  = lr / (1 + lambd * lr * t)^alpha
//   mu   = 1 / max(1, t - t0)
//
// as torch.optim.asgd._single_tensor_asgd computes it (capturable=False: the path torch
// takes by default on the CPU), operation by operation; the CUDA and Triton backends
// compute the same math. torch's foreach path (its default on CUDA) computes
// p - eta * (g_t + lambd * p) and ax + (p - ax) * mu even where mu == 1: a few ulps from
// this per step. The step computes with the eta
// and mu the previous step stored (the old values of the step's state, [note: the
// step's state] in optimizer.h), and advance() replaces them, in double, as torch does
// in Python floats (in lr's dtype with a tensor lr); the engines round them to the state
// tensors' dtype. Whether mu == 1 is a per-tensor branch, as torch's `mu.item() != 1`.
// Per element: reads param, grad, ax (12 B fp32), writes param and ax (8 B). The spec is fused_optim/asgd.py's.
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/optimizer.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

template <typename opmath_t>
struct AsgdScalars {
  opmath_t decay_factor;  // 1 - lambd * eta
  opmath_t neg_eta;       // -eta
  opmath_t mu;
  opmath_t averaging;     // 1 where mu != 1 (ax moves toward p), else 0 (ax = p)
  opmath_t weight_decay;
};

// The optimizer (see [note: an optimizer is its spec and its math] in optimizer.h).
struct Asgd : WithL2Decay<Asgd, OptimizerBase> {
  static constexpr const char* kOp = "asgd_";
  enum List : int { kParam, kGrad, kAx, kLists };
  static constexpr std::array<const char*, kLists> kListNames = {"params", "grads", "axs"};
  enum State : int { kStep, kEta, kMu, kStates };
  static constexpr std::array<const char*, kStates> kStateNames = {"state_steps", "etas",
                                                                   "mus"};
  enum Float : int { kLambd, kAlpha, kT0, kWeightDecay, kFloats };
  static constexpr std::array<const char*, kFloats> kFloatNames = {"lambd", "alpha", "t0",
                                                                   "weight_decay"};
  enum Flag : int { kMaximize, kFlags };
  static constexpr std::array<const char*, kFlags> kFlagNames = {"maximize"};

  // step += 1, then the next step's eta and mu from it. torch stores
  // torch.as_tensor(value): a Python float becomes a tensor of the default dtype, which
  // the step's dtype records (torch.optim creates `step` in it and never casts it on
  // load), so with a float32 step a Python-float eta or mu is rounded to float32 even
  // where the state itself is float64 (a float64 model's loaded state_dict). With an lr
  // tensor, eta is a tensor of lr's dtype already (a float64 lr tensor counts as a
  // Python float here: the op cannot tell them apart).
  FO_HOST_DEVICE static void advance(const Args& a, double* state, const bool* is_double) {
    const double step = state[kStep] + 1.0;
    const double lambd = a.floats[kLambd];
    const LrMath lr = lr_math(a);
    const bool default_float32 = !is_double[kStep];
    // lr / ((1 + lambd * lr * step) ** alpha), in lr's dtype.
    const double base = lr.add(1.0, lr.mul(lr.mul(a.lr, lambd), step));
    const double eta = lr.div(a.lr, lr.pow(base, a.floats[kAlpha]));
    const double since_t0 = step - a.floats[kT0];
    const double mu = 1.0 / (since_t0 > 1.0 ? since_t0 : 1.0);
    state[kStep] = step;
    state[kEta] = round_to_float_if(eta, default_float32);
    state[kMu] = round_to_float_if(mu, default_float32);
  }

  template <typename S>
  using Scalars = AsgdScalars<S>;

  template <uint32_t LISTS, uint32_t V, typename S>
  FO_HOST_DEVICE static Scalars<S> scalars(const Args& a, const double* state) {
    const double eta = state[kStates + kEta];  // as the previous step stored them
    const double mu = state[kStates + kMu];
    Scalars<S> s;
    s.decay_factor = static_cast<S>(1.0 - a.floats[kLambd] * eta);
    s.neg_eta = static_cast<S>(-eta);
    s.mu = static_cast<S>(mu);
    s.averaging = mu != 1.0 ? S(1) : S(0);
    s.weight_decay = static_cast<S>(a.floats[kWeightDecay]);
    return s;
  }

  template <uint32_t LISTS, uint32_t V, typename Vt, typename S>
  FO_HOST_DEVICE FO_INLINE static void update(Vt (&x)[kLists], Vt grad, const Scalars<S>& s) {
    grad = decayed<V>(grad, x[kParam], s.weight_decay);
    x[kParam] = decay_weights(x[kParam], s.decay_factor);
    x[kParam] = x[kParam] + s.neg_eta * grad;
    if (s.averaging != S(0)) {
      x[kAx] = x[kAx] + (x[kParam] - x[kAx]) * s.mu;
    } else {
      x[kAx] = x[kParam];
    }
  }
};

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
