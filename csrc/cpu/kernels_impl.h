// The CPU multi-tensor engine and every optimizer's kernels built on it.
//
// Included by kernels_default.cpp, kernels_avx2.cpp and kernels_avx512.cpp after each
// has set FO_CPU_CAPABILITY and `#pragma GCC target` (see [note: one instruction set
// per translation unit] in fused_optim/macros.h). Everything here is compiled once per
// instruction set; only kernels_<isa>() has external linkage.
//
// What it computes: for every chunk handed to it, load each list's elements, convert
// them to opmath (float, or double for fp64 storage), call the algorithm's element-wise
// math from fused_optim/math/, and store the lists the algorithm writes. Nothing else:
// the math exists once, in the headers, for the CPU and the CUDA backends alike.
//
// Preconditions (checked by the ops layer with TORCH_CHECK): every tensor of a row is
// non-overlapping and dense with one layout, so element i of each list is at offset i;
// all lists share one storage dtype; chunks never overlap.
//
// [note: SIMD by the compiler]
// The element loops are written once, in scalar form, under `#pragma omp simd`, and
// GCC vectorizes them for the instruction set of the unit (with -O3 -fno-math-errno,
// sqrt becomes vsqrtps). fp32 and fp64 storage are processed in place. In the portable
// variant half-precision storage goes through fp32 blocks of kBlock elements that stay
// in L1: a vectorized convert-in (a shift for bf16), the same scalar-form math loop, a
// vectorized convert-out (round to nearest even); the x86 variants keep it in registers
// (next note). Measured here (AVX2, in cache, 1 thread, Adam): fp32 0.54 ns/element,
// fp16 0.94, bf16 1.16 blocked vs 1.35 with GCC converting inside the element loop. So
// "SIMD inside each chunk, scalar tails" holds for every dtype without a second copy
// of any algorithm.
//
// [note: half precision in registers]
// On x86 units with AVX2 (and AVX-512), bf16 and fp16 skip the blocks: 16 elements of
// each list are loaded and widened in registers to two vectors of eight fp32 lanes
// (math::vfloat8, a GCC vector type), the algorithm's math runs on those vectors (the
// same stage templates, instantiated with V = vfloat8), and the results are rounded and
// narrowed in registers. The blocks cost a store and a reload of every element in each
// direction, in phases that cannot overlap the math's division and sqrt (bound by the
// divider); here the conversions' integer work runs beside them. bf16 widens 32 bits at
// a time: shifting left by 16 gives the even elements, masking off the low half the odd
// ones; narrowing blends the two back. The math is element-wise, so which lanes hold
// which elements never matters. fp16 converts with F16C as the blocks did. Tails of
// fewer than 16 elements convert one element at a time. Measured (AVX2, 1 thread, 512K
// elements in L2/L3, AdamW): bf16 1.00 -> 0.80 ns/element, fp16 0.79 -> 0.57 (fp32:
// 0.42); the next note took bf16 on to 0.64 (the kernel alone, 32K elements in L2).
//
// [note: NaN in bf16 rounding]
// Rounding to bf16 is (u + 0x7fff + lsb) >> 16 on the float's bits u, lsb being bit 16:
// nearest even for every number, infinities included. Checking for NaN on top of that
// is a compare and a blend per vector, 12 of the AdamW loop's ~90 instructions per 16
// elements; without them (and widening by shift and mask rather than unpacking) the
// kernel went from 0.75 to 0.64 ns/element (AVX2, 1 thread, in L2). They are not
// needed, because every NaN that reaches a rounding has a zero low half, and then the
// sum cannot carry into the high half: the result is the NaN's own high half, a NaN.
// The invariant holds because
//   - values loaded from bf16 storage have a zero low half;
//   - x86 arithmetic returns either one of its operands' NaNs, quieted (bit 22 set), or
//     the default NaN 0xffc00000, and selects (maximum, lerp) move values as they are;
//     nothing else runs on the values;
//   - the per-tensor scalars and the grad scale, the only values that come from
//     elsewhere (doubles rounded to opmath, a float read from a tensor), pass through
//     quiet_nans() when a chunk's op is built.
// Without it a NaN lr whose float has a set low half, 0x7fffffff, would round to -0.
// tests/cpp checks every bf16 pattern through the kernels, and NaN scalars with such
// payloads. Which NaN comes out is not part of the contract (c10::BFloat16 makes 0x7fc0,
// ATen's vectorized conversion 0xffff); that it is a NaN is.
#pragma once

#include "cpu/kernel_api.h"
#include "fused_optim/dispatch.h"
#include "fused_optim/math/stochastic.h"
#include "fused_optim/optimizers.h"

