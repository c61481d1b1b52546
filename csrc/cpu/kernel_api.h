// The interface between the torch-facing ops (csrc/ops_cpu.cpp) and the CPU kernels,
// which are compiled once per instruction set (csrc/cpu/kernels_*.cpp).
//
// Plain data only (see [note: one instruction set per translation unit] in
// fused_optim/macros.h). Nothing here includes torch: the kernels see raw pointers, element counts and plain
// hyperparameters, so the C++ unit tests (tests/cpp) drive them without libtorch and
// the ops layer stays the only place that knows about at::Tensor.
#pragma once

#include <cstdint>

#include "fused_optim/math/args.h"

namespace fused_optim {
namespace cpu {

enum class DType : int8_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Elements per work item of the parallel region. 16K fp32 elements = 64 KiB per list:
// large enough that per-chunk overhead (scalars, pointer set-up) is noise, small enough
// that 2048 x 16K or 8 x 4M both split into hundreds of items for load balance.
constexpr int64_t kChunkSize = 16384;

// One work item: elements [begin, end) of tensor `tensor`.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// [note: memory policy]
// How a call stores what it updates (fused_optim/_policy.py): the state lists' dtype,
// whether the params have fp32 master copies (the math updates the copy; the param is
// written rounded to nearest from it in the same pass), and whether bf16 stores round
// stochastically (math/stochastic.h; element i of tensor t takes the words of Philox at
// counter offset_t + i under key seed_t: word 0 for the param, 1 + k for the k-th state
// list the call keeps). torch.optim's storage is the uniform policy: states in the
// params' dtype, neither master copies nor stochastic rounding. The others the engine
// runs are these (kPolicies, the same table as fused_optim/_policy.py's POLICIES):
struct PolicyKey {
  DType param, state;
  bool master, stochastic;
};

constexpr PolicyKey kPolicies[] = {
    {DType::kFloat32, DType::kBFloat16, false, false},
    {DType::kFloat32, DType::kBFloat16, false, true},
    {DType::kBFloat16, DType::kFloat32, false, false},
    {DType::kBFloat16, DType::kFloat32, false, true},
    {DType::kBFloat16, DType::kBFloat16, false, true},
    {DType::kBFloat16, DType::kFloat32, true, false},
    {DType::kBFloat16, DType::kBFloat16, true, false},
    {DType::kBFloat16, DType::kBFloat16, true, true},
    {DType::kFloat16, DType::kFloat32, true, false},
};
constexpr int kNumPolicies = sizeof(kPolicies) / sizeof(kPolicies[0]);

// The index of a policy in kPolicies; -1 for the uniform one; -2 for none the engine runs.
constexpr int policy_index(DType param, DType state, bool master, bool stochastic) {
  if (state == param && !master && !stochastic) return -1;
  for (int i = 0; i < kNumPolicies; ++i) {
    const PolicyKey& k = kPolicies[i];
    if (k.param == param && k.state == state && k.master == master && k.stochastic == stochastic) {
      return i;
    }
  }
  return -2;
}

constexpr bool policy_supported(DType param, DType state, bool master, bool stochastic) {
  return policy_index(param, state, master, stochastic) != -2;
}

// The tensors of one (device, dtype) bucket, list-major: ptrs[list * n_tensors + t].
// Params and grads are of storage dtype `dtype`, the state lists of `state_dtype` (the
// same but under a memory policy); tensor t of every list has numels[t] elements.
// The lists are those of the call, in op order: the optimizer's lists without the
// optional ones the call leaves out. master[t]: param t's fp32 master copy, or nullptr
// for the whole call ([note: memory policy]).
struct TensorTable {
  int64_t n_tensors;
  int n_lists;
  void* const* ptrs;
  const int64_t* numels;
  DType dtype;
  DType state_dtype;
  void* const* master = nullptr;
};

// One call of an optimizer's kernels.
struct StepCall {
  math::Args args;
  uint32_t lists;               // the optimizer's lists present in the table (a bit each)
  bool maximize;                // grads are negated before the optimizer's math
  const float* grad_scale;      // nullptr: grads are not scaled; else grads /= *grad_scale
  // Per tensor, its step's state ([note: the step's state] in math/optimizer.h): the
  // per-tensor state after this step's advance, rounded to the state tensors' dtypes, then
  // as it was before: tensor_state[t * 2 * n_states + j] (nullptr without state).
  const double* tensor_state;
  // Stochastic rounding ([note: memory policy]): per tensor its Philox key and the
  // counter of its element 0 at this step, rng[2 * t], rng[2 * t + 1]; nullptr: every
  // store rounds to nearest.
  const uint64_t* rng = nullptr;
};

// Processes chunks[begin, end) of one optimizer's call. Called concurrently from one
// parallel region; chunks never overlap, so no two threads touch the same element.
using ChunksFn = void (*)(const TensorTable&, const StepCall&, const Chunk* chunks,
                          int64_t begin, int64_t end);

// The number of optimizers of fused_optim/optimizers.h (checked there by the kernels).
constexpr int kMaxOptimizers = 32;

// One call of a row math ([note: row math] in fused_optim/math/optimizer.h): the touched
// rows of a bucket's params. Param t is a [rows, row_len[t]] matrix, as is each of its
// states; its sparse grad's entries are value rows values[t] ([nnz, row_len[t]]), taken
// in the order perm[t] gives (entry perm[t][k] k-th).
struct RowCall {
  int64_t n_tensors;
  DType dtype;
  void* const* params;          // [n_tensors]
  void* const* states;          // [n_states * n_tensors], state-major
  const void* const* values;    // [n_tensors]
  const int64_t* const* perm;   // [n_tensors]; nullptr: the identity
  const int64_t* row_len;       // [n_tensors]
  const double* constants;      // [n_tensors * n_constants]
  bool maximize;                // values are negated first
};

// The entries perm[tensor][begin, end) of a call, all of row `row` of that tensor.
struct RowSegment {
  int64_t tensor;
  int64_t row;
  int64_t begin;
  int64_t end;
};

// Steps segments[begin, end) of a call. Called concurrently; segments of one call name
// distinct rows, so no two threads touch the same element.
using RowsFn = void (*)(const RowCall&, const RowSegment* segments, int64_t begin, int64_t end);

constexpr int kMaxRowMaths = 8;

// [note: factored engine] One call of the factored-moment engine (csrc/factored.cpp,
// fused_optim/_factored.py): a bucket's Adafactor step in three passes over work items.
// A factored tensor is `batches` matrices of rows x cols; a vector is one "row" of
// `cols` elements (rows = batches = 1).
struct FactoredTensor {
  int64_t batches, rows, cols;
  void* param;
  const void* grad;
  void* row_var;         // [batches * rows], storage dtype; nullptr for a vector
  void* col_var;         // [batches * cols]
  void* variance;        // [cols] (a vector only)
  double* row_sums;      // [batches * rows]: sum_j g^2 (pass 1 writes)
  const double* means;   // [batches]: the clamped row_var means (passes 2, 3 read)
  double weight;         // 1 - beta2_t (pass 1: a vector's variance)
  double step_alpha;     // pass 3
};

// Elements [begin, end) of a vector, or rows [begin, end) of matrix `batch`. Pass 1
// writes the item's partial sum of param^2 to sums[item] and its partial column sums
// of g^2 to col_partials + col_offset; pass 2 its partial sum of update^2 to sums[item].
struct FactoredItem {
  int64_t tensor, batch, begin, end, col_offset;
};

struct FactoredCall {
  DType dtype;
  bool maximize;
  bool decay;             // weight_decay != 0
  double eps1_sq;         // eps1 * eps1 (rounded to the storage dtype by the kernels)
  double decay_factor;    // 1 - lr * weight_decay
  FactoredTensor* tensors;
  const FactoredItem* items;
  double* sums;           // [items]
  double* col_partials;
};

// Runs items [begin, end) of pass 0, 1 or 2 (the engine's passes 1-3).
using FactoredFn = void (*)(const FactoredCall&, int64_t begin, int64_t end);

// [note: LBFGS row passes] The two passes of an LBFGS iteration over its history buffer
// (csrc/lbfgs.cpp, fused_optim/lbfgs.py): a row-major [rows, n] matrix of float32 or
// float64 whose row 0 is the flat grad g, cut into column blocks of `block` elements.
//   products  (pass 0): the candidate pair of slot `slot` (if >= 0) written, y = g - prev
//             into row 1 + 2 slot, s = d * t into row 2 + 2 slot, and prev = g; then the
//             block's partial dot of each row 1..rows with g, then of y . s and y . y.
//   direction (pass 1): out = sum_r coef[r] * row r over rows 0..rows-1, added in the
//             storage dtype row after row (as sgemv and torch's recursion add);
//             the block's partial g . out and max |out| (NaN if any is NaN).
// A block's partials (float64, [note: LBFGS sums] in lbfgs_impl.h) are at
// partials + block * width; the op adds them up in block order.
struct LbfgsCall {
  DType dtype;          // kFloat32 or kFloat64
  int64_t n;            // elements per row
  int64_t block;        // elements per column block
  int64_t rows;         // see above
  void* buf;            // row r at buf + r * n elements
  int64_t slot;         // products: the candidate slot, or -1
  void* prev;           // products: [n], read, then set to g
  const void* d;        // products: [n]
  double t;             // products: the step, rounded to the storage dtype by the kernel
  const void* coef;     // direction: [rows]
  void* out;            // direction: [n]
  double* partials;     // [blocks * width]
  int64_t width;
  double* scratch;      // direction: room for `block` elements, the calling thread's own
};

// Runs column blocks [begin, end) of pass 0 or 1.
using LbfgsFn = void (*)(const LbfgsCall&, int64_t begin, int64_t end);

// The kernels of one instruction set: chunks[id], id being the optimizer's position in
// FO_FOR_EACH_OPTIMIZER; rows[id], the row math's in FO_FOR_EACH_ROW_MATH.
struct KernelSet {
  const char* name;  // "default", "avx2", "avx512"
  ChunksFn chunks[kMaxOptimizers];
  RowsFn rows[kMaxRowMaths];
  FactoredFn adafactor[3];  // [note: factored engine]
  LbfgsFn lbfgs[2];         // [note: LBFGS row passes]
};

// Defined by each kernels_<isa>.cpp.
const KernelSet& kernels_default();
const KernelSet& kernels_avx2();
const KernelSet& kernels_avx512();

}  // namespace cpu
}  // namespace fused_optim
