// The factored-moment engine on the CPU: torch.ops.fused_optim.adafactor_, the Adafactor
// step of every param of a (device, dtype) bucket (fused_optim/_factored.py builds the
// call; the math is fused_optim/math/adafactor.h).
//
//   adafactor_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] row_vars,
//              Tensor(c!)[] col_vars, Tensor(d!)[] variances, Tensor(e!)[] state_steps, *,
//              Tensor lr, float beta2_decay, float eps1, float eps2, float d,
//              float weight_decay, bool maximize) -> ()
//
// The first len(row_vars) params have 2+ dims and their factors (row_var shaped
// [..., m, 1], col_var [..., 1, n], torch.optim's state as it is); the others are
// vectors (any param of fewer dims) with their variance. state_steps are one-element
// float32 / float64 tensors; eps1 is resolved (torch's None: the dtype's eps).
//
// One call: the per-tensor work before pass 1 (step + 1, 1 - beta2_t) on the host; then
// ONE parallel region per pass over work items of every tensor (a vector: 64K elements;
// a matrix: whole rows, ~64K elements), threads taking contiguous item ranges cut by
// element count; between the passes the per-tensor and per-row / column work (sums of
// the items' partials in item order, so results do not depend on which thread ran
// what, the factors' update, alpha, the clipping denominator) in a parallel loop over
// tensors. No value leaves for Python: nothing syncs. See csrc/cpu/factored_impl.h for
// the passes and their bytes.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernel_api.h"
#include "fused_optim/math/adafactor.h"
#include "ops_common.h"

