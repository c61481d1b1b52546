// The optimizer table of the C++ tests: see [note: adding an optimizer to the C++ tests]
// in optimizer_table.h.
#include "optimizer_table.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <stdexcept>

namespace fo_test {
namespace {

// Each tensor's step count after the tests' first step: bias corrections differ per
// tensor within one call (steps 1 and 1000 in one bucket).
double step_for_tensor(int64_t t) {
  static const double steps[] = {1, 2, 3, 10, 1000, 7};
  return steps[t % 6];
}

// The op's arguments: floats and flags in the optimizer's schema order, every one given.
template <typename Optim>
fm::Args make_args(double lr, std::initializer_list<double> floats,
                   std::initializer_list<bool> flags,
                   fm::LrDType lr_dtype = fm::LrDType::kFloat64) {
  if (floats.size() != static_cast<size_t>(Optim::kFloats) ||
      flags.size() != static_cast<size_t>(Optim::kFlags)) {
    throw std::logic_error(std::string("make_args: wrong argument count for ") + Optim::kOp);
  }
  fm::Args a{};
  int i = 0;
  for (double f : floats) a.floats[i++] = f;
  i = 0;
  for (bool b : flags) a.flags[i++] = b;
  a.lr = lr;
  a.lr_dtype = lr_dtype;
  return a;
}

// What every entry takes from its struct: ids, list and argument names, the header's
// advance. The name is the registry's, at the id the struct has there.
template <typename Optim>
OptimizerEntry entry_of() {
  OptimizerEntry e{};
  e.id = optimizer_id<Optim>();
  static_assert(optimizer_id<Optim>() >= 0, "not in FO_FOR_EACH_OPTIMIZER");
  e.name = registered_optimizers()[e.id];
  e.n_lists = Optim::kLists;
  static_assert(Optim::kLists <= kMaxLists, "raise kMaxLists in reference.h");
  for (const char* n : Optim::kListNames) e.list_names.push_back(n);
  e.param_list = Optim::kParam;
  e.grad_list = Optim::kGrad;
  e.optional_lists = Optim::kOptionalLists;
  e.n_states = fm::num_states<Optim>();
  for (const char* n : Optim::kFloatNames) e.float_names.push_back(n);
  for (const char* n : Optim::kFlagNames) e.flag_names.push_back(n);
  e.maximize_flag = -1;
  for (size_t i = 0; i < e.flag_names.size(); ++i) {
    if (e.flag_names[i] == "maximize") e.maximize_flag = static_cast<int>(i);
  }
  e.advance = &Optim::advance;
  return e;
}

double random_sign(Rng& rng) { return rng.chance(0.5) ? -1.0 : 1.0; }

fm::Args with_lr(fm::Args a, double lr, fm::LrDType d) {
  a.lr = lr;
  a.lr_dtype = d;
  return a;
}

// An lr tensor's value is of its dtype: 0.1 as float32.
const double kLrFloat32 = static_cast<float>(0.1);

// Random magnitudes of grads: mostly up to 1.5, a tenth of them below 1e-3.
double grad_magnitude(Rng& rng) {
  return rng.chance(0.1) ? rng.uniform(0, 1e-3) : rng.uniform(0, 1.5);
}

// The draws every fill (but SGD's, which has no state to start fresh) begins with: the
// grads' scale, whether the element is "fresh" (all state zero, as before a first step),
// the signs of param and grad. The fill then draws its own, and calls fill_param_grad.
struct FillStart {
  double scale;
  bool fresh;
  double sgn_p, sgn_g;
};

FillStart fill_start(Rng& rng, const OptCase& c) {
  FillStart f{};
  f.scale = c.scaled ? c.grad_scale : 1.0;
  f.fresh = rng.chance(0.05);
  f.sgn_p = random_sign(rng);
  f.sgn_g = random_sign(rng);
  return f;
}

// Params of both signs away from zero; the grad of magnitude g_mag (scaled), 0 for half
// of the fresh elements.
void fill_param_grad(Rng& rng, const FillStart& f, double g_mag, double* param, double* grad) {
  *param = f.sgn_p * rng.uniform(0.05, 2.0);
  *grad = (f.fresh && rng.chance(0.5)) ? 0.0 : f.sgn_g * g_mag * f.scale;
}

// OptimizerEntry::reference of a reference.h template: long double for fp64 storage.
using ReferenceFn = ElemRef (*)(const fm::Args&, const double*, const float*, const double*);
template <ReferenceFn Double, ReferenceFn Extended>
ElemRef reference_of(const fm::Args& a, const double* state, const float* grad_scale,
                     const double* in, bool extended) {
  return extended ? Extended(a, state, grad_scale, in) : Double(a, state, grad_scale, in);
}

// The per-tensor state of an optimizer whose only state is torch's step count (`step +=
// 1` before the update): tensor t starts at step_for_tensor(t) - 1.
void use_step_count_state(OptimizerEntry& e) {
  e.initial_state = [](int64_t t, double* s) { s[0] = step_for_tensor(t) - 1; };
  e.advance_reference = [](const fm::Args&, double* s, const bool*) { s[0] = s[0] + 1; };  // step += 1
}

// Teeth of an entry against one base case: `b` differs in its arguments, its grad scale
// or its steps.
struct TeethOf {
  OptimizerEntry& e;
  OptCase base;
  int steps_done = 0;

