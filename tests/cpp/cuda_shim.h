// Host emulation of the little CUDA that csrc/cuda/multi_tensor_apply.cuh and
// csrc/cuda/engine.cuh use, so that the C++ tests compile the CUDA engine (its host-side
// packing and its kernels) as plain C++ and run it on the CPU ([note: host emulation] in
// multi_tensor_apply.cuh). tests/cpp/cuda_shim/ holds stand-ins for <cuda_runtime_api.h>,
// <cuda_fp16.h> and <cuda_bf16.h> that include this file; only test_cuda_engine.cpp sees
// that directory.
//
// What it emulates:
//  - the keywords: __global__, __device__, __host__, __forceinline__, __launch_bounds__,
//    __grid_constant__ (no-ops), __shared__ (a function-local static: one instance, which
//    the sequential launch below makes per block);
//  - threadIdx / blockIdx / blockDim / gridDim (x only), __syncthreads (a no-op);
//  - __half / __nv_bfloat16 as 16-bit storage with CUDA's conversions (below);
//  - cudaStream_t, cudaError_t, cudaGetLastError, CUDART_VERSION;
//  - a launch (FO_LAUNCH_KERNEL) that checks the configuration as the CUDA runtime does,
//    records it, and runs blocks 0, 1, ... in order and, in each, threads 0, 1, ... in
//    order, each to completion. Thread 0 runs first, so the block's __shared__ scalars it
//    writes before __syncthreads are set when the other threads read them; the kernels
//    have no other communication between threads.
// What it cannot show: races and memory ordering between threads or blocks (every thread
// runs alone), device arithmetic (nvcc contracts a * b + c into FMAs by default, its pow
// and sqrt are its own; these are host operations without contraction), and parameter
// space limits beyond the static size check.
#pragma once

#if defined(__CUDACC__)
#error "cuda_shim.h emulates CUDA for host compilers; nvcc has the real thing"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define CUDART_VERSION 13000

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static

// Small tables: a bucket of 20 to 40 tensors already takes several launches, and each
// emulated thread copies 1 KB of table (the by-value kernel parameter) instead of 32 KB.
#define FO_CUDA_TEST_TABLE_BYTES 1024

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};

inline dim3 threadIdx{0, 0, 0};
inline dim3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};

inline void __syncthreads() {}

// The values of the CUDA runtime's enum.
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

// ---------------------------------------------------------------------------------------
// Storage types and CUDA's conversions, as cuda_fp16.hpp / cuda_bf16.hpp (CUDA 13.0)
// define them: round to nearest even; a NaN becomes the canonical NaN, 0x7fff (its sign and
// payload dropped), in both directions for fp16 (half -> float gives 0x7fffffff); bf16 ->
// float is the bit shift, NaNs included. The device instructions (cvt.rn.f16.f32,
// cvt.rn.bf16.f32, cvt.f32.f16) give the same results. Checked, for every fp16 / bf16 pattern
// and every float rounding tie, against the test oracles (test_cuda_engine.cpp) and, once
// by hand, against the headers' own host code compiled with g++. The CPU kernels round
// numbers alike but keep a NaN's payload: the two engines' stored NaNs differ in bits.

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