namespace fused_optim {
namespace {

constexpr const char* kOp = "fused_optim::adafactor_";
// Elements per work item (a matrix's items take whole rows: at least one).
constexpr int64_t kItemElements = 65536;

// The storage dtype's rounding on the host (what the kernels' RowRounding does).
template <typename T>
struct HostRounding {
  using opmath = float;
  static float r(float x) { return static_cast<float>(static_cast<T>(x)); }
};
template <>
struct HostRounding<float> {
  using opmath = float;
  static float r(float x) { return x; }
};
template <>
struct HostRounding<double> {
  using opmath = double;
  static double r(double x) { return x; }
};

template <typename T>
double round_to_storage(double x) {
  using O = typename HostRounding<T>::opmath;
  return static_cast<double>(HostRounding<T>::r(static_cast<O>(x)));
}

template <typename T>
double load(const void* p, int64_t i) {
  return static_cast<double>(static_cast<typename HostRounding<T>::opmath>(
      static_cast<const T*>(p)[i]));
}

template <typename T>
void store(void* p, int64_t i, typename HostRounding<T>::opmath x) {
  static_cast<T*>(p)[i] = static_cast<T>(x);
}

// One tensor's state between passes.
struct TensorWork {
  int64_t item_begin = 0, item_end = 0;
  int64_t numel = 0;
  double step = 0;
  math::Adafactor::TensorScalars scalars{};
};

// The factors' update and their clamped row means of tensor t (after pass 1), in its
// storage type T: column sums of the items' partials in item order.
template <typename T>
void update_factors(const cpu::FactoredCall& call, const cpu::FactoredTensor& t,
                    const TensorWork& w, double eps1, double* means) {
  using R = HostRounding<T>;
  using O = typename R::opmath;
  using A = math::Adafactor;
  const int64_t m = t.rows, n = t.cols;
  const O weight = static_cast<O>(w.scalars.weight);
  std::vector<double> col(n);
  int64_t k = w.item_begin;
  for (int64_t b = 0; b < t.batches; ++b) {
    std::fill(col.begin(), col.end(), 0.0);
    for (; k < w.item_end && call.items[k].batch == b; ++k) {
      const double* part = call.col_partials + call.items[k].col_offset;
      for (int64_t j = 0; j < n; ++j) col[j] += part[j];
    }
    for (int64_t j = 0; j < n; ++j) {
      const O target = A::mean_square<R>(col[j], static_cast<O>(m));
      const O old = static_cast<O>(load<T>(t.col_var, b * n + j));
      store<T>(t.col_var, b * n + j, A::moved<R>(old, target, weight));
    }
    double row_total = 0.0;
    for (int64_t i = 0; i < m; ++i) {
      const O target = A::mean_square<R>(t.row_sums[b * m + i], static_cast<O>(n));
      const O old = static_cast<O>(load<T>(t.row_var, b * m + i));
      const O now = R::r(A::moved<R>(old, target, weight));
      store<T>(t.row_var, b * m + i, now);
      row_total += static_cast<double>(now);
    }
    // row_var.mean(dim=-2).clamp_(min=eps1), in the storage dtype.
    O mean = R::r(static_cast<O>(row_total) / static_cast<O>(m));
    const O floor = R::r(static_cast<O>(eps1));
    if (mean < floor) mean = floor;
    means[b] = static_cast<double>(mean);
  }
}

template <typename F>
void dispatch_storage(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::Double: f(double{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, kOp, ": unsupported dtype ", dtype);
  }
}

void check_call(at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                at::TensorList col_vars, at::TensorList variances, at::TensorList steps,
                const at::Tensor& lr) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && steps.size() == n, kOp, ": expected one grad and one "
              "state_step per param (", n, "), got ", grads.size(), " and ", steps.size());
  TORCH_CHECK(row_vars.size() == col_vars.size() && row_vars.size() + variances.size() == n,
              kOp, ": expected row_vars and col_vars for the first params and variances for "
              "the rest (", n, " params), got ", row_vars.size(), ", ", col_vars.size(), " and ",
              variances.size());
  TORCH_CHECK(lr.numel() == 1, kOp, ": lr must be a one-element tensor, got shape ", lr.sizes());
  TORCH_CHECK(lr.device().is_cpu() && (lr.scalar_type() == at::kFloat ||
                                        lr.scalar_type() == at::kDouble),
              kOp, ": lr must be a float32 or float64 CPU tensor, got ", lr.scalar_type(),
              " on ", lr.device());
  if (n == 0) return;
  const c10::ScalarType dtype = params[0].scalar_type();
  (void)to_kernel_dtype(kOp, dtype);
  const size_t kf = row_vars.size();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(p.device().is_cpu() && p.layout() == c10::kStrided && p.is_contiguous(), kOp,
                ": params[", i, "] must be a contiguous CPU tensor");
    TORCH_CHECK(p.scalar_type() == dtype, kOp, ": all params of one call must have one "
                "dtype; params[", i, "] is ", p.scalar_type(), ", params[0] is ", dtype);
    TORCH_CHECK(g.device() == p.device() && g.layout() == c10::kStrided && g.is_contiguous() &&
                    g.scalar_type() == dtype && g.sizes() == p.sizes(),
                kOp, ": grads[", i, "] must be a contiguous ", dtype, " tensor shaped like "
                "params[", i, "] ", p.sizes(), ", got ", g.scalar_type(), " ", g.sizes());
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.device().is_cpu() && s.numel() == 1 &&
                    (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                kOp, ": state_steps[", i, "] must be a one-element float32 or float64 CPU "
                "tensor, got ", s.scalar_type(), " ", s.sizes(), " on ", s.device());
    const auto state_ok = [&](const at::Tensor& t, int64_t numel) {
      return t.device() == p.device() && t.layout() == c10::kStrided && t.is_contiguous() &&
             t.scalar_type() == dtype && t.numel() == numel;
    };
    if (i < kf) {
      TORCH_CHECK(p.dim() >= 2, kOp, ": params[", i, "] has row_vars and col_vars but ",
                  p.dim(), " dims; a factored param has 2 or more");
      const int64_t m = p.size(-2), cols = p.size(-1);
      const int64_t batches = m * cols == 0 ? 0 : p.numel() / (m * cols);
      TORCH_CHECK(state_ok(row_vars[i], batches * m) && state_ok(col_vars[i], batches * cols),
                  kOp, ": row_vars[", i, "] and col_vars[", i, "] must be contiguous ", dtype,
                  " tensors of ", batches * m, " and ", batches * cols, " elements (params[", i,
                  "] is ", p.sizes(), "), got ", row_vars[i].sizes(), " and ",
                  col_vars[i].sizes());
    } else {
      TORCH_CHECK(state_ok(variances[i - kf], p.numel()), kOp, ": variances[", i - kf,
                  "] must be a contiguous ", dtype, " tensor shaped like params[", i, "] ",
                  p.sizes(), ", got ", variances[i - kf].sizes());
    }
  }
}