namespace fused_optim {
namespace cpu {
inline namespace FO_CPU_CAPABILITY {
namespace {

// ---------------------------------------------------------------------------------
// Storage conversions (round to nearest even, as c10::Half and c10::BFloat16 do).

FO_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
}

FO_INLINE float bits_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

FO_INLINE float bf16_to_float(uint16_t h) {
  return bits_float(static_cast<uint32_t>(h) << 16);
}

// Nearest even. A NaN must have a zero low half (see [note: NaN in bf16 rounding]); it
// then comes back as its own high half.
FO_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The opmath value of x, with any NaN replaced by the default quiet NaN (zero payload).
template <typename T>
FO_INLINE T quiet_nan_of(T x) {
  return x != x ? static_cast<T>(__builtin_nan("")) : x;
}

// Applies quiet_nan_of to every field of a struct of opmath scalars
// (each optimizer's Scalars): [note: NaN in bf16 rounding].
template <typename opmath, typename Scalars>
FO_INLINE Scalars quiet_nans(Scalars s) {
  static_assert(std::is_standard_layout<Scalars>::value && alignof(Scalars) == alignof(opmath) &&
                    sizeof(Scalars) % sizeof(opmath) == 0,
                "a struct of opmath fields only");
  constexpr std::size_t kFields = sizeof(Scalars) / sizeof(opmath);
  opmath fields[kFields];
  __builtin_memcpy(fields, &s, sizeof(s));
  for (std::size_t i = 0; i < kFields; ++i) fields[i] = quiet_nan_of(fields[i]);
  __builtin_memcpy(&s, fields, sizeof(s));
  return s;
}

FO_INLINE float half_to_float(uint16_t h) {
  const uint32_t shifted_exponent = 0x7c00u << 13;
  uint32_t u = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  const uint32_t exponent = u & shifted_exponent;
  u += (127u - 15u) << 23;
  if (exponent == shifted_exponent) {
    u += (128u - 16u) << 23;  // inf / NaN
  } else if (exponent == 0) {
    u += 1u << 23;            // zero / subnormal: renormalize through float arithmetic
    u = float_bits(bits_float(u) - bits_float(113u << 23));
  }
  return bits_float(u | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
}

FO_INLINE uint16_t float_to_half(float f) {
  uint32_t u = float_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t out;
  if (u >= ((127u + 16u) << 23)) {
    out = (u > 0x7f800000u) ? 0x7e00 : 0x7c00;  // NaN, or overflow to inf
  } else if (u < (113u << 23)) {
    // Subnormal or zero: adding a magic number lines the mantissa up with fp16's and
    // lets the FPU do the rounding.
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    out = static_cast<uint16_t>(float_bits(bits_float(u) + bits_float(magic)) - magic);
  } else {
    const uint32_t mantissa_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mantissa_odd;
    out = static_cast<uint16_t>(u >> 13);
  }
  return static_cast<uint16_t>(out | (sign >> 16));
}

template <DType D>
struct Storage;

#if defined(FO_CPU_VEC8)
constexpr bool kHalfInRegisters = true;  // [note: half precision in registers]
#else
constexpr bool kHalfInRegisters = false;
#endif

// Each storage type says how an element becomes opmath and back: kBlocked types convert
// whole blocks (load/store), the others element by element inside the vectorized loop;
// kInRegisters types have Vec16 loads and stores (and the element-wise conversions for
// the tails).
template <>
struct Storage<DType::kFloat32> {
  using type = float;
  using opmath = float;
  static constexpr bool kBlocked = false;
  static constexpr bool kInRegisters = false;
  static FO_INLINE float to_opmath(float x) { return x; }
  static FO_INLINE float from_opmath(float x) { return x; }
};

template <>
struct Storage<DType::kFloat64> {
  using type = double;
  using opmath = double;
  static constexpr bool kBlocked = false;
  static constexpr bool kInRegisters = false;
  static FO_INLINE double to_opmath(double x) { return x; }
  static FO_INLINE double from_opmath(double x) { return x; }
};

template <>
struct Storage<DType::kBFloat16> {
  using type = uint16_t;
  using opmath = float;
  static constexpr bool kInRegisters = kHalfInRegisters;
  static constexpr bool kBlocked = !kInRegisters;
  static FO_INLINE float to_opmath(uint16_t x) { return bf16_to_float(x); }
  static FO_INLINE uint16_t from_opmath(float x) { return float_to_bf16(x); }
  static void load(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  }
  static void store(const float* src, uint16_t* dst, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
  }
};

template <>
struct Storage<DType::kFloat16> {
  using type = uint16_t;
  using opmath = float;
  static constexpr bool kInRegisters = kHalfInRegisters;
  static constexpr bool kBlocked = !kInRegisters;
  static FO_INLINE float to_opmath(uint16_t x) { return half_to_float(x); }
  static FO_INLINE uint16_t from_opmath(float x) { return float_to_half(x); }
  static void load(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
#if defined(FO_HAVE_F16C)
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
#endif
    for (; i < n; ++i) dst[i] = half_to_float(src[i]);
  }
  static void store(const float* src, uint16_t* dst, int64_t n) {
    int64_t i = 0;
#if defined(FO_HAVE_F16C)
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
    }
#endif
    for (; i < n; ++i) dst[i] = float_to_half(src[i]);
  }
};

// ---------------------------------------------------------------------------------
// The engine: one chunk of one row of tensors.

// fp32 blocks for half-precision storage: 5 lists x 512 x 4 B = 10 KiB, inside L1.
constexpr int64_t kBlock = 512;

// Stores x into *dst, converted to storage, only for the lists the algorithm writes (a
// compile-time choice).
template <bool WRITE, typename S, typename T, typename opmath>
FO_INLINE void store_if(T* dst, opmath x) {
  if constexpr (WRITE) *dst = S::from_opmath(x);
}

// The element loop over n elements of N lists of storage S. The pointers arrive as a
// parameter pack, not an array, so they live in registers and GCC vectorizes the loop
// (`#pragma omp simd` instead privatizes x[] per lane into memory and defeats it).
template <typename Op, typename S, std::size_t... Is, typename... Ptrs>
FO_INLINE void element_loop(std::index_sequence<Is...>, int64_t n, const Op& op,
                            Ptrs... ptrs) {
  using opmath = decltype(op.grad_sign);
  const Op local_op = op;  // a local copy cannot alias the stores: its fields stay in registers
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    opmath x[sizeof...(Is)] = {(Op::reads(Is) ? S::to_opmath(ptrs[i]) : opmath(0))...};
    local_op(x);
    (store_if<Op::writes(Is), S>(ptrs + i, x[Is]), ...);
  }
}

// The element loop over fp32 blocks of a blocked storage type.
struct OpmathBlock {
  static FO_INLINE float to_opmath(float x) { return x; }
  static FO_INLINE float from_opmath(float x) { return x; }
};

#if defined(FO_CPU_VEC8)
using math::vfloat8;

// 16 elements of half-precision storage <-> two vectors of eight fp32 lanes.
template <DType D>
struct Vec16;

template <>
struct Vec16<DType::kBFloat16> {
  // a: elements 0, 2, ..., 14; b: elements 1, 3, ..., 15 (each the high half of a lane).
  static FO_INLINE void load(const uint16_t* src, vfloat8& a, vfloat8& b) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    a = reinterpret_cast<vfloat8>(_mm256_slli_epi32(h, 16));
    b = reinterpret_cast<vfloat8>(_mm256_and_si256(h, _mm256_set1_epi32(0xffff0000)));
  }
  // float_to_bf16 on eight lanes, the result in the high half of each lane.
  static FO_INLINE __m256i round(vfloat8 f) {
    const __m256i u = reinterpret_cast<__m256i>(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
  }
  static FO_INLINE void store(uint16_t* dst, vfloat8 a, vfloat8 b) {
    // Low halves from a, high halves from b: elements 0-15 in order again.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm256_blend_epi16(_mm256_srli_epi32(round(a), 16), round(b), 0xaa));
  }
};

template <>
struct Vec16<DType::kFloat16> {
  static FO_INLINE void load(const uint16_t* src, vfloat8& a, vfloat8& b) {
    a = reinterpret_cast<vfloat8>(
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
    b = reinterpret_cast<vfloat8>(
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8))));
  }
  static FO_INLINE void store(uint16_t* dst, vfloat8 a, vfloat8 b) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                     _mm256_cvtps_ph(reinterpret_cast<__m256>(a), _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8),
                     _mm256_cvtps_ph(reinterpret_cast<__m256>(b), _MM_FROUND_TO_NEAREST_INT));
  }
};

