// The CUDA implementation of torch.ops.fused_optim.adafactor_, the factored-moment
// engine's op (schema and the CPU implementation: csrc/factored.cpp; the kernels:
// csrc/cuda/factored.cu). The host builds the work items (a matrix's whole rows, at
// most kFactoredItemRows of them and about kFactoredItemElements elements; 64K elements
// of a vector) and the per-tensor table from metadata, copies both to the device once,
// and enqueues six launches on the current stream. Nothing is read back: no host sync
// (a CUDA lr and the steps are read by the kernels).
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

#include "cuda/factored.h"
#include "ops_common.h"

namespace fused_optim {
namespace {

constexpr const char* kOp = "fused_optim::adafactor_";

void adafactor_cuda(at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                    at::TensorList col_vars, at::TensorList variances, at::TensorList steps,
                    const at::Tensor& lr, double beta2_decay, double eps1, double eps2,
                    double d, double weight_decay, bool maximize) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && steps.size() == n, kOp, ": expected one grad and one "
              "state_step per param (", n, "), got ", grads.size(), " and ", steps.size());
  TORCH_CHECK(row_vars.size() == col_vars.size() && row_vars.size() + variances.size() == n,
              kOp, ": expected row_vars and col_vars for the first params and variances for "
              "the rest");
  TORCH_CHECK(lr.numel() == 1 && (lr.scalar_type() == at::kFloat ||
                                  lr.scalar_type() == at::kDouble),
              kOp, ": lr must be a one-element float32 or float64 tensor");
  if (n == 0) return;
  const size_t kf = row_vars.size();
  const at::Device device = params[0].device();
  const c10::ScalarType dtype = params[0].scalar_type();
  const cpu::DType kernel_dtype = to_kernel_dtype(kOp, dtype);
  TORCH_CHECK(lr.device().is_cpu() || lr.device() == device, kOp, ": lr is on ", lr.device(),
              " but the params are on ", device);
  const c10::cuda::CUDAGuard guard(device);

