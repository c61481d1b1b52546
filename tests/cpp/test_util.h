// Shared pieces of the engine tests: storage oracles, guarded buffers, the chunk list,
// a deterministic RNG and the tolerance table.
//
// The storage conversions here are ORACLES, written independently of
// csrc/cpu/kernels_impl.h: fp16 goes through GCC's _Float16 (libgcc's soft-fp
// __truncsfhf2 / __extendhfsf2), bf16 through a nearest-even rounding that compares the
// distances to both neighbours in double instead of adding a rounding bias.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu/kernel_api.h"

namespace fo_test {

using fused_optim::cpu::Chunk;
using fused_optim::cpu::DType;
using fused_optim::cpu::kChunkSize;

// ---------------------------------------------------------------------------------------
// Deterministic randomness (splitmix64: the same numbers with every standard library).

struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  bool chance(double p) { return uniform() < p; }
};

// ---------------------------------------------------------------------------------------
// Bit casts and the storage oracles.

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t half_bits(_Float16 h) {
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
inline _Float16 bits_half(uint16_t u) {
  _Float16 h;
  std::memcpy(&h, &u, 2);
  return h;
}

// fp16 oracle: GCC's conversions (round to nearest even, IEEE subnormals and overflow).
// fp16 -> float is read from a table of all 65,536 conversions, made once: the soft-fp
// call per element was a quarter of the engine tests' time.
inline uint16_t oracle_float_to_half(float f) { return half_bits(static_cast<_Float16>(f)); }
inline float oracle_half_to_float(uint16_t h) {
  static const std::vector<float> table = [] {
    std::vector<float> t(0x10000);
    for (uint32_t i = 0; i < 0x10000; ++i) {
      t[i] = static_cast<float>(bits_half(static_cast<uint16_t>(i)));
    }
    return t;
  }();
  return table[h];
}

// bf16 oracle: the two bf16 values that bracket f are its truncation toward zero and the
// next one away from zero; pick the nearer, the even one on a tie. Overflow follows IEEE:
// a value at or beyond max + half an ulp rounds to inf (inf sits at 2^128 in that
// comparison, as the next step of the exponent ladder). NaN becomes 0x7fc0, the quiet NaN
// that c10::BFloat16 produces (the kernels keep a NaN's own high half instead: callers
// compare NaNs by NaN-ness).
inline uint16_t oracle_float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7fc0;
  const uint32_t u = f32_bits(f);
  if (std::isinf(f)) return static_cast<uint16_t>(u >> 16);
  const uint32_t toward_zero = u & 0xffff0000u;
  const uint32_t away = toward_zero + 0x10000u;  // may reach inf (0x7f80...), never NaN
  const double x = std::fabs(static_cast<double>(f));
  const double lo = std::fabs(static_cast<double>(bits_f32(toward_zero)));
  const double hi = ((away & 0x7fffffffu) == 0x7f800000u)
                        ? std::ldexp(1.0, 128)
                        : std::fabs(static_cast<double>(bits_f32(away)));
  const double d_lo = x - lo, d_hi = hi - x;
  uint32_t pick;
  if (d_lo < d_hi) {
    pick = toward_zero;
  } else if (d_hi < d_lo) {
    pick = away;
  } else {
    pick = ((toward_zero >> 16) & 1u) == 0 ? toward_zero : away;
  }
  return static_cast<uint16_t>(pick >> 16);
}
inline float oracle_bf16_to_float(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

// ---------------------------------------------------------------------------------------
// Elements of any storage dtype, read and written as double.

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "fp32";
    case DType::kFloat64: return "fp64";
    case DType::kFloat16: return "fp16";
    case DType::kBFloat16: return "bf16";
  }
  return "?";
}

inline size_t elem_size(DType d) {
  return d == DType::kFloat64 ? 8 : d == DType::kFloat32 ? 4 : 2;
}

