// Input checks and bucket flattening shared by the CPU and CUDA implementations of the
// fused_optim ops. Every check is a TORCH_CHECK that names the op, the list and the
// index, so bad input raises a Python RuntimeError instead of corrupting memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "cpu/kernel_api.h"
#include "parallel_rows.h"

namespace fused_optim {

inline cpu::DType to_kernel_dtype(const char* op, c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return cpu::DType::kFloat32;
    case c10::ScalarType::Double: return cpu::DType::kFloat64;
    case c10::ScalarType::Half: return cpu::DType::kFloat16;
    case c10::ScalarType::BFloat16: return cpu::DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": parameters must be float32, float64, float16 or bfloat16, got ",
                  t);
  }
}

struct NamedList {
  const char* name;
  at::TensorList tensors;
};

// List-major pointer table for the kernels: ptrs[list * n + t], numels[t].
struct FlatTable {
  std::vector<void*> ptrs;
  std::vector<int64_t> numels;
  cpu::TensorTable table{};
};

// [note: cold tensor metadata]
// After a streaming step nothing of the previous step is left in any cache, so the
// per-tensor walk of the next call misses on every TensorImpl (and on its StorageImpl for
// data_ptr): at 2,048 params x 4-5 tensors that walk took ~1.5 ms on the dev machine,
// one miss after another. The passes over tensor lists therefore prefetch a few rows
// ahead: the TensorImpl kAhead rows ahead, and the StorageImpl (found through the
// TensorImpl fetched kAhead rows earlier) of the row half as far.
constexpr size_t kPrefetchAhead = 8;

inline void prefetch_lines(const void* p, int lines) {
  const char* c = static_cast<const char*>(p);
  for (int k = 0; k < lines; ++k) __builtin_prefetch(c + 64 * k);
}

inline void prefetch_metadata(at::TensorList l, size_t i) {
  if (i + kPrefetchAhead < l.size() && l[i + kPrefetchAhead].defined()) {
    prefetch_lines(l[i + kPrefetchAhead].unsafeGetTensorImpl(), 4);
  }
  const size_t near = i + kPrefetchAhead / 2;
  if (near < l.size() && l[near].defined()) {
    const c10::TensorImpl* impl = l[near].unsafeGetTensorImpl();
    if (impl->has_storage()) prefetch_lines(impl->unsafe_storage().unsafeGetStorageImpl(), 2);
  }
}

// The hyperparameters of one adam_ call as every device's kernels take them: the
// weight-decay mode from the schema's flag, and none at all when weight_decay is 0.
inline math::AdamHyper adam_hyper(double lr, double beta1, double beta2, double weight_decay,
                                  double eps, bool amsgrad, bool maximize,
                                  bool decoupled_weight_decay) {
  return math::AdamHyper{lr,
                         beta1,
                         beta2,
                         weight_decay,
                         eps,
                         amsgrad,
                         maximize,
                         weight_decay == 0.0      ? math::WeightDecay::kNone
                         : decoupled_weight_decay ? math::WeightDecay::kDecoupled
                                                  : math::WeightDecay::kL2};
}

// One row of check_bucket: row i of every list checked, its pointers written to `flat`.
inline void check_row(const char* op, const std::vector<NamedList>& lists, size_t i,
                      FlatTable* flat) {
  const at::TensorList params = lists[0].tensors;
  const size_t n = params.size();
  const at::Device device = params[0].device();
  const c10::ScalarType dtype = params[0].scalar_type();
  const at::Tensor& p = params[i];
  for (size_t k = 0; k < lists.size(); ++k) {
    const NamedList& l = lists[k];
    prefetch_metadata(l.tensors, i);
    const at::Tensor& t = l.tensors[i];
    TORCH_CHECK(t.defined(), op, ": ", l.name, "[", i, "] is undefined");
    TORCH_CHECK(t.layout() == c10::kStrided, op, ": ", l.name, "[", i,
                "] is sparse; fused_optim kernels take dense tensors only");
    TORCH_CHECK(t.device() == device, op, ": all tensors of one call must be on one device; ",
                l.name, "[", i, "] is on ", t.device(), ", params[0] on ", device);
    TORCH_CHECK(t.scalar_type() == dtype, op, ": all tensors of one call must have one dtype; ",
                l.name, "[", i, "] is ", t.scalar_type(), ", params[0] is ", dtype);
    TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", l.name, "[", i, "] has shape ", t.sizes(),
                " but params[", i, "] has shape ", p.sizes());
    TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": ", l.name, "[", i,
                "] must be non-overlapping and dense (e.g. contiguous)");
    TORCH_CHECK(t.numel() <= 1 || t.strides() == p.strides(), op, ": ", l.name, "[", i,
                "] has strides ", t.strides(), " but params[", i, "] has strides ",
                p.strides(), "; every tensor of a row must share one memory layout");
    flat->ptrs[k * n + i] = t.data_ptr();
  }
  flat->numels[i] = p.numel();
}

