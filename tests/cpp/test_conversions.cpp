// The scalar fp16 / bf16 storage conversions of csrc/cpu/kernels_impl.h, tested
// directly against independent oracles (test_util.h): GCC's _Float16 for fp16, a
// distance-comparing nearest-even for bf16.
//
// The conversions live in an anonymous namespace of kernels_impl.h, so this translation
// unit includes the header itself under its own FO_CPU_CAPABILITY (TEST), as the design
// allows: every unit gets its own copy (see [note: one instruction set per translation
// unit] in fused_optim/macros.h), compiled here for the portable baseline, i.e. the
// scalar code paths, which are also the tails of the F16C / bf16 vector paths. The
// vector paths are tested through the engine in test_engine.cpp.
#define FO_CPU_CAPABILITY TEST

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/kernel_api.h"
// This unit uses only the conversions: the engine's entry points stay unused.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "cpu/kernels_impl.h"
#pragma GCC diagnostic pop

#include <string>
#include <vector>

#include "harness.h"
#include "test_util.h"

namespace fo_test {
namespace {

namespace impl = fused_optim::cpu::TEST;

std::string hex(uint32_t x) {
  static const char* digits = "0123456789abcdef";
  std::string s = "0x";
  bool started = false;
  for (int shift = 28; shift >= 0; shift -= 4) {
    const uint32_t d = (x >> shift) & 0xf;
    if (d || started || shift == 0) {
      s += digits[d];
      started = true;
    }
  }
  return s;
}

bool half_is_nan(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x03ff) != 0; }

// Checks float_to_half(f) against the oracle; NaN only needs to stay a NaN of the same
// sign (c10::Half returns 0x7e00 | sign; F16C keeps the payload; both are fine).
void check_float_to_half(float f) {
  const uint16_t got = impl::float_to_half(f);
  if (std::isnan(f)) {
    FO_CHECK(half_is_nan(got) && ((got & 0x8000) != 0) == std::signbit(f))
        << "float_to_half(NaN " << hex(f32_bits(f)) << ") = " << hex(got);
    return;
  }
  const uint16_t want = oracle_float_to_half(f);
  FO_CHECK(got == want) << "float_to_half(" << f << " = " << hex(f32_bits(f)) << ") = "
                        << hex(got) << ", oracle " << hex(want);
}

// float_to_bf16 is defined on numbers and on NaNs with a zero low half, the only NaNs
// the kernels can hand it ([note: NaN in bf16 rounding] in kernels_impl.h; the engine
// tests feed it NaN scalars with other payloads through the kernels). Those NaNs come
// back as their own high half.
void check_float_to_bf16(float f) {
  const uint16_t got = impl::float_to_bf16(f);
  const uint32_t u = f32_bits(f);
  if (std::isnan(f)) {
    if ((u & 0xffffu) == 0) {
      FO_CHECK(got == (u >> 16)) << "float_to_bf16(NaN " << hex(u) << ") = " << hex(got);
    }
    return;  // a NaN with a set low half is outside the domain (see above)
  }
  const uint16_t want = oracle_float_to_bf16(f);
  FO_CHECK(got == want) << "float_to_bf16(" << f << " = " << hex(f32_bits(f)) << ") = "
                        << hex(got) << ", oracle " << hex(want);
}

// The value of the fp16 one ulp above |h| in magnitude (65536 past the largest finite,
// which is where IEEE puts the overflow threshold's upper neighbour).
double next_half_up(uint16_t h_abs) {
  return h_abs == 0x7bff ? 65536.0 : oracle_half_to_float(static_cast<uint16_t>(h_abs + 1));
}

}  // namespace

FO_TEST(conv_half_to_float_all_65536_patterns) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float got = impl::half_to_float(static_cast<uint16_t>(h));
    const float want = oracle_half_to_float(static_cast<uint16_t>(h));
    if (half_is_nan(static_cast<uint16_t>(h))) {
      // NaN: sign and payload kept (the payload moves to the top of the float mantissa).
      const uint32_t u = f32_bits(got);
      FO_CHECK(std::isnan(got) && ((u >> 31) == (h >> 15)) &&
               ((u >> 13) & 0x3ff) == (h & 0x3ff))
          << "half_to_float(" << hex(h) << ") = " << hex(u);
    } else {
      FO_CHECK(f32_bits(got) == f32_bits(want))
          << "half_to_float(" << hex(h) << ") = " << hex(f32_bits(got)) << ", oracle "
          << hex(f32_bits(want));
    }
  }
}

