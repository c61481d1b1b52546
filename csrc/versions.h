// Version-counter bumps for the tensors an op wrote ([note: version counters of mutated
// tensors] in csrc/ops.cpp), shared by the dispatcher path and the eager entry.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include "ops_common.h"
#include "parallel_rows.h"

namespace fused_optim {

inline const at::Tensor& tensor_of(const at::Tensor& t) { return t; }
inline const at::Tensor& tensor_of(const c10::IValue& v) { return v.toTensor(); }

// Bumps the version of every tensor a call of `b` wrote: each of its lists the call
// writes (OpBinding::writes_list: the grads only with grad_scale) and every state list,
// through references: no tensor is copied (see BorrowedTensors in csrc/ops_common.h).
// Inference tensors have no version. The lists are the call's, as tensors or as a
// stack's list items (T: at::Tensor or c10::IValue); rows split over threads as the
// checks split them.
template <typename T>
void bump_written(const OpBinding& b, bool has_grad_scale,
                  const std::vector<c10::ArrayRef<T>>& lists,
                  const std::vector<c10::ArrayRef<T>>& states) {
  size_t rows = 0;
  for (const c10::ArrayRef<T>& l : lists) rows = std::max(rows, l.size());
  for (const c10::ArrayRef<T>& l : states) rows = std::max(rows, l.size());
  const auto bump = [](c10::ArrayRef<T> l, size_t begin, size_t end) {
    for (size_t i = begin; i < std::min(end, l.size()); ++i) {
      const at::Tensor& t = tensor_of(l[i]);
      if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
    }
  };
  parallel_rows(rows, [&](size_t begin, size_t end) {
    for (size_t k = 0; k < lists.size(); ++k) {
      if (b.writes_list(k, has_grad_scale)) bump(lists[k], begin, end);
    }
    for (const c10::ArrayRef<T>& l : states) bump(l, begin, end);
  });
}

}  // namespace fused_optim
