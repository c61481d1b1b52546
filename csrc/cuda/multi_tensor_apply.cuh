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
// every list sits at offset i from its data pointer; all lists share one storage dtype;
// tensors of one launch do not overlap in memory.
//
// Bytes moved per element: exactly the lists the functor reads and writes, once each
// (fp32 AdamW: reads param, grad, exp_avg, exp_avg_sq = 16 B, writes param, exp_avg,
// exp_avg_sq = 12 B). Per block there is one more read of the per-tensor scalars
// (step, lr, found_inf, grad_scale), a few bytes per 64K elements.
//
// Functor interface (see OptimFunctor in engine.cuh):
//   using storage_t;                            float, double, __half or __nv_bfloat16
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
// call the same functor, so the results are bit-identical.
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

// V elements of T in one 16-byte-aligned word: one 128-bit load or store.
template <typename T, int V>
struct alignas(sizeof(T) * V) Packed {
  T v[V];
};

// ---------------------------------------------------------------------------------
// The launch table (see [note: launch metadata by value]).

template <int NS, int MAX_TENSORS>
struct TensorScalarPtrs {
  const void* ptrs[NS][MAX_TENSORS];
};
template <int MAX_TENSORS>
struct TensorScalarPtrs<0, MAX_TENSORS> {};

template <int DEPTH, int NS>
struct ChunkTable {
  // pointers + numel + scalar pointers + chunk_start, per tensor
  static constexpr int kBytesPerTensor = 8 * DEPTH + 8 + 8 * NS + 4;
  static constexpr int kMaxTensors = (kTableBytes - 16) / kBytesPerTensor;

  void* ptrs[DEPTH][kMaxTensors];
  int64_t numels[kMaxTensors];
  TensorScalarPtrs<NS, kMaxTensors> scalars;
  int32_t chunk_start[kMaxTensors + 1];  // chunk_start[n_tensors] = chunks in the launch
  int32_t n_tensors;
};

// ---------------------------------------------------------------------------------
// The kernel.

template <typename Op>
using TableFor = ChunkTable<Op::kDepth, Op::kTensorScalars>;

template <typename Op>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_apply_kernel(const __grid_constant__ TableFor<Op> table,
                              const __grid_constant__ Op op) {
  using T = typename Op::storage_t;
  using opmath = typename Storage<T>::opmath;
  using BlockScalars = typename Op::BlockScalars;
  constexpr int D = Op::kDepth;
  constexpr int NS = Op::kTensorScalars;
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  static_assert(kChunkSize % V == 0, "chunks must keep vector alignment");

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

  // Per-tensor scalars (bias corrections in double, lr, grad_scale): one thread computes
  // them, the block shares them.
  __shared__ BlockScalars shared_scalars;
  if (threadIdx.x == 0) {
    const void* tensor_scalars[NS > 0 ? NS : 1] = {nullptr};
    if constexpr (NS > 0) {
#pragma unroll
      for (int j = 0; j < NS; ++j) tensor_scalars[j] = table.scalars.ptrs[j][t];
    }
    shared_scalars = op.block_scalars(tensor_scalars);
  }
  __syncthreads();
  const BlockScalars s = shared_scalars;

  T* base[D];
  uintptr_t address_bits = 0;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    base[d] = static_cast<T*>(table.ptrs[d][t]) + chunk_begin;
    address_bits |= reinterpret_cast<uintptr_t>(base[d]);
  }

  if (address_bits % 16 == 0) {
    using Vec = Packed<T, V>;
    const int n_vec = n - n % V;
    for (int i = static_cast<int>(threadIdx.x) * V; i < n_vec; i += kBlockSize * V) {
      opmath x[V][D];
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (Op::reads(d)) {
          const Vec p = *reinterpret_cast<const Vec*>(base[d] + i);
#pragma unroll
          for (int k = 0; k < V; ++k) x[k][d] = Storage<T>::to_opmath(p.v[k]);
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) x[k][d] = opmath(0);
        }
      }
#pragma unroll
      for (int k = 0; k < V; ++k) op(x[k], s);
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (Op::writes(d)) {
          Vec p;
#pragma unroll
          for (int k = 0; k < V; ++k) p.v[k] = Storage<T>::from_opmath(x[k][d]);
          *reinterpret_cast<Vec*>(base[d] + i) = p;
        }
      }
    }
    // Scalar tail: fewer than V elements, only in a tensor's last chunk.
    for (int i = n_vec + static_cast<int>(threadIdx.x); i < n; i += kBlockSize) {
      opmath x[D];
#pragma unroll
      for (int d = 0; d < D; ++d) {
        x[d] = Op::reads(d) ? Storage<T>::to_opmath(base[d][i]) : opmath(0);
      }
      op(x, s);
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (Op::writes(d)) base[d][i] = Storage<T>::from_opmath(x[d]);
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
          x[k][d] = (Op::reads(d) && i < n) ? Storage<T>::to_opmath(base[d][i]) : opmath(0);
        }
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int i = i0 + static_cast<int>(threadIdx.x) + k * kBlockSize;
        if (i < n) op(x[k], s);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int i = i0 + static_cast<int>(threadIdx.x) + k * kBlockSize;
        if (i < n) {
#pragma unroll
          for (int d = 0; d < D; ++d) {
            if (Op::writes(d)) base[d][i] = Storage<T>::from_opmath(x[k][d]);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// The host side: pack the bucket into as few tables as fit, launch one kernel per table.

// rows: the bucket, list-major (rows.n_lists must be Op::kDepth); tensor_scalars[j]: a
// host array of rows.n_tensors device pointers for the functor's j-th per-tensor scalar.
// Returns the first launch error, or cudaSuccess.
template <typename Op>
cudaError_t multi_tensor_apply(const cpu::TensorTable& rows,
                               const std::array<void* const*, Op::kTensorScalars>& tensor_scalars,
                               const Op& op, cudaStream_t stream) {
  constexpr int D = Op::kDepth;
  constexpr int NS = Op::kTensorScalars;
  using Table = ChunkTable<D, NS>;
  static_assert(sizeof(Table) + sizeof(Op) + 16 <= kMaxKernelParamBytes,
                "launch table and functor exceed the 32 KB kernel parameter limit");
  if (rows.n_lists != D) return cudaErrorInvalidValue;

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
