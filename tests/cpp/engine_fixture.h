// Running the Adam / SGD kernels of a variant over a Bucket and checking every element
// against the scalar reference (reference.h), the guards, and the lists that must stay
// untouched.
#pragma once

#include <cmath>
#include <iomanip>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernel_api.h"
#include "harness.h"
#include "reference.h"
#include "test_util.h"

namespace fo_test {

namespace fc = fused_optim::cpu;

// Each tensor's step count after this step's increment: bias corrections differ per
// tensor within one call.
inline double step_for_tensor(int64_t t) {
  static const double steps[] = {1, 2, 3, 10, 1000, 7};
  return steps[t % 6];
}

// Misalignment (in elements) of list l, tensor t: 0..7, different across the lists of a
// row so their vector loops are misaligned differently.
inline int mixed_offset(int l, int t) { return (l * 5 + t * 3 + 1) % 8; }

// Expected values of every list, flattened over the bucket's tensors.
struct Expected {
  std::vector<const char*> list_names;
  std::vector<std::vector<double>> value, mag;  // [list][flat element]
  std::vector<bool> unchanged;                  // list must keep its input bits
};

inline Bucket clone_bucket(const Bucket& src, int (*offset)(int, int)) {
  Bucket b(src.dtype, src.n_lists, src.numels, offset);
  for (int l = 0; l < src.n_lists; ++l) {
    for (int64_t t = 0; t < src.n_tensors(); ++t) {
      for (int64_t i = 0; i < src.numels[t]; ++i) b.at(l, t).set_bits(i, src.at(l, t).bits(i));
    }
  }
  return b;
}

// Compares every list of `got` with `e`, bitwise for unchanged lists; `input` holds the
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
          FO_CHECK(same) << ctx << ": " << e.list_names[l] << " of tensor " << t << " (numel "
                         << got.numels[t] << ") element " << i << " changed";
          continue;
        }
        const double v = got.at(l, t).get(i);
        const double ref = e.value[l][k];
        const double tol = allowed_error(got.dtype, ref, e.mag[l][k]);
        const bool ok = std::fabs(v - ref) <= tol;
        bad += !ok;
        if (!ok) {
          std::ostringstream in;
          in.precision(17);
          for (int j = 0; j < input.n_lists; ++j) {
            in << (j ? ", " : "") << e.list_names[j] << "=" << input.at(j, t).get(i);
          }
          FO_CHECK(ok) << std::setprecision(17) << ctx << ": " << e.list_names[l] << " of tensor " << t << " (numel "
                       << got.numels[t] << ") element " << i << ": got " << v
                       << ", reference " << ref << ", allowed error " << tol << " [inputs "
                       << in.str() << "]";
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
      for (int64_t i = 0; i < a.numels[t]; ++i) diff += a.at(l, t).bits(i) != b.at(l, t).bits(i);
    }
  }
  return diff;
}

// ---------------------------------------------------------------------------------------
// Adam

struct AdamCase {
  const char* name;
  AdamHyper hyper;
  bool scaled;       // grads carry a scale the kernel divides out
  float grad_scale;
};

inline int adam_lists(const AdamHyper& h) { return h.amsgrad ? 5 : 4; }

// Random Adam state: params of both signs away from zero, grads with a spread of
// magnitudes, exp_avg_sq bounded away from 0 except for "fresh" elements, whose state is
// all zeros as before a first step (and whose grad is 0 half of the time).
inline void fill_adam(Bucket& b, const AdamCase& c, uint64_t seed) {
  Rng rng(seed);
  const double scale = c.scaled ? c.grad_scale : 1.0;
  for (int64_t t = 0; t < b.n_tensors(); ++t) {
    for (int64_t i = 0; i < b.numels[t]; ++i) {
      const bool fresh = rng.chance(0.05);
      const double sgn_p = rng.chance(0.5) ? -1 : 1, sgn_g = rng.chance(0.5) ? -1 : 1,
                   sgn_m = rng.chance(0.5) ? -1 : 1;
      const double g_mag = rng.chance(0.1) ? rng.uniform(0, 1e-3) : rng.uniform(0, 1.5);
      b.at(fc::kAdamParam, t).set(i, sgn_p * rng.uniform(0.05, 2.0));
      b.at(fc::kAdamGrad, t).set(i, (fresh && rng.chance(0.5)) ? 0.0 : sgn_g * g_mag * scale);
      b.at(fc::kAdamExpAvg, t).set(i, fresh ? 0.0 : sgn_m * rng.uniform(0, 0.5));
      b.at(fc::kAdamExpAvgSq, t).set(i, fresh ? 0.0 : rng.uniform(1e-3, 0.5));
      if (b.n_lists == 5) b.at(fc::kAdamMaxExpAvgSq, t).set(i, fresh ? 0.0 : rng.uniform(1e-3, 0.6));
    }
  }
}

// Per-tensor step counts of a call: step_for_tensor(t) + shift.
inline std::vector<double> adam_steps(int64_t n_tensors, int shift = 0) {
  std::vector<double> steps;
  for (int64_t t = 0; t < n_tensors; ++t) steps.push_back(step_for_tensor(t) + shift);
  return steps;
}

