// CPU implementations of the fused_optim ops.
//
// One call = one bucket (one device, one dtype). The op checks its inputs, applies the
// found_inf skip and the step increments (cheap, serial: one scalar per tensor), builds
// the chunk table of every tensor in the bucket, and runs ONE parallel region over all
// chunks with the kernels of the instruction set chosen at run time. torch's fused CPU
// Adam runs one parallel_for per tensor instead, which leaves threads idle on models
// with many small tensors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernel_api.h"
#include "ops_common.h"

namespace fused_optim {
namespace {

// Below this many elements in a bucket the work runs on the calling thread: waking the
// pool costs more than it saves.
constexpr int64_t kSerialElements = 32768;

std::vector<cpu::Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<cpu::Chunk> chunks;
  int64_t count = 0;
  for (int64_t n : numels) count += (n + cpu::kChunkSize - 1) / cpu::kChunkSize;
  chunks.reserve(count);
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t b = 0; b < numels[t]; b += cpu::kChunkSize) {
      const int64_t e = b + cpu::kChunkSize < numels[t] ? b + cpu::kChunkSize : numels[t];
      chunks.push_back(cpu::Chunk{static_cast<int64_t>(t), b, e});
    }
  }
  return chunks;
}

// Runs fn(chunks, begin, end) over all chunks: one contiguous range of chunks per
// thread, cut at the chunk boundaries nearest to t / threads of the elements. (Splitting
// the chunk count evenly, as parallel_for over the chunks would, gave one thread 20%
// more elements than the other on ResNet-50, whose chunks range from one element to
// 16K; the compute-bound half-precision kernels waited for it.)
template <typename Fn>
void run_chunks(const std::vector<cpu::Chunk>& chunks, const std::vector<int64_t>& numels,
                Fn fn) {
  int64_t total = 0;
  for (int64_t n : numels) total += n;
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n_chunks);
  if (total < kSerialElements || threads < 2) {
    fn(chunks.data(), int64_t{0}, n_chunks);
    return;
  }
  // cuts[t]: the first chunk of range t. Range t starts at chunk c once the elements
  // before c's middle reach t / threads of the total.
  std::vector<int64_t> cuts(threads + 1, n_chunks);
  cuts[0] = 0;
  int64_t before = 0;  // elements in chunks [0, c)
  int64_t t = 1;
  for (int64_t c = 0; c < n_chunks && t < threads; ++c) {
    const int64_t size = chunks[c].end - chunks[c].begin;
    while (t < threads && (2 * before + size) * threads >= 2 * total * t) cuts[t++] = c;
    before += size;
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (cuts[r] < cuts[r + 1]) fn(chunks.data(), cuts[r], cuts[r + 1]);
    }
  });
}

bool skip_step(const c10::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->item<float>() != 0.0f;
}

// Adds one to every step counter and returns their new values.
std::vector<double> increment_steps(at::TensorList state_steps) {
  std::vector<double> steps;
  steps.reserve(state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    // The counters' metadata and values are cold: see [note: cold tensor metadata].
    prefetch_metadata(state_steps, i);
    if (i + 2 < state_steps.size()) __builtin_prefetch(state_steps[i + 2].data_ptr());
    const at::Tensor& s = state_steps[i];
    if (s.scalar_type() == c10::ScalarType::Float) {
      float* v = s.data_ptr<float>();
      *v += 1.0f;
      steps.push_back(*v);
    } else {
      double* v = s.data_ptr<double>();
      *v += 1.0;
      steps.push_back(*v);
    }
  }
  return steps;
}

double read_lr(const char* op, const at::Tensor& lr) {
  TORCH_CHECK(lr.numel() == 1, op, ": lr must be a one-element tensor, got shape ", lr.sizes());
  TORCH_CHECK(lr.device().is_cpu(), op, ": lr for CPU params must be a CPU tensor, got ",
              lr.device());
  return lr.item<double>();
}

