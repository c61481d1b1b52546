// The CPU implementation of every fused_optim op.
//
// One call = one bucket (one device, one dtype). The op checks its inputs, applies the
// found_inf skip and advances the per-tensor state (cheap, serial: a few scalars per
// tensor), builds the chunk table of every tensor in the bucket, and runs ONE parallel
// region over all chunks with the kernels of the instruction set chosen at run time.
// torch's fused CPU Adam runs one parallel_for per tensor instead, which leaves threads
// idle on models with many small tensors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernel_api.h"
#include "fused_optim/dispatch.h"
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

bool skip_step(const at::Tensor* found_inf) {
  return found_inf != nullptr && found_inf->item<float>() != 0.0f;
}

// Advances every tensor's per-tensor state (step += 1, ...; `args`: the call's, lr
// included) in row order, as torch.optim's for-loop does (a state tensor passed for two
// params advances twice, each row computing with the value after its own advance), and
// returns each tensor's step's state ([note: the step's state] in math/optimizer.h):
// tensor-major, 2 * n_states per tensor.
std::vector<double> advance_states(const OpCall& c, const math::Args& args) {
  const size_t n = c.params().size();
  const size_t ns = c.states.size();
  std::vector<double> out(n * 2 * ns);
  if (ns == 0) return out;
  void* ptrs[math::kMaxStates];
  bool is_double[math::kMaxStates];
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < ns; ++j) {
      // The counters' metadata and values are cold: see [note: cold tensor metadata].
      prefetch_metadata(c.states[j], i);
      if (i + 2 < n) __builtin_prefetch(c.states[j][i + 2].data_ptr());
      const at::Tensor& s = c.states[j][i];
      ptrs[j] = s.data_ptr();
      is_double[j] = s.scalar_type() == c10::ScalarType::Double;
    }
    double* state = out.data() + i * 2 * ns;
    c.op->info->advance(args, ptrs, is_double, state);
    for (size_t j = 0; j < ns; ++j) store_state(ptrs[j], is_double[j], state[j]);
  }
  return out;
}

// Each tensor's Philox key and the counter of its element 0 at this step (StepCall::rng),
// read from its rng_state [seed, offset], whose offset then advances by the tensor's
// element count ([note: the policy's random bits] in fused_optim/_policy.py).
std::vector<uint64_t> advance_rng(at::TensorList rng, const std::vector<int64_t>& numels) {
  std::vector<uint64_t> out(2 * rng.size());
  for (size_t i = 0; i < rng.size(); ++i) {
    int64_t* state = rng[i].data_ptr<int64_t>();
    out[2 * i] = static_cast<uint64_t>(state[0]);
    out[2 * i + 1] = static_cast<uint64_t>(state[1]);
    state[1] = static_cast<int64_t>(static_cast<uint64_t>(state[1]) +
                                    static_cast<uint64_t>(numels[i]));
  }
  return out;
}

void cpu_step(const OpCall& c) {
  const CheckedCall checked(c, c10::DeviceType::CPU, &parallel_rows, /*policies=*/true);
  if (checked.empty() || skip_step(c.found_inf)) return;

  cpu::StepCall call;
  call.args = checked.args;
  call.lists = checked.lists.mask;
  call.maximize = c.maximize;
  const float grad_scale_value = c.grad_scale != nullptr ? c.grad_scale->item<float>() : 1.0f;
  call.grad_scale = c.grad_scale != nullptr ? &grad_scale_value : nullptr;
  const std::vector<double> tensor_state = advance_states(c, checked.args);
  call.tensor_state = tensor_state.data();

  const FlatTable& flat = checked.lists.flat;
  const std::vector<uint64_t> rng = advance_rng(c.rng, flat.numels);
  call.rng = c.rng.empty() ? nullptr : rng.data();
  const cpu::ChunksFn kernel = cpu::active_kernels().chunks[c.op->info->id];
  const std::vector<cpu::Chunk> chunks = make_chunks(flat.numels);
  run_chunks(chunks, flat.numels, [&](const cpu::Chunk* ch, int64_t begin, int64_t end) {
    kernel(flat.table, call, ch, begin, end);
  });
}

struct RegisterCpu {
  RegisterCpu() { set_device_step(c10::DeviceType::CPU, &cpu_step); }
} register_cpu;

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