namespace fo_cuda_shim {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace fo_cuda_shim

inline float __half2float(__half h) {
  using fo_cuda_shim::float_of;
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t exponent = (h.x >> 10) & 0x1fu;
  const uint32_t mantissa = h.x & 0x3ffu;
  if (exponent == 0x1f) return float_of(mantissa ? 0x7fffffffu : (sign | 0x7f800000u));
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 0x1.0p-24f;
    return sign ? -magnitude : magnitude;
  }
  return float_of(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t u = fo_cuda_shim::bits_of(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{0x7fff};                  // NaN
  if (a >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: inf
  if (a >= 0x38800000u) {  // a normal half (>= 2^-14): drop 13 mantissa bits, nearest even
    const uint32_t dropped = a & 0x1fffu;
    uint32_t h = (a - 0x38000000u) >> 13;
    if (dropped > 0x1000u || (dropped == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent
    return __half{static_cast<uint16_t>(sign | h)};
  }
  // Zero or an fp16 subnormal: a multiple of 2^-24, rounded to nearest even in the FPU
  // (scaling by 2^24 is exact; the default rounding mode is nearest even).
  const float scaled = std::fabs(f) * 0x1.0p24f;
  return __half{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)))};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  return fo_cuda_shim::float_of(static_cast<uint32_t>(b.x) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = fo_cuda_shim::bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};  // NaN
  uint32_t h = u >> 16;
  const uint32_t dropped = u & 0xffffu;
  if (dropped > 0x8000u || (dropped == 0x8000u && (h & 1u))) ++h;  // max + half an ulp: inf
  return __nv_bfloat16{static_cast<uint16_t>(h)};
}

// ---------------------------------------------------------------------------------------
// Launches.

namespace fo_cuda_shim {

struct LaunchRecord {
  std::string kernel;  // the kernel as the launch names it: "advance_states_kernel<Optim>"
  unsigned int blocks;                   // grid x
  unsigned int threads;                  // block x
  std::vector<unsigned char> first_arg;  // the bytes of the first kernel argument (the table)
};

struct State {
  std::vector<LaunchRecord> launches;  // every launch attempted, in order
  cudaError_t last_error = cudaSuccess;
  // Test hooks. Which blocks run: all, or (when restricted) those in the ranges
  // [first, second) -- for virtual tensors whose other chunks have no memory behind them.
  bool restrict_blocks = false;
  std::vector<std::pair<int64_t, int64_t>> block_ranges;
  int fail_launch = -1;  // this launch (index into `launches`) fails to start

  void reset() { *this = State(); }
};

inline State& state() {
  static State s;
  return s;
}

template <typename First, typename... Rest>
std::vector<unsigned char> bytes_of_first(const First& first, const Rest&...) {
  static_assert(std::is_trivially_copyable_v<First>, "kernel arguments are copied bytewise");
  std::vector<unsigned char> b(sizeof(First));
  std::memcpy(b.data(), &first, sizeof(First));
  return b;
}

template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 blocks, dim3 threads,
            size_t shared_bytes, cudaStream_t, const Args&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "argument count");
  static_assert((sizeof(Params) + ... + 0) <= 32764,
                "kernel parameters exceed CUDA's 32,764 bytes (CUDA 12.1+, sm_70+)");
  State& s = state();
  // The CUDA runtime's checks: a grid of 1 .. 2^31 - 1 blocks in x (65,535 in y, z), 1 ..
  // 1,024 threads per block, 48 KB of dynamic shared memory without opt-in.
  const bool valid = blocks.x >= 1 && blocks.x <= 0x7fffffffu && blocks.y >= 1 &&
                     blocks.y <= 65535 && blocks.z >= 1 && blocks.z <= 65535 && threads.x >= 1 &&
                     threads.y >= 1 && threads.z >= 1 &&
                     static_cast<uint64_t>(threads.x) * threads.y * threads.z <= 1024 &&
                     shared_bytes <= 48 * 1024;
  if (!valid) {
    s.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (blocks.y != 1 || blocks.z != 1 || threads.y != 1 || threads.z != 1) {
    s.last_error = cudaErrorNotSupported;  // the emulation runs x only
    return;
  }
  s.launches.push_back(LaunchRecord{name, blocks.x, threads.x, bytes_of_first(args...)});
  if (static_cast<int>(s.launches.size()) - 1 == s.fail_launch) {
    s.last_error = cudaErrorLaunchFailure;
    return;
  }
  blockDim = threads;
  gridDim = blocks;
  auto run_blocks = [&](int64_t begin, int64_t end) {
    if (begin < 0) begin = 0;
    if (end > static_cast<int64_t>(blocks.x)) end = blocks.x;
    for (int64_t b = begin; b < end; ++b) {
      blockIdx = dim3(static_cast<unsigned int>(b), 0, 0);
      for (unsigned int t = 0; t < threads.x; ++t) {
        threadIdx = dim3(t, 0, 0);
        kernel(args...);
      }
    }
  };
  if (!s.restrict_blocks) {
    run_blocks(0, blocks.x);
  } else {
    for (const auto& r : s.block_ranges) run_blocks(r.first, r.second);
  }
}

}  // namespace fo_cuda_shim

// Returns the last error and resets it, as the runtime does for launch errors.
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = fo_cuda_shim::state().last_error;
  fo_cuda_shim::state().last_error = cudaSuccess;
  return e;
}

#define FO_LAUNCH_KERNEL(kernel, blocks, threads, shared_bytes, stream, ...) \
  ::fo_cuda_shim::launch(#kernel, &kernel, blocks, threads, shared_bytes, stream, __VA_ARGS__)
