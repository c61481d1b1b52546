// Adafactor: the math of torch.optim.Adafactor's for-loop (_single_tensor_adafactor),
// written once for every C++ backend of the factored-moment engine
// (fused_optim/_factored.py; csrc/factored.cpp + csrc/cpu/factored_impl.h on the CPU,
// csrc/cuda/factored_cuda.cu on CUDA). Triton's copy is in triton_kernels/factored.py,
// the reference in fused_optim/_factored.py; the three follow the same operations.
//
// Per param, viewed as [B, m, n] (factored, 2+ dims) or as a flat vector:
//
//   per tensor (double, host or one device thread):
//     step' = step + 1 (rounded to the step tensor's dtype)
//     weight = step' ** beta2_decay                       (torch's one_minus_beta2_t)
//     rho is lr  <=>  not (1 / sqrt(step') < lr)          (Python's min(lr, x))
//     alpha = max(eps2, |param|_2 / sqrt(numel)) * rho    (lr's dtype where rho is lr)
//   per row i / column j of each matrix b (opmath; r() rounds to the storage dtype):
//     row_mean = r(r(r(sqrt(sum_j g^2))^2) / n)           torch.norm(dim=-1).square_().div_(n)
//     row_var = r(lerp(row_var, row_mean, weight))        likewise col_var, sum over i, / m
//     mean_b = max(r(sum_i row_var / m), r(eps1))         row_var.mean(-2).clamp_(min=eps1)
//   per element (opmath):
//     v = r(r(row_var_i * col_var_j) / mean_b)            (row_var @ col_var).div_(mean)
//     a vector's: variance = r(lerp(variance, r(g * g), weight)); v = variance
//     u = r(r(1 / sqrt(max(v, r(eps1 * eps1)))) * g)      clamp_(eps1^2).rsqrt_().mul_(g)
//   per tensor: denom = max(1, |u|_2 / (sqrt(numel) * d)); step_alpha = -alpha / denom
//   per element: p = r(p * r(1 - lr * weight_decay)) (if weight_decay != 0);
//                p = p.add_(u, alpha=step_alpha)
//
// The norms are sums of squares accumulated in double, their square roots rounded to the
// storage dtype (torch's norm returns a tensor of it). Python's max(a, x) is x only
// where x > a (a NaN norm gives a), as torch's host code computes it.
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/args.h"
#include "fused_optim/math/optimizer.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

struct Adafactor {
  // The per-tensor values of one step that do not depend on the update's norm.
  struct TensorScalars {
    double weight;        // 1 - beta2_t
    double alpha;         // max(eps2, RMS(param)) * rho_t (in lr's dtype where rho_t is lr)
    bool rho_is_lr;
    double decay_factor;  // 1 - lr * weight_decay, in lr's dtype
  };

  // Python's max(a, x) for floats: x where x > a, else a (NaN x gives a).
  FO_HOST_DEVICE static double python_max(double a, double x) { return x > a ? x : a; }

  // `step` already advanced; `param_norm` rounded to the param's dtype.
  FO_HOST_DEVICE static TensorScalars tensor_scalars(double step, double lr, LrDType lr_dtype,
                                                     double beta2_decay, double eps2,
                                                     double weight_decay, double param_norm,
                                                     double numel) {
    const LrMath L{lr_dtype};
    TensorScalars s;
    s.weight = ::pow(step, beta2_decay);
    const double inv_sqrt = 1.0 / ::sqrt(step);
    s.rho_is_lr = !(L.operand(inv_sqrt) < lr);
    const double rms = python_max(eps2, param_norm / ::sqrt(numel));
    s.alpha = s.rho_is_lr ? L.mul(rms, lr) : rms * inv_sqrt;
    s.decay_factor = L.sub(1.0, L.mul(lr, weight_decay));
    return s;
  }

  // -alpha / max(1, RMS(update) / d); `update_norm` rounded to the param's dtype.
  FO_HOST_DEVICE static double step_alpha(const TensorScalars& s, LrDType lr_dtype,
                                          double update_norm, double numel, double d) {
    const double denom = python_max(1.0, update_norm / (::sqrt(numel) * d));
    return s.rho_is_lr ? LrMath{lr_dtype}.div(-s.alpha, denom) : -s.alpha / denom;
  }

  // The mean of g^2 over a row (or column) of `count` elements, from its sum in double.
  template <typename R, typename O = typename R::opmath>
  FO_HOST_DEVICE FO_INLINE static O mean_square(double sum, O count) {
    const O norm = R::r(static_cast<O>(sqrt_op(sum)));
    return R::r(R::r(norm * norm) / count);
  }

  // A factor (row_var / col_var) or a vector's variance moved toward `target`.
  template <typename R, typename V, typename S>
  FO_HOST_DEVICE FO_INLINE static V moved(V var, V target, S weight) {
    return R::r(lerp(var, target, weight));
  }

  // The second-moment estimate of a factored element.
  template <typename R, typename V, typename S>
  FO_HOST_DEVICE FO_INLINE static V factored_estimate(V row, V col, S mean) {
    return R::r(R::r(row * col) / mean);
  }

  // The update of one element from its estimate v (eps1_sq: r(eps1 * eps1)).
  template <typename R, typename V, typename S>
  FO_HOST_DEVICE FO_INLINE static V update(V grad, V v, S eps1_sq) {
    const V floored = v < eps1_sq ? V(eps1_sq) : v;  // clamp_min (v NaN stays NaN)
    return R::r(R::r(V(1) / sqrt_op(floored)) * grad);
  }

  // The param after the weight decay and the update (R::add_scaled: p.add_(u, alpha=)).
  template <typename R, bool DECAY, typename V, typename S>
  FO_HOST_DEVICE FO_INLINE static V apply(V param, V u, S decay_factor, S step_alpha) {
    if constexpr (DECAY) param = R::r(param * decay_factor);
    return R::add_scaled(param, step_alpha, u);
  }
};

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
