// The CUDA multi-tensor engine, shared by every algorithm.
//
// What it computes: for every chunk of kChunkSize elements of every tensor of a bucket,
// one thread block loads the elements of each list (param, grad, states...), converts
// them to opmath (float for fp32/fp16/bf16 storage, double for fp64), calls the
// algorithm's functor, which calls the element-wise math of fused_optim/math/, and
// stores the lists the algorithm writes. Nothing else: no algorithm is written here.
//
// Preconditions (checked by the ops layer, csrc/cuda/ops_cuda.cu, with TORCH_CHECK):
// every tensor of a row is non-overlapping and dense with one layout, so element i of
// every list sits at offset i from its data pointer; the lists' storage is the launch's
// storage policy's ([note: storage policy]); tensors of one launch do not overlap in
// memory.
//
// Bytes moved per element: exactly the lists the functor reads and writes, once each
// (fp32 AdamW: reads param, grad, exp_avg, exp_avg_sq = 16 B, writes param, exp_avg,
// exp_avg_sq = 12 B). Per block there is one more read of the per-tensor scalars
// (step, lr, found_inf, grad_scale), a few bytes per 64K elements.
//
// Functor interface (see OptimFunctor in engine.cuh):
//   using storage;                              a ListStorage ([note: storage policy])
//   static constexpr int kDepth;                number of lists
//   static constexpr int kTensorScalars;        per-tensor state pointers (0 .. kMaxStates)
//   static constexpr bool reads(int list), writes(int list);
//   struct BlockScalars;                        per-tensor values, computed once per block
//   __device__ bool skip() const;               true: the whole call is a no-op (found_inf)
//   __device__ BlockScalars block_scalars(const void* const* tensor_scalars) const;
//   __device__ void operator()(opmath (&x)[kDepth], const BlockScalars&) const;
//
// [note: launch metadata by value]
// The pointers, sizes and chunk map of a launch travel as one kernel argument, as in
// ATen's and apex's multi_tensor_apply, so a launch needs no host-to-device copy, no
// device allocation, and is safe to capture in a CUDA graph (the argument is baked into
// the graph node; the tensors' addresses are fixed under capture anyway). Since CUDA
// 12.1 (driver R530+) a kernel may take 32,764 bytes of parameters on sm_70 and newer.
// ATen's table holds, at depth 4, 36 tensors and 320 blocks per launch under the old
// 4 KB limit (252 tensors and 2,240 blocks when ATen is built with CUDA 13). Ours
// stores, per tensor, its DEPTH pointers, its numel, its state pointers and where its
// chunks start, and no per-block entries: 619 tensors per launch with 4 lists and a step
// (AdamW), 537 with 5 lists and a step, 895 with 3 lists and no state, 1,151 with 2,
// whatever their sizes. An 8,192-tensor AdamW bucket takes 14 launches (ATen with 4 KB:
// at least 228).
//
// [note: one block per chunk, found by binary search]
// The table stores, per tensor, the index of its first chunk (a prefix sum), not a
// block -> tensor map: a block finds its tensor by a binary search over the table
// (~10 uniform loads from the parameter space for 619 tensors, once per 64K elements).
// So the number of blocks of a launch is bounded only by the grid (2^31 - 1), a tensor
// never spans two launches, and a launch is cut only when the table of tensors is full.
// The table is a `const __grid_constant__` parameter, so indexing it with a run-time
// index reads the parameter space directly instead of copying 32 KB to local memory.
//
// [note: 64-bit indexing]
// A chunk's first element is chunk_index * kChunkSize, computed in int64, and each
// block's base pointers are offset by it; inside a chunk (<= 65536 elements) indices are
// int32. numels are int64. Tensors of more than 2^31 elements are therefore handled
// like any other; the limit is 2^31 - 1 chunks per launch (2^47 elements).
//
// [note: vectorized and scalar paths]
// When the DEPTH base pointers of a row are all 16-byte aligned (the usual case: the
// caching allocator aligns to 512 B, and kChunkSize is a multiple of every vector
// width), each thread moves 16 B per list per iteration (4 fp32, 8 fp16/bf16, 2 fp64)
// with one 128-bit load and store per list, and the last n % V elements of the tensor
// go through a scalar tail. Otherwise (e.g. views whose storage offset is not a
// multiple of V) each thread handles V elements per iteration at stride kBlockSize,
// still coalesced, all loads of an iteration issued before any math (ILP). Both paths
// call the same functor, so the results are bit-identical. Under a storage policy whose
// lists differ in element size, V is the widest list's 16 B (4 elements beside an fp32
// list or master copy): a bf16 list moves them in one 8-byte access (still coalesced,
// 256 contiguous bytes per warp). Registers (ptxas, sm_90, nvcc 13.0, no spills): Adam
// on bf16 params and states with fp32 master copies and stochastic rounding 100-112 at
// V = 4 (124-128 at V = 8, two 16-byte accesses per fp32 list); all-bf16 lists with
// stochastic rounding (V = 8) 116-128; the uniform bf16 kernel 58-98.
//
// [note: storage policy]
// What a launch reads and writes, and how it rounds, is its ListStorage: params and
// grads (table lists 0 and 1) in one storage type, the state lists (2, ...) in another,
// optionally the params' fp32 master copies, optionally stochastic rounding into bf16.
// The uniform storage (every list of one dtype, neither) is torch.optim's and every call
// without a memory policy; the others are the memory policies of cpu::kPolicies
// ([note: memory policy] in csrc/cpu/kernel_api.h), the same semantics, bit for bit, as
// the CPU engine's policy_loop (csrc/cpu/kernels_impl.h):
//  - each list is loaded in its own storage; the math is in fp32 (opmath);
//  - with master copies, the param's value is read from the copy; the copy is written,
//    and the param written rounded to nearest from it, in the same pass;
//  - stores round to nearest even; bf16 ones with math::bf16_bits_nearest (a NaN stays
//    a quiet NaN of its high half, the CPU's float_to_bf16_any), not
//    __float2bfloat16_rn (which makes every NaN the canonical one);
//  - with stochastic rounding, element i of tensor t takes the four words of
//    math::random_words(seed_t, offset_t + i): word 0 rounds the param (a bf16 param
//    without a master copy), word 1 + k the k-th state list of the call (bf16 states),
//    each with math::bf16_bits_stochastic; the grads (written back unscaled) and a
//    master copy's param round to nearest. seed_t and offset_t are read by each block
//    from the tensor's rng_state, an int64 [seed, offset] in device memory (no host
//    sync), and offset_t advances by numel_t in the launch that stores the per-tensor
//    state, after every block has read it ([note: per-tensor state] in engine.cuh).
// The policy's lists travel in the launch table (the master copies' and rng_states'
// pointers, 8 B per tensor each, only in the tables of policies that have them).
// A bf16 work list ([note: bf16 work lists] in fused_optim/math/optimizer.h: Muon's
// Newton-Schulz input and output) is a list of its own storage beside the uniform ones
// (ListStorage's WORK, Bf16Work): loaded exactly, stored rounded to the params' dtype and
// then to bf16, as the CPU engine's store_work; no memory policy with it. It moves V
// elements in one access of 2V bytes (4 B beside fp64 params, 8 B beside fp32).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <array>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "cpu/kernel_api.h"
#include "cuda/kernel_api.h"
#include "fused_optim/macros.h"
#include "fused_optim/math/stochastic.h"

