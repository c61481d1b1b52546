// The LBFGS row passes on the CPU ([note: LBFGS row passes] in csrc/cpu/kernel_api.h;
// fused_optim/lbfgs.py calls them, the kernels are csrc/cpu/lbfgs_impl.h):
//
//   lbfgs_products_(Tensor(a!) buf, Tensor(b!) prev, Tensor d, Tensor t, int slot,
//                   int rows) -> Tensor
//       writes the candidate pair of `slot` (y = g - prev into row 1 + 2 slot, s = d * t
//       into row 2 + 2 slot) and prev = g, g being row 0 of buf; returns, in buf's dtype,
//       [row_1 . g, ..., row_rows . g, y . s, y . y].
//   lbfgs_direction(Tensor rows, Tensor coef) -> (Tensor d, Tensor stats)
//       d = coef @ rows ([r] @ [r, n]); stats = [rows[0] . d, max |d|] in rows' dtype.
//
// float32 or float64, contiguous, one CPU device. t is a one-element tensor read here
// (no host read through the dispatcher: tests/test_lbfgs.py counts those), rounded to
// buf's dtype as torch's d.mul(t) rounds it. Each call is ONE pass over its rows, the
// column blocks split over the intra-op threads; sums are float64 in fixed lanes per
// block, added up here in block order, so the numbers do not depend on the thread count
// or the instruction set.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernel_api.h"

namespace fused_optim {
namespace {

void check_flat(const char* op, const char* name, const at::Tensor& x, const at::Tensor& like) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ",
              like.scalar_type(), ", got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
}

cpu::DType row_dtype(const char* op, const at::Tensor& rows) {
  TORCH_CHECK(rows.dim() == 2, op, ": expected a 2-D row buffer, got shape ", rows.sizes());
  TORCH_CHECK(rows.device().is_cpu(), op, ": expected a CPU tensor, got ", rows.device());
  TORCH_CHECK(rows.is_contiguous(), op, ": the row buffer must be contiguous");
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kDouble, op,
              ": expected float32 or float64, got ", rows.scalar_type());
  return rows.scalar_type() == at::kDouble ? cpu::DType::kFloat64 : cpu::DType::kFloat32;
}

// Column block: 64K elements (256 KiB of fp32 per row), long runs of each row for the
// prefetchers (8K-element blocks: the products pass over 21 rows of 4M fp32 took 54 ms
// against 48, dev machine under load), while a block's slice of g, or of the sum,
// stays in the core's L2 (1 MiB).
constexpr int64_t kBlock = 65536;

// The call's column blocks on the intra-op threads, contiguous ranges per thread, each
// thread with its own scratch.
void run_blocks(int pass, cpu::LbfgsCall& call) {
  const cpu::LbfgsFn fn = cpu::active_kernels().lbfgs[pass];
  const int64_t blocks = (call.n + call.block - 1) / call.block;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(blocks, 1));
  std::vector<double> scratch(pass == 1 ? static_cast<size_t>(threads * call.block) : 0);
  call.scratch = scratch.data();
  if (threads <= 1 || at::in_parallel_region()) {
    fn(call, 0, blocks);
    return;
  }
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    cpu::LbfgsCall mine = call;
    if (pass == 1) mine.scratch += static_cast<int64_t>(at::get_thread_num()) * call.block;
    fn(mine, begin, end);
  });
}

double read_scalar(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 1 && t.device().is_cpu(), op,
              ": t must be a one-element CPU tensor, got shape ", t.sizes(), " on ", t.device());
  switch (t.scalar_type()) {
    case at::kFloat: return static_cast<double>(*t.const_data_ptr<float>());
    case at::kDouble: return *t.const_data_ptr<double>();
    default: TORCH_CHECK(false, op, ": t must be float32 or float64, got ", t.scalar_type());
  }
}

