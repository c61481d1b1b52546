// Every optimizer on CUDA: the functor the multi-tensor engine calls, the launcher that
// turns a call's options into template flags, and the per-tensor state update. The math
// is the optimizer's header (fused_optim/math/<name>.h, via fused_optim/optimizers.h),
// shared with the CPU engine; nothing here names an optimizer. The build instantiates
// launch<> once per optimizer and storage dtype, and launch_policy<> once per optimizer
// and memory policy of cpu::kPolicies (csrc/cuda/instantiate.py).
//
// What it computes, per element: grads are divided by *grad_scale (when given) and
// written back unscaled; then Optim::update with g = grad * (maximize ? -1 : 1), on the
// lists the call has. Bytes per element: each list the optimizer reads, once, and each
// it writes, once (fp32 AdamW: reads param, grad, exp_avg, exp_avg_sq = 16 B, writes
// param, exp_avg, exp_avg_sq = 12 B; + the grad with grad_scale). Per block: the
// per-tensor state (the step), lr (when a device tensor), found_inf and grad_scale.
//
// Template flags (dispatch_variant in fused_optim/dispatch.h, as on the CPU): which
// optional lists the call has (amsgrad's, momentum's), the optimizer's own variant bits,
// UNSCALE (grads read, divided and written back).
// maximize is a multiplication by -1 (exact), lr a value or pointer: both are uniform
// and cost nothing in a memory-bound loop, and each would double the instantiations.
//
// [note: per-tensor state]
// Each tensor's scalar state (its step count, ...) must advance exactly once per call,
// however many blocks and launches read it, and not at all when found_inf is set. The
// optimizer's kernels therefore never write it: every block reads the state as it was
// before the call, advances it and rounds it to the state tensors' dtypes itself
// (advance_state in fused_optim/dispatch.h, as the CPU op does: a float32 counter stops
// at 2^24 exactly as torch's `step += 1` does).
// Once all of the optimizer's launches are enqueued, advance_states stores the same
// advanced values. Stream order makes it run after every block that read the old value,
// so no block can see a half-updated state; no atomics between blocks, no "last block"
// counters, no host sync, and the sequence captures into a CUDA graph as is. The
// alternative (a first launch that advances, then the optimizer reading the new value)
// costs the same one launch; this order leaves the state unchanged when the optimizer's
// launch fails. A state tensor passed for two rows of one launch would be advanced once;
// run_step never launches such rows together ([note: aliased state] in kernel_api.h).
// A memory policy's rng_state [seed, offset] is per-tensor state of the same kind: every
// block reads the offset as it was before the call, and advance_states adds the tensor's
// element count to it (after the optimizer's launches, unless found_inf), in the same
// launch as the optimizer's per-tensor state, or in one of its own for an optimizer
// without any.
#pragma once

#include <array>
#include <cstdint>
#include <type_traits>

#include "cuda/kernel_api.h"
#include "cuda/multi_tensor_apply.cuh"
#include "fused_optim/dispatch.h"
#include "fused_optim/optimizers.h"

