// CPU kernels for AVX-512 F/BW/VL/DQ (Skylake-SP, Ice Lake, Zen 4 and newer).
// See [note: one instruction set per translation unit] in fused_optim/macros.h: the
// standard headers and the data-only API come before the target pragma; the engine and
// the math after it, in the inline namespace FO_CPU_CAPABILITY.
#define FO_CPU_CAPABILITY AVX512

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/kernel_api.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define FO_HAVE_F16C 1
#define FO_CPU_VEC8 1  // [note: half precision in registers] in kernels_impl.h
#define FO_CPU_VEC16 1  // 512-bit integer vectors (the Philox draws, kernels_impl.h)
#define FO_ISA_SUPPORTED 1
#endif

#include "cpu/kernels_impl.h"

#if defined(__x86_64__)
#pragma GCC pop_options  // the accessor below must run on any CPU
#endif

namespace fused_optim {
namespace cpu {

const KernelSet& kernels_avx512() {
#if defined(FO_ISA_SUPPORTED)
  static const KernelSet set{"avx512", {FO_FOR_EACH_OPTIMIZER(FO_CHUNKS_OF)},
                                  {FO_FOR_EACH_ROW_MATH(FO_ROWS_OF)},
                                  {FO_ADAFACTOR_PASSES},
                                  {FO_LBFGS_PASSES}};
#else
  static const KernelSet set{"avx512", {}};  // not built for this architecture
#endif
  return set;
}

}  // namespace cpu
}  // namespace fused_optim
