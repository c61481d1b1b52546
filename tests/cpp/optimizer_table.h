// The optimizers the C++ tests know, one entry each: every engine test (CPU variants,
// the host emulation of the CUDA engine, the option, NaN, alignment and multi-step
// tests) loops over this table and reaches the kernels only through the generic API
// (KernelSet::chunks[id], StepCall, math::Args; cuda::launch<Optim, D>).
//
// [note: adding an optimizer to the C++ tests]
// When fused_optim/optimizers.h gains an optimizer, the test
// `optimizer_table_covers_every_registered_optimizer` fails until it gets
//   1. a scalar reference in reference.h, written from torch.optim's
//      `_single_tensor_<name>` in R = double / long double, returning each list's value
//      and magnitude (see the existing ones);
//   2. an entry in optimizer_table.cpp: entry_of<math::Name>() (ids, list and argument
//      names come from the struct), how to fill one element's random state, the torch
//      statement of its per-tensor state update, its option cases (math::Args + grad
//      scale), the case the engine tests use, and the "teeth" pairs that prove the
//      tolerance sees every option;
// or, until then, its name in kNoCppReferenceYet (optimizer_table.cpp), so that the gap
// is written down rather than silently skipped.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "fused_optim/math/args.h"
#include "fused_optim/optimizers.h"
#include "reference.h"
#include "test_util.h"

namespace fo_test {

// The position of Optim in FO_FOR_EACH_OPTIMIZER (its id: KernelSet::chunks[id]), or -1.
template <typename Optim>
constexpr int optimizer_id() {
  int id = 0, found = -1;
#define FO_TEST_ID_OF(Name)                                   \
  if (std::is_same_v<Optim, fused_optim::math::Name>) found = id; \
  ++id;
  FO_FOR_EACH_OPTIMIZER(FO_TEST_ID_OF)
#undef FO_TEST_ID_OF
  return found;
}

// The struct names of FO_FOR_EACH_OPTIMIZER, in id order.
const std::vector<std::string>& registered_optimizers();

// One option case of an optimizer: the op's arguments and the grad scale.
struct OptCase {
  std::string name;
  fm::Args args;
  bool scaled;       // grads carry a scale the kernel divides out (and writes back)
  float grad_scale;  // only read when scaled
};

// Two cases whose results must differ by more than the tolerance on most elements of
// `list` (per element: |a - b| > allowed_error), so that a kernel ignoring the option
// could not pass the option tests. Both run `steps_done` steps after the initial state
// (one tensor: Adam's step 1 + steps_done); `state_shift` more steps for the second
// (bias corrections, lr decay).
struct Teeth {
  std::string what;
  OptCase a, b;
  int steps_done;
  int state_shift;
  int list;
  double min_fraction;
  bool fp64_only;  // differences below fp32's resolution (lr rounding)
};

struct OptimizerEntry {
  // From the struct (entry_of<Optim>).
  int id;
  std::string name;
  int n_lists;
  std::vector<std::string> list_names;
  int param_list;
  int grad_list;
  uint32_t optional_lists;
  int n_states;
  std::vector<std::string> float_names, flag_names;
  int maximize_flag;                                  // index among the flags, or -1
  // Optim::advance (the header's); the tests keep every state in float64.
  void (*advance)(const fm::Args&, double* state, const bool* is_double);

  // The test's own statements.
  uint32_t (*lists)(const fm::Args&);  // the lists a call with these arguments has
  // The per-tensor state before the tests' first step, for tensor t of a bucket.
  void (*initial_state)(int64_t t, double* state);
  // torch.optim's update of the per-tensor state (Adam's step_t += 1), independent of
  // Optim::advance (which optimizer_advance_matches_torch checks against it).
  // is_double[j]: state j is a float64 tensor (else float32), as Optim::advance takes it.
  void (*advance_reference)(const fm::Args&, double* state, const bool* is_double);
  // One element's random inputs, every list of the optimizer (absent ones: ignored).
  void (*fill)(Rng& rng, const OptCase& c, double* x);
  // reference.h; `extended`: long double (fp64 storage), else double.
  ElemRef (*reference)(const fm::Args& a, const double* state, const float* grad_scale,
                       const double* in, bool extended);
  std::vector<OptCase> cases;
  // Every optional list present, scaled grads, maximize where it has one: the case of the
  // engine tests (slicing, alignment, emulated CUDA launches).
  OptCase engine_case;
  // The case of step `step` (0, 1, 2) of the multi-step test.
  OptCase (*step_case)(int step);
  std::vector<Teeth> teeth;
  // The lists a NaN lr / a NaN grad scale makes NaN in one step (default: the params /
  // every list).
  uint32_t nan_lr_lists = 1u;
  uint32_t nan_grad_scale_lists = ~0u;
};

// Every optimizer with a C++ reference, in id order.
const std::vector<OptimizerEntry>& optimizer_table();

// Optimizers of FO_FOR_EACH_OPTIMIZER that have no entry yet (see the note above).
const std::vector<std::string>& no_cpp_reference_yet();

const OptimizerEntry& entry_for_id(int id);

// The optimizer lists of a call laid out as the engines see them: the present lists,
// in op order, one table row each.
struct Layout {
  uint32_t lists = 0;
  int n_rows = 0;
  int row[kMaxLists];          // row of optimizer list k, or -1 when absent
  int list_of_row[kMaxLists];  // optimizer list of row r

  Layout(const OptimizerEntry& e, uint32_t present) : lists(present) {
    for (int k = 0; k < kMaxLists; ++k) row[k] = list_of_row[k] = -1;
    for (int k = 0; k < e.n_lists; ++k) {
      if ((present >> k) & 1u) {
        row[k] = n_rows;
        list_of_row[n_rows++] = k;
      }
    }
  }
  bool has(int list) const { return list >= 0 && list < kMaxLists && row[list] >= 0; }
};

inline Layout layout_for(const OptimizerEntry& e, const OptCase& c) {
  return Layout(e, e.lists(c.args));
}

inline bool maximize_of(const OptimizerEntry& e, const fm::Args& a) {
  return e.maximize_flag >= 0 && a.flags[e.maximize_flag];
}

// Each tensor's state before a step, `steps_done` steps after the tests' initial state
// (advanced with the torch statement).
std::vector<double> states_before(const OptimizerEntry& e, const fm::Args& a, int64_t n_tensors,
                                  int steps_done);

// The states after one more step: with the torch statement (the reference's input) or
// with Optim::advance (what the ops layer hands the CPU engine).
std::vector<double> advanced(const OptimizerEntry& e, const fm::Args& a,
                             const std::vector<double>& before, bool header,
                             bool states_double = true);

// Each tensor's step's state ([note: the step's state] in math/optimizer.h): its state
// after one more step (as `advanced`), then `before`'s; 2 * n_states per tensor. What the
// CPU engine and the references are given.
std::vector<double> step_state(const OptimizerEntry& e, const fm::Args& a,
                               const std::vector<double>& before, bool header);
// The same from states after and before (n_states per tensor each).
std::vector<double> step_state_of(const OptimizerEntry& e, const std::vector<double>& after,
                                  const std::vector<double>& before);

}  // namespace fo_test
