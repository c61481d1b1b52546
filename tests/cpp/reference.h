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
// which scales the tolerance (see [note: tolerances] in test_util.h). The steps several
// optimizers share compute their value and magnitude in one place: prepare_grad (unscale,
// maximize, L2), ema_sq (moving average / sum of squares), lerp (moving average). Adding
// an optimizer to the tests is one such function here plus one entry in
// optimizer_table.cpp.
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
  double add(double a, double b) const {
    if (dtype == fm::LrDType::kFloat64) return a + b;
    return round(static_cast<float>(a) + static_cast<float>(b));
  }
  // tensor ** python_float (ASGD's eta): ATen's pow_tensor_scalar passes the exponent on
  // as a double, and a one-element tensor takes the scalar loop, std::pow(float base,
  // double exp): the base is of lr's dtype, the exponent is NOT rounded to float, the
  // double result is rounded to float (measured with torch 2.13: bit for bit for
  // exponents 0.75, 0.6, 0.3). The vectorized loop of larger tensors (Sleef's powf)
  // does not apply to a 0-dim lr.
  double pow(double a, double b) const {
    if (dtype == fm::LrDType::kFloat64) return std::pow(a, b);
    return round(static_cast<float>(std::pow(static_cast<double>(static_cast<float>(a)), b)));
  }
};

// ---------------------------------------------------------------------------------------
// The pieces every reference shares, each with its magnitude.

// A computed value and `mag`, the sum of the magnitudes of the terms that formed it.
template <typename R>
struct Term {
  R value;
  R mag;
};

template <typename R>
void record(ElemRef& out, int list, const Term<R>& t) {
  out.value[list] = static_cast<double>(t.value);
  out.mag[list] = static_cast<double>(t.mag);
}

// torch.optim's prologue, in its order: the grad unscaled (grad_scale divides it, and the
// kernel writes it back divided, so the grad list is recorded in `out`), negated for
// maximize, and the L2 term `l2 * param` added when l2 != 0 (coupled weight decay;
// AdamW's decoupled decay passes 0 and scales the param itself).
template <typename R>
Term<R> prepare_grad(R g, R p, const float* grad_scale, bool maximize, R l2, int grad_list,
                     ElemRef& out) {
  using std::fabs;
  if (grad_scale) g = g / static_cast<R>(*grad_scale);
  record(out, grad_list, Term<R>{g, fabs(g)});
  if (maximize) g = -g;
  Term<R> t{g, fabs(g)};
  if (l2 != 0) {
    t.value = g + l2 * p;
    t.mag = t.mag + fabs(l2 * p);
  }
  return t;
}

// AdamW-style decoupled decay, param.mul_(1 - lr * weight_decay) where weight_decay != 0
// and `decoupled`: the factor in Python floats, or two rounded ops of an lr tensor.
template <typename R>
R decoupled_decay(const fm::Args& a, R p, double weight_decay, bool decoupled) {
  if (weight_decay == 0 || !decoupled) return p;
  const TorchLr lr{a.lr_dtype};
  const R factor = a.lr_dtype == fm::LrDType::kFloat64
                       ? 1 - static_cast<R>(a.lr) * static_cast<R>(weight_decay)
                       : static_cast<R>(lr.sub(1.0, lr.mul(a.lr, weight_decay)));
  return p * factor;
}

// v = beta * v + weight * x^2: a moving average of squares (weight = 1 - beta: Adam's
// exp_avg_sq, RMSprop's and Adadelta's square_avg, Adadelta's acc_delta) or a sum of
// squares (beta = weight = 1: Adagrad's state_sum). Its error is bounded by u times
//   beta * |v| + weight * x^2        the magnitudes of the two terms (each rounding of
//                                    the product, the square and the sum is <= u * that)
//   + 2 * weight * mag_x^2           x's own error (<= u * mag_x) enters through x^2 as
//                                    2 |x| u mag_x <= 2 u mag_x^2
// i.e. |v_new| + 2 * weight * mag_x^2 for v >= 0. (The references used to disagree:
// Adam took it from the new v as here, RMSprop / Adadelta / Adagrad left out the
// weight * x^2 term.)
template <typename R>
Term<R> ema_sq(R v, R beta, R weight, const Term<R>& x) {
  using std::fabs;
  const R square = weight * x.value * x.value;
  return {beta * v + square, beta * fabs(v) + square + 2 * weight * x.mag * x.mag};
}

