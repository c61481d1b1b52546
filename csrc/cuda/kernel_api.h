// The interface between the torch-facing CUDA ops (csrc/cuda/ops_cuda.cu) and the CUDA
// kernel translation units, which the build generates, one per optimizer and storage
// dtype and one per optimizer and memory policy (csrc/cuda/instantiate.py:
// `<name>_<dtype>.cu` instantiating launch<>, `<name>_<param>_<state>[_master][_sr].cu`
// launch_policy<>, of csrc/cuda/engine.cuh for one optimizer of fused_optim/optimizers.h).
//
// Plain data and the CUDA runtime's stream type only: the kernel units include no torch
// header, which keeps each of them a short compile, and the ops unit is the only place
// that knows about at::Tensor, the dispatcher, device guards and streams. Launchers
// return the first launch error (cudaGetLastError after each launch); the ops unit turns
// it into a c10::CUDAError with C10_CUDA_CHECK.
//
// The bucket is described by the same list-major table as on the CPU
// (cpu::TensorTable: ptrs[list * n_tensors + t], numels[t], the params' and the state
// lists' storage dtypes, the master copies), here holding device pointers.
//
// [note: aliased state]
// torch.optim's for-loop advances a state tensor passed for two params twice (`step += 1`
// once per param), and each param's update uses the value after its own advance; the
// CPU op does the same (it advances the rows in order). Every block of a CUDA launch
// reads the state as it was before the call ([note: per-tensor state] in engine.cuh), so
// run_step cuts a call into runs of rows in which no state tensor appears twice and
// enqueues each run (launch<>, then advance_states<>) after the previous one: the second
// row of a state tensor reads what the first row's advance_states stored, on the device,
// in stream order. A call without aliased state (every call torch.optim makes) is one
// run of all its rows; finding that out is one pass over the state pointers on the host.
// A memory policy's rng_states count as state here: a [seed, offset] passed for two params
// advances twice, in row order, as on the CPU.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/kernel_api.h"
#include "fused_optim/math/args.h"

namespace fused_optim {
namespace cuda {

// Elements per chunk, the unit of work of one thread block; a multiple of every vector
// width (16 B / sizeof(T)). ATen's multi_tensor_apply uses the same 64K.
constexpr int64_t kChunkSize = 65536;

// A one-element device tensor read by the kernels (lr), or a value known on the host.
struct DeviceScalar {
  const void* ptr;  // nullptr: use `value`
  bool is_double;   // *ptr is a double, else a float
  double value;
};

// One call of an optimizer over a bucket.
struct Launch {
  cpu::TensorTable rows;         // the call's lists, op order (cpu::StepCall); device pointers
  uint32_t lists;                // the optimizer's lists present in rows, a bit each
  math::Args args;               // args.lr and args.lr_dtype are set from `lr` on the device
  DeviceScalar lr;
  bool maximize;
  // Per state list j: a host array of rows.n_tensors device pointers (one element each),
  // and whether they are doubles (else floats).
  void* const* states[math::kMaxStates];
  bool states_are_double[math::kMaxStates];
  const float* grad_scale;       // device; nullptr: grads are not scaled
  const float* found_inf;        // device; nullptr: never skip
  // Stochastic rounding ([note: memory policy] in csrc/cpu/kernel_api.h): a host array of
  // rows.n_tensors device pointers, each an int64 [seed, offset]; nullptr: none. The
  // master copies are rows.master.
  int64_t* const* rng;
};

// The index of the call's memory policy in cpu::kPolicies; -1 for the uniform storage,
// -2 for none the engine runs.
inline int policy_of(const Launch& l) {
  return cpu::policy_index(l.rows.dtype, l.rows.state_dtype, l.rows.master != nullptr,
                           l.rng != nullptr);
}

// One step of Optim over the bucket, every tensor with its per-tensor state advanced as
// advance_states will store it ([note: per-tensor state] in csrc/cuda/engine.cuh). D is
// the storage dtype of rows.
template <typename Optim, cpu::DType D>
cudaError_t launch(const Launch& launch, cudaStream_t stream);

// The same under memory policy P, an index into cpu::kPolicies ([note: storage policy]
// in multi_tensor_apply.cuh); cudaErrorInvalidValue for a call of another policy.
template <typename Optim, int P>
cudaError_t launch_policy(const Launch& launch, cudaStream_t stream);

// Stores every tensor's advanced per-tensor state and advances its rng_state's offset by
// its element count (when the call has rng_states), unless *found_inf is non-zero.
// Enqueued after launch<> on the same stream.
template <typename Optim>
cudaError_t advance_states(const Launch& launch, cudaStream_t stream);

using LaunchFn = cudaError_t (*)(const Launch&, cudaStream_t);

// The launchers of one optimizer (instantiated by the generated units).
struct Launchers {
  LaunchFn by_dtype[4];                 // cpu::DType order: f32, f64, f16, bf16
  LaunchFn by_policy[cpu::kNumPolicies];
  LaunchFn advance;