  std::vector<cuda::FactoredTensorWork> work(n);
  std::vector<cpu::FactoredItem> items;
  int64_t col_total = 0, row_total = 0, batch_total = 0;
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    const at::Tensor& g = grads[t];
    const at::Tensor& s = steps[t];
    TORCH_CHECK(p.device() == device && p.is_contiguous() && p.scalar_type() == dtype &&
                    g.device() == device && g.is_contiguous() && g.scalar_type() == dtype &&
                    g.sizes() == p.sizes(),
                kOp, ": params[", t, "] and grads[", t, "] must be contiguous ", dtype,
                " tensors of one shape on ", device);
    TORCH_CHECK(s.device() == device && s.numel() == 1 &&
                    (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                kOp, ": state_steps[", t, "] must be a one-element float32 or float64 tensor on ",
                device);
    cuda::FactoredTensorWork& w = work[t];
    std::memset(&w, 0, sizeof(w));
    w.numel = p.numel();
    w.step = s.data_ptr();
    w.step_is_double = s.scalar_type() == at::kDouble;
    w.t.param = p.data_ptr();
    w.t.grad = g.data_ptr();
    w.item_begin = static_cast<int64_t>(items.size());
    if (t < kf) {
      TORCH_CHECK(p.dim() >= 2, kOp, ": params[", t, "] has factors but ", p.dim(), " dims");
      w.t.rows = p.size(-2);
      w.t.cols = p.size(-1);
      w.t.batches = w.numel == 0 ? 0 : w.numel / (w.t.rows * w.t.cols);
      for (const at::Tensor* f : {&row_vars[t], &col_vars[t]}) {
        TORCH_CHECK(f->device() == device && f->is_contiguous() && f->scalar_type() == dtype,
                    kOp, ": the factors of params[", t, "] must be contiguous ", dtype,
                    " tensors on ", device);
      }
      TORCH_CHECK(row_vars[t].numel() == w.t.batches * w.t.rows &&
                      col_vars[t].numel() == w.t.batches * w.t.cols,
                  kOp, ": the factors of params[", t, "] have the wrong sizes");
      w.t.row_var = row_vars[t].data_ptr();
      w.t.col_var = col_vars[t].data_ptr();
      const int64_t per_item = std::clamp<int64_t>(
          cuda::kFactoredItemElements / std::max<int64_t>(w.t.cols, 1), 1,
          cuda::kFactoredItemRows);
      w.items_per_batch = (w.t.rows + per_item - 1) / per_item;
      for (int64_t b = 0; b < w.t.batches; ++b) {
        for (int64_t i = 0; i < w.t.rows; i += per_item) {
          items.push_back({static_cast<int64_t>(t), b, i, std::min(w.t.rows, i + per_item),
                           col_total});
          col_total += w.t.cols;
        }
      }
      // Workspace offsets, made pointers below.
      w.t.row_sums = reinterpret_cast<double*>(row_total);
      w.t.means = reinterpret_cast<const double*>(batch_total);
      row_total += w.t.batches * w.t.rows;
      batch_total += w.t.batches;
    } else {
      const at::Tensor& v = variances[t - kf];
      TORCH_CHECK(v.device() == device && v.is_contiguous() && v.scalar_type() == dtype &&
                      v.numel() == w.numel,
                  kOp, ": variances[", t - kf, "] must be a contiguous ", dtype,
                  " tensor shaped like params[", t, "]");
      w.t.rows = w.t.batches = 1;
      w.t.cols = w.numel;
      w.t.variance = v.data_ptr();
      for (int64_t i = 0; i < w.numel; i += cuda::kFactoredItemElements) {
        items.push_back({static_cast<int64_t>(t), 0, i,
                         std::min(w.numel, i + cuda::kFactoredItemElements), 0});
      }
    }
    w.item_end = static_cast<int64_t>(items.size());
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  // Device memory: [tensors | items] bytes, and a float64 workspace
  // [sums | column partials | row sums | means].
  const size_t tensor_bytes = sizeof(cuda::FactoredTensorWork) * n;
  const size_t item_bytes = sizeof(cpu::FactoredItem) * items.size();
  at::Tensor workspace = at::empty({std::max<int64_t>(1, n_items + col_total + row_total +
                                                             batch_total)},
                                   at::TensorOptions().dtype(at::kDouble).device(device));
  double* ws = workspace.data_ptr<double>();
  double* row_sums = ws + n_items + col_total;
  double* means = row_sums + row_total;
  for (size_t t = 0; t < kf; ++t) {
    work[t].t.row_sums = row_sums + reinterpret_cast<int64_t>(work[t].t.row_sums);
    work[t].t.means = means + reinterpret_cast<int64_t>(work[t].t.means);
  }
  std::vector<uint8_t> host(tensor_bytes + item_bytes);
  std::memcpy(host.data(), work.data(), tensor_bytes);
  if (item_bytes) std::memcpy(host.data() + tensor_bytes, items.data(), item_bytes);
  const at::Tensor table =
      at::from_blob(host.data(), {static_cast<int64_t>(host.size())}, at::kByte).to(device);

  cuda::FactoredLaunch l{};
  l.n_tensors = static_cast<int64_t>(n);
  l.n_items = n_items;
  l.tensors = reinterpret_cast<cuda::FactoredTensorWork*>(table.data_ptr<uint8_t>());
  l.items = reinterpret_cast<const cpu::FactoredItem*>(table.data_ptr<uint8_t>() + tensor_bytes);
  l.sums = ws;
  l.col_partials = ws + n_items;
  l.lr_dtype = lr_dtype(kOp, lr);
  if (lr.device().is_cpu()) {
    l.lr_value = lr.scalar_type() == at::kDouble ? *lr.const_data_ptr<double>()
                                                 : *lr.const_data_ptr<float>();
  } else {
    l.lr_device = lr.const_data_ptr();
    l.lr_device_is_double = lr.scalar_type() == at::kDouble;
  }
  l.beta2_decay = beta2_decay;
  l.eps1 = eps1;
  l.eps2 = eps2;
  l.d = d;
  l.weight_decay = weight_decay;
  l.maximize = maximize;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  C10_CUDA_CHECK(cuda::launch_adafactor(kernel_dtype, l, stream));
  // table and workspace go back to the caching allocator on this stream: later work on
  // it runs after the kernels.
}

}  // namespace
}  // namespace fused_optim

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("adafactor_", &fused_optim::adafactor_cuda);
}

#endif  // !defined(__CUDA_ARCH__)
