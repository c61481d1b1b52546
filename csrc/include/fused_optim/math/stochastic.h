// Random bits and stochastic rounding, on host and device: the building block of the
// memory policy's stochastic rounding into bf16 (issue 14): the CPU engine's and the
// CUDA engine's policy stores.
//
// [note: stochastic rounding]
// A float rounds to bf16 stochastically when its 16 low bits, read as a fraction of the
// bf16 ulp, are the probability of rounding away from zero: add 16 uniform random bits to
// the float's bits and cut the low 16. The mean of many such roundings is the float
// (unbiased), where round-to-nearest-even loses every update below half an ulp.
// Infinities stay (their low bits are zero); NaN is kept quiet (adding to 0x7FFFFFFF
// would carry into the sign); a finite float above bf16's largest finite rounds to
// infinity with the probability its distance gives.
//
// The bits come from Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
// 1, 2, 3", SC 2011), counter-based: the bits of element i are a function of (key,
// counter i) alone, so any thread, block or instruction set computes the same bits in
// any order, and a run is reproducible from its key and the counters. The key and
// counter layout is Triton's tl.randint4x(seed, offset): key (seed low 32, seed high
// 32), counter (offset low 32, offset high 32, 0, 0); the first of the four words is
// tl.randint's. So a Triton kernel and a C++ one draw the same bits for an element
// (tests/test_stochastic.py checks it against the Triton interpreter).
#pragma once

#include <stdint.h>

#include "fused_optim/macros.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

struct Philox4x32 {
  uint32_t x[4];
};

FO_HOST_DEVICE FO_INLINE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds of Philox4x32 on counter c under key (k0, k1).
FO_HOST_DEVICE FO_INLINE Philox4x32 philox4x32_10(Philox4x32 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint32_t c0 = c.x[0], c2 = c.x[2];
    c.x[0] = mulhi32(kRoundB, c2) ^ c.x[1] ^ k0;
    c.x[2] = mulhi32(kRoundA, c0) ^ c.x[3] ^ k1;
    c.x[1] = kRoundB * c2;
    c.x[3] = kRoundA * c0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c;
}

// The four words Triton's tl.randint4x(seed, offset) gives for one offset.
FO_HOST_DEVICE FO_INLINE Philox4x32 random_words(uint64_t seed, uint64_t offset) {
  const Philox4x32 c{{static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u,
                      0u}};
  return philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The bf16 bits of x rounded stochastically with the random bits r (its low 16 bits
// used): [note: stochastic rounding].
FO_HOST_DEVICE FO_INLINE uint16_t bf16_bits_stochastic(float x, uint32_t r) {
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + (r & 0xFFFFu)) >> 16);
}

// The bf16 bits of x rounded to nearest even, any NaN kept a quiet NaN of its sign and
// high payload (bf16_bits_stochastic's rule): the nearest rounding of the memory policy's
// stores ([note: memory policy] in csrc/cpu/kernel_api.h), whose fp32 values (fp32
// params, master copies) may hold NaNs of any low half. The CPU engine's
// float_to_bf16_any and the CUDA engine's policy stores (csrc/cuda) give these bits.
FO_HOST_DEVICE FO_INLINE uint16_t bf16_bits_nearest(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