FO_TEST(conv_half_round_trip_all_65536_patterns) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t back = impl::float_to_half(impl::half_to_float(static_cast<uint16_t>(h)));
    if (half_is_nan(static_cast<uint16_t>(h))) {
      FO_CHECK(half_is_nan(back) && (back & 0x8000) == (h & 0x8000))
          << hex(h) << " -> " << hex(back);
    } else {
      FO_CHECK(back == h) << "half -> float -> half: " << hex(h) << " -> " << hex(back);
    }
  }
}

// Every fp16 value, the midpoint to its upper neighbour, one float ulp either side of
// that midpoint, and a quarter / three quarters of the way: covers round-to-nearest-even
// at every tie (normal and subnormal), overflow at 65520, and underflow below 2^-25.
FO_TEST(conv_float_to_half_nearest_even_at_every_midpoint) {
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const double a = oracle_half_to_float(static_cast<uint16_t>(h));
    const double b = next_half_up(static_cast<uint16_t>(h));
    const float mid = static_cast<float>((a + b) / 2);  // exact: one more bit than fp16
    FO_CHECK(static_cast<double>(mid) == (a + b) / 2) << "midpoint not exact for " << hex(h);
    const float cands[] = {static_cast<float>(a),
                           mid,
                           std::nextafter(mid, 0.0f),
                           std::nextafter(mid, INFINITY),
                           static_cast<float>(a + (b - a) / 4),
                           static_cast<float>(a + 3 * (b - a) / 4)};
    for (float f : cands) {
      check_float_to_half(f);
      check_float_to_half(-f);
    }
  }
  // Ties on both sides of an odd and an even mantissa, spelled out.
  FO_CHECK_EQ(hex(impl::float_to_half(1.0f + 0x1.0p-11f)), hex(0x3c00));  // 1 + ulp/2 -> 1 (even)
  FO_CHECK_EQ(hex(impl::float_to_half(1.0f + 3 * 0x1.0p-11f)), hex(0x3c02));  // odd -> up
  FO_CHECK_EQ(hex(impl::float_to_half(65520.0f)), hex(0x7c00));               // tie -> inf
  FO_CHECK_EQ(hex(impl::float_to_half(std::nextafter(65520.0f, 0.0f))), hex(0x7bff));
  FO_CHECK_EQ(hex(impl::float_to_half(0x1.0p-25f)), hex(0x0000));  // tie below min subnormal
  FO_CHECK_EQ(hex(impl::float_to_half(0x1.8p-24f)), hex(0x0002));  // 1.5 x min sub -> 2 (even)
  FO_CHECK_EQ(hex(impl::float_to_half(-0.0f)), hex(0x8000));
}

FO_TEST(conv_float_to_half_specials_and_random_bits) {
  const uint32_t specials[] = {0x00000000u, 0x80000000u, 0x00000001u, 0x807fffffu,
                               0x7f800000u, 0xff800000u, 0x7f7fffffu, 0xff7fffffu,
                               0x7f800001u, 0x7fc00000u, 0xffc00001u, 0x7fffffffu,
                               0x477fefffu, 0x477ff000u, 0x38800000u, 0x387fffffu,
                               0x33000000u, 0x33000001u, 0x32ffffffu, 0x33800000u};
  for (uint32_t u : specials) check_float_to_half(bits_f32(u));
  Rng rng(12345);
  for (int i = 0; i < 1000000; ++i) {
    const uint32_t u = static_cast<uint32_t>(rng.next());
    check_float_to_half(bits_f32(u));
    // Also the exponent range where fp16 lives (random bits mostly fall outside it).
    const uint32_t e = 100 + static_cast<uint32_t>(rng.next() % 45);  // 2^-27 .. 2^17
    check_float_to_half(bits_f32((u & 0x807fffffu) | (e << 23)));
  }
}

FO_TEST(conv_bf16_to_float_and_round_trip_all_65536_patterns) {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = impl::bf16_to_float(static_cast<uint16_t>(b));
    FO_CHECK(f32_bits(f) == (b << 16)) << "bf16_to_float(" << hex(b) << ") = " << hex(f32_bits(f));
    const uint16_t back = impl::float_to_bf16(f);
    FO_CHECK(back == b) << "bf16 -> float -> bf16: " << hex(b) << " -> " << hex(back);
  }
}

