// The LBFGS row passes' CPU kernels ([note: LBFGS row passes] in kernel_api.h), float32
// and float64. Included at the end of kernels_impl.h (after factored_impl.h, whose
// fixed-lane sums they use), so compiled once per instruction set; csrc/lbfgs.cpp cuts
// the columns into blocks, runs them on the threads and adds up the partials.
//
// Bytes per iteration, fp32 (4 B per element and row), R rows of history:
//   products   reads g, prev, d and the R rows, writes y, s, prev: 4 (R + 3) + 12 B;
//              torch.optim.LBFGS's sub, mul, two dots and the copy of prev alone move
//              32 B, and the rows' dots (its first loop) 4 R more.
//   direction  reads the R + 1 rows, writes d: 4 (R + 1) + 4 B, with g . d and max |d|
//              from the registers (torch: two more passes over d, one over g).
// One column block at a time: its slice of g (products) or of the sum (direction) stays
// in the core's L2 while the rows stream through once.
#pragma once

#include <algorithm>

namespace fused_optim {
namespace cpu {
inline namespace FO_CPU_CAPABILITY {
namespace {

// [note: LBFGS sums] A dot product adds in runs of kRun elements: each run in kDotLanes
// lanes of T (element j into lane j % kDotLanes, as sgemv's and torch's fp32 dots add in
// fp32, but over 32 terms a lane), each run's lanes then into float64 ones, so the
// rounding error does not grow with n; float64 accumulation of every product costs a
// conversion per element and ran at half of MKL's sgemv speed in cache (dev machine).
// The order is fixed, so every instruction set gets the same bits.
constexpr int64_t kRun = 1024;

template <typename T>
struct LbfgsPasses {
  static constexpr int kDotLanes = 64 / sizeof(T) * 2;  // two vectors of 512 bits

  static FO_INLINE double wide(T x) { return static_cast<double>(x); }

  // sum_i a[i] * b[i] over [0, len), in runs ([note: LBFGS sums]).
  static double dot(const T* __restrict a, const T* __restrict b, int64_t len) {
    double total[kDotLanes] = {};
    for (int64_t j = 0; j < len; j += kRun) {
      const int64_t m = std::min(kRun, len - j);
      T acc[kDotLanes] = {};
      int64_t i = 0;
      for (; i + kDotLanes <= m; i += kDotLanes) {
#pragma omp simd
        for (int l = 0; l < kDotLanes; ++l) acc[l] += a[j + i + l] * b[j + i + l];
      }
      for (int l = 0; i + l < m; ++l) acc[l] += a[j + i + l] * b[j + i + l];
      for (int l = 0; l < kDotLanes; ++l) total[l] += wide(acc[l]);
    }
    double sum = 0.0;
    for (int l = 0; l < kDotLanes; ++l) sum += total[l];
    return sum;
  }

  // dot(a0, b, len) and dot(a1, b, len) in one sweep (b loaded once for both); the
  // same sums, in the same order, as two calls of dot.
  static void dot2(const T* __restrict a0, const T* __restrict a1, const T* __restrict b,
                   int64_t len, double& s0, double& s1) {
    double t0[kDotLanes] = {}, t1[kDotLanes] = {};
    for (int64_t j = 0; j < len; j += kRun) {
      const int64_t m = std::min(kRun, len - j);
      T acc0[kDotLanes] = {}, acc1[kDotLanes] = {};
      int64_t i = 0;
      for (; i + kDotLanes <= m; i += kDotLanes) {
#pragma omp simd
        for (int l = 0; l < kDotLanes; ++l) {
          const T bv = b[j + i + l];
          acc0[l] += a0[j + i + l] * bv;
          acc1[l] += a1[j + i + l] * bv;
        }
      }
      for (int l = 0; i + l < m; ++l) {
        acc0[l] += a0[j + i + l] * b[j + i + l];
        acc1[l] += a1[j + i + l] * b[j + i + l];
      }
      for (int l = 0; l < kDotLanes; ++l) {
        t0[l] += wide(acc0[l]);
        t1[l] += wide(acc1[l]);
      }
    }
    s0 = 0.0;
    s1 = 0.0;
    for (int l = 0; l < kDotLanes; ++l) {
      s0 += t0[l];
      s1 += t1[l];
    }
  }

  static void products(const LbfgsCall& c, int64_t begin, int64_t end) {
    T* buf = static_cast<T*>(c.buf);
    const int64_t n = c.n;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t j0 = b * c.block;
      const int64_t len = std::min(c.block, n - j0);
      double* part = c.partials + b * c.width;
      const T* __restrict g = buf + j0;
      if (c.slot >= 0) {
        // torch's y = g.sub(prev), s = d.mul(t), each one rounding in T; prev.copy_(g)
        T* __restrict y = buf + (1 + 2 * c.slot) * n + j0;
        T* __restrict s = y + n;
        T* __restrict prev = static_cast<T*>(c.prev) + j0;
        const T* __restrict d = static_cast<const T*>(c.d) + j0;
        const T t = static_cast<T>(c.t);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const T yi = g[i] - prev[i];
          y[i] = yi;
          s[i] = d[i] * t;
          prev[i] = g[i];
        }
        part[c.rows] = dot(y, s, len);
        part[c.rows + 1] = dot(y, y, len);
      }
      int64_t r = 1;
      for (; r + 1 <= c.rows; r += 2) {
        dot2(buf + r * n + j0, buf + (r + 1) * n + j0, g, len, part[r - 1], part[r]);
      }
      if (r == c.rows) part[r - 1] = dot(buf + r * n + j0, g, len);
    }
  }

  static void direction(const LbfgsCall& c, int64_t begin, int64_t end) {
    const T* buf = static_cast<const T*>(c.buf);
    const T* coef = static_cast<const T*>(c.coef);
    const int64_t n = c.n;
    T* __restrict acc = reinterpret_cast<T*>(c.scratch);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t j0 = b * c.block;
      const int64_t len = std::min(c.block, n - j0);
      const T* __restrict g = buf + j0;
      const T c0 = coef[0];
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) acc[i] = c0 * g[i];
      // four rows a sweep, added one after another: the same sums in the same order as
      // one row a sweep, with a quarter of the loads and stores of acc
      int64_t r = 1;
      for (; r + 4 <= c.rows; r += 4) {
        const T* __restrict r0 = buf + r * n + j0;
        const T* __restrict r1 = r0 + n;
        const T* __restrict r2 = r1 + n;
        const T* __restrict r3 = r2 + n;
        const T k0 = coef[r], k1 = coef[r + 1], k2 = coef[r + 2], k3 = coef[r + 3];
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          acc[i] = (((acc[i] + k0 * r0[i]) + k1 * r1[i]) + k2 * r2[i]) + k3 * r3[i];
        }
      }
      for (; r < c.rows; ++r) {
        const T* __restrict row = buf + r * n + j0;
        const T k = coef[r];
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] + k * row[i];
      }
      T* __restrict out = static_cast<T*>(c.out) + j0;
      T top[kLanes] = {};
      in_lanes(len, [&](int64_t i, int l) {
        const T v = acc[i];
        out[i] = v;
        const T a = v < 0 ? -v : v;
        top[l] = (a > top[l] || a != a) ? a : top[l];  // NaN sticks
      });
      double m = 0.0;
      for (int l = 0; l < kLanes; ++l) {
        m = (wide(top[l]) > m || top[l] != top[l]) ? wide(top[l]) : m;
      }
      c.partials[b * c.width] = dot(g, out, len);
      c.partials[b * c.width + 1] = m;
    }
  }
};

template <int P>
void lbfgs_pass(const LbfgsCall& c, int64_t begin, int64_t end) {
  if (c.dtype == DType::kFloat64) {
    if constexpr (P == 0) LbfgsPasses<double>::products(c, begin, end);
    else LbfgsPasses<double>::direction(c, begin, end);
  } else {
    if constexpr (P == 0) LbfgsPasses<float>::products(c, begin, end);
    else LbfgsPasses<float>::direction(c, begin, end);
  }
}

}  // namespace
}  // namespace FO_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_optim

// This unit's LBFGS entries of its KernelSet.
#define FO_LBFGS_PASSES                                  \
  &::fused_optim::cpu::FO_CPU_CAPABILITY::lbfgs_pass<0>, \
      &::fused_optim::cpu::FO_CPU_CAPABILITY::lbfgs_pass<1>