namespace fused_optim {
namespace cuda {

// The storage type of dtype D: torch.optim's (UniformStorage), and under a memory policy
// (PolicyStorageOf: bf16 as its bits, rounded as the CPU engine rounds them, [note:
// storage policy] in multi_tensor_apply.cuh).
template <cpu::DType D>
struct StorageOf;
template <>
struct StorageOf<cpu::DType::kFloat32> {
  using type = float;
};
template <>
struct StorageOf<cpu::DType::kFloat64> {
  using type = double;
};
template <>
struct StorageOf<cpu::DType::kFloat16> {
  using type = __half;
};
template <>
struct StorageOf<cpu::DType::kBFloat16> {
  using type = __nv_bfloat16;
};

template <cpu::DType D>
struct PolicyStorageOf : StorageOf<D> {};
template <>
struct PolicyStorageOf<cpu::DType::kBFloat16> {
  using type = Bf16Bits;
};

// The ListStorage of memory policy P (an index into cpu::kPolicies).
template <int P>
using PolicyListStorage =
    ListStorage<typename PolicyStorageOf<cpu::kPolicies[P].param>::type,
                typename PolicyStorageOf<cpu::kPolicies[P].state>::type, cpu::kPolicies[P].master,
                cpu::kPolicies[P].stochastic>;

// The number of lists in LISTS, and the optimizer list held by table list d.
FO_HOST_DEVICE constexpr int count_lists(uint32_t lists) {
  int n = 0;
  for (; lists != 0; lists &= lists - 1) ++n;
  return n;
}

FO_HOST_DEVICE constexpr int list_of(uint32_t lists, int d) {
  for (int k = 0; k < 32; ++k) {
    if ((lists >> k) & 1u) {
      if (d == 0) return k;
      --d;
    }
  }
  return -1;
}

// The bits of `bits` (a bit per optimizer list) as table lists of a call with `lists`.
FO_HOST_DEVICE constexpr uint32_t table_bits(uint32_t lists, uint32_t bits) {
  uint32_t out = 0;
  int d = 0;
  for (int k = 0; k < 32; ++k) {
    if ((lists >> k) & 1u) {
      if ((bits >> k) & 1u) out |= uint32_t{1} << d;
      ++d;
    }
  }
  return out;
}

// Pol with the table lists WORK as bf16 work lists ([note: bf16 work lists]).
template <typename Pol, uint32_t WORK>
struct WithWorkLists;
template <typename P, typename S, bool M, bool R, uint32_t W, uint32_t WORK>
struct WithWorkLists<ListStorage<P, S, M, R, W>, WORK> {
  using type = ListStorage<P, S, M, R, WORK>;
};

// ElementStep (fused_optim/dispatch.h, shared with the CPU engine) as the multi-tensor
// engine takes it: by table list d, which holds the optimizer's list list_of(LISTS, d).
// Pol: the launch's ListStorage ([note: storage policy] in multi_tensor_apply.cuh).
template <typename Optim, typename Pol, uint32_t LISTS, uint32_t V, bool UNSCALE>
struct OptimFunctor {
  using Step = ElementStep<Optim, LISTS, V, UNSCALE>;
  using storage = Pol;
  using opmath_t = typename Pol::opmath;
  static constexpr int kDepth = count_lists(LISTS);
  static constexpr int kTensorScalars = math::num_states<Optim>();
  static constexpr FO_HOST_DEVICE bool reads(int d) { return Step::reads(list_of(LISTS, d)); }
  static constexpr FO_HOST_DEVICE bool writes(int d) { return Step::writes(list_of(LISTS, d)); }

  struct BlockScalars {
    typename Optim::template Scalars<opmath_t> s;
    opmath_t grad_scale;
    opmath_t grad_sign;
  };

  math::Args args;
  DeviceScalar lr;
  const float* grad_scale;
  const float* found_inf;
  bool maximize;
  bool states_are_double[math::kMaxStates];

  __device__ FO_INLINE bool skip() const { return found_inf_set(found_inf); }

  __device__ BlockScalars block_scalars(const void* const* tensor_scalars) const {
    math::Args a = args;
    a.lr = read_scalar(lr);
    double state[kTensorScalars > 0 ? 2 * kTensorScalars : 1] = {0.0};
    if constexpr (kTensorScalars > 0) {
      advance_state<Optim>(a, tensor_scalars, states_are_double, state);
    }
    BlockScalars b;
    b.s = Optim::template scalars<LISTS, V, opmath_t>(a, state);
    b.grad_scale = UNSCALE ? static_cast<opmath_t>(*grad_scale) : opmath_t(1);
    b.grad_sign = maximize ? opmath_t(-1) : opmath_t(1);
    return b;
  }