inline double load_elem(DType d, const void* base, int64_t i) {
  switch (d) {
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    case DType::kFloat64: return static_cast<const double*>(base)[i];
    case DType::kFloat16: return oracle_half_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16: return oracle_bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
  return 0;
}

// Stores x rounded to the storage dtype (through float for the 16-bit types: inputs only
// need to be some representable value; the tests read back what was stored).
inline void store_elem(DType d, void* base, int64_t i, double x) {
  switch (d) {
    case DType::kFloat32: static_cast<float*>(base)[i] = static_cast<float>(x); break;
    case DType::kFloat64: static_cast<double*>(base)[i] = x; break;
    case DType::kFloat16:
      static_cast<uint16_t*>(base)[i] = oracle_float_to_half(static_cast<float>(x));
      break;
    case DType::kBFloat16:
      static_cast<uint16_t*>(base)[i] = oracle_float_to_bf16(static_cast<float>(x));
      break;
  }
}

// Distance from |x| to the next representable magnitude of the storage dtype.
inline double storage_ulp(DType d, double x) {
  int mant_bits = 23, min_exp = -126;  // exponent of the smallest normal
  switch (d) {
    case DType::kFloat32: mant_bits = 23; min_exp = -126; break;
    case DType::kFloat64: mant_bits = 52; min_exp = -1022; break;
    case DType::kFloat16: mant_bits = 10; min_exp = -14; break;
    case DType::kBFloat16: mant_bits = 7; min_exp = -126; break;
  }
  int e = min_exp;
  if (x != 0 && std::isfinite(x)) {
    int fe;
    std::frexp(x, &fe);  // |x| in [2^(fe-1), 2^fe)
    e = fe - 1 < min_exp ? min_exp : fe - 1;
  }
  return std::ldexp(1.0, e - mant_bits);
}

// [note: tolerances]
// A kernel result is compared with a reference computed from the SAME stored inputs
// (double, or long double for fp64 storage) and left unrounded:
//   |kernel - reference| <= storage_ulps * ulp_storage(reference) + opmath_units * u * mag
// where u is the unit roundoff of the kernel's opmath type (float for fp32/fp16/bf16,
// double for fp64) and `mag` is the sum of the magnitudes of the terms that formed the
// result, so cancellation cannot make the bound too tight. Reasons:
//  - opmath_units = 16: the longest chains (Adam's unscale, L2, lerp, square, sqrt,
//    divide, addcdiv, and the per-tensor scalars rounded from double to opmath; centered
//    RMSprop with momentum about as long) have about 8 roundings of at most u * mag
//    each, where mag carries each step's amplification (sqrt of a cancellation, a
//    division by a computed denominator); 16 is 2x that. The host kernels do not contract
//    into FMAs (-ffp-contract=off); on a GPU nvcc does, which moves some roundings but
//    stays within the same bound.
//  - storage_ulps = 1: storing rounds to nearest (<= 0.5 ulp), and a result that lands
//    on the other side of a power of two than the exact value sees an ulp twice as big;
//    for fp32/fp64 it also covers results in the subnormal range.
// The lr, weight decay and grads of the tests are chosen so that every option moves
// the results by many times this tolerance (checked by the `tolerance_has_teeth` test).
struct Tolerance {
  double storage_ulps;
  double opmath_units;
  double u;  // unit roundoff of opmath
};

inline Tolerance tolerance_for(DType d) {
  switch (d) {
    case DType::kFloat32: return {1, 16, 0x1.0p-24};
    case DType::kFloat64: return {1, 16, 0x1.0p-53};
    case DType::kFloat16: return {1, 16, 0x1.0p-24};
    case DType::kBFloat16: return {1, 16, 0x1.0p-24};
  }
  return {1, 16, 0x1.0p-24};
}

inline double allowed_error(DType d, double ref, double mag) {
  const Tolerance t = tolerance_for(d);
  return t.storage_ulps * storage_ulp(d, ref) + t.opmath_units * t.u * mag;
}

// ---------------------------------------------------------------------------------------
// A tensor's storage with guard bytes before and after it. The element data starts
// `offset` elements after a 64-byte boundary, so offsets 1..7 misalign it for every
// vector width. Any write outside [data, data + numel) changes a guard byte.

class GuardedBuffer {
 public:
  static constexpr size_t kGuardBytes = 128;  // a multiple of 64
  static constexpr unsigned char kPattern = 0xA5;

  GuardedBuffer(DType dtype, int64_t numel, int offset)
      : dtype_(dtype), numel_(numel), offset_(offset) {
    const size_t es = elem_size(dtype);
    total_ = kGuardBytes + offset * es + numel * es + kGuardBytes;
    raw_.reset(new unsigned char[total_ + 64]);
    const uintptr_t p = reinterpret_cast<uintptr_t>(raw_.get());
    begin_ = raw_.get() + ((64 - p % 64) % 64);
    std::memset(begin_, kPattern, total_);
    data_ = begin_ + kGuardBytes + offset * es;
  }
  GuardedBuffer(GuardedBuffer&&) = default;
  GuardedBuffer& operator=(GuardedBuffer&&) = default;

  void* data() const { return data_; }
  int64_t numel() const { return numel_; }
  DType dtype() const { return dtype_; }
  double get(int64_t i) const { return load_elem(dtype_, data_, i); }
  void set(int64_t i, double x) { store_elem(dtype_, data_, i, x); }
  // Raw storage bits of element i (for bitwise comparisons).
  uint64_t bits(int64_t i) const {
    uint64_t b = 0;
    const size_t es = elem_size(dtype_);
    std::memcpy(&b, static_cast<unsigned char*>(data_) + i * es, es);
    return b;
  }
  void set_bits(int64_t i, uint64_t b) {
    const size_t es = elem_size(dtype_);
    std::memcpy(static_cast<unsigned char*>(data_) + i * es, &b, es);
  }

  // Number of guard bytes that changed.
  int64_t damaged_guard_bytes() const {
    int64_t bad = 0;
    const unsigned char* end = static_cast<unsigned char*>(data_) + numel_ * elem_size(dtype_);
    for (const unsigned char* q = begin_; q < static_cast<unsigned char*>(data_); ++q) {
      bad += *q != kPattern;
    }
    for (const unsigned char* q = end; q < begin_ + total_; ++q) bad += *q != kPattern;
    return bad;
  }

 private:
  DType dtype_;
  int64_t numel_;
  int offset_;
  size_t total_ = 0;
  std::unique_ptr<unsigned char[]> raw_;
  unsigned char* begin_ = nullptr;
  void* data_ = nullptr;
};

// The tensors of one bucket, list-major like csrc/ops_common.h's FlatTable.
struct Bucket {
  DType dtype;
  int n_lists;
  std::vector<int64_t> numels;
  std::vector<GuardedBuffer> bufs;  // bufs[list * n_tensors + t]
  std::vector<void*> ptrs;

  // offset(list, tensor) gives each buffer's misalignment in elements.
  template <typename OffsetFn>
  Bucket(DType d, int lists, std::vector<int64_t> sizes, OffsetFn offset)
      : dtype(d), n_lists(lists), numels(std::move(sizes)) {
    for (int l = 0; l < n_lists; ++l) {
      for (size_t t = 0; t < numels.size(); ++t) {
        bufs.emplace_back(dtype, numels[t], offset(l, static_cast<int>(t)));
      }
    }
    for (auto& b : bufs) ptrs.push_back(b.data());
  }
  int64_t n_tensors() const { return static_cast<int64_t>(numels.size()); }
  GuardedBuffer& at(int list, int64_t t) { return bufs[list * numels.size() + t]; }
  const GuardedBuffer& at(int list, int64_t t) const { return bufs[list * numels.size() + t]; }
  fused_optim::cpu::TensorTable table() const {
    return fused_optim::cpu::TensorTable{n_tensors(), n_lists, ptrs.data(), numels.data(),
                                         dtype, dtype};
  }
  int64_t damaged_guard_bytes() const {
    int64_t bad = 0;
    for (const auto& b : bufs) bad += b.damaged_guard_bytes();
    return bad;
  }
};

// The chunk list exactly as csrc/ops_cpu.cpp's make_chunks builds it.
inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunkSize) {
      const int64_t e = b + kChunkSize < numels[t] ? b + kChunkSize : numels[t];
      chunks.push_back(Chunk{static_cast<int64_t>(t), b, e});
    }
  }
  return chunks;
}