// Loads 16 elements (READ) or zeros (a list whose old values the op never reads).
template <bool READ, DType D>
FO_INLINE void load16(const uint16_t* src, vfloat8& a, vfloat8& b) {
  if constexpr (READ) {
    Vec16<D>::load(src, a, b);
  } else {
    a = vfloat8{};
    b = vfloat8{};
  }
}

// The element loop of half-precision storage in registers: 16 elements per iteration,
// the op applied to two vectors of each list, then the tail element by element. Each
// iteration stores the previous iteration's results after starting its own math, so
// the narrowing of one group can run while the next waits on the divider. Measured
// (AVX2, 1 thread, kernel alone, AdamW in L2): fp16 0.497 -> 0.464 ns/element, bf16
// 0.642 -> 0.632.
template <typename Op, DType D, std::size_t... Is, typename... Ptrs>
FO_INLINE void vector_loop(std::index_sequence<Is...> lists, int64_t n, const Op& op,
                           Ptrs... ptrs) {
  constexpr std::size_t N = sizeof...(Is);
  const Op local_op = op;
  int64_t i = 0;
  if (n >= 16) {
    vfloat8 ready_a[N];  // results for elements [i - 16, i), not stored yet
    vfloat8 ready_b[N];
    (load16<Op::reads(Is), D>(ptrs, ready_a[Is], ready_b[Is]), ...);
    local_op(ready_a);
    local_op(ready_b);
    for (i = 16; i + 16 <= n; i += 16) {
      vfloat8 a[N];
      vfloat8 b[N];
      (load16<Op::reads(Is), D>(ptrs + i, a[Is], b[Is]), ...);
      local_op(a);
      local_op(b);
      ((Op::writes(Is) ? Vec16<D>::store(ptrs + i - 16, ready_a[Is], ready_b[Is]) : void()), ...);
      ((ready_a[Is] = a[Is], ready_b[Is] = b[Is]), ...);
    }
    ((Op::writes(Is) ? Vec16<D>::store(ptrs + i - 16, ready_a[Is], ready_b[Is]) : void()), ...);
  }
  if (i < n) element_loop<Op, Storage<D>>(lists, n - i, op, (ptrs + i)...);
}
#endif

template <typename opmath>
FO_INLINE void fill_zero(opmath* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = opmath(0);
}

// Applies `op` to elements [begin, end) of the lists whose base pointers are `base`.
// Op provides: static constexpr int kLists; static constexpr bool reads(int list),
// writes(int list);
// void operator()(opmath (&x)[kLists]) const, which updates x in place.
template <DType D, typename Op, std::size_t... Is>
void apply_chunk_impl(std::index_sequence<Is...> lists, void* const* base, int64_t begin,
                      int64_t end, const Op& op) {
  using T = typename Storage<D>::type;
  using opmath = typename Storage<D>::opmath;
  constexpr int N = Op::kLists;
  const int64_t n = end - begin;
  if constexpr (Storage<D>::kInRegisters) {
#if defined(FO_CPU_VEC8)
    vector_loop<Op, D>(lists, n, op, (static_cast<T*>(base[Is]) + begin)...);
#endif
  } else if constexpr (!Storage<D>::kBlocked) {
    element_loop<Op, Storage<D>>(lists, n, op, (static_cast<T*>(base[Is]) + begin)...);
  } else {
    alignas(64) opmath buf[N][kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t m = n - b < kBlock ? n - b : kBlock;
      ((Op::reads(Is) ? Storage<D>::load(static_cast<T*>(base[Is]) + begin + b, buf[Is], m)
                      : fill_zero(buf[Is], m)),
       ...);
      element_loop<Op, OpmathBlock>(lists, m, op, static_cast<opmath*>(buf[Is])...);
      ((Op::writes(Is) ? Storage<D>::store(buf[Is], static_cast<T*>(base[Is]) + begin + b, m)
                       : void()),
       ...);
    }
  }
}

