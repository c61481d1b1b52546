// The row-sparse engine on the CPU: torch.ops.fused_optim.sparse_rows_, the step of
// every param of a bucket whose grad is sparse (fused_optim/_sparse.py builds the call).
//
//   sparse_rows_(Tensor(a!)[] params, Tensor[] rows, Tensor[] values, Tensor(b!)[] states,
//                Tensor constants, *, str math, bool maximize) -> ()
//
// params and states are [rows, row length] matrices, rows[t] the row of each entry of
// param t's grad (int64 [nnz]), values[t] its entries ([nnz, row length], the param's
// dtype), states state-major (every param's first state, then the second ...),
// constants float64 [params, the row math's constants]. `math` names a row math of
// FO_FOR_EACH_ROW_MATH ([note: row math] in fused_optim/math/optimizer.h).
//
// A row math that coalesces: per param, the entries ordered by row in the order that
// coalesce() sums them ([note: entry order of a coalescing sum]: the sums here are the
// same, bit for bit); rows already strictly increasing (a coalesced grad) keep their
// order. Then ONE parallel region over the touched rows of every param: each row's
// entries summed, its states read, updated and written, by the instruction set's kernel
// (csrc/cpu, kernels_impl.h rows_typed). Rows are distinct within a param, so threads
// never share an element. A row math that applies entries one by one needs no sort
// (apply_in_index_order).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/sort.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernel_api.h"
#include "cpu/row_order.h"
#include "fused_optim/optimizers.h"
#include "ops_common.h"
#include "sparse_rows.h"

namespace fused_optim {
namespace {

// Elements per work item of the parallel region (a few rows of a wide embedding, many
// of a narrow one).
constexpr int64_t kRowsGrain = 16384;

// A math that applies entries one by one (SparseGrads.coalesce False: torch's
// param.add_(sparse) adds each entry to its row in index order) needs no sort: thread j
// of T takes the rows [R j / T, R (j + 1) / T) of every param and applies, in index
// order, the entries that fall there (each a one-entry segment), kScanBatch at a time
// as it finds them. Every entry of a row goes to one thread, in order; each thread reads
// all the indices (8 B per entry) and the values and rows of its own entries.
constexpr int64_t kScanBatch = 512;

void apply_in_index_order(const cpu::RowCall& call, at::TensorList params, at::TensorList rows,
                          cpu::RowsFn kernel) {
  const int64_t n = call.n_tensors;
  int64_t work = 0;
  for (int64_t t = 0; t < n; ++t) work += rows[t].size(0) * call.row_len[t];
  const int64_t threads = work < kRowsGrain ? 1 : std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    cpu::RowSegment batch[kScanBatch];
    for (int64_t j = begin; j < end; ++j) {
      int64_t count = 0;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t nnz = rows[t].size(0);
        if (nnz == 0 || call.row_len[t] == 0) continue;
        const int64_t n_rows = params[t].size(0);
        const int64_t lo = n_rows * j / threads, hi = n_rows * (j + 1) / threads;
        const int64_t* idx = rows[t].data_ptr<int64_t>();
        for (int64_t k = 0; k < nnz; ++k) {
          if (idx[k] < lo || idx[k] >= hi) continue;
          batch[count++] = cpu::RowSegment{t, idx[k], k, k + 1};
          if (count == kScanBatch) {
            kernel(call, batch, 0, count);
            count = 0;
          }
        }
      }
      if (count > 0) kernel(call, batch, 0, count);
    }
  });
}