// How the chunk list is handed to the kernel: one call, or sub-ranges as threads of a
// parallel region would get them.
enum class Slicing { kOneCall, kEachChunkReversed, kUnevenSlices };

inline const char* slicing_name(Slicing s) {
  return s == Slicing::kOneCall ? "one call"
         : s == Slicing::kEachChunkReversed ? "each chunk, reversed"
                                            : "uneven slices";
}

// Calls fn(begin, end) over [0, n) split as `s` says.
template <typename Fn>
void for_slices(int64_t n, Slicing s, Fn fn) {
  if (s == Slicing::kOneCall) {
    fn(int64_t{0}, n);
  } else if (s == Slicing::kEachChunkReversed) {
    for (int64_t c = n - 1; c >= 0; --c) fn(c, c + 1);
  } else {
    // 1, 2, 3, 1, 2, 3... chunks per call, last slice first, with an empty call in between.
    std::vector<std::pair<int64_t, int64_t>> slices;
    int64_t b = 0, w = 1;
    while (b < n) {
      const int64_t e = b + w < n ? b + w : n;
      slices.emplace_back(b, e);
      b = e;
      w = w % 3 + 1;
    }
    for (auto it = slices.rbegin(); it != slices.rend(); ++it) {
      fn(it->first, it->first);  // an empty range must do nothing
      fn(it->first, it->second);
    }
  }
}

// Every size the tests put in one bucket: empty, SIMD tails (8 fp32 lanes in AVX2, 16
// in AVX-512, 8-element F16C groups, the 512-element fp32 blocks of half storage) and
// chunk boundaries.
inline std::vector<int64_t> awkward_sizes() {
  return {0,   1,   3,   7,   8,   9,   15,  16,  17,  31,  33,
          511, 512, 513, kChunkSize - 1, kChunkSize, kChunkSize + 1, 2 * kChunkSize + 3};
}

inline const DType kAllDTypes[] = {DType::kFloat32, DType::kFloat64, DType::kFloat16,
                                   DType::kBFloat16};

}  // namespace fo_test