// m + w * (x - m): torch's lerp_(x, w), the moving average m = (1 - w) m + w x (Adam's and
// Adamax's exp_avg, RMSprop's grad_avg). Both operands enter with a weight <= 1, the
// difference with |m| + |x|: bounded by |m| + mag_x.
template <typename R>
Term<R> lerp(R m, const Term<R>& x, R w) {
  using std::fabs;
  return {m + w * (x.value - m), fabs(m) + x.mag};
}

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
  R p = in[A::kParam];
  const R vhat_old = in[A::kMaxExpAvgSq];
  ElemRef out;

  const Term<R> g = prepare_grad<R>(in[A::kGrad], p, grad_scale, maximize,
                                    decoupled ? R(0) : wd, A::kGrad, out);
  p = decoupled_decay<R>(a, p, weight_decay, decoupled);
  const Term<R> m = lerp<R>(in[A::kExpAvg], g, 1 - static_cast<R>(beta1));
  const Term<R> v = ema_sq<R>(in[A::kExpAvgSq], b2, 1 - b2, g);
  Term<R> second = v;
  if (amsgrad) {
    const R vhat = vhat_old > v.value ? vhat_old : v.value;
    second = {vhat, vhat > v.mag ? vhat : v.mag};
    record(out, A::kMaxExpAvgSq, second);
  }
  // The per-tensor scalars in double, as torch.optim computes them (Python floats):
  // 1 - beta2^step amplifies pow's rounding by up to 1 / (1 - beta2^step) (~500x at
  // step 2), which is part of the definition, not an error the fp64 kernel must beat.
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  const R step_size = static_cast<R>(lr.div(a.lr, bias_correction1));
  const R denom = std::sqrt(second.value) / static_cast<R>(std::sqrt(bias_correction2)) + eps;
  const R update = step_size * m.value / denom;
  // The relative error of denom is at most that of `second` (mag / value).
  const R rel_second = second.value > 0 ? second.mag / second.value : R(1);
  const R mag_update = step_size * (m.mag + fabs(m.value) * rel_second) / denom;
  record(out, A::kParam, Term<R>{p - update, fabs(p) + mag_update});
  record(out, A::kExpAvg, m);
  record(out, A::kExpAvgSq, v);
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
  const R p = in[S::kParam];
  R buf = in[S::kMomentumBuffer];
  ElemRef out;

  const Term<R> grad = prepare_grad<R>(in[S::kGrad], p, grad_scale, a.flags[S::kMaximize], wd,
                                       S::kGrad, out);
  const R g = grad.value, mag_g = grad.mag;
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
    record(out, S::kMomentumBuffer, Term<R>{buf, mag_buf});
  }
  record(out, S::kParam, Term<R>{p - lr * d, fabs(p) + fabs(lr) * mag_d});
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
  const R p = in[A::kParam];
  ElemRef out;

  const Term<R> g = prepare_grad<R>(in[A::kGrad], p, grad_scale, a.flags[A::kMaximize], wd,
                                    A::kGrad, out);
  // clr in Python floats (an lr tensor: lr's dtype), the denominator a Python float.
  const R clr = static_cast<R>(lr.div(a.lr, 1.0 + (step - 1.0) * a.floats[A::kLrDecay]));
  const Term<R> sum = ema_sq<R>(in[A::kSum], 1, 1, g);  // state_sum += g^2
  const R std = std::sqrt(sum.value) + eps;
  const R rel_sum = sum.value > 0 ? sum.mag / sum.value : R(1);
  const R update = clr * g.value / std;
  const R mag_update = fabs(clr) * (g.mag + fabs(g.value) * rel_sum) / std;
  record(out, A::kParam, Term<R>{p - update, fabs(p) + mag_update});
  record(out, A::kSum, sum);
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
  const R p = in[A::kParam], buf = in[A::kMomentumBuffer];
  ElemRef out;

  const Term<R> grad = prepare_grad<R>(in[A::kGrad], p, grad_scale, a.flags[A::kMaximize], wd,
                                       A::kGrad, out);
  const R g = grad.value, mag_g = grad.mag;
  const Term<R> sq = ema_sq<R>(in[A::kSquareAvg], alpha, 1 - alpha, grad);
  record(out, A::kSquareAvg, sq);
  R var = sq.value, mag_var = sq.mag;
  if (a.flags[A::kCentered]) {
    const Term<R> ga = lerp<R>(in[A::kGradAvg], grad, 1 - alpha);
    record(out, A::kGradAvg, ga);
    var = sq.value - ga.value * ga.value;
    mag_var = sq.mag + 2 * ga.mag * ga.mag;  // the cancellation's inputs
  }
  // sqrt halves a relative error; an absolute one (e * mag_var) becomes e * mag_var / (2 avg).
  const R avg = std::sqrt(var);
  const R mag_avg = avg + (avg > 0 ? mag_var / (2 * avg) : std::sqrt(mag_var));
  const R d = avg + eps;
  const R rel_d = (mag_avg + eps) / d;
  const R step = g / d;
  const R mag_step = (mag_g + fabs(g) * rel_d) / d;
  if (a.floats[A::kMomentum] > 0) {
    const Term<R> new_buf{mom * buf + step, mom * fabs(buf) + mag_step};
    record(out, A::kMomentumBuffer, new_buf);
    record(out, A::kParam, Term<R>{p - lr * new_buf.value, fabs(p) + fabs(lr) * new_buf.mag});
  } else {
    record(out, A::kParam, Term<R>{p - lr * step, fabs(p) + fabs(lr) * mag_step});
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
  const R p = in[A::kParam], acc = in[A::kAccDelta];
  ElemRef out;

  const Term<R> g = prepare_grad<R>(in[A::kGrad], p, grad_scale, a.flags[A::kMaximize], wd,
                                    A::kGrad, out);
  const Term<R> sq = ema_sq<R>(in[A::kSquareAvg], rho, 1 - rho, g);
  const R std = std::sqrt(sq.value + eps);
  const R ratio = std::sqrt(acc + eps) / std;  // inputs exact: only sq's error propagates
  // |delta| relative error: sq's (halved by sqrt, relative to sq + eps), plus g's.
  const R delta_value = ratio * g.value;
  const Term<R> delta{delta_value, ratio * g.mag + fabs(delta_value) *
                                                       (1 + (sq.mag + eps) / (sq.value + eps))};
  record(out, A::kSquareAvg, sq);
  record(out, A::kAccDelta, ema_sq<R>(acc, rho, 1 - rho, delta));
  record(out, A::kParam, Term<R>{p - lr * delta.value, fabs(p) + fabs(lr) * delta.mag});
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
  const R p = in[A::kParam];
  ElemRef out;

  const Term<R> g = prepare_grad<R>(in[A::kGrad], p, grad_scale, a.flags[A::kMaximize], wd,
                                    A::kGrad, out);
  const Term<R> m = lerp<R>(in[A::kExpAvg], g, 1 - static_cast<R>(beta1));
  const R decayed = b2 * in[A::kExpInf], bound = fabs(g.value) + eps;
  const bool nan = decayed != decayed || bound != bound;
  const R u = nan ? decayed + bound : (decayed > bound ? decayed : bound);
  const R mag_u = decayed > bound ? decayed : g.mag + eps;
  const R clr = static_cast<R>(lr.div(a.lr, 1.0 - std::pow(beta1, step)));
  const R update = clr * m.value / u;
  const R mag_update = fabs(clr) * (m.mag + fabs(m.value) * mag_u / u) / u;
  record(out, A::kExpAvg, m);
  record(out, A::kExpInf, Term<R>{u, mag_u});
  record(out, A::kParam, Term<R>{p - update, fabs(p) + mag_update});
  return out;
}