// [note: entry order of a coalescing sum]
// coalesce() sums a row's entries in the order torch's sort(0) leaves them: below
// kTorchRadixMin entries that is std::sort's order (among equal rows, the algorithm's
// order, not the input's); from kTorchRadixMin on a stable radix sort's (the input's).
// Adding one or two entries does not depend on their order (addition commutes). So each
// grad is ordered by our own stable radix sort (cpu/row_order.h): that order is torch's
// for a grad of kTorchRadixMin entries or more, and for every row of one or two entries.
// The rows of three or more entries of a smaller grad take the order of torch's own sort,
// which runs on the calling thread while every thread updates the other rows; those rows
// are updated last. Measured (2-core EPYC VM, Embedding(1M, 64) fp32, 16,384 lookups, of
// which about half the grads have a row of three): torch's sort alone took 0.74 ms of
// the SparseAdam op's 3.2-3.6; the op went to 2.7-2.9 ms, Adagrad's from 2.4-2.6 to 2.0.
constexpr int64_t kTorchRadixMin = 32768;  // at::internal::GRAIN_SIZE: can_use_radix_sort

// Runs kernel over segments[0, count) on `threads` threads, in chunks of `chunk` taken in
// turn; thread 0 first runs `first` (the calling thread: it may call ATen).
template <typename First>
void run_segments(const cpu::RowCall& call, const std::vector<cpu::RowSegment>& segments,
                  int64_t chunk, int64_t threads, cpu::RowsFn kernel, const First& first) {
  const int64_t count = static_cast<int64_t>(segments.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    if (begin == 0) first();
    for (int64_t c = next.fetch_add(1); c * chunk < count; c = next.fetch_add(1)) {
      kernel(call, segments.data(), c * chunk, std::min(count, (c + 1) * chunk));
    }
    (void)end;
  });
}

}  // namespace

void sparse_rows_cpu(at::TensorList params, at::TensorList rows, at::TensorList values,
                     at::TensorList states, const at::Tensor& constants, c10::string_view math,
                     bool maximize) {
  const RowMathInfo& m = find_row_math(math);
  check_sparse_rows(m, params, rows, values, states, constants, c10::DeviceType::CPU);
  const size_t n = params.size();
  if (n == 0) return;
  const cpu::DType kernel_dtype = to_kernel_dtype(kSparseRowsOp, params[0].scalar_type());
  std::vector<void*> param_ptrs(n), state_ptrs(states.size());
  std::vector<const void*> value_ptrs(n);
  std::vector<const int64_t*> perms(n);
  std::vector<int64_t> row_len(n);
  std::vector<std::vector<int64_t>> orders(n);  // each grad's entry order (coalescing maths)
  std::vector<int64_t> sorted;
  std::vector<size_t> torch_sorted;  // the grads whose rows of 3+ entries wait for at::sort
  std::vector<cpu::RowSegment> segments, deferred;
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    const at::Tensor& r = rows[t];
    const at::Tensor& v = values[t];
    for (int j = 0; j < m.states; ++j) {
      const at::Tensor& s = states[j * n + t];
      state_ptrs[j * n + t] = s.data_ptr();
    }
    param_ptrs[t] = p.data_ptr();
    value_ptrs[t] = v.data_ptr();
    row_len[t] = p.size(1);
    perms[t] = nullptr;  // the identity
    const int64_t nnz = r.size(0);
    if (nnz == 0 || p.size(1) == 0) continue;
    const int64_t* idx = r.data_ptr<int64_t>();
    const int64_t n_rows = p.size(0);
    const auto [lo, hi] = std::minmax_element(idx, idx + nnz);
    TORCH_CHECK(*lo >= 0 && *hi < n_rows, kSparseRowsOp, ": rows[", t,
                "] has an index out of range for a param of ", n_rows, " rows (",
                *lo < 0 ? *lo : *hi, ")");
    // Applied entry by entry in index order: no sort (see apply_in_index_order).
    if (!m.coalesce) continue;
    // Entry order: [note: entry order of a coalescing sum]; a grad with strictly
    // increasing rows (coalesced) keeps its order.
    bool increasing = true;
    for (int64_t k = 1; k < nnz && increasing; ++k) increasing = idx[k - 1] < idx[k];
    const int64_t* keys = idx;
    if (!increasing) {
      cpu::stable_order_by_row(idx, nnz, n_rows, orders[t], sorted);
      perms[t] = orders[t].data();
      keys = sorted.data();
    }
    bool waits = false;
    for (int64_t b = 0; b < nnz;) {
      int64_t e = b + 1;
      while (e < nnz && keys[e] == keys[b]) ++e;
      const cpu::RowSegment seg{static_cast<int64_t>(t), keys[b], b, e};
      if (e - b >= 3 && nnz < kTorchRadixMin) {
        deferred.push_back(seg);
        waits = true;
      } else {
        segments.push_back(seg);
      }
      b = e;
    }
    if (waits) torch_sorted.push_back(t);
  }
  cpu::RowCall call;
  call.n_tensors = static_cast<int64_t>(n);
  call.dtype = kernel_dtype;
  call.params = param_ptrs.data();
  call.states = state_ptrs.data();
  call.values = value_ptrs.data();
  call.perm = perms.data();
  call.row_len = row_len.data();
  call.constants = constants.data_ptr<double>();
  call.maximize = maximize;
  const cpu::RowsFn kernel = cpu::active_kernels().rows[m.id];
  if (!m.coalesce) {
    apply_in_index_order(call, params, rows, kernel);
    return;
  }
  // The rows of 3+ entries of grad t take at::sort's order (the same segments: both
  // sorts leave the same rows in the same places).
  auto torch_orders = [&] {
    for (size_t t : torch_sorted) {
      const at::Tensor perm = std::get<1>(at::sort(rows[t], 0, false));
      const int64_t* from = perm.data_ptr<int64_t>();
      for (const cpu::RowSegment& seg : deferred) {
        if (seg.tensor != static_cast<int64_t>(t)) continue;
        std::copy(from + seg.begin, from + seg.end, orders[t].begin() + seg.begin);
      }
    }
  };
  // Work per segment: its row length times its entries; a chunk of ~kRowsGrain elements.
  int64_t work = 0;
  for (const cpu::RowSegment& s : segments) work += row_len[s.tensor] * (s.end - s.begin);
  const int64_t count = static_cast<int64_t>(segments.size());
  const int64_t chunk = std::max<int64_t>(1, count * kRowsGrain / std::max<int64_t>(work, 1));
  const int64_t threads = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (count + chunk - 1) / chunk));
  if (count > 0 || !torch_sorted.empty()) {
    run_segments(call, segments, chunk, threads, kernel, torch_orders);
  }
  if (!deferred.empty()) {
    at::parallel_for(0, static_cast<int64_t>(deferred.size()), 16,
                     [&](int64_t begin, int64_t end) {
                       kernel(call, deferred.data(), begin, end);
                     });
  }
}

