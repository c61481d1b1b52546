// Plain scalar references of one element step of each optimizer, written from
// torch.optim's single-tensor implementations (torch/optim/<name>.py, `_single_tensor_*`),
// NOT from the kernels or the math headers: no opmath rounding, no stage functions,
// per-tensor scalars computed inline, as torch computes them.
//
// Every reference has the signature
//
//   template <typename R>
//   ElemRef <name>_reference(const math::Args& a, const double* state,
//                            const float* grad_scale, const double* in);
//
//   a           the op's arguments (floats / flags in the optimizer's schema order, lr,
//               lr's dtype); maximize is read from the optimizer's own flag
//   state       the tensor's per-tensor state AFTER this step's update (Adam's step
//               count after `step += 1`: 1 on the first step); unused without state
//   grad_scale  nullptr, or the scale grads are divided by (and written back divided)
//   in          one element's value of every list of the optimizer, in its list order;
//               lists the arguments leave out hold anything and are never read
//
// R is the arithmetic type: double for fp32/fp16/bf16 storage, long double for fp64
// storage (so the reference is more precise than any kernel it checks). Besides each
// list's result it returns `mag`, the sum of the magnitudes of the terms that formed it,
// which scales the tolerance (see [note: tolerances] in test_util.h). Adding an optimizer
// to the tests is one such function here plus one entry in optimizer_table.cpp.
#pragma once

#include <cmath>

#include "fused_optim/math/args.h"
#include "fused_optim/optimizers.h"
#include "test_util.h"

namespace fo_test {

namespace fm = fused_optim::math;

// The most lists any optimizer of the tests has (Adam: 5).
constexpr int kMaxLists = 8;

struct ElemRef {
  double value[kMaxLists] = {};
  double mag[kMaxLists] = {};
};

// torch.optim's arithmetic on lr, written from ATen's semantics rather than from
// math::LrMath: a Python float lr computes in double; an lr tensor of dtype float32 /
// float16 / bfloat16 takes a Python float operand as float (its opmath), computes in
// float and rounds the float result to its own dtype (the storage oracles of
// test_util.h do the fp16 / bf16 rounding).
struct TorchLr {
  fm::LrDType dtype;