// ---------------------------------------------------------------------------------------
// NAdam: torch.optim.nadam._single_tensor_nadam (capturable=False, differentiable=False).
//   step_t += 1; step = step_t.item(); bias_correction2 = 1 - beta2 ** step
//   grad = -grad if maximize
//   weight_decay != 0: param.mul_(1 - lr * wd) if decoupled else grad = grad + wd * param
//   mu = beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))
//   mu_next = beta1 * (1 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
//   mu_product *= mu
//   exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
//   denom = exp_avg_sq.div(bias_correction2).sqrt().add_(eps)
//   param.addcdiv_(grad, denom, value=-lr * (1 - mu) / (1 - mu_product))
//   param.addcdiv_(exp_avg, denom, value=(-lr * mu_next) / (1 - mu_product * mu_next))
// `state`: [step, mu_product] after this step's update (mu_product as stored: torch reads
// it back with .item()), then their values before it (unused).
template <typename R>
ElemRef nadam_reference(const fm::Args& a, const double* state, const float* grad_scale,
                        const double* in) {
  using N = fm::NAdam;
  using std::fabs;
  const double step = state[N::kStep];
  const double mu_product = state[N::kMuProduct];
  const bool decoupled = a.flags[N::kDecoupledWeightDecay];
  const double beta1 = a.floats[N::kBeta1], beta2 = a.floats[N::kBeta2];
  const double momentum_decay = a.floats[N::kMomentumDecay];
  const double weight_decay = a.floats[N::kWeightDecay];
  const TorchLr lr{a.lr_dtype};
  const R b2 = beta2, wd = weight_decay, eps = a.floats[N::kEps];
  R p = in[N::kParam];
  ElemRef out;

  const Term<R> g = prepare_grad<R>(in[N::kGrad], p, grad_scale, a.flags[N::kMaximize],
                                    decoupled ? R(0) : wd, N::kGrad, out);
  p = decoupled_decay<R>(a, p, weight_decay, decoupled);
  // The per-tensor scalars in Python floats (an lr tensor: -lr * x / y in its dtype, the
  // Python float operands rounded to it).
  const double mu = beta1 * (1.0 - 0.5 * std::pow(0.96, step * momentum_decay));
  const double mu_next = beta1 * (1.0 - 0.5 * std::pow(0.96, (step + 1) * momentum_decay));
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  const R c1 = static_cast<R>(lr.div(lr.mul(-a.lr, 1.0 - mu), 1.0 - mu_product));
  const R c2 = static_cast<R>(lr.div(lr.mul(-a.lr, mu_next), 1.0 - mu_product * mu_next));

  const Term<R> m = lerp<R>(in[N::kExpAvg], g, 1 - static_cast<R>(beta1));
  const Term<R> v = ema_sq<R>(in[N::kExpAvgSq], b2, 1 - b2, g);
  const R denom = std::sqrt(v.value / static_cast<R>(bias_correction2)) + eps;
  // The relative error of denom is at most that of v (mag / value).
  const R rel_v = v.value > 0 ? v.mag / v.value : R(1);
  const R t1 = c1 * g.value / denom;
  const R t2 = c2 * m.value / denom;
  const R mag_t1 = fabs(c1) * (g.mag + fabs(g.value) * rel_v) / denom;
  const R mag_t2 = fabs(c2) * (m.mag + fabs(m.value) * rel_v) / denom;
  record(out, N::kParam, Term<R>{p + t1 + t2, fabs(p) + mag_t1 + mag_t2});
  record(out, N::kExpAvg, m);
  record(out, N::kExpAvgSq, v);
  return out;
}

