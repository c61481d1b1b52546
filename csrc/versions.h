// Version-counter bumps for the tensors an op wrote ([note: version counters of mutated
// tensors] in csrc/ops.cpp), shared by the dispatcher path and the eager entry.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace fused_optim {

// Bumps the version of tensors at(0) .. at(n - 1) (inference tensors have none),
// through references: no tensor is copied (see AdamLists in csrc/ops_common.h).
template <typename At>
void bump_versions(size_t n, At at) {
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = at(i);
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace fused_optim
