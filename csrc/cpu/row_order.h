// The order of a sparse grad's entries by row, for the row-sparse engine (csrc/sparse_rows.cpp):
// a stable LSD radix sort, torch-free (ctest: tests/cpp/test_rows.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace fused_optim {
namespace cpu {

// order[k]: the entry at sorted position k of the rows idx[0, nnz), each in [0, n_rows);
// sorted[k] = idx[order[k]]. Stable: the entries of one row keep their input order. Digits
// of kRadixBits bits, as many passes as n_rows needs (two for a million rows).
inline void stable_order_by_row(const int64_t* idx, int64_t nnz, int64_t n_rows,
                                std::vector<int64_t>& order, std::vector<int64_t>& sorted) {
  constexpr int kRadixBits = 11;
  constexpr int64_t kBins = int64_t{1} << kRadixBits;
  int bits = 0;
  while (bits < 63 && (int64_t{1} << bits) < n_rows) ++bits;
  order.resize(nnz);
  sorted.assign(idx, idx + nnz);
  for (int64_t k = 0; k < nnz; ++k) order[k] = k;
  if (bits == 0) return;  // one row: every entry already in place
  std::vector<int64_t> order_tmp(nnz), sorted_tmp(nnz), count(kBins);
  for (int shift = 0; shift < bits; shift += kRadixBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t k = 0; k < nnz; ++k) ++count[(sorted[k] >> shift) & (kBins - 1)];
    int64_t sum = 0;
    for (int64_t b = 0; b < kBins; ++b) {
      const int64_t c = count[b];
      count[b] = sum;
      sum += c;
    }
    for (int64_t k = 0; k < nnz; ++k) {
      const int64_t to = count[(sorted[k] >> shift) & (kBins - 1)]++;
      sorted_tmp[to] = sorted[k];
      order_tmp[to] = order[k];
    }
    sorted.swap(sorted_tmp);
    order.swap(order_tmp);
  }
}

}  // namespace cpu
}  // namespace fused_optim
