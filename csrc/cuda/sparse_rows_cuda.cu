// The CUDA implementation of torch.ops.fused_optim.sparse_rows_, the row-sparse engine's
// op (schema and the CPU implementation: csrc/sparse_rows.cpp; the checks they share:
// csrc/sparse_rows.h). Per param: the entries ordered by row with ATen's stable sort on
// the device, and the runs of one row found with unique_consecutive; then ONE launch
// over the segments of every param of the call (csrc/cuda/rows.cu). The sizes of the
// unique-row lists and the range check of the indices are read on the host: one sync per
// call, which the number of touched rows needs anyway (the kernels' grid).
//
// Duplicates are summed in index order (the stable sort's), which is deterministic;
// torch's CUDA coalesce() does not promise an order, so GPU sums may part from torch's
// by a rounding (the CPU op matches coalesce() bit for bit instead).
//
// [note: host-only translation unit] in ops_cuda.cu: no device code here.
#if !defined(__CUDA_ARCH__)

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cuda/rows.h"
#include "ops_common.h"
#include "sparse_rows.h"

namespace fused_optim {
namespace {

void sparse_rows_cuda(at::TensorList params, at::TensorList rows, at::TensorList values,
                      at::TensorList states, const at::Tensor& constants, c10::string_view math,
                      bool maximize) {
  const RowMathInfo& m = find_row_math(math);
  check_sparse_rows(m, params, rows, values, states, constants, c10::DeviceType::CUDA);
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cpu::DType dtype = to_kernel_dtype(kSparseRowsOp, params[0].scalar_type());
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(device);

  // Per param: its sorted entries' permutation, its unique rows and where each run ends.
  std::vector<at::Tensor> perms(n), uniques, tables, ends_of;
  std::vector<int64_t> nonempty;
  std::vector<at::Tensor> bounds;
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& r = rows[t];
    if (r.size(0) == 0 || params[t].size(1) == 0) {
      perms[t] = at::empty({0}, long_opts);
      continue;
    }
    auto [sorted, perm] = at::sort(r, /*stable=*/true, 0, false);
    perms[t] = perm;
    auto [unique, inverse, counts] = at::unique_consecutive(sorted, false, true);
    const at::Tensor end = counts.cumsum(0);
    const at::Tensor begin = end - counts;
    tables.push_back(at::stack({at::full_like(unique, t), unique, begin, end}, 1));
    bounds.push_back(at::stack({sorted[0], sorted[-1], at::scalar_tensor(params[t].size(0), long_opts)}));
    nonempty.push_back(t);
  }
  if (tables.empty()) return;
  // The one sync: the range of every param's rows (and, through the tables' shapes
  // above, the numbers of unique rows).
  const at::Tensor b = at::stack(bounds).cpu();
  const int64_t* bp = b.data_ptr<int64_t>();
  for (size_t k = 0; k < nonempty.size(); ++k) {
    TORCH_CHECK(bp[3 * k] >= 0 && bp[3 * k + 1] < bp[3 * k + 2], kSparseRowsOp, ": rows[",
                nonempty[k], "] has an index out of range for a param of ", bp[3 * k + 2],
                " rows (", bp[3 * k] < 0 ? bp[3 * k] : bp[3 * k + 1], ")");
  }
  const at::Tensor segments = at::cat(tables).contiguous();

  // The pointer table (cuda/rows.h), built on the host, copied once.
  const int64_t kS = m.states, kC = m.constants;
  std::vector<int64_t> host((4 + kS) * n + n * kC);
  int64_t max_len = 0;
  for (int64_t t = 0; t < n; ++t) {
    host[t] = reinterpret_cast<int64_t>(params[t].data_ptr());
    for (int64_t j = 0; j < kS; ++j) {
      host[(1 + j) * n + t] = reinterpret_cast<int64_t>(states[j * n + t].data_ptr());
    }
    host[(1 + kS) * n + t] = reinterpret_cast<int64_t>(values[t].data_ptr());
    host[(2 + kS) * n + t] = reinterpret_cast<int64_t>(perms[t].data_ptr());
    host[(3 + kS) * n + t] = params[t].size(1);
    max_len = std::max(max_len, params[t].size(1));
  }
  const double* c = constants.data_ptr<double>();
  std::memcpy(host.data() + (4 + kS) * n, c, sizeof(double) * n * kC);
  const at::Tensor table =
      at::from_blob(host.data(), {static_cast<int64_t>(host.size())}, at::kLong).to(device);

  cuda::RowLaunch launch;
  launch.n_tensors = n;
  launch.n_segments = segments.size(0);
  launch.max_row_len = max_len;
  launch.table = table.data_ptr<int64_t>();
  launch.segments = segments.data_ptr<int64_t>();
  launch.maximize = maximize;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  C10_CUDA_CHECK(cuda::launch_rows(m.id, dtype, launch, stream));
  // The temporaries (table, segments, perms) are freed by the caching allocator on this
  // stream: later work on it runs after the kernel.
}

}  // namespace
}  // namespace fused_optim

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("sparse_rows_", &fused_optim::sparse_rows_cuda);
}

#endif  // !defined(__CUDA_ARCH__)