template <DType D, typename Op>
FO_INLINE void apply_chunk(void* const* base, int64_t begin, int64_t end, const Op& op) {
  apply_chunk_impl<D>(std::make_index_sequence<Op::kLists>{}, base, begin, end, op);
}

// ---------------------------------------------------------------------------------
// Memory policies ([note: memory policy] in cpu/kernel_api.h): each list in its own
// storage, the param from its fp32 master copy, bf16 stores rounded stochastically.
// One element loop in scalar form, vectorized by GCC as the uniform one is.

// Nearest even, as float_to_bf16, for any NaN: a policy's fp32 values (fp32 params,
// master copies) may hold NaNs with any low half, which float_to_bf16 would carry into
// the exponent ([note: NaN in bf16 rounding]). Same NaN rule as bf16_bits_stochastic.
FO_INLINE uint16_t float_to_bf16_any(float f) {
  const uint32_t u = float_bits(f);
  return (u & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>((u >> 16) | 0x0040u)
                                         : float_to_bf16(f);
}

template <int P>
struct PolicyStorage {
  static constexpr PolicyKey kKey = kPolicies[P];
  using Param = Storage<kKey.param>;
  using State = Storage<kKey.state>;
  static constexpr bool kMaster = kKey.master;
  static constexpr bool kStochastic = kKey.stochastic;
  // The storage of list k: params and grads, then the state lists.
  template <std::size_t K>
  using Of = std::conditional_t<(K < 2), Param, State>;
};

// x stored into storage S: stochastically with the random word r into bf16 when
// STOCHASTIC, else to nearest.
template <typename S, bool STOCHASTIC>
FO_INLINE typename S::type round_store(float x, uint32_t r) {
  if constexpr (std::is_same_v<S, Storage<DType::kBFloat16>>) {
    if constexpr (STOCHASTIC) {
      return math::bf16_bits_stochastic(x, r);
    } else {
      return float_to_bf16_any(x);
    }
  } else {
    return S::from_opmath(x);
  }
}

#if defined(FO_CPU_VEC8)
// The Philox draws in the vector units: kRandomLanes counters at a time, 16 in 512-bit
// vectors (AVX-512 units), 8 in 256-bit ones (AVX2).
#if defined(FO_CPU_VEC16)
constexpr int kRandomLanes = 16;
#else
constexpr int kRandomLanes = 8;
#endif
typedef uint32_t vrandom __attribute__((vector_size(4 * kRandomLanes)));

// The high and low 32 bits of a * b in each lane: the even lanes' products and the odd
// lanes' as 64-bit lanes (vpmuludq; GCC's own vectorization of the 64-bit products used
// vpmullq, 2x slower here), their halves interleaved back.
FO_INLINE void mulhilo(vrandom a, uint32_t b, vrandom& hi, vrandom& lo) {
#if defined(FO_CPU_VEC16)
  const __m512i v = reinterpret_cast<__m512i>(a);
  const __m512i m = _mm512_set1_epi32(static_cast<int>(b));
  const __m512i even = _mm512_mul_epu32(v, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(v, 32), m);
  lo = reinterpret_cast<vrandom>(_mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32)));
  hi = reinterpret_cast<vrandom>(_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd));
#else
  const __m256i v = reinterpret_cast<__m256i>(a);
  const __m256i m = _mm256_set1_epi32(static_cast<int>(b));
  const __m256i even = _mm256_mul_epu32(v, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(v, 32), m);
  lo = reinterpret_cast<vrandom>(_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA));
  hi = reinterpret_cast<vrandom>(_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA));
#endif
}

