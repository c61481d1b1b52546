// Portability macros shared by every C++ kernel language we compile (host C++, CUDA).
//
// Kept free of torch headers on purpose: the CPU kernel translation units are compiled
// once per instruction set (see csrc/cpu/kernels_impl.h) and must not instantiate any
// inline function that another translation unit could also emit (see
// [note: one instruction set per translation unit]).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FO_HOST_DEVICE __host__ __device__
#define FO_INLINE __forceinline__
#else
#define FO_HOST_DEVICE
#define FO_INLINE inline __attribute__((always_inline))
#endif

// `#pragma unroll` in device code; host compilers unroll short constant-count loops on
// their own, and GCC would warn about an unknown pragma (nvcc hands a macro's _Pragma to
// the host compiler, so it is defined in the device passes only).
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define FO_UNROLL _Pragma("unroll")
#else
#define FO_UNROLL
#endif

// [note: one instruction set per translation unit]
// The CPU kernels are compiled three times, for the portable x86-64 baseline, AVX2 and
// AVX-512, with `#pragma GCC target` in csrc/cpu/kernels_<isa>.cpp, and the variant is
// chosen at run time from the CPU's flags. An inline function compiled under the AVX-512
// target in one translation unit must never be merged by the linker with the same
// function from the portable unit, or a CPU without AVX-512 could run AVX-512 code. So
// every function in the math headers lives in the inline namespace FO_CPU_CAPABILITY,
// which each kernel unit sets to its own name; everything else sees `generic`. Types
// shared across units (csrc/cpu/kernel_api.h, math/hyper.h) hold data only.
#ifndef FO_CPU_CAPABILITY
#define FO_CPU_CAPABILITY generic
#endif