  // The launcher of a call: by its params' dtype, or by its memory policy; nullptr for a
  // combination the engine does not run (the ops refuse it first).
  LaunchFn launcher_for(const Launch& l) const {
    const int p = policy_of(l);
    if (p == -1) return by_dtype[static_cast<int>(l.rows.dtype)];
    return p >= 0 ? by_policy[p] : nullptr;
  }
};

template <typename Optim, int... P>
constexpr Launchers launchers_of(std::integer_sequence<int, P...>) {
  return Launchers{{&launch<Optim, cpu::DType::kFloat32>, &launch<Optim, cpu::DType::kFloat64>,
                    &launch<Optim, cpu::DType::kFloat16>, &launch<Optim, cpu::DType::kBFloat16>},
                   {&launch_policy<Optim, P>...},
                   &advance_states<Optim>};
}

// Every launcher of Optim.
template <typename Optim>
constexpr Launchers launchers_of() {
  return launchers_of<Optim>(std::make_integer_sequence<int, cpu::kNumPolicies>{});
}

// Where runs of rows without a state tensor twice end ([note: aliased state]): the rows
// [0, cuts[0]), [cuts[0], cuts[1]), ..., up to l.rows.n_tensors, of a call with n_states
// state lists. Empty (one run) when no state tensor appears in two rows.
inline std::vector<int64_t> aliased_state_cuts(const Launch& l, int n_states) {
  std::vector<int64_t> cuts;
  const int64_t n = l.rows.n_tensors;
  // The keyed lists: the state lists, then the rng_states.
  const int n_keyed = n_states + (l.rng != nullptr ? 1 : 0);
  if (n_keyed == 0 || n < 2) return cuts;
  // Open addressing, keyed by pointer: the last row that had it. A pointer last seen at
  // or after the current run's first row, in an earlier row, starts a new run; one seen
  // twice in the same row (two state lists of one param) cannot be split and does not.
  struct Slot {
    const void* ptr;
    int64_t row;
  };
  int bits = 4;
  while ((int64_t{1} << bits) < 2 * n * n_keyed) ++bits;
  std::vector<Slot> slots(size_t{1} << bits, Slot{nullptr, -1});
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  int64_t begin = 0;
  for (int64_t t = 0; t < n; ++t) {
    bool repeated = false;
    for (int j = 0; j < n_keyed; ++j) {
      const void* p = j < n_states ? static_cast<const void*>(l.states[j][t])
                                   : static_cast<const void*>(l.rng[t]);
      const uint64_t key = reinterpret_cast<uintptr_t>(p) >> 2;
      uint64_t h = (key * 0x9e3779b97f4a7c15ull) >> (64 - bits);  // Fibonacci hashing
      while (slots[h].ptr != nullptr && slots[h].ptr != p) h = (h + 1) & mask;
      if (slots[h].ptr == p && slots[h].row >= begin && slots[h].row < t) repeated = true;
      slots[h] = Slot{p, t};
    }
    if (repeated) {
      cuts.push_back(t);
      begin = t;
    }
  }
  return cuts;
}

// One call over the bucket: launch, then (when it succeeded) advance, for every run of
// rows without a state tensor twice, in order on `stream` ([note: aliased state]).
// Returns the first error; the runs before it have been enqueued.
inline cudaError_t run_step(const Launch& l, int n_states, LaunchFn launch, LaunchFn advance,
                            cudaStream_t stream) {
  const std::vector<int64_t> cuts = aliased_state_cuts(l, n_states);
  if (cuts.empty()) {
    const cudaError_t err = launch(l, stream);
    return err != cudaSuccess ? err : advance(l, stream);
  }
  const int64_t n = l.rows.n_tensors;
  std::vector<void*> ptrs;
  for (size_t r = 0; r <= cuts.size(); ++r) {
    const int64_t begin = r == 0 ? 0 : cuts[r - 1];
    const int64_t end = r == cuts.size() ? n : cuts[r];
    // The run's rows as a call of their own: the list-major table of [begin, end).
    ptrs.resize(static_cast<size_t>(l.rows.n_lists * (end - begin)));
    for (int d = 0; d < l.rows.n_lists; ++d) {
      for (int64_t t = begin; t < end; ++t) {
        ptrs[d * (end - begin) + (t - begin)] = l.rows.ptrs[d * n + t];
      }
    }
    Launch run = l;
    run.rows.n_tensors = end - begin;
    run.rows.ptrs = ptrs.data();
    run.rows.numels = l.rows.numels + begin;
    if (l.rows.master != nullptr) run.rows.master = l.rows.master + begin;
    if (l.rng != nullptr) run.rng = l.rng + begin;
    for (int j = 0; j < n_states; ++j) run.states[j] = l.states[j] + begin;
    cudaError_t err = launch(run, stream);
    if (err == cudaSuccess) err = advance(run, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace fused_optim