// math::philox4x32_10 on the counters counter .. counter + kRandomLanes - 1 at once,
// the words of lane l stored at w0[l] .. w3[l]: the same bits.
FO_INLINE void random_words_lanes(uint32_t k0, uint32_t k1, uint64_t counter, uint32_t* w0,
                                  uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  vrandom iota;
  for (int l = 0; l < kRandomLanes; ++l) iota[l] = static_cast<uint32_t>(l);
  const uint32_t lo = static_cast<uint32_t>(counter);
  vrandom c0 = lo + iota;
  // The carry into the high word where lo + l wraps (a comparison is -1 where true).
  vrandom c1 = static_cast<uint32_t>(counter >> 32) - reinterpret_cast<vrandom>(c0 < lo);
  vrandom c2 = {};
  vrandom c3 = {};
  for (int round = 0; round < 10; ++round) {
    vrandom hi_b, lo_b, hi_a, lo_a;
    mulhilo(c2, 0xCD9E8D57u, hi_b, lo_b);
    mulhilo(c0, 0xD2511F53u, hi_a, lo_a);
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  __builtin_memcpy(w0, &c0, sizeof c0);
  __builtin_memcpy(w1, &c1, sizeof c1);
  __builtin_memcpy(w2, &c2, sizeof c2);
  __builtin_memcpy(w3, &c3, sizeof c3);
}
#endif

// The four Philox words of counters counter .. counter + n - 1 under `key`, word w of
// element i in words[w][i]: a loop of its own, apart from the element loop (inside it
// GCC kept the whole loop scalar), in the vector units where the unit has them.
FO_INLINE void random_block(uint64_t key, uint64_t counter, int64_t n,
                            uint32_t (*__restrict words)[kBlock]) {
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  int64_t i = 0;
#if defined(FO_CPU_VEC8)
  for (; i + kRandomLanes <= n; i += kRandomLanes) {
    random_words_lanes(k0, k1, counter + static_cast<uint64_t>(i), words[0] + i, words[1] + i,
                       words[2] + i, words[3] + i);
  }
#endif
  for (; i < n; ++i) {
    const uint64_t c = counter + static_cast<uint64_t>(i);
    const math::Philox4x32 r = math::philox4x32_10(
        math::Philox4x32{{static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u, 0u}},
        k0, k1);
    words[0][i] = r.x[0];
    words[1][i] = r.x[1];
    words[2][i] = r.x[2];
    words[3][i] = r.x[3];
  }
}

// The element loop of policy P over n elements; `master`: the fp32 copies of the
// params' elements (kMaster); `words`: the random words of each element (kStochastic,
// random_block).
template <int P, typename Op, std::size_t... Is, typename... Ptrs>
FO_INLINE void policy_loop(std::index_sequence<Is...>, int64_t n, const Op& op,
                           float* __restrict master, const uint32_t (*__restrict words)[kBlock],
                           Ptrs... ptrs) {
  using Pol = PolicyStorage<P>;
  constexpr uint32_t LISTS = Op::kListMask;
  const Op local_op = op;
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    float x[sizeof...(Is)] = {
        (!Op::reads(Is) ? 0.0f
                        : (Is == 0 && Pol::kMaster) ? master[i]
                                                    : Pol::template Of<Is>::to_opmath(ptrs[i]))...};
    local_op(x);
    (
        [&] {
          if constexpr (Op::writes(Is)) {
            using S = typename Pol::template Of<Is>;
            if constexpr (Is == 0 && Pol::kMaster) {
              master[i] = x[0];
              ptrs[i] = round_store<S, false>(x[0], 0);  // the copy: to nearest
            } else if constexpr (Is == 1) {
              ptrs[i] = round_store<S, false>(x[1], 0);  // the unscaled grad
            } else {
              // Word 0 for the param, 1 + k for the k-th state list the call keeps.
              constexpr int word = Is == 0 ? 0 : __builtin_popcount(LISTS & ((1u << Is) - 1u)) - 1;
              static_assert(word < 4, "four random words per element");
              ptrs[i] = round_store<S, Pol::kStochastic>(
                  x[Is], Pol::kStochastic ? words[word][i] : 0u);
            }
          }
        }(),
        ...);
  }
}

template <int P, typename Op, std::size_t... Is>
FO_INLINE void apply_policy_chunk_impl(std::index_sequence<Is...> lists, void* const* base,
                                       float* master, uint64_t key, uint64_t counter,
                                       int64_t begin, int64_t end, const Op& op) {
  // counter: the Philox counter of the tensor's element 0.
  using Pol = PolicyStorage<P>;
  if constexpr (!Pol::kStochastic) {
    policy_loop<P>(lists, end - begin, op, master ? master + begin : nullptr, nullptr,
                   (static_cast<typename Pol::template Of<Is>::type*>(base[Is]) + begin)...);
  } else {
    alignas(64) uint32_t words[4][kBlock];
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t m = std::min(kBlock, end - b);
      random_block(key, counter + static_cast<uint64_t>(b), m, words);
      policy_loop<P>(lists, m, op, master ? master + b : nullptr, words,
                     (static_cast<typename Pol::template Of<Is>::type*>(base[Is]) + b)...);
    }
  }
}

// ---------------------------------------------------------------------------------
// bf16 work lists ([note: bf16 work lists] in fused_optim/math/optimizer.h): the lists of
// the bit mask BF16 in bf16, the others in storage D (any of the four), computed in D's
// opmath. One element loop in scalar form, vectorized by GCC as the policies' is.

template <DType D, bool WORK>
using WorkStorageType = std::conditional_t<WORK, uint16_t, typename Storage<D>::type>;

template <DType D, bool WORK, typename T>
FO_INLINE typename Storage<D>::opmath load_work(const T* p) {
  using opmath = typename Storage<D>::opmath;
  if constexpr (WORK) {
    return static_cast<opmath>(bf16_to_float(*p));
  } else {
    return Storage<D>::to_opmath(*p);
  }
}

// A work list's value is rounded to the params' dtype, then to bf16 (through float).
template <DType D, bool WORK, typename T>
FO_INLINE void store_work(T* p, typename Storage<D>::opmath x) {
  if constexpr (WORK) {
    *p = float_to_bf16_any(static_cast<float>(Storage<D>::to_opmath(Storage<D>::from_opmath(x))));
  } else {
    *p = Storage<D>::from_opmath(x);
  }
}

template <DType D, uint32_t BF16, typename Op, std::size_t... Is, typename... Ptrs>
FO_INLINE void work_list_loop(std::index_sequence<Is...>, int64_t n, const Op& op, Ptrs... ptrs) {
  using opmath = typename Storage<D>::opmath;
  const Op local_op = op;
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    opmath x[sizeof...(Is)] = {
        (Op::reads(Is) ? load_work<D, ((BF16 >> Is) & 1u) != 0>(ptrs + i) : opmath(0))...};
    local_op(x);
    ((Op::writes(Is) ? store_work<D, ((BF16 >> Is) & 1u) != 0>(ptrs + i, x[Is]) : void()), ...);
  }
}

