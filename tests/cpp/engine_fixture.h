// Running an optimizer of the table (optimizer_table.h) over a Bucket through the generic
// CPU API (KernelSet::chunks[id], StepCall), and checking every element against its
// scalar reference (reference.h), the guards, and the lists that must stay untouched.
// Nothing here names an optimizer.
#pragma once

#include <cmath>
#include <cstring>
#include <iomanip>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernel_api.h"
#include "harness.h"
#include "optimizer_table.h"
#include "reference.h"
#include "test_util.h"

namespace fo_test {

namespace fc = fused_optim::cpu;

// Misalignment (in elements) of list l, tensor t: 0..7, different across the lists of a
// row so their vector loops are misaligned differently.
inline int mixed_offset(int l, int t) { return (l * 5 + t * 3 + 1) % 8; }
inline int offset_zero(int, int) { return 0; }

// Expected values of every row of a bucket, flattened over the bucket's tensors, with
// each value's allowed error ([note: tolerances] in test_util.h).
struct Expected {
  std::vector<std::string> row_names;
  std::vector<std::vector<double>> value, tol;  // [row][flat element]
  std::vector<bool> unchanged;                  // row must keep its input bits
};

inline Bucket clone_bucket(const Bucket& src, int (*offset)(int, int)) {
  Bucket b(src.dtype, src.n_lists, src.numels, offset);
  for (int l = 0; l < src.n_lists; ++l) {
    for (int64_t t = 0; t < src.n_tensors(); ++t) {
      std::memcpy(b.at(l, t).data(), src.at(l, t).data(), src.numels[t] * elem_size(src.dtype));
    }
  }
  return b;
}

// A bucket of the case's lists with random state from the entry's fill.
inline Bucket make_bucket(const OptimizerEntry& e, const OptCase& c, DType d,
                          const std::vector<int64_t>& sizes, int (*offset)(int, int),
                          uint64_t seed) {
  const Layout lay = layout_for(e, c);
  Bucket b(d, lay.n_rows, sizes, offset);
  Rng rng(seed);
  double x[kMaxLists];
  for (int64_t t = 0; t < b.n_tensors(); ++t) {
    for (int64_t i = 0; i < b.numels[t]; ++i) {
      e.fill(rng, c, x);
      for (int r = 0; r < lay.n_rows; ++r) b.at(r, t).set(i, x[lay.list_of_row[r]]);
    }
  }
  return b;
}

// The reference applied to every element of `in`; `states`: each tensor's step's state
// (step_state with the torch statement, see optimizer_table.h).
inline Expected expected_for(const OptimizerEntry& e, const OptCase& c, const Bucket& in,
                             const std::vector<double>& states) {
  const Layout lay = layout_for(e, c);
  Expected x;
  for (int r = 0; r < lay.n_rows; ++r) x.row_names.push_back(e.list_names[lay.list_of_row[r]]);
  x.value.assign(lay.n_rows, {});
  x.tol.assign(lay.n_rows, {});
  x.unchanged.assign(lay.n_rows, false);
  x.unchanged[lay.row[e.grad_list]] = !c.scaled;
  const float* scale = c.scaled ? &c.grad_scale : nullptr;
  const bool extended = in.dtype == DType::kFloat64;
  double vals[kMaxLists] = {};
  for (int64_t t = 0; t < in.n_tensors(); ++t) {
    const double* st = e.n_states ? states.data() + t * 2 * e.n_states : nullptr;
    for (int64_t i = 0; i < in.numels[t]; ++i) {
      for (int r = 0; r < lay.n_rows; ++r) vals[lay.list_of_row[r]] = in.at(r, t).get(i);
      const ElemRef o = e.reference(c.args, st, scale, vals, extended);
      for (int r = 0; r < lay.n_rows; ++r) {
        const int k = lay.list_of_row[r];
        x.value[r].push_back(o.value[k]);
        x.tol[r].push_back(allowed_error(in.dtype, o.value[k], o.mag[k]));
      }
    }
  }
  return x;
}

// Compares every row of `got` with `e`, bitwise for unchanged rows; `input` holds the
// inputs for the failure messages. Returns the number of mismatches.
inline int64_t check_bucket(const Bucket& got, const Bucket& input, const Expected& e,
                            const std::string& ctx) {
  // Guards first: a write outside the tensors is the worst failure and reported first.
  const int64_t damaged = got.damaged_guard_bytes();
  FO_CHECK_EQ(damaged, 0) << ctx << ": bytes outside the tensors were written";
  int64_t bad = 0;
  for (int l = 0; l < got.n_lists; ++l) {
    int64_t k = 0;
    for (int64_t t = 0; t < got.n_tensors(); ++t) {
      for (int64_t i = 0; i < got.numels[t]; ++i, ++k) {
        if (e.unchanged[l]) {
          const bool same = got.at(l, t).bits(i) == input.at(l, t).bits(i);
          bad += !same;
          FO_CHECK(same) << ctx << ": " << e.row_names[l] << " of tensor " << t << " (numel "
                         << got.numels[t] << ") element " << i << " changed";
          continue;
        }
        const double v = got.at(l, t).get(i);
        const double ref = e.value[l][k];
        const double tol = e.tol[l][k];
        const bool ok = std::fabs(v - ref) <= tol;
        bad += !ok;
        if (!ok) {
          std::ostringstream in;
          in.precision(17);
          for (int j = 0; j < input.n_lists; ++j) {
            in << (j ? ", " : "") << e.row_names[j] << "=" << input.at(j, t).get(i);
          }
          FO_CHECK(ok) << std::setprecision(17) << ctx << ": " << e.row_names[l]
                       << " of tensor " << t << " (numel " << got.numels[t] << ") element "
                       << i << ": got " << v << ", reference " << ref << ", allowed error "
                       << tol << " [inputs " << in.str() << "]";
        }
      }
    }
  }
  return bad + damaged;
}

// Elements whose stored bits differ between two buckets of the same shape.
inline int64_t count_bit_differences(const Bucket& a, const Bucket& b) {
  int64_t diff = 0;
  for (int l = 0; l < a.n_lists; ++l) {
    for (int64_t t = 0; t < a.n_tensors(); ++t) {
      const GuardedBuffer& x = a.at(l, t);
      const GuardedBuffer& y = b.at(l, t);
      if (std::memcmp(x.data(), y.data(), x.numel() * elem_size(x.dtype())) == 0) continue;
      for (int64_t i = 0; i < a.numels[t]; ++i) diff += x.bits(i) != y.bits(i);
    }
  }
  return diff;
}

// One step's call of the CPU kernels, as csrc/ops_cpu.cpp builds it. `states`: each
// tensor's step's state (step_state in optimizer_table.h; must outlive the call).
inline fc::StepCall step_call(const OptimizerEntry& e, const OptCase& c,
                              const std::vector<double>& states) {
  fc::StepCall call{};
  call.args = c.args;
  call.lists = layout_for(e, c).lists;
  call.maximize = maximize_of(e, c.args);
  call.grad_scale = c.scaled ? &c.grad_scale : nullptr;
  call.tensor_state = e.n_states ? states.data() : nullptr;
  return call;
}

inline void run_cpu(const fc::KernelSet& k, const OptimizerEntry& e, Bucket& b,
                    const fc::StepCall& call, Slicing s) {
  const std::vector<Chunk> chunks = make_chunks(b.numels);
  const fc::TensorTable table = b.table();
  for_slices(static_cast<int64_t>(chunks.size()), s, [&](int64_t lo, int64_t hi) {
    k.chunks[e.id](table, call, chunks.data(), lo, hi);
  });
}

// The step's states of a step `steps_done` steps after the tests' initial state
// (step_state): with Optim::advance (`header`: what the ops layer hands the engine) or
// with the entry's torch statement (what the reference is given).
inline std::vector<double> step_states(const OptimizerEntry& e, const OptCase& c,
                                       int64_t n_tensors, int steps_done, bool header) {
  return step_state(e, c.args, states_before(e, c.args, n_tensors, steps_done), header);
}

// One step of case `c` through kernel set `k` on a copy of `input` laid out with `offset`.
inline Bucket cpu_run(const fc::KernelSet& k, const OptimizerEntry& e, const OptCase& c,
                      const Bucket& input, int (*offset)(int, int), int steps_done, Slicing s) {
  const std::vector<double> states = step_states(e, c, input.n_tensors(), steps_done, true);
  Bucket b = clone_bucket(input, offset);
  run_cpu(k, e, b, step_call(e, c, states), s);
  return b;
}

// The reference results of that step.
inline Expected reference_step(const OptimizerEntry& e, const OptCase& c, const Bucket& input,
                               int steps_done) {
  return expected_for(e, c, input, step_states(e, c, input.n_tensors(), steps_done, false));
}

// Context for failure messages.
inline std::string ctx_of(const OptimizerEntry& e, const OptCase& c, DType d,
                          const std::string& where) {
  return e.name + " " + c.name + " " + dtype_name(d) + " [" + where + "]";
}

// ---------------------------------------------------------------------------------------
// NaN scalars ([note: NaN in bf16 rounding] in kernels_impl.h): bf16 rounding adds to the
// bits of a float, which would carry a NaN whose float has a set low half into -0 or +0
// (0x7fffffff -> 0x8000). The kernels' own arithmetic never makes one; the scalars and the
// grad scale could, and the kernels replace those. Every engine (the CPU variants, the
// emulated CUDA engine) runs every case of every optimizer twice, with a NaN lr (double
// bits all ones, so its float's are too) and with a NaN grad scale (0x7fffffff), on
// kNanScalarSizes (vector body and tails) in each of kNanScalarDTypes.

struct NanScalarCase {
  OptCase c;
  bool nan_grad_scale;  // else a NaN lr
};

inline std::vector<NanScalarCase> nan_scalar_cases(const OptimizerEntry& e) {
  double nan_lr;
  const uint64_t all_ones = 0x7fffffffffffffffull;
  std::memcpy(&nan_lr, &all_ones, sizeof(nan_lr));
  std::vector<NanScalarCase> out;
  for (const OptCase& base : e.cases) {
    for (bool nan_grad_scale : {false, true}) {
      OptCase c = base;
      if (nan_grad_scale) {
        c.scaled = true;
        c.grad_scale = bits_f32(0x7fffffffu);
      } else {
        c.args.lr = nan_lr;
      }
      out.push_back({c, nan_grad_scale});
    }
  }
  return out;
}

inline const std::vector<int64_t>& nan_scalar_sizes() {
  static const std::vector<int64_t> sizes = {1, 17, 4097};
  return sizes;
}

inline const DType kNanScalarDTypes[] = {DType::kBFloat16, DType::kFloat16};

// After such a step on a bucket of nan_scalar_sizes(): no byte outside the tensors
// written, and every element NaN in the lists the NaN reaches (a NaN lr: the params; a NaN
// grad scale: every list, grads included, since they are written back unscaled).
inline void check_nan_scalar_step(const OptimizerEntry& e, const NanScalarCase& n, DType d,
                                  const Bucket& r, const std::string& where) {
  const std::string ctx = ctx_of(e, n.c, d, where);
  FO_CHECK_EQ(r.damaged_guard_bytes(), 0) << ctx;
  const Layout lay = layout_for(e, n.c);
  for (int row = 0; row < lay.n_rows; ++row) {
    const int list = lay.list_of_row[row];
    if (!(((n.nan_grad_scale ? e.nan_grad_scale_lists : e.nan_lr_lists) >> list) & 1u)) continue;
    int64_t not_nan = 0;
    for (int64_t t = 0; t < r.n_tensors(); ++t) {
      for (int64_t i = 0; i < r.numels[t]; ++i) not_nan += !std::isnan(r.at(row, t).get(i));
    }
    FO_CHECK_EQ(not_nan, 0) << ctx << (n.nan_grad_scale ? " NaN grad scale" : " NaN lr") << ": "
                            << e.list_names[list] << " has non-NaN elements";
  }
}

}  // namespace fo_test
