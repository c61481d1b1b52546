// The factored-moment engine's CPU kernels ([note: factored engine] in kernel_api.h):
// the three passes of an Adafactor step over work items, for every storage dtype, with
// the math of fused_optim/math/adafactor.h. Included at the end of kernels_impl.h, so
// compiled once per instruction set like the rest of the engine; csrc/factored.cpp
// builds the items, runs the per-tensor scalar work between the passes and the threads.
//
//   pass 1  reads param, grad (a vector: and its variance, written): the item's sum of
//           param^2, each row's sum of g^2, the item's column sums of g^2; 8 B/element
//           fp32 (a vector: 16).
//   pass 2  reads grad (a vector: its variance): the item's sum of update^2; 4 B (8).
//   pass 3  reads param, grad, writes param: 12 B.
// The update is recomputed in passes 2 and 3 from the factors (never stored): fp32,
// 24 B per element in all, the traffic floor of the step with three grad reads.
// Sums accumulate in double (exact squares of fp32 values, so only the sums round), in
// fixed lanes ([note: sums in fixed lanes]).
#pragma once

#include "fused_optim/math/adafactor.h"

namespace fused_optim {
namespace cpu {
inline namespace FO_CPU_CAPABILITY {
namespace {

// [note: sums in fixed lanes]
// Every sum of a pass (param^2, a row's g^2, update^2) accumulates in kLanes float64
// lanes, element j of a run into lane j % kLanes, and the lanes add up in order: the
// same operations in the same order for every instruction set (an `omp simd`
// reduction would add in as many lanes as the vector has), so the variants agree to the
// bit, as the element-wise kernels do.
constexpr int kLanes = 16;

template <typename F>
FO_INLINE void in_lanes(int64_t n, F&& f) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) f(j + l, l);
  }
  for (int l = 0; j + l < n; ++l) f(j + l, l);
}

FO_INLINE double lane_sum(const double (&lanes)[kLanes]) {
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <DType D>
struct AdafactorPasses {
  using S = Storage<D>;
  using T = typename S::type;
  using O = typename S::opmath;
  using R = RowRounding<D>;
  using A = math::Adafactor;

  static FO_INLINE double sq(O x) { return static_cast<double>(x) * static_cast<double>(x); }

  static void pass1(const FactoredCall& c, int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const FactoredItem& item = c.items[k];
      const FactoredTensor& t = c.tensors[item.tensor];
      double psq[kLanes] = {};
      if (t.row_var == nullptr) {
        const T* __restrict p = static_cast<const T*>(t.param) + item.begin;
        const T* __restrict g = static_cast<const T*>(t.grad) + item.begin;
        T* __restrict var = static_cast<T*>(t.variance) + item.begin;
        const O w = static_cast<O>(t.weight);
        in_lanes(item.end - item.begin, [&](int64_t i, int l) {
          psq[l] += sq(S::to_opmath(p[i]));
          const O gv = S::to_opmath(g[i]);
          var[i] = S::from_opmath(A::moved<R>(S::to_opmath(var[i]), R::r(gv * gv), w));
        });
      } else {
        const int64_t n = t.cols;
        const int64_t base = item.batch * t.rows;
        double* __restrict colp = c.col_partials + item.col_offset;
        for (int64_t j = 0; j < n; ++j) colp[j] = 0.0;
        for (int64_t i = item.begin; i < item.end; ++i) {
          const T* __restrict p = static_cast<const T*>(t.param) + (base + i) * n;
          const T* __restrict g = static_cast<const T*>(t.grad) + (base + i) * n;
          double rs[kLanes] = {};
          in_lanes(n, [&](int64_t j, int l) {
            const double s = sq(S::to_opmath(g[j]));
            rs[l] += s;
            colp[j] += s;
            psq[l] += sq(S::to_opmath(p[j]));
          });
          t.row_sums[base + i] = lane_sum(rs);
        }
      }
      c.sums[k] = lane_sum(psq);
    }
  }

  static void pass2(const FactoredCall& c, int64_t begin, int64_t end) {
    const O eps1_sq = R::r(static_cast<O>(c.eps1_sq));
    for (int64_t k = begin; k < end; ++k) {
      const FactoredItem& item = c.items[k];
      const FactoredTensor& t = c.tensors[item.tensor];
      double usq[kLanes] = {};
      if (t.row_var == nullptr) {
        const T* __restrict g = static_cast<const T*>(t.grad) + item.begin;
        const T* __restrict var = static_cast<const T*>(t.variance) + item.begin;
        in_lanes(item.end - item.begin, [&](int64_t j, int l) {
          usq[l] += sq(A::update<R>(S::to_opmath(g[j]), S::to_opmath(var[j]), eps1_sq));
        });
      } else {
        const int64_t n = t.cols;
        const int64_t base = item.batch * t.rows;
        const T* __restrict cv = static_cast<const T*>(t.col_var) + item.batch * n;
        const O mean = static_cast<O>(t.means[item.batch]);
        for (int64_t i = item.begin; i < item.end; ++i) {
          const T* __restrict g = static_cast<const T*>(t.grad) + (base + i) * n;
          const O rv = S::to_opmath(static_cast<const T*>(t.row_var)[base + i]);
          in_lanes(n, [&](int64_t j, int l) {
            const O v = A::factored_estimate<R>(rv, S::to_opmath(cv[j]), mean);
            usq[l] += sq(A::update<R>(S::to_opmath(g[j]), v, eps1_sq));
          });
        }
      }
      c.sums[k] = lane_sum(usq);
    }
  }

  template <bool DECAY>
  static void pass3_typed(const FactoredCall& c, int64_t begin, int64_t end) {
    const O eps1_sq = R::r(static_cast<O>(c.eps1_sq));
    const O sign = c.maximize ? O(-1) : O(1);
    const O decay = static_cast<O>(c.decay_factor);
    for (int64_t k = begin; k < end; ++k) {
      const FactoredItem& item = c.items[k];
      const FactoredTensor& t = c.tensors[item.tensor];
      const O alpha = static_cast<O>(t.step_alpha);
      if (t.row_var == nullptr) {
        T* __restrict p = static_cast<T*>(t.param) + item.begin;
        const T* __restrict g = static_cast<const T*>(t.grad) + item.begin;
        const T* __restrict var = static_cast<const T*>(t.variance) + item.begin;
        const int64_t len = item.end - item.begin;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const O u = A::update<R>(sign * S::to_opmath(g[j]), S::to_opmath(var[j]), eps1_sq);
          p[j] = S::from_opmath(A::apply<R, DECAY>(S::to_opmath(p[j]), u, decay, alpha));
        }
      } else {
        const int64_t n = t.cols;
        const int64_t base = item.batch * t.rows;
        const T* __restrict cv = static_cast<const T*>(t.col_var) + item.batch * n;
        const O mean = static_cast<O>(t.means[item.batch]);
        for (int64_t i = item.begin; i < item.end; ++i) {
          T* __restrict p = static_cast<T*>(t.param) + (base + i) * n;
          const T* __restrict g = static_cast<const T*>(t.grad) + (base + i) * n;
          const O rv = S::to_opmath(static_cast<const T*>(t.row_var)[base + i]);
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            const O v = A::factored_estimate<R>(rv, S::to_opmath(cv[j]), mean);
            const O u = A::update<R>(sign * S::to_opmath(g[j]), v, eps1_sq);
            p[j] = S::from_opmath(A::apply<R, DECAY>(S::to_opmath(p[j]), u, decay, alpha));
          }
        }
      }
    }
  }

  static void pass3(const FactoredCall& c, int64_t begin, int64_t end) {
    if (c.decay) {
      pass3_typed<true>(c, begin, end);
    } else {
      pass3_typed<false>(c, begin, end);
    }
  }
};

// FactoredFn of pass P (kernel_api.h).
template <int P>
void adafactor_pass(const FactoredCall& c, int64_t begin, int64_t end) {
  dispatch_dtype(c.dtype, [&](auto dtype_c) {
    using Passes = AdafactorPasses<decltype(dtype_c)::value>;
    if constexpr (P == 0) {
      Passes::pass1(c, begin, end);
    } else if constexpr (P == 1) {
      Passes::pass2(c, begin, end);
    } else {
      Passes::pass3(c, begin, end);
    }
  });
}

}  // namespace
}  // namespace FO_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_optim

// This unit's factored-engine entries of its KernelSet.
#define FO_ADAFACTOR_PASSES                                  \
  &::fused_optim::cpu::FO_CPU_CAPABILITY::adafactor_pass<0>, \
      &::fused_optim::cpu::FO_CPU_CAPABILITY::adafactor_pass<1>, \
      &::fused_optim::cpu::FO_CPU_CAPABILITY::adafactor_pass<2>