template <DType D, uint32_t BF16, typename Op, std::size_t... Is>
FO_INLINE void apply_work_chunk_impl(std::index_sequence<Is...> lists, void* const* base,
                                     int64_t begin, int64_t end, const Op& op) {
  work_list_loop<D, BF16>(
      lists, end - begin, op,
      (static_cast<WorkStorageType<D, ((BF16 >> Is) & 1u) != 0>*>(base[Is]) + begin)...);
}

// The P of chunks_typed for an optimizer with bf16 work lists.
constexpr int kWorkLists = -2;

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(std::integral_constant<DType, DType::kFloat32>{}); break;
    case DType::kFloat64: f(std::integral_constant<DType, DType::kFloat64>{}); break;
    case DType::kFloat16: f(std::integral_constant<DType, DType::kFloat16>{}); break;
    case DType::kBFloat16: f(std::integral_constant<DType, DType::kBFloat16>{}); break;
  }
}

// ---------------------------------------------------------------------------------
// Every optimizer: the op the loops above apply, and the template dispatch of a call.

// One optimizer's update as the loops take it: ElementStep (fused_optim/dispatch.h, shared
// with the CUDA engine) on x[list] for every list of the optimizer, with the values of
// one chunk's tensor.
template <typename Optim, typename opmath, uint32_t LISTS, uint32_t V, bool UNSCALE>
struct OptimOp {
  using Step = ElementStep<Optim, LISTS, V, UNSCALE>;
  static constexpr int kLists = Optim::kLists;
  static constexpr uint32_t kListMask = LISTS;
  static constexpr bool reads(int list) { return Step::reads(list); }
  static constexpr bool writes(int list) { return Step::writes(list); }
  using Scalars = typename Optim::template Scalars<opmath>;

  Scalars s;
  opmath grad_sign;   // -1 for maximize: multiplying by +-1 is exact
  opmath grad_scale;  // only read when UNSCALE

  // Vt: opmath, or math::vfloat8 lanes of it ([note: half precision in registers]).
  template <typename Vt>
  FO_INLINE void operator()(Vt (&x)[kLists]) const {
    Step::apply(x, s, grad_scale, grad_sign);
  }
};

// P: the call's memory policy, an index into kPolicies, or -1 for the uniform one
// (every list of storage D).
template <typename Optim, DType D, int P = -1>
void chunks_typed(const TensorTable& table, const StepCall& call, const Chunk* chunks,
                  int64_t begin, int64_t end) {
  using opmath = typename Storage<D>::opmath;
  constexpr int kStates = math::num_states<Optim>();
  // A combination no call selects does nothing here; the ops refuse it before any kernel
  // ([note: compiled variants] in fused_optim/dispatch.h).
  dispatch_variant<Optim>(
      call.lists, call.args, call.grad_scale != nullptr,
      [&](auto lists_c, auto variant_c, auto unscale_c) {
        constexpr uint32_t LISTS = decltype(lists_c)::value;
        constexpr uint32_t V = decltype(variant_c)::value;
        constexpr bool UNSCALE = decltype(unscale_c)::value;
        using Op = OptimOp<Optim, opmath, LISTS, V, UNSCALE>;
        // Where each of the optimizer's lists sits in the table (absent lists read the
        // params' pointer, never dereferenced).
        int row[Op::kLists];
        for (int k = 0, present = 0; k < Op::kLists; ++k) {
          row[k] = math::has<LISTS>(k) ? present++ : 0;
        }
        Op op{};  // op.s: set before the first chunk uses it (GCC cannot tell)
        op.grad_sign = call.maximize ? opmath(-1) : opmath(1);
        op.grad_scale = UNSCALE ? quiet_nan_of(static_cast<opmath>(*call.grad_scale)) : opmath(1);
        if constexpr (kStates == 0) {
          op.s = quiet_nans<opmath>(Optim::template scalars<LISTS, V, opmath>(call.args, nullptr));
        }
        // The tensor whose scalars op.s holds: consecutive chunks of one tensor reuse them
        // (Optim::scalars is double math, pow and divisions: once per tensor, not per chunk).
        int64_t scalars_tensor = -1;
        void* base[Op::kLists];
        for (int64_t c = begin; c < end; ++c) {
          const Chunk& chunk = chunks[c];
          if constexpr (kStates > 0) {
            if (chunk.tensor != scalars_tensor) {
              op.s = quiet_nans<opmath>(Optim::template scalars<LISTS, V, opmath>(
                  call.args, call.tensor_state + chunk.tensor * 2 * kStates));
              scalars_tensor = chunk.tensor;
            }
          }
          for (int k = 0; k < Op::kLists; ++k) {
            base[k] = table.ptrs[row[k] * table.n_tensors + chunk.tensor];
          }
          if constexpr (P == kWorkLists) {
            apply_work_chunk_impl<D, Optim::kBFloat16Lists>(
                std::make_index_sequence<Op::kLists>{}, base, chunk.begin, chunk.end, op);
          } else if constexpr (P < 0) {
            apply_chunk<D>(base, chunk.begin, chunk.end, op);
          } else {
            const uint64_t* rng = call.rng != nullptr ? call.rng + 2 * chunk.tensor : nullptr;
            apply_policy_chunk_impl<P>(
                std::make_index_sequence<Op::kLists>{}, base,
                table.master != nullptr ? static_cast<float*>(table.master[chunk.tensor]) : nullptr,
                rng != nullptr ? rng[0] : 0, rng != nullptr ? rng[1] : 0, chunk.begin, chunk.end, op);
          }
        }
      });
}

