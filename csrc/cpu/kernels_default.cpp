// CPU kernels for the portable x86-64 baseline (SSE2), or any other architecture.
// See [note: one instruction set per translation unit] in fused_optim/macros.h: the
// standard headers and the data-only API come before the target pragma; the engine and
// the math after it, in the inline namespace FO_CPU_CAPABILITY.
#define FO_CPU_CAPABILITY DEFAULT

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/kernel_api.h"

#define FO_ISA_SUPPORTED 1

#include "cpu/kernels_impl.h"

namespace fused_optim {
namespace cpu {

const KernelSet& kernels_default() {
#if defined(FO_ISA_SUPPORTED)
  static const KernelSet set{"default", {FO_FOR_EACH_OPTIMIZER(FO_CHUNKS_OF)},
                                  {FO_FOR_EACH_ROW_MATH(FO_ROWS_OF)},
                                  {FO_ADAFACTOR_PASSES},
                                  {FO_LBFGS_PASSES}};
#else
  static const KernelSet set{"default", {}};  // not built for this architecture
#endif
  return set;
}

}  // namespace cpu
}  // namespace fused_optim
