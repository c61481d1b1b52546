// Every optimizer on CUDA: the functor the multi-tensor engine calls, the launcher that
// turns a call's options into template flags, and the per-tensor state update. The math
// is the optimizer's header (fused_optim/math/<name>.h, via fused_optim/optimizers.h),
// shared with the CPU engine; nothing here names an optimizer. The build instantiates
// launch<> once per optimizer and storage dtype (csrc/cuda/instantiate.py).
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

// ElementStep (fused_optim/dispatch.h, shared with the CPU engine) as the multi-tensor
// engine takes it: by table list d, which holds the optimizer's list list_of(LISTS, d).
template <typename Optim, typename T, uint32_t LISTS, uint32_t V, bool UNSCALE>
struct OptimFunctor {
  using Step = ElementStep<Optim, LISTS, V, UNSCALE>;
  using storage_t = T;
  using opmath_t = typename Storage<T>::opmath;
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

template <typename Optim, cpu::DType D>
cudaError_t launch(const Launch& l, cudaStream_t stream) {
  using T = typename StorageOf<D>::type;
  constexpr int NS = math::num_states<Optim>();
  std::array<void* const*, NS> states{};
  for (int j = 0; j < NS; ++j) states[j] = l.states[j];
  cudaError_t err = cudaSuccess;
  // The ops never pass a combination that selects no variant ([note: compiled variants]
  // in fused_optim/dispatch.h); refused here too, before any launch.
  const bool compiled = dispatch_variant<Optim>(
      l.lists, l.args, l.grad_scale != nullptr, [&](auto lists_c, auto variant_c, auto unscale_c) {
        using Op = OptimFunctor<Optim, T, decltype(lists_c)::value, decltype(variant_c)::value,
                                decltype(unscale_c)::value>;
        Op op;
        op.args = l.args;
        op.lr = l.lr;
        op.grad_scale = l.grad_scale;
        op.found_inf = l.found_inf;
        op.maximize = l.maximize;
        for (int j = 0; j < math::kMaxStates; ++j) op.states_are_double[j] = l.states_are_double[j];
        err = multi_tensor_apply<Op>(l.rows, states, op, stream);
      });
  return compiled ? err : cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------
// advance_states: one thread per tensor, pointers by value ([note: launch metadata by
// value] in multi_tensor_apply.cuh): up to ~4,000 tensors per launch with one state list.

constexpr int kStatesBlockSize = 256;

template <int NS>
struct StateTable {
  static constexpr int kMaxTensors = (kTableBytes - 16) / (8 * NS);
  void* ptrs[NS][kMaxTensors];
  int32_t n;
};

struct StateArgs {
  math::Args args;
  DeviceScalar lr;
  const float* found_inf;
  bool is_double[math::kMaxStates];
};

template <typename Optim>
__global__ void __launch_bounds__(kStatesBlockSize)
    advance_states_kernel(const __grid_constant__ StateTable<math::num_states<Optim>()> table,
                          const __grid_constant__ StateArgs a) {
  constexpr int NS = math::num_states<Optim>();
  if (found_inf_set(a.found_inf)) return;
  const int i = static_cast<int>(blockIdx.x) * kStatesBlockSize + static_cast<int>(threadIdx.x);
  if (i >= table.n) return;
  math::Args args = a.args;
  args.lr = read_scalar(a.lr);
  const void* ptrs[NS];
#pragma unroll
  for (int j = 0; j < NS; ++j) ptrs[j] = table.ptrs[j][i];
  double state[2 * NS];
  advance_state<Optim>(args, ptrs, a.is_double, state);
#pragma unroll
  for (int j = 0; j < NS; ++j) store_state(table.ptrs[j][i], a.is_double[j], state[j]);
}

template <typename Optim>
cudaError_t advance_states(const Launch& l, cudaStream_t stream) {
  constexpr int NS = math::num_states<Optim>();
  if constexpr (NS == 0) {
    return cudaSuccess;
  } else {
    using Table = StateTable<NS>;
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
      for (int j = 0; j < NS; ++j) {
        for (int64_t i = 0; i < count; ++i) table.ptrs[j][i] = l.states[j][begin + i];
      }
      table.n = static_cast<int32_t>(count);
      const unsigned int blocks =
          static_cast<unsigned int>((count + kStatesBlockSize - 1) / kStatesBlockSize);
      FO_LAUNCH_KERNEL(advance_states_kernel<Optim>, blocks, kStatesBlockSize, 0, stream, table, a);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
}

}  // namespace cuda
}  // namespace fused_optim
