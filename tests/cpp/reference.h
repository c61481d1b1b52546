// Plain scalar reference of one Adam / SGD element step, written from the formulas in
// csrc/include/fused_optim/math/{adam,sgd}.h (and torch.optim's docs), NOT from the
// kernels: no opmath rounding, no stage functions, scalars computed inline.
//
// R is the arithmetic type: double for fp32/fp16/bf16 storage, long double for fp64
// storage (so the reference is more precise than any kernel it checks). Besides each
// result it returns `mag`, the sum of the magnitudes of the terms that formed it, which
// scales the tolerance (see [note: tolerances] in test_util.h).
#pragma once

#include <cmath>

#include "fused_optim/math/hyper.h"

namespace fo_test {

using fused_optim::math::AdamHyper;
using fused_optim::math::SgdHyper;
using fused_optim::math::WeightDecay;

struct AdamElemIn {
  double param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq;
};

struct AdamElemOut {
  double param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq;
  double mag_param, mag_grad, mag_exp_avg, mag_exp_avg_sq, mag_max_exp_avg_sq;
};

// `step`: the tensor's step count after this step's increment. `grad_scale`: nullptr or
// the scale grads are divided by (and written back divided).
template <typename R>
AdamElemOut adam_reference(const AdamHyper& h, double step, const float* grad_scale,
                           const AdamElemIn& in) {
  using std::fabs;
  R p = in.param, g = in.grad, m = in.exp_avg, v = in.exp_avg_sq, vhat = in.max_exp_avg_sq;
  const R lr = h.lr, b1 = h.beta1, b2 = h.beta2, wd = h.weight_decay, eps = h.eps;
  AdamElemOut out{};

  if (grad_scale) g = g / static_cast<R>(*grad_scale);
  out.grad = static_cast<double>(g);
  out.mag_grad = static_cast<double>(fabs(g));
  if (h.maximize) g = -g;
  R mag_g = fabs(g);
  if (h.weight_decay_mode == WeightDecay::kL2) {
    g = g + wd * p;
    mag_g = mag_g + fabs(wd * p);
  } else if (h.weight_decay_mode == WeightDecay::kDecoupled) {
    p = p * (1 - lr * wd);
  }
  // m = beta1 * m + (1 - beta1) * g, written as the lerp it is.
  const R m_old = m;
  m = m + (1 - b1) * (g - m);
  const R mag_m = fabs(m_old) + mag_g;
  // v = beta2 * v + (1 - beta2) * g^2; g's own error (u * mag_g) enters squared.
  v = b2 * v + (1 - b2) * g * g;
  const R mag_v = v + 2 * (1 - b2) * mag_g * mag_g;
  R second = v, mag_second = mag_v;
  if (h.amsgrad) {
    vhat = vhat > v ? vhat : v;
    second = vhat;
    mag_second = vhat > mag_v ? vhat : mag_v;
    out.max_exp_avg_sq = static_cast<double>(vhat);
    out.mag_max_exp_avg_sq = static_cast<double>(mag_second);
  }
  // The per-tensor scalars in double, as torch.optim computes them (Python floats) and
  // as math/adam.h specifies: 1 - beta2^step amplifies pow's rounding by up to
  // 1 / (1 - beta2^step) (~500x at step 2), which is part of the definition, not an
  // error the fp64 kernel must beat.
  const double bias_correction1 = 1.0 - std::pow(h.beta1, step);
  const double bias_correction2 = 1.0 - std::pow(h.beta2, step);
  const R step_size = static_cast<R>(h.lr / bias_correction1);
  const R denom = std::sqrt(second) / static_cast<R>(std::sqrt(bias_correction2)) + eps;
  const R update = step_size * m / denom;
  // The relative error of denom is at most that of `second` (mag_second / second).
  const R rel_second = second > 0 ? mag_second / second : R(1);
  const R mag_update = step_size * (mag_m + fabs(m) * rel_second) / denom;
  const R mag_p = fabs(p) + mag_update;
  p = p - update;

  out.param = static_cast<double>(p);
  out.exp_avg = static_cast<double>(m);
  out.exp_avg_sq = static_cast<double>(v);
  out.mag_param = static_cast<double>(mag_p);
  out.mag_exp_avg = static_cast<double>(mag_m);
  out.mag_exp_avg_sq = static_cast<double>(mag_v);
  return out;
}

struct SgdElemIn {
  double param, grad, momentum_buffer;
};

struct SgdElemOut {
  double param, grad, momentum_buffer;
  double mag_param, mag_grad, mag_momentum_buffer;
};

template <typename R>
SgdElemOut sgd_reference(const SgdHyper& h, const float* grad_scale, const SgdElemIn& in) {
  using std::fabs;
  R p = in.param, g = in.grad, buf = in.momentum_buffer;
  const R lr = h.lr, mom = h.momentum, damp = h.dampening, wd = h.weight_decay;
  SgdElemOut out{};

  if (grad_scale) g = g / static_cast<R>(*grad_scale);
  out.grad = static_cast<double>(g);
  out.mag_grad = static_cast<double>(fabs(g));
  if (h.maximize) g = -g;
  R mag_g = fabs(g);
  if (h.weight_decay != 0) {
    g = g + wd * p;
    mag_g = mag_g + fabs(wd * p);
  }
  R d = g, mag_d = mag_g;
  if (h.momentum != 0) {
    R mag_buf;
    if (h.is_first_step) {
      buf = g;  // torch: buf = clone(d_p); dampening does not apply on the first step
      mag_buf = mag_g;
    } else {
      mag_buf = mom * fabs(buf) + (1 - damp) * mag_g;
      buf = mom * buf + (1 - damp) * g;
    }
    if (h.nesterov) {
      d = g + mom * buf;
      mag_d = mag_g + mom * mag_buf;
    } else {
      d = buf;
      mag_d = mag_buf;
    }
    out.momentum_buffer = static_cast<double>(buf);
    out.mag_momentum_buffer = static_cast<double>(mag_buf);
  }
  out.mag_param = static_cast<double>(fabs(p) + lr * mag_d);
  p = p - lr * d;
  out.param = static_cast<double>(p);
  return out;
}

}  // namespace fo_test