  void args(const char* what, fm::Args b, int list, double min_fraction = 0.5) {
    e.teeth.push_back(
        {what, base, {what, b, false, 1.0f}, steps_done, 0, list, min_fraction, false});
  }
  void grad_scale(int list) {
    e.teeth.push_back({"grad_scale", base, {"scaled", base.args, true, 2.0f}, steps_done, 0, list,
                       0.5, false});
  }
  void steps(int shift, int list) {
    e.teeth.push_back({"step + " + std::to_string(shift), base, base, steps_done, shift, list, 0.5,
                       false});
  }
  // lr's dtype float32 rather than float64, lr 0.1 as a float: below fp32's resolution.
  void lr_float32(int list) {
    const fm::Args f64 = with_lr(base.args, kLrFloat32, fm::LrDType::kFloat64);
    const fm::Args f32 = with_lr(base.args, kLrFloat32, fm::LrDType::kFloat32);
    e.teeth.push_back({"lr float64 -> float32 (fp64 storage)", {"lr_f64", f64, false, 1.0f},
                       {"lr_f32", f32, false, 1.0f}, steps_done, 0, list, 0.5, true});
  }
};

// ---------------------------------------------------------------------------------------
// Adam

using fm::Adam;

fm::Args adam_args(double wd, bool decoupled, bool amsgrad, bool maximize) {
  // lr 0.1 and weight decay 0.3 make every option move fp16/bf16 params by many ulps
  // (lr 1e-3 would hide a wrong formula inside one bf16 ulp).
  return make_args<Adam>(0.1, {0.9, 0.999, wd, 1e-8}, {amsgrad, maximize, decoupled});
}

// Random Adam state: params of both signs away from zero, grads with a spread of
// magnitudes, exp_avg_sq bounded away from 0 except for "fresh" elements, whose state is
// all zeros as before a first step (and whose grad is 0 half of the time).
void adam_fill(Rng& rng, const OptCase& c, double* x) {
  const FillStart f = fill_start(rng, c);
  const double sgn_m = random_sign(rng);
  fill_param_grad(rng, f, grad_magnitude(rng), &x[Adam::kParam], &x[Adam::kGrad]);
  x[Adam::kExpAvg] = f.fresh ? 0.0 : sgn_m * rng.uniform(0, 0.5);
  x[Adam::kExpAvgSq] = f.fresh ? 0.0 : rng.uniform(1e-3, 0.5);
  x[Adam::kMaxExpAvgSq] = f.fresh ? 0.0 : rng.uniform(1e-3, 0.6);
}

// The same for an optimizer with Adam's four lists (NAdam, RAdam): param, grad, exp_avg,
// exp_avg_sq.
template <typename Optim>
void adam_fill_of(Rng& rng, const OptCase& c, double* x) {
  const FillStart f = fill_start(rng, c);
  const double sgn_m = random_sign(rng);
  fill_param_grad(rng, f, grad_magnitude(rng), &x[Optim::kParam], &x[Optim::kGrad]);
  x[Optim::kExpAvg] = f.fresh ? 0.0 : sgn_m * rng.uniform(0, 0.5);
  x[Optim::kExpAvgSq] = f.fresh ? 0.0 : rng.uniform(1e-3, 0.5);
}

OptimizerEntry adam_entry() {
  OptimizerEntry e = entry_of<Adam>();
  // fused_optim/adam.py: max_exp_avg_sqs exactly when amsgrad.
  e.lists = [](const fm::Args& a) {
    return fm::required_lists<Adam>() |
           (a.flags[Adam::kAmsgrad] ? fm::bit(Adam::kMaxExpAvgSq) : 0u);
  };
  use_step_count_state(e);
  e.fill = adam_fill;
  e.reference = reference_of<adam_reference<double>, adam_reference<long double>>;
  // Other betas and a large eps, so no constant is silently hard-wired.
  fm::Args odd = make_args<Adam>(0.05, {0.5, 0.99, 0.3, 1e-2}, {true, false, false});
  // An lr tensor: its value is of its dtype; 1 - lr * wd and lr / bias_correction1 round
  // as that dtype does ([note: lr arithmetic] in stages.h). 0.1 as float32 and bfloat16.
  const double lr_f32 = kLrFloat32;
  const double lr_bf16 = oracle_bf16_to_float(oracle_float_to_bf16(0.1f));
  e.cases = {
      {"adam", adam_args(0.0, false, false, false), false, 1.0f},
      {"adam_l2", adam_args(0.3, false, false, false), false, 1.0f},
      {"adamw", adam_args(0.3, true, false, false), false, 1.0f},
      {"adamw_wd0", adam_args(0.0, true, false, false), false, 1.0f},
      {"adam_amsgrad", adam_args(0.0, false, true, false), false, 1.0f},
      {"adam_amsgrad_l2", adam_args(0.3, false, true, false), false, 1.0f},
      {"adamw_amsgrad", adam_args(0.3, true, true, false), false, 1.0f},
      {"adam_maximize", adam_args(0.0, false, false, true), false, 1.0f},
      {"adam_maximize_l2", adam_args(0.3, false, false, true), false, 1.0f},
      {"adamw_maximize_amsgrad", adam_args(0.3, true, true, true), false, 1.0f},
      {"adam_grad_scale_pow2", adam_args(0.3, false, false, false), true, 1024.0f},
      {"adamw_grad_scale_3_amsgrad_maximize", adam_args(0.3, true, true, true), true, 3.0f},
      {"adam_odd_betas_eps", odd, true, 0.5f},
      {"adamw_lr_float32", with_lr(adam_args(0.3, true, false, false), lr_f32,
                                   fm::LrDType::kFloat32), false, 1.0f},
      {"adamw_amsgrad_lr_bfloat16", with_lr(adam_args(0.3, true, true, false), lr_bf16,
                                            fm::LrDType::kBFloat16), true, 2.0f},
  };
  e.engine_case = {"adam_amsgrad_l2_scaled_maximize", adam_args(0.3, false, true, true), true,
                   3.0f};
  e.step_case = [](int) {
    return OptCase{"adamw_amsgrad", adam_args(0.3, true, true, false), false, 1.0f};
  };

  TeethOf t{e, {"adam_l2", adam_args(0.3, false, false, false), false, 1.0f}};
  t.args("amsgrad", adam_args(0.3, false, true, false), Adam::kParam, 0.2);  // vhat > v: ~half
  t.args("maximize", adam_args(0.3, false, false, true), Adam::kParam);
  t.args("L2 -> decoupled", adam_args(0.3, true, false, false), Adam::kParam);
  t.args("L2 -> none", adam_args(0.0, false, false, false), Adam::kExpAvg);
  fm::Args a = adam_args(0.3, false, false, false);
  a.floats[Adam::kBeta1] = 0.8;
  t.args("beta1", a, Adam::kExpAvg);
  a = adam_args(0.3, false, false, false);
  a.floats[Adam::kBeta2] = 0.99;
  t.args("beta2", a, Adam::kExpAvgSq);
  // eps moves the update, a fraction of lr: past a bf16 param's ulp on ~12% of elements
  // (fp16 45%, fp32 and fp64 all), measured with FO_TEST_VERBOSE=1.
  a = adam_args(0.3, false, false, false);
  a.floats[Adam::kEps] = 0.5;
  t.args("eps", a, Adam::kParam, 0.1);
  t.args("lr", with_lr(adam_args(0.3, false, false, false), 0.05, fm::LrDType::kFloat64),
         Adam::kParam);
  t.grad_scale(Adam::kExpAvg);    // grads read as scaled by 2
  t.steps(2, Adam::kParam);       // bias corrections of step 3 instead of 1
  t.lr_float32(Adam::kParam);
  return e;
}

// ---------------------------------------------------------------------------------------
// SGD

using fm::Sgd;

fm::Args sgd_args(double momentum, double dampening, double wd, bool nesterov, bool maximize,
                  bool first) {
  return make_args<Sgd>(0.1, {momentum, dampening, wd}, {nesterov, maximize, first});
}

// On the buffer's first step its old contents must never be read (torch creates it then):
// they are NaN here, so a kernel using them would give NaN.
void sgd_fill(Rng& rng, const OptCase& c, double* x) {
  const double scale = c.scaled ? c.grad_scale : 1.0;
  const double sgn_p = random_sign(rng), sgn_g = random_sign(rng), sgn_b = random_sign(rng);
  const double g_mag = rng.chance(0.05) ? 0.0 : rng.uniform(0, 1.5);
  x[Sgd::kParam] = sgn_p * rng.uniform(0.05, 2.0);
  x[Sgd::kGrad] = sgn_g * g_mag * scale;
  const double buf = sgn_b * rng.uniform(0, 1.0);
  x[Sgd::kMomentumBuffer] =
      c.args.flags[Sgd::kIsFirstStep] ? std::numeric_limits<double>::quiet_NaN() : buf;
}

OptimizerEntry sgd_entry() {
  OptimizerEntry e = entry_of<Sgd>();
  // fused_optim/sgd.py: momentum_buffers exactly when momentum != 0.
  e.lists = [](const fm::Args& a) {
    return fm::required_lists<Sgd>() |
           (a.floats[Sgd::kMomentum] != 0.0 ? fm::bit(Sgd::kMomentumBuffer) : 0u);
  };
  e.initial_state = [](int64_t, double*) {};
  e.advance_reference = [](const fm::Args&, double*, const bool*) {};
  e.fill = sgd_fill;
  e.reference = reference_of<sgd_reference<double>, sgd_reference<long double>>;
  e.cases = {
      {"sgd", sgd_args(0, 0, 0, false, false, false), false, 1.0f},
      {"sgd_wd", sgd_args(0, 0, 0.2, false, false, false), false, 1.0f},
      {"sgd_maximize_wd", sgd_args(0, 0, 0.2, false, true, false), false, 1.0f},
      // momentum 0 with nesterov / first-step flags set: they must not matter.
      {"sgd_flags_without_momentum", sgd_args(0, 0.5, 0, true, false, true), false, 1.0f},
      {"sgd_momentum_first_step", sgd_args(0.9, 0, 0, false, false, true), false, 1.0f},
      {"sgd_momentum_first_step_dampening_ignored", sgd_args(0.9, 0.25, 0.2, false, false, true),
       false, 1.0f},
      {"sgd_momentum", sgd_args(0.9, 0, 0, false, false, false), false, 1.0f},
      {"sgd_momentum_dampening_wd", sgd_args(0.9, 0.25, 0.2, false, false, false), false, 1.0f},
      {"sgd_nesterov_first_step", sgd_args(0.9, 0, 0.2, true, false, true), false, 1.0f},
      {"sgd_nesterov", sgd_args(0.9, 0, 0.2, true, false, false), false, 1.0f},
      {"sgd_nesterov_maximize", sgd_args(0.8, 0, 0, true, true, false), false, 1.0f},
      {"sgd_grad_scale_no_momentum", sgd_args(0, 0, 0.2, false, false, false), true, 1024.0f},
      {"sgd_grad_scale_momentum_3", sgd_args(0.9, 0.25, 0.2, false, true, false), true, 3.0f},
      {"sgd_grad_scale_nesterov_first", sgd_args(0.9, 0, 0, true, false, true), true, 0.25f},
  };
  e.engine_case = {"sgd_nesterov_wd_scaled", sgd_args(0.9, 0, 0.2, true, false, false), true, 2.0f};
  e.step_case = [](int step) {
    return OptCase{"sgd_nesterov", sgd_args(0.9, 0.1, 0.2, true, false, step == 0), false, 1.0f};
  };

  TeethOf t{e, {"sgd_momentum", sgd_args(0.9, 0.25, 0.2, false, false, false), false, 1.0f}};
  t.args("nesterov", sgd_args(0.9, 0.25, 0.2, true, false, false), Sgd::kParam);
  t.args("first step", sgd_args(0.9, 0.25, 0.2, false, false, true), Sgd::kMomentumBuffer);
  t.args("dampening", sgd_args(0.9, 0, 0.2, false, false, false), Sgd::kMomentumBuffer);
  t.args("weight decay", sgd_args(0.9, 0.25, 0, false, false, false), Sgd::kMomentumBuffer);
  t.args("momentum", sgd_args(0.5, 0.25, 0.2, false, false, false), Sgd::kMomentumBuffer);
  t.args("maximize", sgd_args(0.9, 0.25, 0.2, false, true, false), Sgd::kParam);
  t.args("lr", with_lr(sgd_args(0.9, 0.25, 0.2, false, false, false), 0.2, fm::LrDType::kFloat64),
         Sgd::kParam);
  t.grad_scale(Sgd::kMomentumBuffer);
  return e;
}

// ---------------------------------------------------------------------------------------
// Adagrad

using fm::Adagrad;

fm::Args adagrad_args(double lr_decay, double wd, double eps, bool maximize) {
  return make_args<Adagrad>(0.1, {lr_decay, wd, eps}, {maximize});
}

// state_sum >= 0: zero for "fresh" elements (initial_accumulator_value 0, before a
// first step; their grad is 0 half of the time), else up to 2.
void adagrad_fill(Rng& rng, const OptCase& c, double* x) {
  const FillStart f = fill_start(rng, c);
  fill_param_grad(rng, f, grad_magnitude(rng), &x[Adagrad::kParam], &x[Adagrad::kGrad]);
  x[Adagrad::kSum] = f.fresh ? 0.0 : rng.uniform(1e-3, 2.0);
}

OptimizerEntry adagrad_entry() {
  OptimizerEntry e = entry_of<Adagrad>();
  e.lists = [](const fm::Args&) { return fm::required_lists<Adagrad>(); };
  use_step_count_state(e);
  e.fill = adagrad_fill;
  e.reference = reference_of<adagrad_reference<double>, adagrad_reference<long double>>;
  e.cases = {
      {"adagrad", adagrad_args(0, 0, 1e-10, false), false, 1.0f},
      {"adagrad_lr_decay", adagrad_args(0.1, 0, 1e-10, false), false, 1.0f},
      {"adagrad_wd", adagrad_args(0, 0.2, 1e-10, false), false, 1.0f},
      {"adagrad_maximize_lr_decay_wd", adagrad_args(0.1, 0.2, 1e-10, true), false, 1.0f},
      {"adagrad_large_eps", adagrad_args(0, 0, 0.1, false), false, 1.0f},
      {"adagrad_grad_scale_pow2", adagrad_args(0.1, 0.2, 1e-10, false), true, 1024.0f},
      {"adagrad_grad_scale_3_maximize", adagrad_args(0, 0.2, 1e-10, true), true, 3.0f},
      {"adagrad_lr_float32", with_lr(adagrad_args(0.1, 0.2, 1e-10, false), kLrFloat32,
                                     fm::LrDType::kFloat32), false, 1.0f},
  };
  e.engine_case = {"adagrad_lr_decay_wd_maximize_scaled", adagrad_args(0.1, 0.2, 1e-10, true),
                   true, 2.0f};
  e.step_case = [](int) {
    return OptCase{"adagrad_lr_decay_wd", adagrad_args(0.1, 0.2, 1e-10, false), false, 1.0f};
  };
  // Step 5 (tensor 0): lr_decay divides lr by 1.4 there.
  TeethOf t{e, {"adagrad_lr_decay_wd", adagrad_args(0.1, 0.2, 1e-10, false), false, 1.0f}, 4};
  t.args("lr_decay", adagrad_args(0, 0.2, 1e-10, false), Adagrad::kParam);
  t.args("weight decay", adagrad_args(0.1, 0, 1e-10, false), Adagrad::kSum);
  t.args("maximize", adagrad_args(0.1, 0.2, 1e-10, true), Adagrad::kParam);
  t.args("eps", adagrad_args(0.1, 0.2, 0.5, false), Adagrad::kParam);
  t.args("lr", with_lr(adagrad_args(0.1, 0.2, 1e-10, false), 0.05, fm::LrDType::kFloat64),
         Adagrad::kParam);
  t.grad_scale(Adagrad::kSum);
  t.steps(4, Adagrad::kParam);  // step 5 -> 9: lr / 1.4 -> lr / 1.8
  t.lr_float32(Adagrad::kParam);
  return e;
}

// ---------------------------------------------------------------------------------------
// RMSprop

using fm::RMSprop;

fm::Args rmsprop_args(double alpha, double eps, double wd, double momentum, bool centered,
                      bool maximize) {
  return make_args<RMSprop>(0.01, {alpha, eps, wd, momentum}, {centered, maximize});
}

// square_avg >= grad_avg^2 + 0.01, as a history of grads makes it (grad_avg^2 <= the mean
// of the squares); the margin exceeds bf16's rounding of both, so the centered variance
// stays positive after storage rounding. "Fresh" elements: all state zero.
void rmsprop_fill(Rng& rng, const OptCase& c, double* x) {
  const FillStart f = fill_start(rng, c);
  const double sgn_a = random_sign(rng), sgn_b = random_sign(rng);
  const double g_mag = grad_magnitude(rng);
  const double grad_avg = f.fresh ? 0.0 : sgn_a * rng.uniform(0, 0.3);
  fill_param_grad(rng, f, g_mag, &x[RMSprop::kParam], &x[RMSprop::kGrad]);
  x[RMSprop::kGradAvg] = grad_avg;
  x[RMSprop::kSquareAvg] = f.fresh ? 0.0 : grad_avg * grad_avg + rng.uniform(0.01, 0.5);
  x[RMSprop::kMomentumBuffer] = f.fresh ? 0.0 : sgn_b * rng.uniform(0, 1.0);
}

OptimizerEntry rmsprop_entry() {
  OptimizerEntry e = entry_of<RMSprop>();
  // fused_optim/rmsprop.py: grad_avgs when centered, momentum_buffer_list when momentum.
  e.lists = [](const fm::Args& a) {
    return fm::required_lists<RMSprop>() |
           (a.flags[RMSprop::kCentered] ? fm::bit(RMSprop::kGradAvg) : 0u) |
           (a.floats[RMSprop::kMomentum] != 0.0 ? fm::bit(RMSprop::kMomentumBuffer) : 0u);
  };
  use_step_count_state(e);
  e.fill = rmsprop_fill;
  e.reference = reference_of<rmsprop_reference<double>, rmsprop_reference<long double>>;
  e.cases = {
      {"rmsprop", rmsprop_args(0.99, 1e-8, 0, 0, false, false), false, 1.0f},
      {"rmsprop_wd", rmsprop_args(0.99, 1e-8, 0.2, 0, false, false), false, 1.0f},
      {"rmsprop_maximize", rmsprop_args(0.99, 1e-8, 0, 0, false, true), false, 1.0f},
      {"rmsprop_centered", rmsprop_args(0.99, 1e-8, 0, 0, true, false), false, 1.0f},
      {"rmsprop_momentum", rmsprop_args(0.99, 1e-8, 0, 0.9, false, false), false, 1.0f},
      {"rmsprop_centered_momentum_wd_maximize", rmsprop_args(0.99, 1e-8, 0.2, 0.9, true, true),
       false, 1.0f},
      {"rmsprop_odd_alpha_eps_momentum", rmsprop_args(0.9, 1e-2, 0.2, 0.5, false, false), true,
       0.5f},
      {"rmsprop_grad_scale_3_centered_maximize", rmsprop_args(0.99, 1e-8, 0.2, 0, true, true),
       true, 3.0f},
      {"rmsprop_grad_scale_pow2_momentum", rmsprop_args(0.99, 1e-8, 0, 0.9, false, false), true,
       1024.0f},
  };
  e.engine_case = {"rmsprop_centered_momentum_wd_maximize_scaled",
                   rmsprop_args(0.99, 1e-8, 0.2, 0.9, true, true), true, 2.0f};
  e.step_case = [](int) {
    return OptCase{"rmsprop_centered_momentum_wd", rmsprop_args(0.99, 1e-8, 0.2, 0.9, true, false),
                   false, 1.0f};
  };
  TeethOf t{e, {"rmsprop_momentum_wd", rmsprop_args(0.99, 1e-8, 0.2, 0.9, false, false), false,
                1.0f}};
  t.args("centered", rmsprop_args(0.99, 1e-8, 0.2, 0.9, true, false), RMSprop::kMomentumBuffer);
  t.args("momentum", rmsprop_args(0.99, 1e-8, 0.2, 0.5, false, false), RMSprop::kMomentumBuffer);
  t.args("weight decay", rmsprop_args(0.99, 1e-8, 0, 0.9, false, false), RMSprop::kSquareAvg);
  t.args("alpha", rmsprop_args(0.9, 1e-8, 0.2, 0.9, false, false), RMSprop::kSquareAvg);
  t.args("eps", rmsprop_args(0.99, 0.5, 0.2, 0.9, false, false), RMSprop::kMomentumBuffer);
  t.args("maximize", rmsprop_args(0.99, 1e-8, 0.2, 0.9, false, true), RMSprop::kMomentumBuffer);
  t.args("lr", with_lr(rmsprop_args(0.99, 1e-8, 0.2, 0.9, false, false), 0.02,
                       fm::LrDType::kFloat64), RMSprop::kParam);
  t.grad_scale(RMSprop::kSquareAvg);
  return e;
}

// ---------------------------------------------------------------------------------------
// Adadelta

using fm::Adadelta;

fm::Args adadelta_args(double rho, double eps, double wd, bool maximize) {
  return make_args<Adadelta>(1.0, {rho, eps, wd}, {maximize});  // torch's default lr
}

void adadelta_fill(Rng& rng, const OptCase& c, double* x) {
  const FillStart f = fill_start(rng, c);
  fill_param_grad(rng, f, grad_magnitude(rng), &x[Adadelta::kParam], &x[Adadelta::kGrad]);
  x[Adadelta::kSquareAvg] = f.fresh ? 0.0 : rng.uniform(1e-3, 0.5);
  x[Adadelta::kAccDelta] = f.fresh ? 0.0 : rng.uniform(1e-4, 0.5);
}

OptimizerEntry adadelta_entry() {
  OptimizerEntry e = entry_of<Adadelta>();
  e.lists = [](const fm::Args&) { return fm::required_lists<Adadelta>(); };
  use_step_count_state(e);
  e.fill = adadelta_fill;
  e.reference = reference_of<adadelta_reference<double>, adadelta_reference<long double>>;
  e.cases = {
      {"adadelta", adadelta_args(0.9, 1e-6, 0, false), false, 1.0f},
      {"adadelta_wd", adadelta_args(0.9, 1e-6, 0.2, false), false, 1.0f},
      {"adadelta_maximize", adadelta_args(0.9, 1e-6, 0, true), false, 1.0f},
      {"adadelta_rho_eps", adadelta_args(0.5, 1e-2, 0, false), false, 1.0f},
      {"adadelta_grad_scale_pow2_wd", adadelta_args(0.9, 1e-6, 0.2, false), true, 1024.0f},
      {"adadelta_grad_scale_3_maximize_wd", adadelta_args(0.9, 1e-6, 0.2, true), true, 3.0f},
  };
  e.engine_case = {"adadelta_wd_maximize_scaled", adadelta_args(0.9, 1e-6, 0.2, true), true, 2.0f};
  e.step_case = [](int) {
    return OptCase{"adadelta_wd", adadelta_args(0.9, 1e-6, 0.2, false), false, 1.0f};
  };
  TeethOf t{e, {"adadelta_wd", adadelta_args(0.9, 1e-6, 0.2, false), false, 1.0f}};
  t.args("rho", adadelta_args(0.5, 1e-6, 0.2, false), Adadelta::kSquareAvg);
  t.args("eps", adadelta_args(0.9, 0.1, 0.2, false), Adadelta::kParam);
  t.args("weight decay", adadelta_args(0.9, 1e-6, 0, false), Adadelta::kSquareAvg);
  t.args("maximize", adadelta_args(0.9, 1e-6, 0.2, true), Adadelta::kParam);
  t.args("lr", with_lr(adadelta_args(0.9, 1e-6, 0.2, false), 0.5, fm::LrDType::kFloat64),
         Adadelta::kParam);
  t.grad_scale(Adadelta::kSquareAvg);
  return e;
}

// ---------------------------------------------------------------------------------------
// Adamax

using fm::Adamax;

fm::Args adamax_args(double beta1, double beta2, double eps, double wd, bool maximize) {
  return make_args<Adamax>(0.1, {beta1, beta2, eps, wd}, {maximize});
}

void adamax_fill(Rng& rng, const OptCase& c, double* x) {
  const FillStart f = fill_start(rng, c);
  const double sgn_m = random_sign(rng);
  fill_param_grad(rng, f, grad_magnitude(rng), &x[Adamax::kParam], &x[Adamax::kGrad]);
  x[Adamax::kExpAvg] = f.fresh ? 0.0 : sgn_m * rng.uniform(0, 0.5);
  x[Adamax::kExpInf] = f.fresh ? 0.0 : rng.uniform(1e-3, 1.5);
}

OptimizerEntry adamax_entry() {
  OptimizerEntry e = entry_of<Adamax>();
  e.lists = [](const fm::Args&) { return fm::required_lists<Adamax>(); };
  use_step_count_state(e);
  e.fill = adamax_fill;
  e.reference = reference_of<adamax_reference<double>, adamax_reference<long double>>;
  e.cases = {
      {"adamax", adamax_args(0.9, 0.999, 1e-8, 0, false), false, 1.0f},
      {"adamax_wd", adamax_args(0.9, 0.999, 1e-8, 0.2, false), false, 1.0f},
      {"adamax_maximize", adamax_args(0.9, 0.999, 1e-8, 0, true), false, 1.0f},
      {"adamax_odd_betas_eps", adamax_args(0.5, 0.9, 1e-2, 0.2, false), true, 0.5f},
      {"adamax_grad_scale_pow2_wd", adamax_args(0.9, 0.999, 1e-8, 0.2, false), true, 1024.0f},
      {"adamax_grad_scale_3_maximize_wd", adamax_args(0.9, 0.999, 1e-8, 0.2, true), true, 3.0f},
      {"adamax_lr_float32", with_lr(adamax_args(0.9, 0.999, 1e-8, 0.2, false), kLrFloat32,
                                    fm::LrDType::kFloat32), false, 1.0f},
  };
  e.engine_case = {"adamax_wd_maximize_scaled", adamax_args(0.9, 0.999, 1e-8, 0.2, true), true,
                   2.0f};
  e.step_case = [](int) {
    return OptCase{"adamax_wd", adamax_args(0.9, 0.999, 1e-8, 0.2, false), false, 1.0f};
  };
  TeethOf t{e, {"adamax_wd", adamax_args(0.9, 0.999, 1e-8, 0.2, false), false, 1.0f}};
  t.args("beta1", adamax_args(0.8, 0.999, 1e-8, 0.2, false), Adamax::kExpAvg);
  // beta2 only matters where beta2 * exp_inf beats |grad| + eps: about half the elements.
  t.args("beta2", adamax_args(0.9, 0.9, 1e-8, 0.2, false), Adamax::kExpInf, 0.2);
  t.args("eps", adamax_args(0.9, 0.999, 0.5, 0.2, false), Adamax::kExpInf, 0.2);
  t.args("weight decay", adamax_args(0.9, 0.999, 1e-8, 0, false), Adamax::kExpAvg);
  t.args("maximize", adamax_args(0.9, 0.999, 1e-8, 0.2, true), Adamax::kParam);
  t.args("lr", with_lr(adamax_args(0.9, 0.999, 1e-8, 0.2, false), 0.05, fm::LrDType::kFloat64),
         Adamax::kParam);
  t.grad_scale(Adamax::kExpAvg);
  t.steps(2, Adamax::kParam);
  t.lr_float32(Adamax::kParam);
  return e;
}

// ---------------------------------------------------------------------------------------
// NAdam

using fm::NAdam;

fm::Args nadam_args(double wd, bool decoupled, bool maximize, double beta1 = 0.9,
                    double beta2 = 0.999, double eps = 1e-8, double momentum_decay = 4e-3) {
  // lr 0.1 and weight decay 0.3, as Adam's: every option moves bf16 params by ulps.
  return make_args<NAdam>(0.1, {beta1, beta2, eps, wd, momentum_decay}, {maximize, decoupled});
}

// mu_t with torch's defaults (beta1 0.9, momentum_decay 4e-3): the initial states' products.
double nadam_default_mu(double step) { return 0.9 * (1.0 - 0.5 * std::pow(0.96, step * 4e-3)); }

OptimizerEntry nadam_entry() {
  OptimizerEntry e = entry_of<NAdam>();
  e.lists = [](const fm::Args&) { return fm::required_lists<NAdam>(); };
  // Tensor t has taken step_for_tensor(t) - 1 steps with torch's default beta1 and
  // momentum_decay: mu_product is their product as torch's default float32 state
  // tensor keeps it (`mu_product *= mu`: mu rounded to float32, the product too), 1
  // before a first step (torch's initial value), 0 before step 1000 (it underflows).
  // Every value is a float32 one, the same whether the tests store it in float32 or
  // float64.
  e.initial_state = [](int64_t t, double* s) {
    s[NAdam::kStep] = step_for_tensor(t) - 1;
    float product = 1.0f;
    for (double k = 1; k <= s[NAdam::kStep]; ++k) {
      product = product * static_cast<float>(nadam_default_mu(k));
    }
    s[NAdam::kMuProduct] = product;
  };
  // step_t += 1; mu = beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay)); mu_product *= mu,
  // with mu rounded to float32 first on a float32 mu_product (as torch's in-place mul).
  e.advance_reference = [](const fm::Args& a, double* s, const bool* is_double) {
    s[NAdam::kStep] = s[NAdam::kStep] + 1;
    const double step = s[NAdam::kStep];
    const double mu = a.floats[NAdam::kBeta1] *
                      (1.0 - 0.5 * std::pow(0.96, step * a.floats[NAdam::kMomentumDecay]));
    s[NAdam::kMuProduct] =
        s[NAdam::kMuProduct] * (is_double[NAdam::kMuProduct] ? mu : static_cast<float>(mu));
  };
  e.fill = adam_fill_of<NAdam>;
  e.reference = reference_of<nadam_reference<double>, nadam_reference<long double>>;
  const double lr_bf16 = oracle_bf16_to_float(oracle_float_to_bf16(0.1f));
  e.cases = {
      {"nadam", nadam_args(0.0, false, false), false, 1.0f},
      {"nadam_l2", nadam_args(0.3, false, false), false, 1.0f},
      {"nadamw", nadam_args(0.3, true, false), false, 1.0f},
      {"nadamw_wd0", nadam_args(0.0, true, false), false, 1.0f},
      {"nadam_maximize", nadam_args(0.0, false, true), false, 1.0f},
      {"nadam_maximize_l2", nadam_args(0.3, false, true), false, 1.0f},
      {"nadamw_maximize", nadam_args(0.3, true, true), false, 1.0f},
      {"nadam_grad_scale_pow2_l2", nadam_args(0.3, false, false), true, 1024.0f},
      {"nadamw_grad_scale_3_maximize", nadam_args(0.3, true, true), true, 3.0f},
      // Other betas, a large eps and momentum_decay, so no constant is hard-wired.
      {"nadam_odd_betas_eps_momentum_decay", nadam_args(0.3, false, false, 0.5, 0.99, 1e-2, 0.5),
       true, 0.5f},
      {"nadamw_lr_float32", with_lr(nadam_args(0.3, true, false), kLrFloat32,
                                    fm::LrDType::kFloat32), false, 1.0f},
      {"nadam_l2_lr_bfloat16", with_lr(nadam_args(0.3, false, false), lr_bf16,
                                       fm::LrDType::kBFloat16), true, 2.0f},
  };
  e.engine_case = {"nadamw_maximize_scaled", nadam_args(0.3, true, true), true, 3.0f};
  e.step_case = [](int step) {
    return OptCase{step == 1 ? "nadam_l2" : "nadamw", nadam_args(0.3, step != 1, false), false,
                   1.0f};
  };

  TeethOf t{e, {"nadam_l2", nadam_args(0.3, false, false), false, 1.0f}};
  t.args("maximize", nadam_args(0.3, false, true), NAdam::kParam);
  t.args("L2 -> decoupled", nadam_args(0.3, true, false), NAdam::kParam);
  t.args("L2 -> none", nadam_args(0.0, false, false), NAdam::kExpAvg);
  t.args("beta1", nadam_args(0.3, false, false, 0.8), NAdam::kExpAvg);
  t.args("beta2", nadam_args(0.3, false, false, 0.9, 0.99), NAdam::kExpAvgSq);
  t.grad_scale(NAdam::kExpAvg);
  t.steps(999, NAdam::kParam);  // step 1000 instead of 1: bias correction, mu, mu_product
  t.lr_float32(NAdam::kParam);
  // Step 1000, where 1 - beta2^t no longer makes the denominator >= 1 (sqrt(v / 0.001)
  // at step 1) and c1 depends on mu (at step 1 c1 = -lr, mu_product = mu): eps, lr and
  // momentum_decay move the update by more there (at step 10 lr moved less than half
  // of the bf16 params beyond the tolerance).
  TeethOf t10{e, {"nadam_l2", nadam_args(0.3, false, false), false, 1.0f}, 999};
  t10.args("eps", nadam_args(0.3, false, false, 0.9, 0.999, 0.5), NAdam::kParam, 0.1);
  t10.args("lr", with_lr(nadam_args(0.3, false, false), 0.05, fm::LrDType::kFloat64),
           NAdam::kParam);
  t10.args("momentum_decay", nadam_args(0.3, false, false, 0.9, 0.999, 1e-8, 2.0),
           NAdam::kParam);
  return e;
}

// ---------------------------------------------------------------------------------------
// RAdam

using fm::RAdam;

fm::Args radam_args(double wd, bool decoupled, bool maximize, double beta1 = 0.9,
                    double beta2 = 0.999, double eps = 1e-8) {
  return make_args<RAdam>(0.1, {beta1, beta2, eps, wd}, {maximize, decoupled});
}

OptimizerEntry radam_entry() {
  OptimizerEntry e = entry_of<RAdam>();
  e.lists = [](const fm::Args&) { return fm::required_lists<RAdam>(); };
  // Steps 1, 5, 3, 2 (rho_t <= 5: plain momentum) and 10, 1000 (rectified) in one call;
  // tensor 1 takes steps 5, 6, 7 in the multi-step test (three tensors): its branch
  // changes there, at step 6 (rho_t = 5.994 with beta2 = 0.999).
  e.initial_state = [](int64_t t, double* s) {
    static const double steps[] = {1, 5, 3, 10, 1000, 2};
    s[0] = steps[t % 6] - 1;
  };
  e.advance_reference = [](const fm::Args&, double* s, const bool*) { s[0] = s[0] + 1; };
  e.fill = adam_fill_of<RAdam>;
  e.reference = reference_of<radam_reference<double>, radam_reference<long double>>;
  e.cases = {
      {"radam", radam_args(0.0, false, false), false, 1.0f},
      {"radam_l2", radam_args(0.3, false, false), false, 1.0f},
      {"radamw", radam_args(0.3, true, false), false, 1.0f},
      {"radamw_wd0", radam_args(0.0, true, false), false, 1.0f},
      {"radam_maximize", radam_args(0.0, false, true), false, 1.0f},
      {"radam_maximize_l2", radam_args(0.3, false, true), false, 1.0f},
      {"radamw_maximize", radam_args(0.3, true, true), false, 1.0f},
      {"radam_grad_scale_pow2_l2", radam_args(0.3, false, false), true, 1024.0f},
      {"radamw_grad_scale_3_maximize", radam_args(0.3, true, true), true, 3.0f},
      // beta2 0.99: rho_t > 5 from step 6 as well, with other rectification terms.
      {"radam_odd_betas_eps", radam_args(0.3, false, false, 0.5, 0.99, 1e-2), true, 0.5f},
      // lr's dtype rounds 1 - lr * weight_decay only (`* lr` takes its value).
      {"radamw_lr_float32", with_lr(radam_args(0.3, true, false), kLrFloat32,
                                    fm::LrDType::kFloat32), false, 1.0f},
  };
  e.engine_case = {"radamw_maximize_scaled", radam_args(0.3, true, true), true, 3.0f};
  e.step_case = [](int step) {
    return OptCase{step == 1 ? "radam_l2" : "radamw", radam_args(0.3, step != 1, false), false,
                   1.0f};
  };

  // Step 1000: rectified, where eps and beta2 reach the params (at step 10 r_t ~ 0.05
  // keeps the update below a bf16 ulp of most params).
  TeethOf t{e, {"radam_l2", radam_args(0.3, false, false), false, 1.0f}, 999};
  t.args("maximize", radam_args(0.3, false, true), RAdam::kParam);
  t.args("L2 -> decoupled", radam_args(0.3, true, false), RAdam::kParam);
  t.args("L2 -> none", radam_args(0.0, false, false), RAdam::kExpAvg);
  t.args("beta1", radam_args(0.3, false, false, 0.8), RAdam::kExpAvg);
  t.args("beta2", radam_args(0.3, false, false, 0.9, 0.99), RAdam::kExpAvgSq);
  t.args("beta2 (rectification)", radam_args(0.3, false, false, 0.9, 0.99), RAdam::kParam, 0.2);
  t.args("eps", radam_args(0.3, false, false, 0.9, 0.999, 0.5), RAdam::kParam, 0.1);
  t.args("lr", with_lr(radam_args(0.3, false, false), 0.05, fm::LrDType::kFloat64),
         RAdam::kParam);
  t.grad_scale(RAdam::kExpAvg);
  // Step 1: plain momentum, no sqrt(v) in the update; step 1 -> 10 switches the branch.
  TeethOf t1{e, {"radam_l2", radam_args(0.3, false, false), false, 1.0f}};
  t1.args("maximize (unrectified)", radam_args(0.3, false, true), RAdam::kParam);
  t1.steps(9, RAdam::kParam);
  // Step 10 -> 1000: r_t from ~0.05 to ~0.65, other bias corrections.
  TeethOf t10{e, {"radam_l2", radam_args(0.3, false, false), false, 1.0f}, 9};
  t10.steps(990, RAdam::kParam);
  TeethOf tw{e, {"radamw", radam_args(0.3, true, false), false, 1.0f}, 9};
  tw.lr_float32(RAdam::kParam);  // 1 - lr * weight_decay in float32
  return e;
}

// ---------------------------------------------------------------------------------------
// ASGD

using fm::Asgd;

// lr 0.1 and lambd 0.5 (torch's defaults are 0.01 and 1e-4, which would leave the decay
// 1 - lambd * eta inside one ulp of 1): lambd, alpha and t0 move the params by ulps.
fm::Args asgd_args(double wd, bool maximize, double lambd = 0.5, double alpha = 0.75,
                   double t0 = 2.0) {
  return make_args<Asgd>(0.1, {lambd, alpha, t0, wd}, {maximize});
}

// The state torch stores after `done` steps of lr 0.1, lambd 0.5, alpha 0.75 and t0 `t0`:
// eta = lr and mu = 1 before a first step (torch's initial values), else the last
// step's eta = lr / (1 + lambd * lr * done) ** alpha and mu = 1 / max(1, done - t0),
// copied into torch's default float32 state tensors: float32 values, the same whether
// the tests store them in float32 or float64 (the update reads them as stored).
void asgd_state_after(double done, double t0, double* s) {
  const double eta = done == 0 ? 0.1 : 0.1 / std::pow(1.0 + 0.5 * 0.1 * done, 0.75);
  const double mu = done == 0 ? 1.0 : 1.0 / std::max(1.0, done - t0);
  s[Asgd::kStep] = done;
  s[Asgd::kEta] = static_cast<float>(eta);
  s[Asgd::kMu] = static_cast<float>(mu);
}

void asgd_fill(Rng& rng, const OptCase& c, double* x) {
  const FillStart f = fill_start(rng, c);
  const double sgn_a = random_sign(rng);
  fill_param_grad(rng, f, grad_magnitude(rng), &x[Asgd::kParam], &x[Asgd::kGrad]);
  x[Asgd::kAx] = f.fresh ? 0.0 : sgn_a * rng.uniform(0, 2.0);
}

OptimizerEntry asgd_entry() {
  OptimizerEntry e = entry_of<Asgd>();
  e.lists = [](const fm::Args&) { return fm::required_lists<Asgd>(); };
  // Steps 1, 2, 3, 10, 1000, 7 with t0 = 2: mu == 1 for the first three (ax = param),
  // 1/7, 1/997, 1/4 for the others (ax moves toward param).
  e.initial_state = [](int64_t t, double* s) { asgd_state_after(step_for_tensor(t) - 1, 2.0, s); };
  // step_t += 1; eta = lr / ((1 + lambd * lr * step) ** alpha); mu = 1 / max(1, step - t0),
  // with Python floats, or in lr's dtype with an lr tensor.
  // torch.as_tensor(Python float) is a tensor of the default dtype: float32 where the
  // step (created in it) is float32.
  e.advance_reference = [](const fm::Args& a, double* s, const bool* is_double) {
    const TorchLr lr{a.lr_dtype};
    const double step = s[Asgd::kStep] + 1;
    const auto as_tensor = [&](double v) {
      return is_double[Asgd::kStep] ? v : static_cast<double>(static_cast<float>(v));
    };
    s[Asgd::kStep] = step;
    s[Asgd::kEta] = as_tensor(lr.div(
        a.lr, lr.pow(lr.add(1.0, lr.mul(lr.mul(a.floats[Asgd::kLambd], a.lr), step)),
                     a.floats[Asgd::kAlpha])));
    s[Asgd::kMu] = as_tensor(1.0 / std::max(1.0, step - a.floats[Asgd::kT0]));
  };
  e.fill = asgd_fill;
  e.reference = reference_of<asgd_reference<double>, asgd_reference<long double>>;
  e.cases = {
      {"asgd", asgd_args(0.0, false), false, 1.0f},
      {"asgd_wd", asgd_args(0.2, false), false, 1.0f},
      {"asgd_maximize", asgd_args(0.0, true), false, 1.0f},
      {"asgd_maximize_wd", asgd_args(0.2, true), false, 1.0f},
      // torch's default lambd, alpha and t0 (mu stays 1 after the advance).
      {"asgd_torch_defaults_wd", asgd_args(0.2, false, 1e-4, 0.75, 1e6), false, 1.0f},
      {"asgd_alpha_t0_0", asgd_args(0.2, false, 0.5, 0.5, 0.0), false, 1.0f},
      {"asgd_grad_scale_pow2_wd", asgd_args(0.2, false), true, 1024.0f},
      {"asgd_grad_scale_3_maximize_wd", asgd_args(0.2, true), true, 3.0f},
      // lr reaches only the advance (the next step's eta): in float32 there.
      {"asgd_wd_lr_float32", with_lr(asgd_args(0.2, false), kLrFloat32, fm::LrDType::kFloat32),
       true, 0.5f},
      // alpha not a float32 value: torch's float32 pow takes the exponent unrounded.
      {"asgd_alpha_0.6_lr_float32",
       with_lr(asgd_args(0.2, false, 0.5, 0.6), kLrFloat32, fm::LrDType::kFloat32), false, 1.0f},
  };
  e.engine_case = {"asgd_wd_maximize_scaled", asgd_args(0.2, true), true, 2.0f};
  // The later steps compute with the eta and mu the earlier ones stored (t0 0: mu != 1).
  e.step_case = [](int step) {
    return OptCase{step == 2 ? "asgd_wd_t0_0_maximize" : "asgd_wd_t0_0",
                   asgd_args(0.2, step == 2, 0.5, 0.75, 0.0), false, 1.0f};
  };

  e.nan_lr_lists = 0;  // lr reaches the next step's eta only, not this step's params

  // Step 5: eta and mu from the advance of step 4 with each case's lr, lambd, alpha, t0
  // (t0 2: mu = 1/2).
  TeethOf t{e, {"asgd_wd", asgd_args(0.2, false), false, 1.0f}, 4};
  t.args("maximize", asgd_args(0.2, true), Asgd::kParam);
  t.args("weight decay", asgd_args(0.0, false), Asgd::kParam);
  t.args("lambd", asgd_args(0.2, false, 0.1), Asgd::kParam);
  t.args("alpha", asgd_args(0.2, false, 0.5, 0.25), Asgd::kParam, 0.2);
  t.args("t0 (mu 1/2 -> 1)", asgd_args(0.2, false, 0.5, 0.75, 1e6), Asgd::kAx);
  t.args("lr", with_lr(asgd_args(0.2, false), 0.05, fm::LrDType::kFloat64), Asgd::kParam);
  t.grad_scale(Asgd::kParam);
  t.steps(4, Asgd::kAx);  // mu 1/2 -> 1/6
  t.lr_float32(Asgd::kParam);
  // Step 1: eta and mu are torch's initial ones (lr, 1): ax = param.
  TeethOf t1{e, {"asgd_wd", asgd_args(0.2, false), false, 1.0f}};
  t1.steps(4, Asgd::kAx);
  return e;
}

// ---------------------------------------------------------------------------------------
// Rprop

using fm::Rprop;

fm::Args rprop_args(bool maximize, double step_size_min = 1e-3, double step_size_max = 1.0,
                    double etaminus = 0.5, double etaplus = 1.2) {
  // lr only sets torch's initial step sizes: never read by the step.
  return make_args<Rprop>(0.01, {step_size_min, step_size_max, etaminus, etaplus}, {maximize});
}

// prev of both signs and 0 (torch's initial value; "fresh" elements and a tenth of the
// others): of the sign of the grad as the update sees it (negated with maximize) for
// two thirds of the others (a descent that keeps its direction: etaplus, the param
// moves), opposite for a third (etaminus, the param stays); step sizes at either bound
// (where the clamp holds them) and between.
void rprop_fill(Rng& rng, const OptCase& c, double* x) {
  const FillStart f = fill_start(rng, c);
  // torch's prev is the last step's grad as the update saw it: negated with maximize.
  const double sgn_step = c.args.flags[Rprop::kMaximize] ? -f.sgn_g : f.sgn_g;
  const double sgn_prev = rng.chance(2.0 / 3.0) ? sgn_step : -sgn_step;
  const double lo = c.args.floats[Rprop::kStepSizeMin], hi = c.args.floats[Rprop::kStepSizeMax];
  fill_param_grad(rng, f, grad_magnitude(rng), &x[Rprop::kParam], &x[Rprop::kGrad]);
  x[Rprop::kPrev] = f.fresh || rng.chance(0.1) ? 0.0 : sgn_prev * grad_magnitude(rng);
  const double where = rng.uniform();
  x[Rprop::kStepSize] = where < 0.15 ? lo : where < 0.3 ? hi : rng.uniform(lo, hi);
}

OptimizerEntry rprop_entry() {
  OptimizerEntry e = entry_of<Rprop>();
  e.lists = [](const fm::Args&) { return fm::required_lists<Rprop>(); };
  use_step_count_state(e);
  e.fill = rprop_fill;
  e.reference = reference_of<rprop_reference<double>, rprop_reference<long double>>;
  e.cases = {
      {"rprop", rprop_args(false), false, 1.0f},
      {"rprop_maximize", rprop_args(true), false, 1.0f},
      {"rprop_odd_etas_bounds", rprop_args(false, 0.05, 0.3, 0.3, 1.5), false, 1.0f},
      // torch's default step_sizes.
      {"rprop_torch_bounds_maximize", rprop_args(true, 1e-6, 50.0), false, 1.0f},
      // step_size_min > step_size_max: clamp gives step_size_max.
      {"rprop_crossed_bounds", rprop_args(false, 0.5, 0.1), false, 1.0f},
      {"rprop_grad_scale_pow2", rprop_args(false), true, 1024.0f},
      {"rprop_grad_scale_3_maximize", rprop_args(true, 0.05, 0.3, 0.3, 1.5), true, 3.0f},
  };
  e.engine_case = {"rprop_maximize_scaled", rprop_args(true), true, 2.0f};
  e.step_case = [](int step) {
    return OptCase{"rprop", rprop_args(step == 1), false, 1.0f};
  };

  TeethOf t{e, {"rprop", rprop_args(false), false, 1.0f}};
  t.args("maximize", rprop_args(true), Rprop::kParam, 0.3);
  // Each eta reaches the products of its sign (~55% of elements positive, ~28% negative).
  t.args("etaplus", rprop_args(false, 1e-3, 1.0, 0.5, 1.5), Rprop::kStepSize, 0.2);
  t.args("etaminus", rprop_args(false, 1e-3, 1.0, 0.3, 1.2), Rprop::kStepSize, 0.2);
  t.args("step_size_min", rprop_args(false, 0.2, 1.0), Rprop::kStepSize, 0.2);
  t.args("step_size_max", rprop_args(false, 1e-3, 0.5), Rprop::kStepSize, 0.2);
  t.grad_scale(Rprop::kPrev);  // only prev sees the grads' magnitude
  e.nan_lr_lists = 0;  // no lr
  // sign(NaN) = 0: params and step sizes keep their values.
  e.nan_grad_scale_lists = fm::bit(Rprop::kGrad) | fm::bit(Rprop::kPrev);
  return e;
}

}  // namespace

const std::vector<std::string>& registered_optimizers() {
  static const std::vector<std::string> names = {
#define FO_TEST_NAME_OF(Name) #Name,
      FO_FOR_EACH_OPTIMIZER(FO_TEST_NAME_OF)
#undef FO_TEST_NAME_OF
  };
  return names;
}

const std::vector<OptimizerEntry>& optimizer_table() {
  static const std::vector<OptimizerEntry> table = {
      adam_entry(),   sgd_entry(),   adagrad_entry(), rmsprop_entry(), adadelta_entry(),
      adamax_entry(), nadam_entry(), radam_entry(),   asgd_entry(),    rprop_entry()};
  return table;
}

// Registered optimizers whose reference and cases are still to be written: each is
// named by optimizer_table_covers_every_registered_optimizer on every run.
const std::vector<std::string>& no_cpp_reference_yet() {
  // Muon's element-wise stages are checked bit for bit against torch.optim.Muon by
  // tests/test_muon.py (its bf16 work list needs a table entry of another shape).
  static const std::vector<std::string> names = {"Muon"};
  return names;
}

const OptimizerEntry& entry_for_id(int id) {
  for (const OptimizerEntry& e : optimizer_table()) {
    if (e.id == id) return e;
  }
  throw std::logic_error("no optimizer table entry for id " + std::to_string(id));
}

std::vector<double> states_before(const OptimizerEntry& e, const fm::Args& a, int64_t n_tensors,
                                  int steps_done) {
  std::vector<double> s(static_cast<size_t>(n_tensors * e.n_states));
  for (int64_t t = 0; t < n_tensors && e.n_states > 0; ++t) {
    double* st = s.data() + t * e.n_states;
    e.initial_state(t, st);
    const bool is_double[fm::kMaxStates] = {true, true, true, true};
    for (int k = 0; k < steps_done; ++k) e.advance_reference(a, st, is_double);
  }
  return s;
}

std::vector<double> advanced(const OptimizerEntry& e, const fm::Args& a,
                             const std::vector<double>& before, bool header,
                             bool states_double) {
  std::vector<double> s = before;
  for (size_t i = 0; e.n_states > 0 && i < s.size(); i += e.n_states) {
    double buf[2 * fm::kMaxStates];
    std::memcpy(buf, s.data() + i, sizeof(double) * e.n_states);
    if (header) {
      const bool is_double[fm::kMaxStates] = {states_double, states_double, states_double,
                                              states_double};
      e.advance(a, buf, is_double);
    } else {
      const bool is_double[fm::kMaxStates] = {states_double, states_double, states_double,
                                              states_double};
      e.advance_reference(a, buf, is_double);
    }
    std::memcpy(s.data() + i, buf, sizeof(double) * e.n_states);
  }
  return s;
}

std::vector<double> step_state(const OptimizerEntry& e, const fm::Args& a,
                               const std::vector<double>& before, bool header) {
  return step_state_of(e, advanced(e, a, before, header), before);
}

std::vector<double> step_state_of(const OptimizerEntry& e, const std::vector<double>& after,
                                  const std::vector<double>& before) {
  const size_t ns = static_cast<size_t>(e.n_states);
  std::vector<double> out(2 * after.size());
  for (size_t t = 0; ns > 0 && t < after.size() / ns; ++t) {
    for (size_t j = 0; j < ns; ++j) {
      out[2 * ns * t + j] = after[ns * t + j];
      out[2 * ns * t + ns + j] = before[ns * t + j];
    }
  }
  return out;
}

}  // namespace fo_test