namespace {

// [note: version counters of mutated tensors] in csrc/ops.cpp: the params and states.
void sparse_rows_bump(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                      torch::jit::Stack* stack) {
  const size_t base = stack->size() - 7;
  const c10::IValue params = (*stack)[base];
  const c10::IValue states = (*stack)[base + 3];
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  for (const c10::IValue* list : {&params, &states}) {
    for (const c10::IValue& v : list->toListRef()) {
      const at::Tensor& t = v.toTensor();
      if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Shared with the CUDA op (csrc/cuda/sparse_rows_cuda.cu): see sparse_rows.h.

namespace {

std::vector<RowMathInfo> row_maths() {
  std::vector<RowMathInfo> out;
#define FO_ROW_MATH_INFO(Name)                                                            \
  out.push_back(RowMathInfo{math::Name::kMath, static_cast<int>(out.size()),             \
                            math::Name::kStates, math::Name::kConstants,                 \
                            math::Name::kCoalesce});
  FO_FOR_EACH_ROW_MATH(FO_ROW_MATH_INFO)
#undef FO_ROW_MATH_INFO
  return out;
}

}  // namespace

const RowMathInfo& find_row_math(c10::string_view name) {
  static const std::vector<RowMathInfo> maths = row_maths();
  std::string known;
  for (const RowMathInfo& m : maths) {
    if (name == m.name) return m;
    known += std::string(known.empty() ? "" : ", ") + m.name;
  }
  TORCH_CHECK(false, kSparseRowsOp, ": no row math '", std::string(name), "' (known: ", known,
              ")");
}

void check_sparse_rows(const RowMathInfo& m, at::TensorList params, at::TensorList rows,
                       at::TensorList values, at::TensorList states,
                       const at::Tensor& constants, c10::DeviceType type) {
  const char* op = kSparseRowsOp;
  const size_t n = params.size();
  TORCH_CHECK(rows.size() == n && values.size() == n, op, ": expected one rows and one "
              "values tensor per param (", n, "), got ", rows.size(), " and ", values.size());
  TORCH_CHECK(states.size() == n * static_cast<size_t>(m.states), op, ": the row math '",
              m.name, "' keeps ", m.states, " states per param: expected ", n * m.states,
              " state tensors, got ", states.size());
  TORCH_CHECK(constants.device().is_cpu() && constants.scalar_type() == at::kDouble &&
                  constants.dim() == 2 && constants.size(0) == static_cast<int64_t>(n) &&
                  constants.size(1) == m.constants && constants.is_contiguous(),
              op, ": constants must be a contiguous float64 CPU tensor of shape [", n, ", ",
              m.constants, "], got ", constants.scalar_type(), " ", constants.sizes(), " on ",
              constants.device());
  if (n == 0) return;
  const c10::ScalarType dtype = params[0].scalar_type();
  const at::Device device = params[0].device();
  TORCH_CHECK(device.type() == type, op, ": ", c10::DeviceTypeName(type),
              " kernel called with params on ", device);
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    const at::Tensor& r = rows[t];
    const at::Tensor& v = values[t];
    TORCH_CHECK(p.device() == device && p.layout() == c10::kStrided && p.dim() == 2 &&
                    p.is_contiguous(),
                op, ": params[", t, "] must be a contiguous 2-D tensor on ", device, ", got ",
                p.sizes(), " on ", p.device());
    TORCH_CHECK(p.scalar_type() == dtype, op, ": all params of one call must have one "
                "dtype; params[", t, "] is ", p.scalar_type(), ", params[0] is ", dtype);
    TORCH_CHECK(r.device() == device && r.scalar_type() == at::kLong && r.dim() == 1 &&
                    r.is_contiguous(),
                op, ": rows[", t, "] must be a contiguous 1-D int64 tensor on ", device,
                ", got ", r.scalar_type(), " ", r.sizes(), " on ", r.device());
    TORCH_CHECK(v.device() == device && v.scalar_type() == dtype && v.dim() == 2 &&
                    v.size(0) == r.size(0) && v.size(1) == p.size(1) && v.is_contiguous(),
                op, ": values[", t, "] must be a contiguous ", dtype, " tensor of shape [",
                r.size(0), ", ", p.size(1), "] on ", device, ", got ", v.scalar_type(), " ",
                v.sizes(), " on ", v.device());
    for (int j = 0; j < m.states; ++j) {
      const at::Tensor& s = states[j * n + t];
      TORCH_CHECK(s.device() == device && s.scalar_type() == dtype && s.sizes() == p.sizes() &&
                      s.is_contiguous(),
                  op, ": states[", j * n + t, "] must be a contiguous ", dtype,
                  " tensor shaped like params[", t, "] ", p.sizes(), " on ", device, ", got ",
                  s.scalar_type(), " ", s.sizes(), " on ", s.device());
    }
  }
}

}  // namespace fused_optim

TORCH_LIBRARY_FRAGMENT(fused_optim, m) {
  m.def(
      "sparse_rows_(Tensor(a!)[] params, Tensor[] rows, Tensor[] values, Tensor(b!)[] states, "
      "Tensor constants, *, str math, bool maximize) -> ()");
}

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("sparse_rows_", &fused_optim::sparse_rows_cpu);
}

TORCH_LIBRARY_IMPL(fused_optim, ADInplaceOrView, m) {
  m.impl("sparse_rows_", torch::CppFunction::makeFromBoxedFunction<&fused_optim::sparse_rows_bump>());
}