  __device__ FO_INLINE void operator()(opmath_t (&x)[kDepth], const BlockScalars& b) const {
    opmath_t all[Optim::kLists] = {};  // every list of the optimizer; absent ones unused
#pragma unroll
    for (int d = 0; d < kDepth; ++d) all[list_of(LISTS, d)] = x[d];
    Step::apply(all, b.s, b.grad_scale, b.grad_sign);
#pragma unroll
    for (int d = 0; d < kDepth; ++d) x[d] = all[list_of(LISTS, d)];
  }
};

// One step of Optim over l.rows with the lists stored as Pol says, and Optim's bf16 work
// lists (Optim::kBFloat16Lists) in bf16.
template <typename Optim, typename Pol>
cudaError_t launch_storage(const Launch& l, cudaStream_t stream) {
  constexpr int NS = math::num_states<Optim>();
  std::array<void* const*, NS> states{};
  for (int j = 0; j < NS; ++j) states[j] = l.states[j];
  cudaError_t err = cudaSuccess;
  // The ops never pass a combination that selects no variant ([note: compiled variants]
  // in fused_optim/dispatch.h); refused here too, before any launch.
  const bool compiled = dispatch_variant<Optim>(
      l.lists, l.args, l.grad_scale != nullptr, [&](auto lists_c, auto variant_c, auto unscale_c) {
        constexpr uint32_t lists = decltype(lists_c)::value;
        using LaunchPol =
            typename WithWorkLists<Pol, table_bits(lists, Optim::kBFloat16Lists)>::type;
        using Op = OptimFunctor<Optim, LaunchPol, lists, decltype(variant_c)::value,
                                decltype(unscale_c)::value>;
        Op op;
        op.args = l.args;
        op.lr = l.lr;
        op.grad_scale = l.grad_scale;
        op.found_inf = l.found_inf;
        op.maximize = l.maximize;
        for (int j = 0; j < math::kMaxStates; ++j) op.states_are_double[j] = l.states_are_double[j];
        err = multi_tensor_apply<Op>(l.rows, states, LaunchPol::kStochastic ? l.rng : nullptr,
                                     op, stream);
      });
  return compiled ? err : cudaErrorInvalidValue;
}

template <typename Optim, cpu::DType D>
cudaError_t launch(const Launch& l, cudaStream_t stream) {
  if (l.rows.dtype != D || l.rows.state_dtype != D || l.rows.master != nullptr ||
      l.rng != nullptr) {
    return cudaErrorInvalidValue;  // a memory policy's call: launch_policy
  }
  return launch_storage<Optim, UniformStorage<typename StorageOf<D>::type>>(l, stream);
}

// An optimizer with bf16 work lists takes no memory policy (the ops refuse one): its
// policy units instantiate no kernel.
template <typename Optim, int P>
cudaError_t launch_policy(const Launch& l, cudaStream_t stream) {
  static_assert(P >= 0 && P < cpu::kNumPolicies, "a policy of cpu::kPolicies");
  if (policy_of(l) != P) return cudaErrorInvalidValue;
  if constexpr (Optim::kBFloat16Lists != 0) {
    (void)stream;
    return cudaErrorInvalidValue;
  } else {
    return launch_storage<Optim, PolicyListStorage<P>>(l, stream);
  }
}

// ---------------------------------------------------------------------------------
// advance_states: one thread per tensor, pointers by value ([note: launch metadata by
// value] in multi_tensor_apply.cuh): up to ~4,000 tensors per launch with one state list
// (~1,300 with one and rng_states, ~2,000 with rng_states only).

constexpr int kStatesBlockSize = 256;

template <int NS, int MAX_TENSORS>
struct StatePtrs {
  void* ptrs[NS][MAX_TENSORS];
};
template <int MAX_TENSORS>
struct StatePtrs<0, MAX_TENSORS> {};

// RNG: each tensor's rng_state and element count too ([note: storage policy]).
template <int NS, bool RNG = false>
struct StateTable {
  static constexpr int kBytesPerTensor = 8 * NS + (RNG ? 16 : 0);
  static constexpr int kMaxTensors = (kTableBytes - 16) / kBytesPerTensor;
  StatePtrs<NS, kMaxTensors> state;
  OptionalPtrs<int64_t, RNG, kMaxTensors> rng;
  OptionalArray<int64_t, RNG, kMaxTensors> numels;
  int32_t n;
};

// What one advance_states launch stores: Optim's per-tensor state, and the rng_states'
// offsets when RNG.
template <typename Optim, bool RNG>
struct StateLaunch {
  using optim = Optim;
  static constexpr int kStates = math::num_states<Optim>();
  static constexpr bool kRng = RNG;
};

struct StateArgs {
  math::Args args;
  DeviceScalar lr;
  const float* found_inf;
  bool is_double[math::kMaxStates];
};

template <typename L>
__global__ void __launch_bounds__(kStatesBlockSize)
    advance_states_kernel(const __grid_constant__ StateTable<L::kStates, L::kRng> table,
                          const __grid_constant__ StateArgs a) {
  using Optim = typename L::optim;
  constexpr int NS = L::kStates;
  constexpr bool RNG = L::kRng;
  if (found_inf_set(a.found_inf)) return;
  const int i = static_cast<int>(blockIdx.x) * kStatesBlockSize + static_cast<int>(threadIdx.x);
  if (i >= table.n) return;
  if constexpr (NS > 0) {
    math::Args args = a.args;
    args.lr = read_scalar(a.lr);
    const void* ptrs[NS];
#pragma unroll
    for (int j = 0; j < NS; ++j) ptrs[j] = table.state.ptrs[j][i];
    double state[2 * NS];
    advance_state<Optim>(args, ptrs, a.is_double, state);
#pragma unroll
    for (int j = 0; j < NS; ++j) store_state(table.state.ptrs[j][i], a.is_double[j], state[j]);
  }
  if constexpr (RNG) {
    // The offset as uint64, as the CPU op advances it (wraps at 2^64 alike).
    int64_t* offset = table.rng.ptrs[i] + 1;
    *offset = static_cast<int64_t>(static_cast<uint64_t>(*offset) +
                                   static_cast<uint64_t>(table.numels.v[i]));
  }
}

template <typename Optim, bool RNG>
cudaError_t advance_states_with(const Launch& l, cudaStream_t stream) {
  constexpr int NS = math::num_states<Optim>();
  using Table = StateTable<NS, RNG>;
  static_assert(sizeof(Table) + sizeof(StateArgs) + 16 <= kMaxKernelParamBytes,
                "state table exceeds the 32 KB kernel parameter limit");
  StateArgs a;
  a.args = l.args;
  a.lr = l.lr;
  a.found_inf = l.found_inf;
  for (int j = 0; j < math::kMaxStates; ++j) a.is_double[j] = l.states_are_double[j];
  Table table;
  const int64_t n = l.rows.n_tensors;
  for (int64_t begin = 0; begin < n; begin += Table::kMaxTensors) {
    const int64_t count = n - begin < Table::kMaxTensors ? n - begin : Table::kMaxTensors;
    if constexpr (NS > 0) {
      for (int j = 0; j < NS; ++j) {
        for (int64_t i = 0; i < count; ++i) table.state.ptrs[j][i] = l.states[j][begin + i];
      }
    }
    if constexpr (RNG) {
      for (int64_t i = 0; i < count; ++i) {
        table.rng.ptrs[i] = l.rng[begin + i];
        table.numels.v[i] = l.rows.numels[begin + i];
      }
    }
    table.n = static_cast<int32_t>(count);
    const unsigned int blocks =
        static_cast<unsigned int>((count + kStatesBlockSize - 1) / kStatesBlockSize);
    using L = StateLaunch<Optim, RNG>;
    FO_LAUNCH_KERNEL(advance_states_kernel<L>, blocks, kStatesBlockSize, 0, stream, table, a);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename Optim>
cudaError_t advance_states(const Launch& l, cudaStream_t stream) {
  if (l.rng != nullptr) return advance_states_with<Optim, true>(l, stream);
  if constexpr (math::num_states<Optim>() == 0) {
    return cudaSuccess;
  } else {
    return advance_states_with<Optim, false>(l, stream);
  }
}

}  // namespace cuda
}  // namespace fused_optim