inline Expected adam_expected(const Bucket& in, const AdamCase& c,
                              const std::vector<double>& steps) {
  Expected e;
  e.list_names = {"param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  e.list_names.resize(in.n_lists);
  e.value.assign(in.n_lists, {});
  e.mag.assign(in.n_lists, {});
  e.unchanged.assign(in.n_lists, false);
  e.unchanged[fc::kAdamGrad] = !c.scaled;
  const float* scale = c.scaled ? &c.grad_scale : nullptr;
  for (int64_t t = 0; t < in.n_tensors(); ++t) {
    for (int64_t i = 0; i < in.numels[t]; ++i) {
      AdamElemIn x{in.at(0, t).get(i), in.at(1, t).get(i), in.at(2, t).get(i),
                   in.at(3, t).get(i), in.n_lists == 5 ? in.at(4, t).get(i) : 0.0};
      const AdamElemOut o = in.dtype == DType::kFloat64
                                ? adam_reference<long double>(c.hyper, steps[t], scale, x)
                                : adam_reference<double>(c.hyper, steps[t], scale, x);
      const double vals[] = {o.param, o.grad, o.exp_avg, o.exp_avg_sq, o.max_exp_avg_sq};
      const double mags[] = {o.mag_param, o.mag_grad, o.mag_exp_avg, o.mag_exp_avg_sq,
                             o.mag_max_exp_avg_sq};
      for (int l = 0; l < in.n_lists; ++l) {
        e.value[l].push_back(vals[l]);
        e.mag[l].push_back(mags[l]);
      }
    }
  }
  return e;
}

// `steps` must outlive the call.
inline fc::AdamCall adam_call(const AdamCase& c, const std::vector<double>& steps) {
  fc::AdamCall call;
  call.hyper = c.hyper;
  call.steps = steps.data();
  call.grad_scale = c.scaled ? &c.grad_scale : nullptr;
  return call;
}

inline void run_adam(const fc::KernelSet& k, Bucket& b, const fc::AdamCall& call, Slicing s) {
  const std::vector<Chunk> chunks = make_chunks(b.numels);
  const fc::TensorTable table = b.table();
  for_slices(static_cast<int64_t>(chunks.size()), s, [&](int64_t lo, int64_t hi) {
    k.adam(table, call, chunks.data(), lo, hi);
  });
}

// ---------------------------------------------------------------------------------------
// SGD

struct SgdCase {
  const char* name;
  SgdHyper hyper;
  bool scaled;
  float grad_scale;
};

inline int sgd_lists(const SgdHyper& h) { return h.momentum != 0 ? 3 : 2; }

inline void fill_sgd(Bucket& b, const SgdCase& c, uint64_t seed) {
  Rng rng(seed);
  const double scale = c.scaled ? c.grad_scale : 1.0;
  for (int64_t t = 0; t < b.n_tensors(); ++t) {
    for (int64_t i = 0; i < b.numels[t]; ++i) {
      const double sgn_p = rng.chance(0.5) ? -1 : 1, sgn_g = rng.chance(0.5) ? -1 : 1,
                   sgn_b = rng.chance(0.5) ? -1 : 1;
      const double g_mag = rng.chance(0.05) ? 0.0 : rng.uniform(0, 1.5);
      b.at(0, t).set(i, sgn_p * rng.uniform(0.05, 2.0));
      b.at(1, t).set(i, sgn_g * g_mag * scale);
      if (b.n_lists == 3) b.at(2, t).set(i, sgn_b * rng.uniform(0, 1.0));
    }
  }
}

inline Expected sgd_expected(const Bucket& in, const SgdCase& c) {
  Expected e;
  e.list_names = {"param", "grad", "momentum_buffer"};
  e.list_names.resize(in.n_lists);
  e.value.assign(in.n_lists, {});
  e.mag.assign(in.n_lists, {});
  e.unchanged.assign(in.n_lists, false);
  e.unchanged[1] = !c.scaled;
  const float* scale = c.scaled ? &c.grad_scale : nullptr;
  for (int64_t t = 0; t < in.n_tensors(); ++t) {
    for (int64_t i = 0; i < in.numels[t]; ++i) {
      SgdElemIn x{in.at(0, t).get(i), in.at(1, t).get(i),
                  in.n_lists == 3 ? in.at(2, t).get(i) : 0.0};
      const SgdElemOut o = in.dtype == DType::kFloat64
                               ? sgd_reference<long double>(c.hyper, scale, x)
                               : sgd_reference<double>(c.hyper, scale, x);
      const double vals[] = {o.param, o.grad, o.momentum_buffer};
      const double mags[] = {o.mag_param, o.mag_grad, o.mag_momentum_buffer};
      for (int l = 0; l < in.n_lists; ++l) {
        e.value[l].push_back(vals[l]);
        e.mag[l].push_back(mags[l]);
      }
    }
  }
  return e;
}

inline fc::SgdCall sgd_call(const SgdCase& c) {
  fc::SgdCall call;
  call.hyper = c.hyper;
  call.grad_scale = c.scaled ? &c.grad_scale : nullptr;
  return call;
}

inline void run_sgd(const fc::KernelSet& k, Bucket& b, const fc::SgdCall& call, Slicing s) {
  const std::vector<Chunk> chunks = make_chunks(b.numels);
  const fc::TensorTable table = b.table();
  for_slices(static_cast<int64_t>(chunks.size()), s, [&](int64_t lo, int64_t hi) {
    k.sgd(table, call, chunks.data(), lo, hi);
  });
}

}  // namespace fo_test