#if !defined(CUDART_VERSION) || CUDART_VERSION < 12010
#error "fused_optim's CUDA kernels need CUDA 12.1 or newer (32 KB kernel parameters)"
#endif

// [note: host emulation]
// tests/cpp compiles this header and engine.cuh as plain C++ (tests/cpp/cuda_shim.h
// defines the CUDA keywords, the storage types and a launch that runs the blocks, then
// the threads of each block, one after another), so ctest checks the engine's host and
// kernel logic on machines without a GPU. Two hooks serve it and change nothing under
// nvcc: every launch goes through FO_LAUNCH_KERNEL, which the shim replaces, and
// FO_CUDA_TEST_TABLE_BYTES, which the shim sets, shrinks the launch tables so that small
// buckets take several launches.
#ifndef FO_LAUNCH_KERNEL
#define FO_LAUNCH_KERNEL(kernel, blocks, threads, shared_bytes, stream, ...) \
  kernel<<<blocks, threads, shared_bytes, stream>>>(__VA_ARGS__)
#endif

namespace fused_optim {
namespace cuda {

constexpr int kBlockSize = 512;
// The CUDA limit on the parameters of one kernel (CUDA 12.1+, sm_70+), and the share of
// it given to the table; the rest holds the functor (static_assert below).
constexpr int kMaxKernelParamBytes = 32764;
#if defined(FO_CUDA_TEST_TABLE_BYTES)
constexpr int kTableBytes = FO_CUDA_TEST_TABLE_BYTES;  // [note: host emulation]
#else
constexpr int kTableBytes = kMaxKernelParamBytes - 512;
#endif

// ---------------------------------------------------------------------------------
// Storage types and their conversions to opmath. Conversions to half precision round
// to nearest even (__float2half_rn, __float2bfloat16_rn), as c10::Half and
// c10::BFloat16 do, so results stored here match torch's.

template <typename T>
struct Storage;

template <>
struct Storage<float> {
  using opmath = float;
  static __device__ FO_INLINE float to_opmath(float x) { return x; }
  static __device__ FO_INLINE float from_opmath(float x) { return x; }
};

template <>
struct Storage<double> {
  using opmath = double;
  static __device__ FO_INLINE double to_opmath(double x) { return x; }
  static __device__ FO_INLINE double from_opmath(double x) { return x; }
};

template <>
struct Storage<__half> {
  using opmath = float;
  static __device__ FO_INLINE float to_opmath(__half x) { return __half2float(x); }
  static __device__ FO_INLINE __half from_opmath(float x) { return __float2half_rn(x); }
};

template <>
struct Storage<__nv_bfloat16> {
  using opmath = float;
  static __device__ FO_INLINE float to_opmath(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ FO_INLINE __nv_bfloat16 from_opmath(float x) {
    return __float2bfloat16_rn(x);
  }
};

// bf16 under a memory policy: its bits, rounded as the CPU engine rounds a policy's
// stores ([note: storage policy]). Loading is the bit shift, as __bfloat162float.
struct Bf16Bits {
  uint16_t x;
};

template <>
struct Storage<Bf16Bits> {
  using opmath = float;
  static __device__ FO_INLINE float to_opmath(Bf16Bits b) {
    const uint32_t u = static_cast<uint32_t>(b.x) << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
  }
  static __device__ FO_INLINE Bf16Bits from_opmath(float x) {
    return Bf16Bits{math::bf16_bits_nearest(x)};
  }
};

// A bf16 work list beside lists of storage PARAM ([note: bf16 work lists] in
// fused_optim/math/optimizer.h): its bits, loaded exactly into PARAM's opmath (float, or
// double beside fp64 params); a value stored into it is rounded to PARAM first, then to
// bf16 through float as the CPU engine's store_work rounds it (math::bf16_bits_nearest is
// its float_to_bf16_any), so its bits are those of torch's `.bfloat16()` of a tensor of
// the params' dtype.
template <typename PARAM>
struct Bf16Work {
  uint16_t x;
};

template <typename PARAM>
struct Storage<Bf16Work<PARAM>> {
  using opmath = typename Storage<PARAM>::opmath;
  static __device__ FO_INLINE opmath to_opmath(Bf16Work<PARAM> b) {
    return static_cast<opmath>(Storage<Bf16Bits>::to_opmath(Bf16Bits{b.x}));
  }
  static __device__ FO_INLINE Bf16Work<PARAM> from_opmath(opmath x) {
    const auto stored = Storage<PARAM>::to_opmath(Storage<PARAM>::from_opmath(x));
    return Bf16Work<PARAM>{math::bf16_bits_nearest(static_cast<float>(stored))};
  }
};

// V elements of T in one 16-byte-aligned word: one 128-bit load or store.
template <typename T, int V>
struct alignas(sizeof(T) * V) Packed {
  T v[V];
};

// ---------------------------------------------------------------------------------
// Storage policies ([note: storage policy]).

// PARAM: the storage of params and grads, STATE: of the state lists; MASTER: the params
// have fp32 master copies; STOCHASTIC: bf16 stores round stochastically; WORK: the table
// lists (a bit per list) that are bf16 work lists (Bf16Work<PARAM>), the others as above.
template <typename PARAM, typename STATE, bool MASTER, bool STOCHASTIC, uint32_t WORK = 0>
struct ListStorage {
  using param_t = PARAM;
  using state_t = STATE;
  using work_t = Bf16Work<PARAM>;
  using opmath = typename Storage<PARAM>::opmath;
  static_assert(std::is_same_v<opmath, typename Storage<STATE>::opmath>,
                "the lists of a launch share one opmath");
  static_assert(WORK == 0 || (!MASTER && !STOCHASTIC && std::is_same_v<PARAM, STATE>),
                "bf16 work lists take no memory policy ([note: bf16 work lists])");
  static constexpr bool kMaster = MASTER;
  static constexpr bool kStochastic = STOCHASTIC;
  static constexpr uint32_t kWork = WORK;
  // Elements per thread and iteration: the widest list's 16 bytes (a narrower list moves
  // them in one 8-byte access: 4 bf16 beside fp32 lists), which keeps a policy's
  // registers near the uniform fp32 kernel's.
  static constexpr int kWidest = static_cast<int>(
      sizeof(PARAM) > sizeof(STATE) ? sizeof(PARAM) : sizeof(STATE));
  static constexpr int kVec = 16 / (MASTER && kWidest < 4 ? 4 : kWidest);
  // Table list d is a param or grad list (else a state list); it is the params', which
  // are read from and written to their master copies too.
  static constexpr FO_HOST_DEVICE bool param_list(int d) { return d < 2; }
  static constexpr FO_HOST_DEVICE bool master_list(int d) { return MASTER && d == 0; }
  static constexpr FO_HOST_DEVICE bool work_list(int d) { return ((WORK >> d) & 1u) != 0; }
  static constexpr FO_HOST_DEVICE int bytes(int d) {
    return static_cast<int>(work_list(d)    ? sizeof(work_t)
                            : param_list(d) ? sizeof(PARAM)
                                            : sizeof(STATE));
  }
  // Whether table list d's stores round stochastically, and with which random word.
  static constexpr FO_HOST_DEVICE bool stochastic(int d) {
    return STOCHASTIC && (d == 0 ? !MASTER && std::is_same_v<PARAM, Bf16Bits>
                                 : d >= 2 && std::is_same_v<STATE, Bf16Bits>);
  }
  static constexpr FO_HOST_DEVICE int word(int d) { return d == 0 ? 0 : d - 1; }
};

// Every list of storage T: torch.optim's storage, every call without a memory policy.
template <typename T>
using UniformStorage = ListStorage<T, T, false, false>;

// Elements [i, i + V) of a list of storage T at `base`, as opmath, in accesses of up to
// 16 bytes (base + i aligned to them).
template <typename T, int V, int D, typename O>
__device__ FO_INLINE void load_vector(const void* base, int i, O (&x)[V][D], int d) {
  constexpr int W = 16 / static_cast<int>(sizeof(T)) < V ? 16 / static_cast<int>(sizeof(T)) : V;
  static_assert(V % W == 0, "whole accesses");
  const T* p = static_cast<const T*>(base) + i;
#pragma unroll
  for (int w = 0; w < V / W; ++w) {
    const Packed<T, W> q = *reinterpret_cast<const Packed<T, W>*>(p + w * W);
#pragma unroll
    for (int k = 0; k < W; ++k) x[w * W + k][d] = Storage<T>::to_opmath(q.v[k]);
  }
}

// The V values `in` stored rounded to nearest at elements [i, i + V) of `base`.
template <typename T, int V, int D, typename O>
__device__ FO_INLINE void store_vector(void* base, int i, const O (&x)[V][D], int d) {
  constexpr int W = 16 / static_cast<int>(sizeof(T)) < V ? 16 / static_cast<int>(sizeof(T)) : V;
  static_assert(V % W == 0, "whole accesses");
  T* p = static_cast<T*>(base) + i;
#pragma unroll
  for (int w = 0; w < V / W; ++w) {
    Packed<T, W> q;
#pragma unroll
    for (int k = 0; k < W; ++k) q.v[k] = Storage<T>::from_opmath(x[w * W + k][d]);
    *reinterpret_cast<Packed<T, W>*>(p + w * W) = q;
  }
}

// Element i of table list d, as opmath; x stored there, rounded to nearest.
template <typename Pol>
__device__ FO_INLINE typename Pol::opmath load_element(int d, const void* base, int i) {
  if (Pol::work_list(d)) {
    return Storage<typename Pol::work_t>::to_opmath(
        static_cast<const typename Pol::work_t*>(base)[i]);
  }
  if (Pol::param_list(d)) {
    return Storage<typename Pol::param_t>::to_opmath(
        static_cast<const typename Pol::param_t*>(base)[i]);
  }
  return Storage<typename Pol::state_t>::to_opmath(
      static_cast<const typename Pol::state_t*>(base)[i]);
}

template <typename Pol>
__device__ FO_INLINE void store_element(int d, void* base, int i, typename Pol::opmath x) {
  if (Pol::work_list(d)) {
    static_cast<typename Pol::work_t*>(base)[i] = Storage<typename Pol::work_t>::from_opmath(x);
  } else if (Pol::param_list(d)) {
    static_cast<typename Pol::param_t*>(base)[i] = Storage<typename Pol::param_t>::from_opmath(x);
  } else {
    static_cast<typename Pol::state_t*>(base)[i] = Storage<typename Pol::state_t>::from_opmath(x);
  }
}

// One element's values after the math, x[d] per table list, rounded for its store: the
// lists that round stochastically take their random word of `words` (the element's
// math::random_words) and hold the bf16 value they round to, as a float, which the
// store's nearest rounding then keeps exactly (a bf16 value, or a NaN of bf16's form).
template <typename Pol, int D>
__device__ FO_INLINE void round_stochastic(float (&x)[D], const math::Philox4x32& words) {
#pragma unroll
  for (int d = 0; d < D; ++d) {
    if (Pol::stochastic(d)) {
      const uint32_t u = static_cast<uint32_t>(
                             math::bf16_bits_stochastic(x[d], words.x[Pol::word(d)]))
                         << 16;
      __builtin_memcpy(&x[d], &u, sizeof u);
    }
  }
}

// ---------------------------------------------------------------------------------
// The launch table (see [note: launch metadata by value]).

template <int NS, int MAX_TENSORS>
struct TensorScalarPtrs {
  const void* ptrs[NS][MAX_TENSORS];
};
template <int MAX_TENSORS>
struct TensorScalarPtrs<0, MAX_TENSORS> {};

// A per-tensor pointer of the table that only some storage policies have.
template <typename T, bool HAS, int MAX_TENSORS>
struct OptionalPtrs {
  T* ptrs[MAX_TENSORS];
};
template <typename T, int MAX_TENSORS>
struct OptionalPtrs<T, false, MAX_TENSORS> {};

template <typename T, bool HAS, int MAX_TENSORS>
struct OptionalArray {
  T v[MAX_TENSORS];
};
template <typename T, int MAX_TENSORS>
struct OptionalArray<T, false, MAX_TENSORS> {};

// MASTER: the params' fp32 master copies; RNG: the rng_states ([note: storage policy]).
template <int DEPTH, int NS, bool MASTER = false, bool RNG = false>
struct ChunkTable {
  // pointers + numel + scalar pointers + master and rng_state pointers + chunk_start,
  // per tensor
  static constexpr int kBytesPerTensor = 8 * DEPTH + 8 + 8 * NS + 8 * MASTER + 8 * RNG + 4;
  static constexpr int kMaxTensors = (kTableBytes - 16) / kBytesPerTensor;

