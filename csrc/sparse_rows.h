// What the row-sparse ops of every device share (csrc/sparse_rows.cpp, the CPU op and
// these; csrc/cuda/sparse_rows_cuda.cu, the CUDA op): the row maths by name and the
// checks of a call of torch.ops.fused_optim.sparse_rows_.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/string_view.h>

namespace fused_optim {

constexpr const char* kSparseRowsOp = "fused_optim::sparse_rows_";

// A row math of FO_FOR_EACH_ROW_MATH ([note: row math] in fused_optim/math/optimizer.h).
struct RowMathInfo {
  const char* name;
  int id;  // its position in FO_FOR_EACH_ROW_MATH
  int states;
  int constants;
  bool coalesce;
};

// The row math named `name`, or a RuntimeError listing the known ones.
const RowMathInfo& find_row_math(c10::string_view name);

// Checks a call with TORCH_CHECK: one rows and values tensor per param, the math's count
// of states, constants a float64 CPU [params, constants]; params, rows, values and states
// contiguous, on the params' device (of type `type`), params and states 2-D of one dtype,
// values [nnz, row length] of that dtype, rows 1-D int64.
void check_sparse_rows(const RowMathInfo& m, at::TensorList params, at::TensorList rows,
                       at::TensorList values, at::TensorList states,
                       const at::Tensor& constants, c10::DeviceType type);

// The CPU op's implementation (its dispatcher kernel), for the eager entry
// (csrc/eager.cpp sparse_step_): checks, then one call of the engine; no version bumps.
void sparse_rows_cpu(at::TensorList params, at::TensorList rows, at::TensorList values,
                     at::TensorList states, const at::Tensor& constants, c10::string_view math,
                     bool maximize);

}  // namespace fused_optim