void adam_cpu_(at::TensorList params_, at::TensorList grads_, at::TensorList exp_avgs_,
               at::TensorList exp_avg_sqs_, at::TensorList max_exp_avg_sqs_,
               at::TensorList state_steps_, const at::Tensor& lr, double beta1, double beta2,
               double weight_decay, double eps, bool amsgrad, bool maximize,
               bool decoupled_weight_decay, const c10::optional<at::Tensor>& grad_scale,
               const c10::optional<at::Tensor>& found_inf) {
  static const char* op = "fused_optim::adam_";
  const AdamLists a(op, params_, grads_, exp_avgs_, exp_avg_sqs_, max_exp_avg_sqs_,
                    state_steps_, amsgrad, &parallel_rows);
  const at::TensorList params = a.params;
  const double lr_value = read_lr(op, lr);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cpu(), op, ": CPU kernel called with tensors on ", device);
  check_scalars(op, "state_steps", a.state_steps, params.size(), /*allow_cpu=*/true, device);
  check_optional_scalar(op, "grad_scale", grad_scale, device);
  check_optional_scalar(op, "found_inf", found_inf, device);
  if (skip_step(found_inf)) return;

  const std::vector<double> steps = increment_steps(a.state_steps);
  const FlatTable& flat = a.flat;

  cpu::AdamCall call;
  call.hyper = adam_hyper(lr_value, beta1, beta2, weight_decay, eps, amsgrad, maximize,
                          decoupled_weight_decay);
  call.steps = steps.data();
  const float grad_scale_value = grad_scale.has_value() ? grad_scale->item<float>() : 1.0f;
  call.grad_scale = grad_scale.has_value() ? &grad_scale_value : nullptr;

  const cpu::KernelSet& kernels = cpu::active_kernels();
  const std::vector<cpu::Chunk> chunks = make_chunks(flat.numels);
  run_chunks(chunks, flat.numels, [&](const cpu::Chunk* c, int64_t begin, int64_t end) {
    kernels.adam(flat.table, call, c, begin, end);
  });
}

void sgd_cpu_(at::TensorList params_, at::TensorList grads_, at::TensorList momentum_buffers_,
              const at::Tensor& lr, double momentum, double dampening, double weight_decay,
              bool nesterov, bool maximize, bool is_first_step,
              const c10::optional<at::Tensor>& grad_scale,
              const c10::optional<at::Tensor>& found_inf) {
  static const char* op = "fused_optim::sgd_";
  const SgdLists a(op, params_, grads_, momentum_buffers_, momentum, &parallel_rows);
  const at::TensorList params = a.params;
  const double lr_value = read_lr(op, lr);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cpu(), op, ": CPU kernel called with tensors on ", device);
  check_optional_scalar(op, "grad_scale", grad_scale, device);
  check_optional_scalar(op, "found_inf", found_inf, device);
  if (skip_step(found_inf)) return;

  const FlatTable& flat = a.flat;

  cpu::SgdCall call;
  call.hyper = math::SgdHyper{lr_value, momentum, dampening, weight_decay,
                              nesterov, maximize, is_first_step};
  const float grad_scale_value = grad_scale.has_value() ? grad_scale->item<float>() : 1.0f;
  call.grad_scale = grad_scale.has_value() ? &grad_scale_value : nullptr;

  const cpu::KernelSet& kernels = cpu::active_kernels();
  const std::vector<cpu::Chunk> chunks = make_chunks(flat.numels);
  run_chunks(chunks, flat.numels, [&](const cpu::Chunk* c, int64_t begin, int64_t end) {
    kernels.sgd(flat.table, call, c, begin, end);
  });
}

}  // namespace

void parallel_rows(size_t n, const std::function<void(size_t, size_t)>& fn) {
  if (n < kParallelRows) {
    fn(0, n);
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(n), static_cast<int64_t>(kParallelRows / 2),
                   [&](int64_t begin, int64_t end) {
                     fn(static_cast<size_t>(begin), static_cast<size_t>(end));
                   });
}

}  // namespace fused_optim

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("adam_", &fused_optim::adam_cpu_);
  m.impl("sgd_", &fused_optim::sgd_cpu_);
}
