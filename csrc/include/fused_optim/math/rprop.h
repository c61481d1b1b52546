// Rprop: the element-wise math, written once for every C++ backend.
//
//   g_t  = -grad (maximize)
//   f    = etaplus where g_t * prev > 0, etaminus where < 0, else 1
//   s_t  = clamp(s_{t-1} * f, step_size_min, step_size_max)         (step_size)
//   g_t  = 0 where g_t * prev < 0
//   p_t  = p_{t-1} - sign(g_t) * s_t ;  prev = g_t
//
// as torch.optim.rprop._single_tensor_rprop computes it (capturable=False: the path
// torch takes by default on the CPU; its foreach path, the CUDA default, computes the
// same values), operation by operation: sign() is torch's (0 for 0 and NaN), clamp
// propagates NaN and gives step_size_max where the bounds cross.
// Every value is computed in opmath and rounded once when stored, as in every fused_optim
// kernel; torch multiplies g_t * prev and keeps its sign factors in the params' dtype,
// so for float16 params a product below float16's range (< 2^-25) counts as 0 there
// and for bfloat16 / float16 params the factors are etas rounded to that dtype. The step
// count advances but the math never reads it. Per element: reads param, grad, prev,
// step_size (16 B fp32), writes param, prev, step_size (12 B). The spec is
// fused_optim/rprop.py's.
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/optimizer.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

template <typename opmath_t>
struct RpropScalars {
  opmath_t step_size_min;
  opmath_t step_size_max;
  opmath_t etaminus;
  opmath_t etaplus;
};

// The optimizer (see [note: an optimizer is its spec and its math] in optimizer.h).
struct Rprop : CountsSteps {
  static constexpr const char* kOp = "rprop_";
  enum List : int { kParam, kGrad, kPrev, kStepSize, kLists };
  static constexpr std::array<const char*, kLists> kListNames = {"params", "grads", "prevs",
                                                                 "step_sizes"};
  enum Float : int { kStepSizeMin, kStepSizeMax, kEtaminus, kEtaplus, kFloats };
  static constexpr std::array<const char*, kFloats> kFloatNames = {
      "step_size_min", "step_size_max", "etaminus", "etaplus"};
  enum Flag : int { kMaximize, kFlags };
  static constexpr std::array<const char*, kFlags> kFlagNames = {"maximize"};

  template <typename S>
  using Scalars = RpropScalars<S>;

  template <uint32_t LISTS, uint32_t V, typename S>
  FO_HOST_DEVICE static Scalars<S> scalars(const Args& a, const double*) {
    Scalars<S> s;
    s.step_size_min = static_cast<S>(a.floats[kStepSizeMin]);
    s.step_size_max = static_cast<S>(a.floats[kStepSizeMax]);
    s.etaminus = static_cast<S>(a.floats[kEtaminus]);
    s.etaplus = static_cast<S>(a.floats[kEtaplus]);
    return s;
  }

  // Vt{} is zero in every lane; `zero + scalar` broadcasts a scalar to Vt.
  template <uint32_t LISTS, uint32_t V, typename Vt, typename S>
  FO_HOST_DEVICE FO_INLINE static void update(Vt (&x)[kLists], Vt grad, const Scalars<S>& s) {
    const Vt zero{};
    const Vt prod = grad * x[kPrev];
    // sign.copy_: etaplus where > 0, etaminus where < 0, 1 elsewhere (0 and NaN).
    Vt factor = prod > zero ? zero + s.etaplus : zero + S(1);
    factor = prod < zero ? zero + s.etaminus : factor;
    // step_size.mul_(sign).clamp_(step_size_min, step_size_max)
    Vt step_size = x[kStepSize] * factor;
    step_size = step_size < zero + s.step_size_min ? zero + s.step_size_min : step_size;
    step_size = step_size > zero + s.step_size_max ? zero + s.step_size_max : step_size;
    // grad[sign.eq(etaminus)] = 0; param.addcmul_(grad.sign(), step_size, value=-1):
    // -1 * sign(g) is -1, 1, or -0 (for 0 and NaN), times step_size.
    grad = prod < zero ? zero : grad;
    Vt neg_sign = grad > zero ? zero - S(1) : -zero;
    neg_sign = grad < zero ? zero + S(1) : neg_sign;
    x[kParam] = x[kParam] + neg_sign * step_size;
    x[kPrev] = grad;
    x[kStepSize] = step_size;
  }
};

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