// ---------------------------------------------------------------------------------------
// RAdam: torch.optim.radam._single_tensor_radam (capturable=False, differentiable=False).
//   step_t += 1; step = step_t.item(); grad = -grad if maximize
//   weight_decay != 0: param.mul_(1 - lr * wd) if decoupled else grad = grad + wd * param
//   exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
//   bias_correction1 = 1 - beta1 ** step; bias_correction2 = 1 - beta2 ** step
//   bias_corrected_exp_avg = exp_avg / bias_correction1
//   rho_inf = 2 / (1 - beta2) - 1
//   rho_t = rho_inf - 2 * step * (beta2 ** step) / bias_correction2
//   rho_t > 5:  rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
//                       / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
//               adaptive_lr = (bias_correction2 ** 0.5) / exp_avg_sq.sqrt().add_(eps)
//               param.add_(bias_corrected_exp_avg * lr * adaptive_lr * rect, alpha=-1)
//   else:       param.add_(bias_corrected_exp_avg * lr, alpha=-1)
// An lr tensor enters `* lr` with its value only (a 0-dim operand); its dtype rounds
// 1 - lr * weight_decay.
template <typename R>
ElemRef radam_reference(const fm::Args& a, const double* state, const float* grad_scale,
                        const double* in) {
  using A = fm::RAdam;
  using std::fabs;
  const double step = state[0];
  const bool decoupled = a.flags[A::kDecoupledWeightDecay];
  const double beta1 = a.floats[A::kBeta1], beta2 = a.floats[A::kBeta2];
  const double weight_decay = a.floats[A::kWeightDecay];
  const R b2 = beta2, wd = weight_decay, eps = a.floats[A::kEps], lr_value = a.lr;
  R p = in[A::kParam];
  ElemRef out;

  const Term<R> g = prepare_grad<R>(in[A::kGrad], p, grad_scale, a.flags[A::kMaximize],
                                    decoupled ? R(0) : wd, A::kGrad, out);
  p = decoupled_decay<R>(a, p, weight_decay, decoupled);
  const Term<R> m = lerp<R>(in[A::kExpAvg], g, 1 - static_cast<R>(beta1));
  const Term<R> v = ema_sq<R>(in[A::kExpAvgSq], b2, 1 - b2, g);
  // The per-tensor scalars in Python floats, the branch per tensor.
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  const double rho_inf = 2.0 / (1.0 - beta2) - 1.0;
  const double rho_t = rho_inf - 2.0 * step * std::pow(beta2, step) / bias_correction2;
  const R bc1 = static_cast<R>(bias_correction1);
  const R corrected = m.value / bc1 * lr_value;
  const R mag_corrected = m.mag / bc1 * fabs(lr_value);
  if (rho_t > 5.0) {
    const R rect = static_cast<R>(std::pow((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                                               ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t),
                                           0.5));
    const R denom = std::sqrt(v.value) + eps;
    const R adaptive_lr = static_cast<R>(std::pow(bias_correction2, 0.5)) / denom;
    const R rel_v = v.value > 0 ? v.mag / v.value : R(1);
    const R update = corrected * adaptive_lr * rect;
    const R mag_update = (mag_corrected + fabs(corrected) * rel_v) * adaptive_lr * rect;
    record(out, A::kParam, Term<R>{p - update, fabs(p) + mag_update});
  } else {
    record(out, A::kParam, Term<R>{p - corrected, fabs(p) + mag_corrected});
  }
  record(out, A::kExpAvg, m);
  record(out, A::kExpAvgSq, v);
  return out;
}