// Runs `fn` over items [0, n_items) in one parallel region: thread j of T takes the
// items that start in its 1/T of the elements.
void run_items(const std::vector<int64_t>& starts, int64_t total,
               const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t n_items = static_cast<int64_t>(starts.size());
  if (n_items == 0) return;
  const int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / kItemElements));
  if (threads == 1) {
    fn(0, n_items);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t lo = total * j / threads, hi = total * (j + 1) / threads;
      const int64_t a = std::lower_bound(starts.begin(), starts.end(), lo) - starts.begin();
      const int64_t b = std::lower_bound(starts.begin(), starts.end(), hi) - starts.begin();
      if (a < b) fn(a, b);
    }
  });
}

void adafactor_cpu(at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                   at::TensorList col_vars, at::TensorList variances, at::TensorList steps,
                   const at::Tensor& lr, double beta2_decay, double eps1, double eps2,
                   double d, double weight_decay, bool maximize) {
  check_call(params, grads, row_vars, col_vars, variances, steps, lr);
  const size_t n = params.size();
  if (n == 0) return;
  const size_t kf = row_vars.size();
  const c10::ScalarType dtype = params[0].scalar_type();
  // Host memory: read without a dispatcher call (no _local_scalar_dense).
  const double lr_value = lr.scalar_type() == at::kDouble ? *lr.const_data_ptr<double>()
                                                          : *lr.const_data_ptr<float>();
  const math::LrDType lr_dt = lr_dtype(kOp, lr);

  std::vector<cpu::FactoredTensor> tensors(n);
  std::vector<TensorWork> work(n);
  std::vector<cpu::FactoredItem> items;
  std::vector<int64_t> starts;  // each item's first element in the whole bucket
  int64_t total = 0, col_total = 0, row_total = 0, batch_total = 0;
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    cpu::FactoredTensor& ft = tensors[t];
    TensorWork& w = work[t];
    w.numel = p.numel();
    ft.param = p.data_ptr();
    ft.grad = grads[t].const_data_ptr();
    ft.row_var = ft.col_var = ft.variance = nullptr;
    w.item_begin = static_cast<int64_t>(items.size());
    if (t < kf) {
      ft.rows = p.size(-2);
      ft.cols = p.size(-1);
      ft.batches = w.numel == 0 ? 0 : w.numel / (ft.rows * ft.cols);
      ft.row_var = row_vars[t].data_ptr();
      ft.col_var = col_vars[t].data_ptr();
      const int64_t rows_per_item = std::max<int64_t>(1, kItemElements / ft.cols);
      for (int64_t b = 0; b < ft.batches; ++b) {
        for (int64_t i = 0; i < ft.rows; i += rows_per_item) {
          const int64_t e = std::min(ft.rows, i + rows_per_item);
          items.push_back({static_cast<int64_t>(t), b, i, e, col_total});
          starts.push_back(total);
          total += (e - i) * ft.cols;
          col_total += ft.cols;
        }
      }
      row_total += ft.batches * ft.rows;
      batch_total += ft.batches;
    } else {
      ft.rows = ft.batches = 1;
      ft.cols = w.numel;
      ft.variance = variances[t - kf].data_ptr();
      for (int64_t i = 0; i < w.numel; i += kItemElements) {
        const int64_t e = std::min(w.numel, i + kItemElements);
        items.push_back({static_cast<int64_t>(t), 0, i, e, 0});
        starts.push_back(total);
        total += e - i;
      }
    }
    w.item_end = static_cast<int64_t>(items.size());
  }
  std::vector<double> sums(items.size()), col_partials(col_total), row_sums(row_total),
      means(batch_total);
  {
    int64_t r = 0, b = 0;
    for (size_t t = 0; t < kf; ++t) {
      tensors[t].row_sums = row_sums.data() + r;
      tensors[t].means = means.data() + b;
      r += tensors[t].batches * tensors[t].rows;
      b += tensors[t].batches;
    }
  }
  // Before pass 1: step + 1 (stored in the step's dtype) and 1 - beta2_t.
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& s = steps[t];
    double step;
    if (s.scalar_type() == at::kDouble) {
      step = *s.data_ptr<double>() + 1.0;
      *s.data_ptr<double>() = step;
    } else {
      const float f = static_cast<float>(*s.data_ptr<float>() + 1.0f);
      *s.data_ptr<float>() = f;
      step = f;
    }
    work[t].step = step;
    tensors[t].weight = std::pow(step, beta2_decay);
  }

  cpu::FactoredCall call;
  call.dtype = to_kernel_dtype(kOp, dtype);
  call.maximize = maximize;
  call.decay = weight_decay != 0.0;
  call.eps1_sq = eps1 * eps1;
  call.decay_factor =
      math::LrMath{lr_dt}.sub(1.0, math::LrMath{lr_dt}.mul(lr_value, weight_decay));
  call.tensors = tensors.data();
  call.items = items.data();
  call.sums = sums.data();
  call.col_partials = col_partials.data();
  const cpu::KernelSet& kernels = cpu::active_kernels();

  run_items(starts, total, [&](int64_t a, int64_t b) { kernels.adafactor[0](call, a, b); });
  // Between passes 1 and 2: alpha, the factors and their means, per tensor.
  dispatch_storage(dtype, [&](auto storage) {
    using T = decltype(storage);
    at::parallel_for(0, static_cast<int64_t>(n), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        TensorWork& w = work[t];
        if (w.numel == 0) continue;
        double psq = 0.0;
        for (int64_t k = w.item_begin; k < w.item_end; ++k) psq += sums[k];
        const double norm = round_to_storage<T>(std::sqrt(psq));
        w.scalars = math::Adafactor::tensor_scalars(w.step, lr_value, lr_dt, beta2_decay, eps2,
                                                    weight_decay, norm,
                                                    static_cast<double>(w.numel));
        if (static_cast<size_t>(t) < kf) {
          update_factors<T>(call, tensors[t], w, eps1, const_cast<double*>(tensors[t].means));
        }
      }
    });
  });
  run_items(starts, total, [&](int64_t a, int64_t b) { kernels.adafactor[1](call, a, b); });
  dispatch_storage(dtype, [&](auto storage) {
    using T = decltype(storage);
    for (size_t t = 0; t < n; ++t) {
      const TensorWork& w = work[t];
      if (w.numel == 0) continue;
      double usq = 0.0;
      for (int64_t k = w.item_begin; k < w.item_end; ++k) usq += sums[k];
      const double norm = round_to_storage<T>(std::sqrt(usq));
      tensors[t].step_alpha = math::Adafactor::step_alpha(w.scalars, lr_dt, norm,
                                                          static_cast<double>(w.numel), d);
    }
  });
  run_items(starts, total, [&](int64_t a, int64_t b) { kernels.adafactor[2](call, a, b); });
}

// [note: version counters of mutated tensors] in csrc/ops.cpp: params, the factors,
// the variances and the steps.
void adafactor_bump(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                    torch::jit::Stack* stack) {
  const size_t base = stack->size() - 13;
  std::vector<c10::IValue> lists;
  for (size_t k : {0, 2, 3, 4, 5}) lists.push_back((*stack)[base + k]);
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  for (const c10::IValue& list : lists) {
    for (const c10::IValue& v : list.toListRef()) {
      const at::Tensor& t = v.toTensor();
      if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
    }
  }
}

}  // namespace
}  // namespace fused_optim

TORCH_LIBRARY_FRAGMENT(fused_optim, m) {
  m.def(
      "adafactor_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] row_vars, "
      "Tensor(c!)[] col_vars, Tensor(d!)[] variances, Tensor(e!)[] state_steps, *, Tensor lr, "
      "float beta2_decay, float eps1, float eps2, float d, float weight_decay, bool maximize) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("adafactor_", &fused_optim::adafactor_cpu);
}

TORCH_LIBRARY_IMPL(fused_optim, ADInplaceOrView, m) {
  m.impl("adafactor_",
         torch::CppFunction::makeFromBoxedFunction<&fused_optim::adafactor_bump>());
}