at::Tensor lbfgs_products_cpu(const at::Tensor& buf, const at::Tensor& prev, const at::Tensor& d,
                              const at::Tensor& t, int64_t slot, int64_t rows) {
  constexpr const char* kOp = "fused_optim::lbfgs_products_";
  cpu::LbfgsCall call{};
  call.dtype = row_dtype(kOp, buf);
  const int64_t n = buf.size(1);
  TORCH_CHECK(rows >= 0 && rows < buf.size(0), kOp, ": rows ", rows, " out of range for ",
              buf.size(0), " buffer rows");
  TORCH_CHECK(slot >= 0 && 2 * slot + 2 <= rows, kOp, ": slot ", slot,
              " must lie within the first ", rows, " rows after row 0");
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor&>{"prev", prev},
                                {"d", d}}) {
    check_flat(kOp, name, x, buf);
    TORCH_CHECK(x.numel() == n, kOp, ": ", name, " must have ", n, " elements, got ", x.numel());
  }
  call.n = n;
  call.rows = rows;
  call.buf = buf.data_ptr();
  call.slot = slot;
  call.prev = prev.data_ptr();
  call.d = d.const_data_ptr();
  call.t = read_scalar(kOp, t);
  call.block = std::min(kBlock, std::max<int64_t>(n, 1));
  const int64_t blocks = (n + call.block - 1) / call.block;
  call.width = rows + 2;
  std::vector<double> partials(static_cast<size_t>(blocks * call.width), 0.0);
  call.partials = partials.data();
  run_blocks(0, call);
  std::vector<double> sums(static_cast<size_t>(call.width), 0.0);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t k = 0; k < call.width; ++k) sums[k] += partials[b * call.width + k];
  }
  at::Tensor out = at::empty({call.width}, buf.options());
  if (call.dtype == cpu::DType::kFloat64) {
    std::copy(sums.begin(), sums.end(), out.mutable_data_ptr<double>());
  } else {
    float* o = out.mutable_data_ptr<float>();
    for (int64_t k = 0; k < call.width; ++k) o[k] = static_cast<float>(sums[k]);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> lbfgs_direction_cpu(const at::Tensor& rows,
                                                       const at::Tensor& coef) {
  constexpr const char* kOp = "fused_optim::lbfgs_direction";
  cpu::LbfgsCall call{};
  call.dtype = row_dtype(kOp, rows);
  check_flat(kOp, "coef", coef, rows);
  TORCH_CHECK(rows.size(0) >= 1 && coef.dim() == 1 && coef.numel() == rows.size(0), kOp,
              ": expected one coefficient per row (", rows.size(0), " rows, at least 1), got ",
              coef.sizes());
  const int64_t n = rows.size(1);
  at::Tensor d = at::empty({n}, rows.options());
  call.n = n;
  call.rows = rows.size(0);
  call.buf = const_cast<void*>(rows.const_data_ptr());
  call.slot = -1;
  call.coef = coef.const_data_ptr();
  call.out = d.data_ptr();
  call.block = std::min(kBlock, std::max<int64_t>(n, 1));
  const int64_t blocks = (n + call.block - 1) / call.block;
  call.width = 2;
  std::vector<double> partials(static_cast<size_t>(blocks * 2), 0.0);
  call.partials = partials.data();
  run_blocks(1, call);
  double gd = 0.0, top = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    gd += partials[2 * b];
    const double m = partials[2 * b + 1];
    top = (m > top || std::isnan(m)) ? m : top;
  }
  at::Tensor stats = at::empty({2}, rows.options());
  if (call.dtype == cpu::DType::kFloat64) {
    stats.mutable_data_ptr<double>()[0] = gd;
    stats.mutable_data_ptr<double>()[1] = top;
  } else {
    stats.mutable_data_ptr<float>()[0] = static_cast<float>(gd);
    stats.mutable_data_ptr<float>()[1] = static_cast<float>(top);
  }
  return {d, stats};
}

// [note: version counters of mutated tensors] in csrc/ops.cpp: buf and prev.
void lbfgs_products_bump(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                         torch::jit::Stack* stack) {
  const size_t base = stack->size() - 6;
  const at::Tensor buf = (*stack)[base].toTensor();
  const at::Tensor prev = (*stack)[base + 1].toTensor();
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  for (const at::Tensor& x : {buf, prev}) {
    if (!x.is_inference()) x.unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace
}  // namespace fused_optim

TORCH_LIBRARY_FRAGMENT(fused_optim, m) {
  m.def("lbfgs_products_(Tensor(a!) buf, Tensor(b!) prev, Tensor d, Tensor t, int slot, "
        "int rows) -> Tensor");
  m.def("lbfgs_direction(Tensor rows, Tensor coef) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("lbfgs_products_", &fused_optim::lbfgs_products_cpu);
  m.impl("lbfgs_direction", &fused_optim::lbfgs_direction_cpu);
}

TORCH_LIBRARY_IMPL(fused_optim, ADInplaceOrView, m) {
  m.impl("lbfgs_products_",
         torch::CppFunction::makeFromBoxedFunction<&fused_optim::lbfgs_products_bump>());
}