// The kernel of one optimizer: ChunksFn in kernel_api.h.
// Calls f(std::integral_constant<int, p>) for p = `policy`, an index into kPolicies.
template <int P = 0, typename F>
FO_INLINE void dispatch_policy(int policy, F&& f) {
  if constexpr (P < kNumPolicies) {
    if (policy == P) {
      f(std::integral_constant<int, P>{});
    } else {
      dispatch_policy<P + 1>(policy, f);
    }
  }
}

template <typename Optim>
void chunks_policy(const TensorTable& table, const StepCall& call, const Chunk* chunks,
                   int64_t begin, int64_t end) {
  const int policy = policy_index(table.dtype, table.state_dtype, table.master != nullptr,
                                  call.rng != nullptr);
  if (policy < 0) {
    dispatch_dtype(table.dtype, [&](auto dtype_c) {
      chunks_typed<Optim, decltype(dtype_c)::value>(table, call, chunks, begin, end);
    });
    return;
  }
  dispatch_policy(policy, [&](auto policy_c) {
    constexpr int P = decltype(policy_c)::value;
    chunks_typed<Optim, kPolicies[P].param, P>(table, call, chunks, begin, end);
  });
}

template <typename Optim>
void chunks(const TensorTable& table, const StepCall& call, const Chunk* chunks, int64_t begin,
            int64_t end) {
  if constexpr (Optim::kBFloat16Lists != 0) {
    // No memory policy (the ops refuse one): the params' dtype and the bf16 work lists.
    dispatch_dtype(table.dtype, [&](auto dtype_c) {
      chunks_typed<Optim, decltype(dtype_c)::value, kWorkLists>(table, call, chunks, begin, end);
    });
  } else {
    chunks_policy<Optim>(table, call, chunks, begin, end);
  }
}

// ---------------------------------------------------------------------------------
// The row-sparse kernels ([note: row math] in fused_optim/math/optimizer.h): the rows
// a sparse grad touches, kRowBlock elements of a row at a time.

constexpr int64_t kRowBlock = 256;

// The storage's roundings for a row math (update<R> in [note: row math]).
template <DType D>
struct RowRounding {
  using S = Storage<D>;
  using opmath = typename S::opmath;
  static FO_INLINE opmath r(opmath x) { return S::to_opmath(S::from_opmath(x)); }
  static FO_INLINE opmath add_scaled(opmath p, opmath alpha, opmath x) {
    return math::add_scaled_as_torch<RowRounding, D == DType::kFloat16 || D == DType::kBFloat16>(
        p, alpha, x);
  }
};

// [note: prefetching touched rows]
// The rows a sparse grad touches are scattered over a table that is usually far larger
// than the caches (256 MB for Embedding(1M, 64) fp32), and each is a few hundred bytes:
// the pass waits on one cache (and TLB) miss after another, which the hardware
// prefetcher cannot predict. So the loop fetches ahead: the param and state rows of the
// segment kSegmentsAhead on, and the value rows of the entries kEntriesAhead on.
// The prefetches are reads with low temporal locality (prefetcht2: on x86 into L2, not
// L1): with 16 segments ahead, each of 2-4 rows of 4-8 lines, far more lines are in
// flight than L1 can track, and prefetches into L1 (prefetcht0 / prefetchw, as before)
// stalled the loop at the prefetch instructions themselves (41% of the Adagrad kernel's
// samples, 44% of SGD's). Measured (2-core EPYC VM, fp32, op alone, 1 thread, the
// machine shared: mins of 60-100 calls, 3 interleaved rounds): SGD Embedding(100K, 128)
// 65,536 lookups 5.3-5.9 -> 4.1-4.4 ms, Adagrad Embedding(1M, 64) 16,384 lookups
// 2.25-2.69 -> 2.03-2.13 ms, SparseAdam 1M 3.50-3.83 -> 2.68-2.87 ms, SparseAdam 100K
// 23.0-23.8 -> 18.7 ms. 32 segments ahead was no better overall.
constexpr int64_t kSegmentsAhead = 16;
constexpr int64_t kEntriesAhead = 4;
constexpr int64_t kPrefetchBytes = 1024;  // of each row (the rest streams)

FO_INLINE void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 1);
}

template <typename T, int kS>
FO_INLINE void prefetch_segment(const RowCall& call, const RowSegment& seg) {
  const int64_t t = seg.tensor, n = call.n_tensors, len = call.row_len[t];
  const int64_t bytes = std::min<int64_t>(len * static_cast<int64_t>(sizeof(T)), kPrefetchBytes);
  prefetch_bytes(static_cast<const T*>(call.params[t]) + seg.row * len, bytes);
  for (int j = 0; j < kS; ++j) {
    prefetch_bytes(static_cast<const T*>(call.states[j * n + t]) + seg.row * len, bytes);
  }
  const int64_t* perm = call.perm[t];
  prefetch_bytes(static_cast<const T*>(call.values[t]) +
                     (perm ? perm[seg.begin] : seg.begin) * len, bytes);
}

