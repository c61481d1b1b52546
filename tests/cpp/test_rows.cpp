// The row-sparse kernels (csrc/cpu/kernels_impl.h rows_typed; [note: row math] in
// fused_optim/math/optimizer.h) on the host, through every instruction set built, for
// every row math of FO_FOR_EACH_ROW_MATH and every storage dtype, against a plain loop
// written here: each segment's entries in perm order, summed with a rounding per add
// (coalescing maths) or applied one by one (the others), the math's update on each
// element through this file's own storage conversions (test_util.h oracles). Two
// params of different row lengths, duplicate rows, untouched rows, maximize on and
// off; segments handed over in one call and one at a time in reverse give the same bits.
#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernel_api.h"
#include "cpu/row_order.h"
#include "fused_optim/optimizers.h"
#include "harness.h"
#include "test_util.h"

namespace fo_test {
namespace {

namespace fc = fused_optim::cpu;
namespace fm = fused_optim::math;

// The oracle's storage rounding: opmath is double for fp64 storage, float otherwise,
// as in the kernels; rounding goes through test_util.h's oracle conversions.
template <DType D>
struct OracleRounding {
  using opmath = std::conditional_t<D == DType::kFloat64, double, float>;
  static opmath r(opmath x) {
    double buf[1];
    uint16_t half[1];
    float f[1];
    void* base = D == DType::kFloat64 ? static_cast<void*>(buf)
                 : D == DType::kFloat32 ? static_cast<void*>(f)
                                        : static_cast<void*>(half);
    store_elem(D, base, 0, static_cast<double>(x));
    return static_cast<opmath>(load_elem(D, base, 0));
  }
  static opmath add_scaled(opmath p, opmath alpha, opmath x) {
    if constexpr (D == DType::kFloat16 || D == DType::kBFloat16) {
      return r(p + r(r(alpha) * x));
    } else {
      return std::fma(alpha, x, p);
    }
  }
};

struct Param {
  int64_t rows, len;
  std::vector<int64_t> entry_rows;  // one per entry
};

const Param kParams[] = {
    {9, 5, {3, 7, 3, 0, 3, 8, 7}},  // row 3 three times, rows 1, 2, 4-6 untouched
    {4, 19, {2, 1, 2}},
    {6, 3, {}},  // a grad without entries
    {5, 4, {0, 2, 3}},  // strictly increasing (coalesced): the kernel gets no perm
};

template <typename Math, DType D>
void check_math(const std::string& variant, bool maximize) {
  using O = typename OracleRounding<D>::opmath;
  constexpr int kS = Math::kStates, kC = Math::kConstants;
  const size_t esz = elem_size(D);
  const int64_t n = static_cast<int64_t>(std::size(kParams));
  std::mt19937 gen(17 + static_cast<unsigned>(D) + (maximize ? 100 : 0));
  std::uniform_real_distribution<double> uni(0.1, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  // Buffers: params, states (state-major), values.
  std::vector<std::vector<unsigned char>> params(n), values(n), states(kS * n);
  std::vector<std::vector<int64_t>> perms(n);
  std::vector<double> constants(n * kC);
  for (int64_t t = 0; t < n; ++t) {
    const Param& q = kParams[t];
    params[t].resize(q.rows * q.len * esz);
    for (int64_t i = 0; i < q.rows * q.len; ++i) store_elem(D, params[t].data(), i, normal(gen));
    for (int j = 0; j < kS; ++j) {
      states[j * n + t].resize(q.rows * q.len * esz);
      for (int64_t i = 0; i < q.rows * q.len; ++i) {
        store_elem(D, states[j * n + t].data(), i, uni(gen) * 0.01);  // positive (sums)
      }
    }
    const int64_t nnz = static_cast<int64_t>(q.entry_rows.size());
    values[t].resize(std::max<int64_t>(nnz, 1) * q.len * esz);
    for (int64_t i = 0; i < nnz * q.len; ++i) store_elem(D, values[t].data(), i, normal(gen));
    perms[t].resize(nnz);
    std::iota(perms[t].begin(), perms[t].end(), 0);
    std::stable_sort(perms[t].begin(), perms[t].end(),
                     [&](int64_t a, int64_t b) { return q.entry_rows[a] < q.entry_rows[b]; });
    // Every math's constants are positive but the last (a negated step size): no sqrt of
    // a negative, no NaN (whose bits the two roundings need not agree on).
    for (int j = 0; j < kC; ++j) constants[t * kC + j] = (j == kC - 1 ? -1 : 1) * uni(gen) * 0.1;
  }
  std::vector<fc::RowSegment> segments;
  for (int64_t t = 0; t < n; ++t) {
    const std::vector<int64_t>& p = perms[t];
    const std::vector<int64_t>& r = kParams[t].entry_rows;
    for (size_t b = 0; b < p.size();) {
      size_t e = b + 1;
      while (e < p.size() && r[p[e]] == r[p[b]]) ++e;
      segments.push_back({t, r[p[b]], static_cast<int64_t>(b), static_cast<int64_t>(e)});
      b = e;
    }
  }

  // The oracle, on copies.
  auto ref_params = params;
  auto ref_states = states;
  using R = OracleRounding<D>;
  const O sign = maximize ? O(-1) : O(1);
  for (const fc::RowSegment& s : segments) {
    const int64_t len = kParams[s.tensor].len;
    O c[kC];
    for (int j = 0; j < kC; ++j) c[j] = static_cast<O>(constants[s.tensor * kC + j]);
    for (int64_t e = 0; e < len; ++e) {
      const int64_t at = s.row * len + e;
      O p = static_cast<O>(load_elem(D, ref_params[s.tensor].data(), at));
      O st[kS > 0 ? kS : 1];
      for (int j = 0; j < kS; ++j) st[j] = static_cast<O>(load_elem(D, ref_states[j * n + s.tensor].data(), at));
      const auto value = [&](int64_t k) {
        return static_cast<O>(load_elem(D, values[s.tensor].data(), perms[s.tensor][k] * len + e));
      };
      if constexpr (Math::kCoalesce) {
        O g = value(s.begin);
        for (int64_t k = s.begin + 1; k < s.end; ++k) g = R::r(g + value(k));
        Math::template update<R>(p, sign * g, st, c);
      } else {
        for (int64_t k = s.begin; k < s.end; ++k) Math::template update<R>(p, sign * value(k), st, c);
      }
      store_elem(D, ref_params[s.tensor].data(), at, p);
      for (int j = 0; j < kS; ++j) store_elem(D, ref_states[j * n + s.tensor].data(), at, st[j]);
    }
  }

  // The kernel, in one call and segment by segment in reverse.
  const fc::KernelSet& k = fc::kernels_for(variant);
  int id = 0, this_id = -1;
#define FO_FIND_ROW_MATH(Name) \
  if (std::is_same_v<Math, fm::Name>) this_id = id; \
  ++id;
  FO_FOR_EACH_ROW_MATH(FO_FIND_ROW_MATH)
#undef FO_FIND_ROW_MATH
  for (int slicing = 0; slicing < 2; ++slicing) {
    auto out_params = params;
    auto out_states = states;
    std::vector<void*> pp(n), sp(kS * n);
    std::vector<const void*> vp(n);
    std::vector<const int64_t*> perm_ptrs(n);
    std::vector<int64_t> lens(n);
    for (int64_t t = 0; t < n; ++t) {
      pp[t] = out_params[t].data();
      vp[t] = values[t].data();
      const std::vector<int64_t>& r = kParams[t].entry_rows;
      const bool increasing = std::is_sorted(r.begin(), r.end(), std::less_equal<int64_t>());
      perm_ptrs[t] = increasing && !r.empty() ? nullptr : perms[t].data();  // nullptr: identity
      lens[t] = kParams[t].len;
      for (int j = 0; j < kS; ++j) sp[j * n + t] = out_states[j * n + t].data();
    }
    fc::RowCall call{n, D, pp.data(), sp.data(), vp.data(), perm_ptrs.data(), lens.data(),
                     constants.data(), maximize};
    const int64_t count = static_cast<int64_t>(segments.size());
    if (slicing == 0) {
      k.rows[this_id](call, segments.data(), 0, count);
    } else {
      for (int64_t g = count - 1; g >= 0; --g) k.rows[this_id](call, segments.data(), g, g + 1);
    }
    const std::string ctx = std::string(Math::kMath) + " " + dtype_name(D) + " " + variant +
                            (maximize ? " maximize" : "") + (slicing ? " reversed" : "");
    for (int64_t t = 0; t < n; ++t) {
      FO_CHECK(out_params[t] == ref_params[t]) << ctx << ": params[" << t << "] differ";
      for (int j = 0; j < kS; ++j) {
        FO_CHECK(out_states[j * n + t] == ref_states[j * n + t])
            << ctx << ": state " << j << " of params[" << t << "] differs";
      }
    }
    // Untouched rows of the first param stay as they were.
    const int64_t len0 = kParams[0].len;
    for (int64_t row : {1, 2, 4, 5, 6}) {
      for (int64_t e = 0; e < len0; ++e) {
        FO_CHECK_EQ(load_elem(D, out_params[0].data(), row * len0 + e),
                    load_elem(D, params[0].data(), row * len0 + e))
            << ctx << ": untouched row " << row << " changed";
      }
    }
  }
}

template <typename Math>
void check_all_dtypes(const std::string& variant) {
  for (bool maximize : {false, true}) {
    check_math<Math, DType::kFloat32>(variant, maximize);
    check_math<Math, DType::kFloat64>(variant, maximize);
    check_math<Math, DType::kFloat16>(variant, maximize);
    check_math<Math, DType::kBFloat16>(variant, maximize);
  }
}

}  // namespace

FO_TEST(rows_kernels_match_a_plain_loop_bit_for_bit) {
  for (const std::string& variant : fc::supported_capabilities()) {
#define FO_CHECK_ROW_MATH(Name) check_all_dtypes<fm::Name>(variant);
    FO_FOR_EACH_ROW_MATH(FO_CHECK_ROW_MATH)
#undef FO_CHECK_ROW_MATH
  }
}

// cpu/row_order.h: the engine's order of a grad's entries by row is std::stable_sort's,
// for row counts that take one, two and three radix passes, with heavy duplication,
// without any, and in edge cases (no entries, one row).
FO_TEST(stable_order_by_row_is_a_stable_sort) {
  std::mt19937_64 gen(7);
  std::vector<int64_t> order, sorted;
  for (int64_t n_rows : {int64_t{1}, int64_t{2}, int64_t{5}, int64_t{2048}, int64_t{2049},
                         int64_t{1000000}, int64_t{1} << 33}) {
    for (int64_t nnz : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{5000}}) {
      for (int64_t distinct : {int64_t{3}, n_rows}) {
        std::vector<int64_t> idx(nnz);
        for (int64_t& x : idx) {
          x = static_cast<int64_t>(gen() % static_cast<uint64_t>(std::min(distinct, n_rows)));
          if (distinct == 3) x = x * (n_rows / 3);  // three rows, far apart
        }
        std::vector<int64_t> want(nnz);
        std::iota(want.begin(), want.end(), int64_t{0});
        std::stable_sort(want.begin(), want.end(),
                         [&](int64_t a, int64_t b) { return idx[a] < idx[b]; });
        fc::stable_order_by_row(idx.data(), nnz, n_rows, order, sorted);
        const std::string ctx = "rows " + std::to_string(n_rows) + ", nnz " +
                                std::to_string(nnz) + ", distinct " + std::to_string(distinct);
        FO_CHECK(order == want) << ctx << ": order is not the stable sort's";
        bool keys_match = static_cast<int64_t>(sorted.size()) == nnz;
        for (int64_t k = 0; keys_match && k < nnz; ++k) keys_match = sorted[k] == idx[want[k]];
        FO_CHECK(keys_match) << ctx << ": sorted rows";
      }
    }
  }
}

}  // namespace fo_test
