// fused_optim/math/stochastic.h ([note: stochastic rounding]): Philox4x32-10 against
// Random123's known-answer vectors (the ones the Python test also checks its reference
// and Triton's tl.randint4x against), and the stochastic rounding into bf16: exactly
// unbiased over all 65,536 values of the random bits, bf16 values kept, infinities
// kept, NaN kept quiet, overflow to infinity with its probability.
#define FO_CPU_CAPABILITY TEST

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>

#include "fused_optim/math/stochastic.h"
#include "harness.h"

namespace fo_test {
namespace {

namespace fm = fused_optim::math;

float from_bf16_bits(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace

FO_TEST(philox4x32_10_known_answers) {
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    const fm::Philox4x32 c{{k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3]}};
    const fm::Philox4x32 r = fm::philox4x32_10(c, k.key[0], k.key[1]);
    for (int j = 0; j < 4; ++j) FO_CHECK_EQ(r.x[j], k.out[j]) << "word " << j;
  }
  // random_words is the counter (offset low, offset high, 0, 0) under key (seed low,
  // seed high): Triton's tl.randint4x layout.
  const uint64_t seed = 0x1234567890ABCDEFull, offset = 0x123456789ull;
  const fm::Philox4x32 a = fm::random_words(seed, offset);
  const fm::Philox4x32 b = fm::philox4x32_10(fm::Philox4x32{{0x23456789u, 0x1u, 0u, 0u}},
                                             0x90ABCDEFu, 0x12345678u);
  for (int j = 0; j < 4; ++j) FO_CHECK_EQ(a.x[j], b.x[j]) << "word " << j;
}

FO_TEST(bf16_stochastic_rounding_is_exactly_unbiased) {
  std::mt19937 gen(5);
  int checked = 0;
  for (int i = 0; i < 2000; ++i) {
    // Random finite floats over many binades, both signs, and bf16 values themselves.
    uint32_t u = gen();
    if ((u & 0x7F800000u) == 0x7F800000u) continue;
    if (i % 10 == 0) u &= 0xFFFF0000u;
    const float x = float_of(u);
    const float down = from_bf16_bits(static_cast<uint16_t>(u >> 16));
    double sum = 0;
    int up = 0;
    for (uint32_t r = 0; r < 65536; ++r) {
      const float y = from_bf16_bits(fm::bf16_bits_stochastic(x, r));
      sum += y;
      up += y != down;
      if (y != down && !std::isinf(y)) {
        // the only other value: the next bf16 away from zero
        FO_CHECK_EQ(bits_of(y), (u & 0xFFFF0000u) + 0x10000u) << "x bits " << u;
      }
    }
    // exactly (low 16 bits) / 65536 of the draws round away from zero...
    FO_CHECK_EQ(up, static_cast<int>(u & 0xFFFFu)) << "x bits " << u;
    // ...so the mean is x itself (the sum is exact in double: bf16 values, 2^16 of them)
    if (std::isfinite(sum)) FO_CHECK_EQ(sum / 65536.0, static_cast<double>(x)) << "x bits " << u;
    ++checked;
  }
  FO_CHECK(checked > 1500);
}

FO_TEST(bf16_stochastic_rounding_specials) {
  const float inf = std::numeric_limits<float>::infinity();
  for (uint32_t r : {0u, 1u, 0x7FFFu, 0xFFFFu, 0xFFFFFFFFu}) {
    FO_CHECK(std::isinf(from_bf16_bits(fm::bf16_bits_stochastic(inf, r))));
    FO_CHECK(from_bf16_bits(fm::bf16_bits_stochastic(-inf, r)) == -inf);
    for (uint32_t nan_bits : {0x7FC00000u, 0x7FFFFFFFu, 0xFFFFFFFFu, 0x7F800001u}) {
      const uint16_t b = fm::bf16_bits_stochastic(float_of(nan_bits), r);
      FO_CHECK(std::isnan(from_bf16_bits(b))) << "nan bits " << nan_bits << " r " << r;
      FO_CHECK((b & 0x0040u) != 0) << "a quiet NaN";
      FO_CHECK_EQ(b >> 15, nan_bits >> 31) << "the NaN keeps its sign";
    }
    FO_CHECK_EQ(fm::bf16_bits_stochastic(0.0f, r), 0u);
    FO_CHECK_EQ(fm::bf16_bits_stochastic(-0.0f, r), 0x8000u);
  }
  // Above bf16's largest finite (0x7F7F): infinity with probability (low bits) / 2^16.
  const float big = float_of(0x7F7FC000u);
  FO_CHECK_EQ(from_bf16_bits(fm::bf16_bits_stochastic(big, 0x3FFFu)), float_of(0x7F7F0000u));
  FO_CHECK(std::isinf(from_bf16_bits(fm::bf16_bits_stochastic(big, 0x4000u))));
  FO_CHECK(from_bf16_bits(fm::bf16_bits_stochastic(-big, 0x4000u)) == -inf);
}

}  // namespace fo_test