// ---------------------------------------------------------------------------------------
// ASGD: torch.optim.asgd._single_tensor_asgd (capturable=False).
//   grad = -grad if maximize; step_t += 1
//   grad = grad + weight_decay * param (weight_decay != 0)
//   eta_value = eta.item(); param.mul_(1 - lambd * eta_value); param.add_(grad, alpha=-eta_value)
//   mu.item() != 1: ax.add_(param.sub(ax).mul_(mu))   else: ax.copy_(param)
//   then eta = lr / ((1 + lambd * lr * step) ** alpha), mu = 1 / max(1, step - t0)
// The update reads the eta and mu of the previous step, as stored: `state` is
// [step, eta, mu] after this step's update, then [step, eta, mu] before it (those read).
template <typename R>
ElemRef asgd_reference(const fm::Args& a, const double* state, const float* grad_scale,
                       const double* in) {
  using A = fm::Asgd;
  using std::fabs;
  const double eta = state[A::kStates + A::kEta];
  const double mu = state[A::kStates + A::kMu];
  const R wd = a.floats[A::kWeightDecay];
  const R p = in[A::kParam], ax = in[A::kAx];
  ElemRef out;

  const Term<R> g = prepare_grad<R>(in[A::kGrad], p, grad_scale, a.flags[A::kMaximize], wd,
                                    A::kGrad, out);
  // 1 - lambd * eta_value: Python floats.
  const R decayed = p * static_cast<R>(1.0 - a.floats[A::kLambd] * eta);
  const R eta_r = static_cast<R>(eta);
  const Term<R> p_new{decayed - eta_r * g.value, fabs(decayed) + fabs(eta_r) * g.mag};
  record(out, A::kParam, p_new);
  if (mu != 1.0) {
    const R mu_r = static_cast<R>(mu);
    record(out, A::kAx, Term<R>{ax + (p_new.value - ax) * mu_r,
                                fabs(ax) + fabs(mu_r) * (p_new.mag + fabs(ax))});
  } else {
    record(out, A::kAx, p_new);  // ax.copy_(param)
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Rprop: torch.optim.rprop._single_tensor_rprop (capturable=False, differentiable=False).
//   step += 1; grad = -grad if maximize
//   sign = grad.mul(prev).sign()          (torch.sign: 0 for 0 and for NaN)
//   sign[sign.gt(0)] = etaplus; sign[sign.lt(0)] = etaminus; sign[sign.eq(0)] = 1
//   step_size.mul_(sign).clamp_(step_size_min, step_size_max)
//   grad = grad.clone(); grad[sign.eq(etaminus)] = 0
//   param.addcmul_(grad.sign(), step_size, value=-1); prev.copy_(grad)
// clamp_ is min(max(x, lo), hi): step_size_max where the bounds cross, NaN stays NaN.
template <typename R>
ElemRef rprop_reference(const fm::Args& a, const double*, const float* grad_scale,
                        const double* in) {
  using A = fm::Rprop;
  using std::fabs;
  const R lo = a.floats[A::kStepSizeMin], hi = a.floats[A::kStepSizeMax];
  const R etaminus = a.floats[A::kEtaminus], etaplus = a.floats[A::kEtaplus];
  const R p = in[A::kParam], prev = in[A::kPrev], step_size = in[A::kStepSize];
  ElemRef out;

  Term<R> g = prepare_grad<R>(in[A::kGrad], p, grad_scale, a.flags[A::kMaximize], R(0),
                              A::kGrad, out);
  const R product = g.value * prev;
  R sign = product > 0 ? R(1) : product < 0 ? R(-1) : R(0);  // NaN: 0
  sign = sign > 0 ? etaplus : sign < 0 ? etaminus : R(1);
  R s = step_size * sign;
  if (s == s) {  // clamp_: NaN propagates
    s = s < lo ? lo : s;
    s = s > hi ? hi : s;
  }
  if (sign == etaminus) g = Term<R>{R(0), R(0)};
  const R grad_sign = g.value > 0 ? R(1) : g.value < 0 ? R(-1) : R(0);  // NaN: 0
  record(out, A::kParam, Term<R>{p - grad_sign * s, fabs(p) + fabs(s)});
  record(out, A::kPrev, g);
  record(out, A::kStepSize, Term<R>{s, fabs(s)});
  return out;
}

}  // namespace fo_test