// Checks one bucket and reads its pointer table in the same pass: every list as long as
// params; every tensor dense, on params' device, of params' dtype and with params' sizes
// and strides (so element i of every list sits at the same offset); no sparse or
// complex tensors. Rows are split over threads by `run_rows` when given.
inline void check_bucket(const char* op, const std::vector<NamedList>& lists, FlatTable* flat,
                         RowRunner run_rows) {
  const at::TensorList params = lists[0].tensors;
  for (const NamedList& l : lists) {
    TORCH_CHECK(l.tensors.size() == params.size(), op, ": expected ", params.size(), " ",
                l.name, " (one per param), got ", l.tensors.size());
  }
  if (params.empty()) return;
  const cpu::DType kernel_dtype = to_kernel_dtype(op, params[0].scalar_type());
  const size_t n = params.size();
  flat->ptrs.resize(lists.size() * n);
  flat->numels.resize(n);
  const auto check_rows = [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      check_row(op, lists, i, flat);
    }
  };
  if (run_rows != nullptr) {
    run_rows(n, check_rows);
  } else {
    check_rows(0, n);
  }
  flat->table = cpu::TensorTable{static_cast<int64_t>(n), static_cast<int>(lists.size()),
                                 flat->ptrs.data(), flat->numels.data(), kernel_dtype};
}

// Checks a list of one-element scalar tensors (state steps) against the params.
inline void check_scalars(const char* op, const char* name, at::TensorList ts,
                          size_t expected, bool allow_cpu, const at::Device& device) {
  TORCH_CHECK(ts.size() == expected, op, ": expected ", expected, " ", name,
              " (one per param), got ", ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    prefetch_metadata(ts, i);
    const at::Tensor& t = ts[i];
    TORCH_CHECK(t.defined() && t.numel() == 1, op, ": ", name, "[", i,
                "] must be a one-element tensor");
    TORCH_CHECK(t.scalar_type() == c10::ScalarType::Float ||
                    t.scalar_type() == c10::ScalarType::Double,
                op, ": ", name, "[", i, "] must be float32 or float64, got ", t.scalar_type());
    TORCH_CHECK(t.device() == device || (allow_cpu && t.device().is_cpu()), op, ": ", name, "[",
                i, "] is on ", t.device(), " but the params are on ", device);
  }
}

inline void check_optional_scalar(const char* op, const char* name,
                                  const c10::optional<at::Tensor>& t, const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must be a one-element tensor, got shape ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == c10::ScalarType::Float, op, ": ", name,
              " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(),
              " but the params are on ", device);
}

// The tensor lists of one adam_ call, as every backend receives them first: the
// element-wise lists in kernel order (max_exp_avg_sqs only with amsgrad), checked by
// check_bucket, which also fills their pointer table. Views of the op's arguments, valid
// for the call: nothing here copies a tensor (a copy bumps an atomic count and, for a
// tensor with a Python object, takes the GIL to bump the object's too; ~10,000 of those
// cost ~0.7 ms a step).
struct AdamLists {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps;
  std::vector<NamedList> elementwise;
  FlatTable flat;  // the element-wise lists' pointers, for the kernels

  AdamLists(const char* op, at::TensorList params_, at::TensorList grads_,
            at::TensorList exp_avgs_, at::TensorList exp_avg_sqs_,
            at::TensorList max_exp_avg_sqs_, at::TensorList state_steps_, bool amsgrad,
            RowRunner run_rows = nullptr)
      : params(params_),
        grads(grads_),
        exp_avgs(exp_avgs_),
        exp_avg_sqs(exp_avg_sqs_),
        max_exp_avg_sqs(max_exp_avg_sqs_),
        state_steps(state_steps_),
        elementwise{{"params", params},
                    {"grads", grads},
                    {"exp_avgs", exp_avgs},
                    {"exp_avg_sqs", exp_avg_sqs}} {
    if (amsgrad) {
      elementwise.push_back({"max_exp_avg_sqs", max_exp_avg_sqs});
    } else {
      TORCH_CHECK(max_exp_avg_sqs.empty(), op,
                  ": max_exp_avg_sqs must be empty when amsgrad=False, got ",
                  max_exp_avg_sqs.size());
    }
    check_bucket(op, elementwise, &flat, run_rows);
  }
  AdamLists(const AdamLists&) = delete;
  AdamLists& operator=(const AdamLists&) = delete;
};

// The tensor lists of one sgd_ call (momentum_buffers only with momentum != 0), checked;
// views of the op's arguments, as AdamLists.
struct SgdLists {
  at::TensorList params, grads, momentum_buffers;
  std::vector<NamedList> elementwise;
  FlatTable flat;

  SgdLists(const char* op, at::TensorList params_, at::TensorList grads_,
           at::TensorList momentum_buffers_, double momentum, RowRunner run_rows = nullptr)
      : params(params_),
        grads(grads_),
        momentum_buffers(momentum_buffers_),
        elementwise{{"params", params}, {"grads", grads}} {
    if (momentum != 0.0) {
      elementwise.push_back({"momentum_buffers", momentum_buffers});
    } else {
      TORCH_CHECK(momentum_buffers.empty(), op,
                  ": momentum_buffers must be empty when momentum=0, got ",
                  momentum_buffers.size());
    }
    check_bucket(op, elementwise, &flat, run_rows);
  }
  SgdLists(const SgdLists&) = delete;
  SgdLists& operator=(const SgdLists&) = delete;
};

}  // namespace fused_optim