template <typename RowMath, DType D>
void rows_typed(const RowCall& call, const RowSegment* segments, int64_t begin, int64_t end) {
  using S = Storage<D>;
  using T = typename S::type;
  using O = typename S::opmath;
  constexpr int kS = RowMath::kStates;
  constexpr int kC = RowMath::kConstants;
  using R = RowRounding<D>;
  const int64_t n = call.n_tensors;
  O acc[kRowBlock];
  for (int64_t g = begin; g < std::min(begin + kSegmentsAhead, end); ++g) {
    prefetch_segment<T, kS>(call, segments[g]);
  }
  for (int64_t g = begin; g < end; ++g) {
    if (g + kSegmentsAhead < end) prefetch_segment<T, kS>(call, segments[g + kSegmentsAhead]);
    const RowSegment& seg = segments[g];
    const int64_t t = seg.tensor;
    const int64_t len = call.row_len[t];
    const int64_t* perm = call.perm[t];
    const T* values = static_cast<const T*>(call.values[t]);
    T* p = static_cast<T*>(call.params[t]) + seg.row * len;
    T* st[kS > 0 ? kS : 1] = {};
    for (int j = 0; j < kS; ++j) st[j] = static_cast<T*>(call.states[j * n + t]) + seg.row * len;
    O c[kC];
    for (int j = 0; j < kC; ++j) c[j] = quiet_nan_of(static_cast<O>(call.constants[t * kC + j]));
    const O sign = call.maximize ? O(-1) : O(1);
    if constexpr (RowMath::kCoalesce) {
      // The state rows as named pointers: GCC vectorizes the update loop for every math
      // and dtype only when no pointer array is indexed inside it (it kept 5 of 8
      // instantiations scalar before; SparseAdam fp32, 1M x 64, 16K lookups: the op
      // took 3.8 ms, against Adagrad's 1.4).
      static_assert(kS <= 2, "rows_typed names two state rows");
      T* __restrict s0 = st[0];
      T* __restrict s1 = st[kS > 1 ? 1 : 0];
      // One update per element of the row's grad: grad(e) its (summed) entry.
      auto update = [&](T* __restrict pr, int64_t e0, int64_t m, auto grad) {
        for (int64_t e = 0; e < m; ++e) {
          O pe = S::to_opmath(pr[e]);
          O se[kS > 0 ? kS : 1];
          if constexpr (kS > 0) se[0] = S::to_opmath(s0[e0 + e]);
          if constexpr (kS > 1) se[1] = S::to_opmath(s1[e0 + e]);
          RowMath::template update<R>(pe, sign * grad(e), se, c);
          pr[e] = S::from_opmath(pe);
          if constexpr (kS > 0) s0[e0 + e] = S::from_opmath(se[0]);
          if constexpr (kS > 1) s1[e0 + e] = S::from_opmath(se[1]);
        }
      };
      const T* first = values + (perm ? perm[seg.begin] : seg.begin) * len;
      if (seg.end - seg.begin == 1) {
        // Most rows of a large table have one entry: it is the sum, read in place.
        update(p, 0, len, [&](int64_t e) { return S::to_opmath(first[e]); });
        continue;
      }
      for (int64_t e0 = 0; e0 < len; e0 += kRowBlock) {
        const int64_t m = std::min(kRowBlock, len - e0);
        // The row's entries summed in perm order, each sum rounded (coalesce()), then
        // one update per element.
        const T* v = first + e0;
#pragma omp simd
        for (int64_t e = 0; e < m; ++e) acc[e] = S::to_opmath(v[e]);
        for (int64_t k = seg.begin + 1; k < seg.end; ++k) {
          if (k + kEntriesAhead < seg.end) {
            const int64_t ahead = perm ? perm[k + kEntriesAhead] : k + kEntriesAhead;
            prefetch_bytes(values + ahead * len + e0,
                           std::min<int64_t>(m * static_cast<int64_t>(sizeof(T)), kPrefetchBytes));
          }
          v = values + (perm ? perm[k] : k) * len + e0;
#pragma omp simd
          for (int64_t e = 0; e < m; ++e) acc[e] = R::r(acc[e] + S::to_opmath(v[e]));
        }
        update(p + e0, e0, m, [&](int64_t e) { return acc[e]; });
      }
    } else {
      // One update per entry, in perm order, on the param row in place: the param is
      // stored after each entry, as torch stores it after each add.
      (void)acc;
      for (int64_t k = seg.begin; k < seg.end; ++k) {
        const T* __restrict v = values + (perm ? perm[k] : k) * len;
        T* __restrict pr = p;
#pragma omp simd
        for (int64_t e = 0; e < len; ++e) {
          O pe = S::to_opmath(pr[e]);
          O se[kS > 0 ? kS : 1];
          RowMath::template update<R>(pe, sign * S::to_opmath(v[e]), se, c);
          pr[e] = S::from_opmath(pe);
        }
      }
    }
  }
}

// The kernel of one row math: RowsFn in kernel_api.h.
template <typename RowMath>
void rows(const RowCall& call, const RowSegment* segments, int64_t begin, int64_t end) {
  dispatch_dtype(call.dtype, [&](auto dtype_c) {
    rows_typed<RowMath, decltype(dtype_c)::value>(call, segments, begin, end);
  });
}

}  // namespace
}  // namespace FO_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_optim

#include "cpu/factored_impl.h"
#include "cpu/lbfgs_impl.h"

// The row-math entries of this unit's KernelSet, in FO_FOR_EACH_ROW_MATH order.
#define FO_ROWS_OF(Name) &::fused_optim::cpu::FO_CPU_CAPABILITY::rows<::fused_optim::math::Name>,

// The entries of this unit's KernelSet, in FO_FOR_EACH_OPTIMIZER order (kernels_<isa>.cpp).
#define FO_CHUNKS_OF(Name) &::fused_optim::cpu::FO_CPU_CAPABILITY::chunks<::fused_optim::math::Name>,
static_assert(::fused_optim::kNumOptimizers <= ::fused_optim::cpu::kMaxOptimizers,
              "raise kMaxOptimizers in csrc/cpu/kernel_api.h");