  void* ptrs[DEPTH][kMaxTensors];
  int64_t numels[kMaxTensors];
  TensorScalarPtrs<NS, kMaxTensors> scalars;
  OptionalPtrs<float, MASTER, kMaxTensors> master;
  OptionalPtrs<const int64_t, RNG, kMaxTensors> rng;
  int32_t chunk_start[kMaxTensors + 1];  // chunk_start[n_tensors] = chunks in the launch
  int32_t n_tensors;
};

// ---------------------------------------------------------------------------------
// The kernel.

template <typename Op>
using TableFor = ChunkTable<Op::kDepth, Op::kTensorScalars, Op::storage::kMaster,
                            Op::storage::kStochastic>;

template <typename Op>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_apply_kernel(const __grid_constant__ TableFor<Op> table,
                              const __grid_constant__ Op op) {
  using Pol = typename Op::storage;
  using P = typename Pol::param_t;
  using S = typename Pol::state_t;
  using opmath = typename Pol::opmath;
  using BlockScalars = typename Op::BlockScalars;
  constexpr int D = Op::kDepth;
  constexpr int NS = Op::kTensorScalars;
  constexpr int V = Pol::kVec;
  static_assert(kChunkSize % V == 0, "chunks must keep vector alignment");
  static_assert(!Pol::kStochastic || D <= 5, "four random words per element");

  if (op.skip()) return;  // uniform over the grid: found_inf is one value

  // The tensor of this block: the last t with chunk_start[t] <= blockIdx.x (tensors
  // with no elements are never put in the table, so chunk_start is strictly increasing).
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int lo = 0;
  int hi = table.n_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table.chunk_start[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int t = lo;
  const int64_t chunk_begin = static_cast<int64_t>(block - table.chunk_start[t]) * kChunkSize;
  const int64_t remaining = table.numels[t] - chunk_begin;
  const int n = static_cast<int>(remaining < kChunkSize ? remaining : kChunkSize);

  // Per-tensor scalars (bias corrections in double, lr, grad_scale) and, under
  // stochastic rounding, the Philox key and the counter of the chunk's element 0: one
  // thread computes them, the block shares them.
  __shared__ BlockScalars shared_scalars;
  __shared__ uint64_t shared_rng[2];
  if (threadIdx.x == 0) {
    const void* tensor_scalars[NS > 0 ? NS : 1] = {nullptr};
    if constexpr (NS > 0) {
#pragma unroll
      for (int j = 0; j < NS; ++j) tensor_scalars[j] = table.scalars.ptrs[j][t];
    }
    shared_scalars = op.block_scalars(tensor_scalars);
    if constexpr (Pol::kStochastic) {
      const int64_t* rng = table.rng.ptrs[t];
      shared_rng[0] = static_cast<uint64_t>(rng[0]);
      shared_rng[1] = static_cast<uint64_t>(rng[1]) + static_cast<uint64_t>(chunk_begin);
    }
  }
  __syncthreads();
  const BlockScalars s = shared_scalars;
  uint64_t key = 0, counter = 0;
  if constexpr (Pol::kStochastic) {
    key = shared_rng[0];
    counter = shared_rng[1];
  }

  void* base[D];
  uintptr_t address_bits = 0;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    base[d] = static_cast<char*>(table.ptrs[d][t]) + chunk_begin * Pol::bytes(d);
    address_bits |= reinterpret_cast<uintptr_t>(base[d]);
  }
  float* master = nullptr;
  if constexpr (Pol::kMaster) {
    master = table.master.ptrs[t] + chunk_begin;
    address_bits |= reinterpret_cast<uintptr_t>(master);
  }

  if (address_bits % 16 == 0) {
    const int n_vec = n - n % V;
    for (int i = static_cast<int>(threadIdx.x) * V; i < n_vec; i += kBlockSize * V) {
      opmath x[V][D];
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (!Op::reads(d)) {
#pragma unroll
          for (int k = 0; k < V; ++k) x[k][d] = opmath(0);
        } else if (Pol::master_list(d)) {
          if constexpr (Pol::kMaster) load_vector<float>(master, i, x, d);
        } else if (Pol::work_list(d)) {
          load_vector<typename Pol::work_t>(base[d], i, x, d);
        } else if (Pol::param_list(d)) {
          load_vector<P>(base[d], i, x, d);
        } else {
          load_vector<S>(base[d], i, x, d);
        }
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        op(x[k], s);
        if constexpr (Pol::kStochastic) {
          const uint64_t element = static_cast<uint64_t>(i + k);
          round_stochastic<Pol>(x[k], math::random_words(key, counter + element));
        }
      }
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (Op::writes(d)) {
          if constexpr (Pol::kMaster) {
            if (Pol::master_list(d)) store_vector<float>(master, i, x, d);
          }
          if (Pol::work_list(d)) {
            store_vector<typename Pol::work_t>(base[d], i, x, d);
          } else if (Pol::param_list(d)) {
            store_vector<P>(base[d], i, x, d);
          } else {
            store_vector<S>(base[d], i, x, d);
          }
        }
      }
    }
    // Scalar tail: fewer than V elements, only in a tensor's last chunk.
    for (int i = n_vec + static_cast<int>(threadIdx.x); i < n; i += kBlockSize) {
      opmath x[D];
#pragma unroll
      for (int d = 0; d < D; ++d) {
        x[d] = !Op::reads(d)         ? opmath(0)
               : Pol::master_list(d) ? master[i]
                                     : load_element<Pol>(d, base[d], i);
      }
      op(x, s);
      if constexpr (Pol::kStochastic) {
        round_stochastic<Pol>(x, math::random_words(key, counter + static_cast<uint64_t>(i)));
      }
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (Op::writes(d)) {
          if (Pol::master_list(d)) master[i] = x[0];
          store_element<Pol>(d, base[d], i, x[d]);
        }
      }
    }
  } else {
    for (int i0 = 0; i0 < n; i0 += kBlockSize * V) {
      opmath x[V][D];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int i = i0 + static_cast<int>(threadIdx.x) + k * kBlockSize;
#pragma unroll
        for (int d = 0; d < D; ++d) {
          x[k][d] = (i >= n || !Op::reads(d)) ? opmath(0)
                    : Pol::master_list(d)       ? master[i]
                                                : load_element<Pol>(d, base[d], i);
        }
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int i = i0 + static_cast<int>(threadIdx.x) + k * kBlockSize;
        if (i < n) {
          op(x[k], s);
          if constexpr (Pol::kStochastic) {
            const uint64_t element = static_cast<uint64_t>(i);
            round_stochastic<Pol>(x[k], math::random_words(key, counter + element));
          }
        }
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int i = i0 + static_cast<int>(threadIdx.x) + k * kBlockSize;
        if (i < n) {
#pragma unroll
          for (int d = 0; d < D; ++d) {
            if (Op::writes(d)) {
              if (Pol::master_list(d)) master[i] = x[k][0];
              store_element<Pol>(d, base[d], i, x[k][d]);
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// The host side: pack the bucket into as few tables as fit, launch one kernel per table.

// rows: the bucket, list-major (rows.n_lists must be Op::kDepth; rows.master, the fp32
// master copies, when the storage policy has them); tensor_scalars[j]: a host array of
// rows.n_tensors device pointers for the functor's j-th per-tensor scalar; rng: per row
// its rng_state (device), when the storage policy rounds stochastically.
// Returns the first launch error, or cudaSuccess.
template <typename Op>
cudaError_t multi_tensor_apply(const cpu::TensorTable& rows,
                               const std::array<void* const*, Op::kTensorScalars>& tensor_scalars,
                               const int64_t* const* rng, const Op& op, cudaStream_t stream) {
  using Pol = typename Op::storage;
  constexpr int D = Op::kDepth;
  constexpr int NS = Op::kTensorScalars;
  using Table = TableFor<Op>;
  static_assert(sizeof(Table) + sizeof(Op) + 16 <= kMaxKernelParamBytes,
                "launch table and functor exceed the 32 KB kernel parameter limit");
  if (rows.n_lists != D) return cudaErrorInvalidValue;
  if ((rows.master != nullptr) != Pol::kMaster || (rng != nullptr) != Pol::kStochastic) {
    return cudaErrorInvalidValue;
  }

  Table table;  // 32 KB on the host stack; only the used entries are written
  int n = 0;
  int64_t chunks = 0;
  auto flush = [&]() -> cudaError_t {
    if (n == 0) return cudaSuccess;
    table.n_tensors = n;
    table.chunk_start[n] = static_cast<int32_t>(chunks);
    FO_LAUNCH_KERNEL(multi_tensor_apply_kernel<Op>, static_cast<unsigned int>(chunks), kBlockSize,
                     0, stream, table, op);
    n = 0;
    chunks = 0;
    return cudaGetLastError();
  };

  for (int64_t t = 0; t < rows.n_tensors; ++t) {
    const int64_t numel = rows.numels[t];
    if (numel == 0) continue;  // nothing to update; a step counter is still incremented
    const int64_t tensor_chunks = (numel + kChunkSize - 1) / kChunkSize;
    if (tensor_chunks > INT32_MAX) return cudaErrorInvalidValue;  // > 2^47 elements
    if (n == Table::kMaxTensors || chunks + tensor_chunks > INT32_MAX) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    for (int d = 0; d < D; ++d) table.ptrs[d][n] = rows.ptrs[d * rows.n_tensors + t];
    if constexpr (NS > 0) {
      for (int j = 0; j < NS; ++j) table.scalars.ptrs[j][n] = tensor_scalars[j][t];
    }
    if constexpr (Pol::kMaster) table.master.ptrs[n] = static_cast<float*>(rows.master[t]);
    if constexpr (Pol::kStochastic) table.rng.ptrs[n] = rng[t];
    table.numels[n] = numel;
    table.chunk_start[n] = static_cast<int32_t>(chunks);
    chunks += tensor_chunks;
    ++n;
  }
  return flush();
}

// A one-element device tensor or a host value, read in double on the device.
__device__ FO_INLINE double read_scalar(const DeviceScalar& s) {
  if (s.ptr == nullptr) return s.value;
  return s.is_double ? *static_cast<const double*>(s.ptr)
                     : static_cast<double>(*static_cast<const float*>(s.ptr));
}

__device__ FO_INLINE bool found_inf_set(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

}  // namespace cuda
}  // namespace fused_optim
