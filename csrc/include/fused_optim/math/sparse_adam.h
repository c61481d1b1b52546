// SparseAdam: the row math ([note: row math] in optimizer.h) of torch.optim.SparseAdam,
// written once for every C++ backend. On the coalesced values g of the rows a step
// touches, op by op as torch.optim's sparse_adam computes them:
//
//   m_upd = (g - m) * (1 - beta1)          m += m_upd
//   v_upd = (g * g - v) * (1 - beta2)      v += v_upd
//   p += -step_size * ((m_upd + m_old) / (sqrt(v_upd + v_old) + eps))
//
// with step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t) from the tensor's Python int
// step (its constants: 1 - beta1, 1 - beta2, eps, -step_size). Per touched element:
// reads grad, param, exp_avg, exp_avg_sq (16 B fp32), writes the last three (12 B). The
// spec is fused_optim/sparse_adam.py's.
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

struct SparseAdamRows {
  static constexpr const char* kMath = "sparse_adam";
  static constexpr int kStates = 2, kConstants = 4;
  static constexpr bool kCoalesce = true;
  template <typename R, typename O = typename R::opmath>
  FO_HOST_DEVICE FO_INLINE static void update(O& p, O g, O* s, const O* c) {
    const O m_old = s[0], v_old = s[1];
    const O m_upd = R::r(R::r(g - m_old) * c[0]);
    s[0] = R::r(m_old + m_upd);
    const O v_upd = R::r(R::r(R::r(g * g) - v_old) * c[1]);
    s[1] = R::r(v_old + v_upd);
    const O numer = R::r(m_upd + m_old);
    const O denom = R::r(R::r(sqrt_op(R::r(v_upd + v_old))) + c[2]);
    p = R::r(p + R::r(c[3] * R::r(numer / denom)));
  }
};

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