// For every bf16 value (as the upper half of a float): the exact value, the tie, one
// float ulp either side of it, and the extremes of the discarded half.
FO_TEST(conv_float_to_bf16_nearest_even_at_every_midpoint) {
  for (uint32_t hi = 0; hi < 0x10000; ++hi) {
    for (uint32_t lo : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu, 0x4000u, 0xc000u}) {
      check_float_to_bf16(bits_f32((hi << 16) | lo));
    }
  }
  FO_CHECK_EQ(hex(impl::float_to_bf16(bits_f32(0x3f808000u))), hex(0x3f80));  // tie, even stays
  FO_CHECK_EQ(hex(impl::float_to_bf16(bits_f32(0x3f818000u))), hex(0x3f82));  // tie, odd rounds up
  FO_CHECK_EQ(hex(impl::float_to_bf16(bits_f32(0x7f7f8000u))), hex(0x7f80));  // tie at max -> inf
  FO_CHECK_EQ(hex(impl::float_to_bf16(bits_f32(0x7f7f7fffu))), hex(0x7f7f));
  FO_CHECK_EQ(hex(impl::float_to_bf16(bits_f32(0x00008000u))), hex(0x0000));  // subnormal tie
  FO_CHECK_EQ(hex(impl::float_to_bf16(bits_f32(0x00018000u))), hex(0x0002));
  // NaNs with a zero low half, as the kernels make them: the high half, signaling or not.
  FO_CHECK_EQ(hex(impl::float_to_bf16(bits_f32(0xffc00000u))), hex(0xffc0));  // x86's default
  FO_CHECK_EQ(hex(impl::float_to_bf16(bits_f32(0x7fff0000u))), hex(0x7fff));  // no carry out
  FO_CHECK_EQ(hex(impl::float_to_bf16(bits_f32(0x7f810000u))), hex(0x7f81));
  Rng rng(54321);
  for (int i = 0; i < 1000000; ++i) check_float_to_bf16(bits_f32(static_cast<uint32_t>(rng.next())));
}

// The memory policy's nearest rounding into bf16, on host and device: math::bf16_bits_nearest
// (the CUDA engine's policy stores) gives the CPU engine's float_to_bf16_any bits for every
// float: the oracle's nearest even for numbers, a quiet NaN of its own high half for every
// NaN, whatever its low half (where float_to_bf16 would carry into the exponent).
FO_TEST(conv_bf16_bits_nearest_is_the_cpu_policy_rounding) {
  auto check = [](uint32_t u) {
    const float f = bits_f32(u);
    const uint16_t got = fused_optim::math::TEST::bf16_bits_nearest(f);
    FO_CHECK_EQ(hex(got), hex(impl::float_to_bf16_any(f))) << "float bits " << hex(u);
    if (std::isnan(f)) {
      FO_CHECK_EQ(hex(got), hex(static_cast<uint16_t>((u >> 16) | 0x40u))) << hex(u);
    } else {
      FO_CHECK_EQ(hex(got), hex(oracle_float_to_bf16(f))) << "float bits " << hex(u);
    }
  };
  for (uint32_t hi = 0; hi < 0x10000; ++hi) {
    for (uint32_t lo : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu, 0x4000u}) {
      check((hi << 16) | lo);
    }
  }
  Rng rng(4242);
  for (int i = 0; i < 200000; ++i) check(static_cast<uint32_t>(rng.next()));
}

// The oracles themselves, against values worked out by hand, so a wrong oracle cannot
// make a wrong conversion pass.
FO_TEST(conv_oracles_agree_with_hand_values) {
  FO_CHECK_EQ(hex(oracle_float_to_half(1.0f)), hex(0x3c00));
  FO_CHECK_EQ(hex(oracle_float_to_half(65504.0f)), hex(0x7bff));
  FO_CHECK_EQ(hex(oracle_float_to_half(0x1.0p-24f)), hex(0x0001));
  FO_CHECK_EQ(hex(oracle_float_to_half(1.0f + 0x1.0p-11f)), hex(0x3c00));
  FO_CHECK_EQ(hex(oracle_float_to_half(1.0f + 3 * 0x1.0p-11f)), hex(0x3c02));
  FO_CHECK_EQ(hex(oracle_float_to_half(65520.0f)), hex(0x7c00));
  FO_CHECK_EQ(hex(oracle_float_to_bf16(1.0f)), hex(0x3f80));
  FO_CHECK_EQ(hex(oracle_float_to_bf16(bits_f32(0x3f808000u))), hex(0x3f80));
  FO_CHECK_EQ(hex(oracle_float_to_bf16(bits_f32(0x3f818000u))), hex(0x3f82));
  FO_CHECK_EQ(hex(oracle_float_to_bf16(bits_f32(0x3f808001u))), hex(0x3f81));
  FO_CHECK_EQ(hex(oracle_float_to_bf16(bits_f32(0x7f7f8000u))), hex(0x7f80));
  FO_CHECK_EQ(hex(oracle_float_to_bf16(bits_f32(0xbf818000u))), hex(0xbf82));
}

}  // namespace fo_test