  double round(float f) const {
    switch (dtype) {
      case fm::LrDType::kFloat64:
      case fm::LrDType::kFloat32: return f;
      case fm::LrDType::kFloat16: return oracle_half_to_float(oracle_float_to_half(f));
      case fm::LrDType::kBFloat16: return oracle_bf16_to_float(oracle_float_to_bf16(f));
    }
    return f;
  }
  double mul(double a, double b) const {
    if (dtype == fm::LrDType::kFloat64) return a * b;
    return round(static_cast<float>(a) * static_cast<float>(b));
  }
  double div(double a, double b) const {
    if (dtype == fm::LrDType::kFloat64) return a / b;
    return round(static_cast<float>(a) / static_cast<float>(b));
  }
  double sub(double a, double b) const {
    if (dtype == fm::LrDType::kFloat64) return a - b;
    return round(static_cast<float>(a) - static_cast<float>(b));
  }
};

// ---------------------------------------------------------------------------------------
// Adam / AdamW: torch.optim.adam._single_tensor_adam (capturable=False).
//   step_t += 1
//   grad = -grad if maximize
//   weight_decay != 0: param.mul_(1 - lr * wd) if decoupled else grad += wd * param
//   exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
//   bias_correction1 = 1 - beta1 ** step, bias_correction2 = 1 - beta2 ** step
//   step_size = lr / bias_correction1
//   max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq) (amsgrad)
//   denom = sqrt(max_exp_avg_sq or exp_avg_sq) / sqrt(bias_correction2) + eps
//   param.addcdiv_(exp_avg, denom, value=-step_size)
template <typename R>
ElemRef adam_reference(const fm::Args& a, const double* state, const float* grad_scale,
                       const double* in) {
  using A = fm::Adam;
  using std::fabs;
  const double step = state[0];
  const bool amsgrad = a.flags[A::kAmsgrad];
  const bool maximize = a.flags[A::kMaximize];
  const bool decoupled = a.flags[A::kDecoupledWeightDecay];
  const double beta1 = a.floats[A::kBeta1], beta2 = a.floats[A::kBeta2];
  const double weight_decay = a.floats[A::kWeightDecay];
  const TorchLr lr{a.lr_dtype};
  const R b2 = beta2, wd = weight_decay, eps = a.floats[A::kEps];
  R p = in[A::kParam], g = in[A::kGrad], m = in[A::kExpAvg], v = in[A::kExpAvgSq],
    vhat = in[A::kMaxExpAvgSq];
  ElemRef out;

  if (grad_scale) g = g / static_cast<R>(*grad_scale);
  out.value[A::kGrad] = static_cast<double>(g);
  out.mag[A::kGrad] = static_cast<double>(fabs(g));
  if (maximize) g = -g;
  R mag_g = fabs(g);
  if (weight_decay != 0) {
    if (decoupled) {
      // 1 - lr * weight_decay: Python floats, or two rounded ops of an lr tensor.
      const R factor = a.lr_dtype == fm::LrDType::kFloat64
                           ? 1 - static_cast<R>(a.lr) * wd
                           : static_cast<R>(lr.sub(1.0, lr.mul(a.lr, weight_decay)));
      p = p * factor;
    } else {
      g = g + wd * p;
      mag_g = mag_g + fabs(wd * p);
    }
  }
  // m = beta1 * m + (1 - beta1) * g, written as the lerp it is.
  const R m_old = m;
  m = m + (1 - static_cast<R>(beta1)) * (g - m);
  const R mag_m = fabs(m_old) + mag_g;
  // v = beta2 * v + (1 - beta2) * g^2; g's own error (u * mag_g) enters squared.
  v = b2 * v + (1 - b2) * g * g;
  const R mag_v = v + 2 * (1 - b2) * mag_g * mag_g;
  R second = v, mag_second = mag_v;
  if (amsgrad) {
    vhat = vhat > v ? vhat : v;
    second = vhat;
    mag_second = vhat > mag_v ? vhat : mag_v;
    out.value[A::kMaxExpAvgSq] = static_cast<double>(vhat);
    out.mag[A::kMaxExpAvgSq] = static_cast<double>(mag_second);
  }
  // The per-tensor scalars in double, as torch.optim computes them (Python floats):
  // 1 - beta2^step amplifies pow's rounding by up to 1 / (1 - beta2^step) (~500x at
  // step 2), which is part of the definition, not an error the fp64 kernel must beat.
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  const R step_size = static_cast<R>(lr.div(a.lr, bias_correction1));
  const R denom = std::sqrt(second) / static_cast<R>(std::sqrt(bias_correction2)) + eps;
  const R update = step_size * m / denom;
  // The relative error of denom is at most that of `second` (mag_second / second).
  const R rel_second = second > 0 ? mag_second / second : R(1);
  const R mag_update = step_size * (mag_m + fabs(m) * rel_second) / denom;
  const R mag_p = fabs(p) + mag_update;
  p = p - update;

  out.value[A::kParam] = static_cast<double>(p);
  out.value[A::kExpAvg] = static_cast<double>(m);
  out.value[A::kExpAvgSq] = static_cast<double>(v);
  out.mag[A::kParam] = static_cast<double>(mag_p);
  out.mag[A::kExpAvg] = static_cast<double>(mag_m);
  out.mag[A::kExpAvgSq] = static_cast<double>(mag_v);
  return out;
}

// ---------------------------------------------------------------------------------------
// SGD: torch.optim.sgd._single_tensor_sgd.
//   grad = -grad if maximize; grad += weight_decay * param (weight_decay != 0)
//   momentum != 0: buf = clone(grad) on the buffer's first step (no dampening), else
//                  buf = momentum * buf + (1 - dampening) * grad;
//                  grad = grad + momentum * buf (nesterov) or buf
//   param.add_(grad, alpha=-lr)
template <typename R>
ElemRef sgd_reference(const fm::Args& a, const double*, const float* grad_scale,
                      const double* in) {
  using S = fm::Sgd;
  using std::fabs;
  const double momentum = a.floats[S::kMomentum];
  const R lr = a.lr, mom = momentum, damp = a.floats[S::kDampening],
          wd = a.floats[S::kWeightDecay];
  R p = in[S::kParam], g = in[S::kGrad], buf = in[S::kMomentumBuffer];
  ElemRef out;

  if (grad_scale) g = g / static_cast<R>(*grad_scale);
  out.value[S::kGrad] = static_cast<double>(g);
  out.mag[S::kGrad] = static_cast<double>(fabs(g));
  if (a.flags[S::kMaximize]) g = -g;
  R mag_g = fabs(g);
  if (a.floats[S::kWeightDecay] != 0) {
    g = g + wd * p;
    mag_g = mag_g + fabs(wd * p);
  }
  R d = g, mag_d = mag_g;
  if (momentum != 0) {
    R mag_buf;
    if (a.flags[S::kIsFirstStep]) {
      buf = g;  // torch: buf = clone(d_p); dampening does not apply on the first step
      mag_buf = mag_g;
    } else {
      mag_buf = mom * fabs(buf) + (1 - damp) * mag_g;
      buf = mom * buf + (1 - damp) * g;
    }
    if (a.flags[S::kNesterov]) {
      d = g + mom * buf;
      mag_d = mag_g + mom * mag_buf;
    } else {
      d = buf;
      mag_d = mag_buf;
    }
    out.value[S::kMomentumBuffer] = static_cast<double>(buf);
    out.mag[S::kMomentumBuffer] = static_cast<double>(mag_buf);
  }
  out.mag[S::kParam] = static_cast<double>(fabs(p) + fabs(lr) * mag_d);
  p = p - lr * d;
  out.value[S::kParam] = static_cast<double>(p);
  return out;
}

// ---------------------------------------------------------------------------------------
// Adagrad: torch.optim.adagrad._single_tensor_adagrad (dense grads).
//   step_t += 1; grad = -grad if maximize; grad += weight_decay * param (weight_decay != 0)
//   clr = lr / (1 + (step - 1) * lr_decay)
//   state_sum.addcmul_(grad, grad, value=1); std = state_sum.sqrt().add_(eps)
//   param.addcdiv_(grad, std, value=-clr)
template <typename R>
ElemRef adagrad_reference(const fm::Args& a, const double* state, const float* grad_scale,
                          const double* in) {
  using A = fm::Adagrad;
  using std::fabs;
  const double step = state[0];
  const TorchLr lr{a.lr_dtype};
  const R wd = a.floats[A::kWeightDecay], eps = a.floats[A::kEps];
  R p = in[A::kParam], g = in[A::kGrad], sum = in[A::kSum];
  ElemRef out;

  if (grad_scale) g = g / static_cast<R>(*grad_scale);
  out.value[A::kGrad] = static_cast<double>(g);
  out.mag[A::kGrad] = static_cast<double>(fabs(g));
  if (a.flags[A::kMaximize]) g = -g;
  R mag_g = fabs(g);
  if (a.floats[A::kWeightDecay] != 0) {
    g = g + wd * p;
    mag_g = mag_g + fabs(wd * p);
  }
  // clr in Python floats (an lr tensor: lr's dtype), the denominator a Python float.
  const R clr = static_cast<R>(lr.div(a.lr, 1.0 + (step - 1.0) * a.floats[A::kLrDecay]));
  const R sum_old = sum;
  sum = sum + g * g;
  const R mag_sum = sum_old + 2 * mag_g * mag_g;  // g's error enters squared
  const R std = std::sqrt(sum) + eps;
  const R rel_sum = sum > 0 ? mag_sum / sum : R(1);
  const R update = clr * g / std;
  const R mag_update = fabs(clr) * (mag_g + fabs(g) * rel_sum) / std;
  out.value[A::kParam] = static_cast<double>(p - update);
  out.mag[A::kParam] = static_cast<double>(fabs(p) + mag_update);
  out.value[A::kSum] = static_cast<double>(sum);
  out.mag[A::kSum] = static_cast<double>(mag_sum);
  return out;
}

// ---------------------------------------------------------------------------------------
// RMSprop: torch.optim.rmsprop._single_tensor_rmsprop.
//   grad = -grad if maximize; step += 1; grad += weight_decay * param (weight_decay != 0)
//   square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
//   centered: grad_avg.lerp_(grad, 1 - alpha); avg = (square_avg - grad_avg^2).sqrt_()
//   else:     avg = square_avg.sqrt();   then avg.add_(eps)
//   momentum > 0: buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
//   else:         param.addcdiv_(grad, avg, value=-lr)
template <typename R>
ElemRef rmsprop_reference(const fm::Args& a, const double*, const float* grad_scale,
                          const double* in) {
  using A = fm::RMSprop;
  using std::fabs;
  const R alpha = a.floats[A::kAlpha], eps = a.floats[A::kEps], wd = a.floats[A::kWeightDecay],
          mom = a.floats[A::kMomentum], lr = a.lr;
  R p = in[A::kParam], g = in[A::kGrad], sq = in[A::kSquareAvg], ga = in[A::kGradAvg],
    buf = in[A::kMomentumBuffer];
  ElemRef out;

  if (grad_scale) g = g / static_cast<R>(*grad_scale);
  out.value[A::kGrad] = static_cast<double>(g);
  out.mag[A::kGrad] = static_cast<double>(fabs(g));
  if (a.flags[A::kMaximize]) g = -g;
  R mag_g = fabs(g);
  if (a.floats[A::kWeightDecay] != 0) {
    g = g + wd * p;
    mag_g = mag_g + fabs(wd * p);
  }
  const R sq_old = sq;
  sq = alpha * sq + (1 - alpha) * g * g;
  const R mag_sq = alpha * sq_old + 2 * (1 - alpha) * mag_g * mag_g;
  out.value[A::kSquareAvg] = static_cast<double>(sq);
  out.mag[A::kSquareAvg] = static_cast<double>(mag_sq);
  R var = sq, mag_var = mag_sq;
  if (a.flags[A::kCentered]) {
    const R ga_old = ga;
    ga = ga + (1 - alpha) * (g - ga);
    const R mag_ga = fabs(ga_old) + mag_g;
    out.value[A::kGradAvg] = static_cast<double>(ga);
    out.mag[A::kGradAvg] = static_cast<double>(mag_ga);
    var = sq - ga * ga;
    mag_var = mag_sq + 2 * mag_ga * mag_ga;  // the cancellation's inputs
  }
  // sqrt halves a relative error; an absolute one (e * mag_var) becomes e * mag_var / (2 avg).
  const R avg = std::sqrt(var);
  const R mag_avg = avg + (avg > 0 ? mag_var / (2 * avg) : std::sqrt(mag_var));
  const R d = avg + eps;
  const R rel_d = (mag_avg + eps) / d;
  const R step = g / d;
  const R mag_step = (mag_g + fabs(g) * rel_d) / d;
  if (a.floats[A::kMomentum] > 0) {
    const R buf_old = buf;
    buf = mom * buf + step;
    const R mag_buf = mom * fabs(buf_old) + mag_step;
    out.value[A::kMomentumBuffer] = static_cast<double>(buf);
    out.mag[A::kMomentumBuffer] = static_cast<double>(mag_buf);
    out.value[A::kParam] = static_cast<double>(p - lr * buf);
    out.mag[A::kParam] = static_cast<double>(fabs(p) + fabs(lr) * mag_buf);
  } else {
    out.value[A::kParam] = static_cast<double>(p - lr * step);
    out.mag[A::kParam] = static_cast<double>(fabs(p) + fabs(lr) * mag_step);
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Adadelta: torch.optim.adadelta._single_tensor_adadelta.
//   step += 1; grad = -grad if maximize; grad += weight_decay * param (weight_decay != 0)
//   square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
//   std = square_avg.add(eps).sqrt_(); delta = acc_delta.add(eps).sqrt_().div_(std).mul_(grad)
//   acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
//   param.add_(delta, alpha=-lr)
template <typename R>
ElemRef adadelta_reference(const fm::Args& a, const double*, const float* grad_scale,
                           const double* in) {
  using A = fm::Adadelta;
  using std::fabs;
  const R rho = a.floats[A::kRho], eps = a.floats[A::kEps], wd = a.floats[A::kWeightDecay],
          lr = a.lr;
  R p = in[A::kParam], g = in[A::kGrad], sq = in[A::kSquareAvg], acc = in[A::kAccDelta];
  ElemRef out;

  if (grad_scale) g = g / static_cast<R>(*grad_scale);
  out.value[A::kGrad] = static_cast<double>(g);
  out.mag[A::kGrad] = static_cast<double>(fabs(g));
  if (a.flags[A::kMaximize]) g = -g;
  R mag_g = fabs(g);
  if (a.floats[A::kWeightDecay] != 0) {
    g = g + wd * p;
    mag_g = mag_g + fabs(wd * p);
  }
  const R sq_old = sq;
  sq = rho * sq + (1 - rho) * g * g;
  const R mag_sq = rho * sq_old + 2 * (1 - rho) * mag_g * mag_g;
  const R std = std::sqrt(sq + eps);
  const R ratio = std::sqrt(acc + eps) / std;  // inputs exact: only sq's error propagates
  const R delta = ratio * g;
  // |delta| relative error: sq's (halved by sqrt, relative to sq + eps), plus g's.
  const R mag_delta = ratio * mag_g + fabs(delta) * (1 + (mag_sq + eps) / (sq + eps));
  const R acc_old = acc;
  acc = rho * acc + (1 - rho) * delta * delta;
  const R mag_acc = rho * acc_old + 2 * (1 - rho) * mag_delta * mag_delta;
  out.value[A::kSquareAvg] = static_cast<double>(sq);
  out.mag[A::kSquareAvg] = static_cast<double>(mag_sq);
  out.value[A::kAccDelta] = static_cast<double>(acc);
  out.mag[A::kAccDelta] = static_cast<double>(mag_acc);
  out.value[A::kParam] = static_cast<double>(p - lr * delta);
  out.mag[A::kParam] = static_cast<double>(fabs(p) + fabs(lr) * mag_delta);
  return out;
}

// ---------------------------------------------------------------------------------------
// Adamax: torch.optim.adamax._single_tensor_adamax (capturable=False).
//   step_t += 1; grad = -grad if maximize; grad += weight_decay * param (weight_decay != 0)
//   exp_avg.lerp_(grad, 1 - beta1)
//   exp_inf = torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps))   (NaN propagates)
//   clr = lr / (1 - beta1 ** step); param.addcdiv_(exp_avg, exp_inf, value=-clr)
template <typename R>
ElemRef adamax_reference(const fm::Args& a, const double* state, const float* grad_scale,
                         const double* in) {
  using A = fm::Adamax;
  using std::fabs;
  const double step = state[0];
  const double beta1 = a.floats[A::kBeta1];
  const TorchLr lr{a.lr_dtype};
  const R b2 = a.floats[A::kBeta2], eps = a.floats[A::kEps], wd = a.floats[A::kWeightDecay];
  R p = in[A::kParam], g = in[A::kGrad], m = in[A::kExpAvg], u = in[A::kExpInf];
  ElemRef out;

  if (grad_scale) g = g / static_cast<R>(*grad_scale);
  out.value[A::kGrad] = static_cast<double>(g);
  out.mag[A::kGrad] = static_cast<double>(fabs(g));
  if (a.flags[A::kMaximize]) g = -g;
  R mag_g = fabs(g);
  if (a.floats[A::kWeightDecay] != 0) {
    g = g + wd * p;
    mag_g = mag_g + fabs(wd * p);
  }
  const R m_old = m;
  m = m + (1 - static_cast<R>(beta1)) * (g - m);
  const R mag_m = fabs(m_old) + mag_g;
  const R decayed = b2 * u, bound = fabs(g) + eps;
  const bool nan = decayed != decayed || bound != bound;
  u = nan ? decayed + bound : (decayed > bound ? decayed : bound);
  const R mag_u = decayed > bound ? decayed : mag_g + eps;
  const R clr = static_cast<R>(lr.div(a.lr, 1.0 - std::pow(beta1, step)));
  const R update = clr * m / u;
  const R mag_update = fabs(clr) * (mag_m + fabs(m) * mag_u / u) / u;
  out.value[A::kExpAvg] = static_cast<double>(m);
  out.mag[A::kExpAvg] = static_cast<double>(mag_m);
  out.value[A::kExpInf] = static_cast<double>(u);
  out.mag[A::kExpInf] = static_cast<double>(mag_u);
  out.value[A::kParam] = static_cast<double>(p - update);
  out.mag[A::kParam] = static_cast<double>(fabs(p) + mag_update);
  return out;
}

}  // namespace fo_test
