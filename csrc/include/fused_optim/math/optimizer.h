// What every optimizer's math header provides, and the defaults it may keep.
//
// [note: an optimizer is its spec and its math]
// The generic engines (csrc/cpu, csrc/cuda, the ops in csrc/ops*.cpp, the eager entry)
// name no optimizer: each reads a struct like this one, which fused_optim/math/<name>.h
// defines by deriving from OptimizerBase and declaring
//
//   static constexpr const char* kOp;           the op's name: "adam_" is
//                                               torch.ops.fused_optim.adam_
//   enum List { kParam, kGrad, ..., kLists };    the element-wise lists, in op order;
//   kListNames                                   their op argument names ("exp_avgs")
//   kOptionalLists                               the lists an option may leave out (a bit
//                                               per list): their presence is a
//                                               compile-time variant of every kernel
//   kStateNames                                  the per-tensor scalar state lists
//                                               ("state_steps"): one one-element float
//                                               tensor per param
//   enum Float / kFloatNames, enum Flag / kFlagNames
//                                               the op's float and bool arguments
//   kVariantBits, variant(args)                  further compile-time variants, computed
//                                               from the arguments (Adam's L2 penalty)
//   valid<LISTS, V>()                            false for combinations never called
//   reads<LISTS, V>(list)                        false for a list whose old values the
//                                               update never reads (a buffer's first step)
//   writes<LISTS, V>(list)                       false for a list the variant never changes
//                                               (not stored: a stage that leaves the
//                                               params as they are)
//   kBFloat16Lists                               the work lists kept in bf16 whatever the
//                                               params' dtype (a bit per list; Muon's
//                                               Newton-Schulz input / output): [note:
//                                               bf16 work lists]
//   advance(args, state, is_double)              a tensor's scalar state after this step
//                                               (step + 1, ...), in double, in place;
//                                               is_double[j] says whether state j is kept
//                                               in float64 (else float32), for torch's
//                                               operand roundings (a Python float times a
//                                               float32 tensor rounds the float first);
//                                               the engines round each result to its
//                                               state tensor's dtype
//   Scalars<S>, scalars<LISTS, V, S>(args, state)
//                                               the per-tensor values of one step, from
//                                               the step's state ([note: the step's
//                                               state]), in double, rounded once to the
//                                               opmath type S; a struct of S fields only
//                                               (the CPU engine's quiet_nans walks it as
//                                               an array of them). A per-tensor branch
//                                               (a rectification on or off) is a field that
//                                               update tests: one branch per tensor, taken
//                                               alike by every element of it
//   update<LISTS, V>(x, grad, scalars)           one element: x[list] holds every list's
//                                               value (absent lists: unused), grad is
//                                               unscaled and, with maximize, negated
//
// The engines do the rest for every optimizer alike: grads divided by grad_scale and
// written back, maximize (grad * -1, exact), found_inf (nothing changes), the state
// rounding, loads and stores in the storage dtype. The names are the op's schema, which
// fused_optim/<name>.py generates from its spec; csrc/ops.cpp checks that they agree
// when it registers the op. fused_optim/optimizers.h lists the optimizers.
#pragma once

#include <array>
#include <cstdint>

#include "fused_optim/macros.h"
#include "fused_optim/math/args.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

FO_HOST_DEVICE constexpr uint32_t bit(int i) { return uint32_t{1} << i; }

// Whether list `list` is present in a call whose present lists are LISTS.
template <uint32_t LISTS>
FO_HOST_DEVICE constexpr bool has(int list) {
  return (LISTS & bit(list)) != 0;
}

// [note: bf16 work lists]
// A list of kBFloat16Lists is stored in bf16 beside lists of the params' dtype (any of
// the four). It is loaded exactly into the opmath type (float, or double for fp64
// params), and a value stored into it is rounded to the params' dtype first and then to
// bf16 (through float for fp64, as c10's conversions go): what torch's `.bfloat16()` of
// a tensor of the params' dtype holds. Such an optimizer takes no memory policy.
struct OptimizerBase {
  static constexpr uint32_t kOptionalLists = 0;
  static constexpr uint32_t kBFloat16Lists = 0;
  static constexpr std::array<const char*, 0> kStateNames{};
  static constexpr int kVariantBits = 0;

  static uint32_t variant(const Args&) { return 0; }

  template <uint32_t LISTS, uint32_t V>
  FO_HOST_DEVICE static constexpr bool valid() {
    return true;
  }

  template <uint32_t LISTS, uint32_t V>
  FO_HOST_DEVICE static constexpr bool reads(int) {
    return true;
  }

  template <uint32_t LISTS, uint32_t V>
  FO_HOST_DEVICE static constexpr bool writes(int) {
    return true;
  }

  FO_HOST_DEVICE static void advance(const Args&, double*, const bool*) {}
};

// The per-tensor state of most optimizers: the step count, as torch.optim keeps it
// (state_steps; state[0] is advanced by one per step).
struct CountsSteps : OptimizerBase {
  static constexpr std::array<const char*, 1> kStateNames = {"state_steps"};
  FO_HOST_DEVICE static void advance(const Args&, double* state, const bool*) {
    state[0] += 1.0;
  }
};

// The compile-time variant of an L2 weight decay: skipped, not multiplied by 0, when
// weight_decay is 0 (so inf / NaN params behave as in torch, which skips
// grad.add(param, alpha=0)). Bit 0 of the variant; an optimizer with more variants adds
// its bits above it. Derived names its float argument kWeightDecay.
template <typename Derived, typename Base = CountsSteps>
struct WithL2Decay : Base {
  static constexpr uint32_t kWeightDecayBit = 1;
  static constexpr int kVariantBits = 1;
  static uint32_t variant(const Args& a) {
    return a.floats[Derived::kWeightDecay] != 0.0 ? kWeightDecayBit : 0;
  }
  // grad.add(param, alpha=weight_decay), in the variant that has it.
  template <uint32_t V, typename Vt, typename S>
  FO_HOST_DEVICE FO_INLINE static Vt decayed(Vt grad, Vt param, S weight_decay) {
    if constexpr ((V & kWeightDecayBit) != 0) return add_l2_penalty(grad, param, weight_decay);
    return grad;
  }
};

// The compile-time variants of a weight decay that is an L2 penalty or, under the flag
// Derived::kDecoupledWeightDecay, decoupled (param.mul_(1 - lr * weight_decay) first, as
// torch's NAdam and RAdam take decoupled_weight_decay): bit 0 the penalty, bit 1 the
// decoupled decay, neither without weight decay. Derived names its float argument
// kWeightDecay; its Scalars carry weight_decay and decay_factor (decay_factor(args)).
template <typename Derived, typename Base = CountsSteps>
struct WithWeightDecayModes : Base {
  static constexpr uint32_t kL2 = 1, kDecoupled = 2;
  static constexpr int kVariantBits = 2;
  static uint32_t variant(const Args& a) {
    if (a.floats[Derived::kWeightDecay] == 0.0) return 0;
    return a.flags[Derived::kDecoupledWeightDecay] ? kDecoupled : kL2;
  }
  template <uint32_t LISTS, uint32_t V>
  FO_HOST_DEVICE static constexpr bool valid() {
    return V != (kL2 | kDecoupled);
  }
  // 1 - lr * weight_decay, in lr's dtype ([note: lr arithmetic] in stages.h).
  FO_HOST_DEVICE static double decay_factor(const Args& a) {
    const LrMath lr = lr_math(a);
    return lr.sub(1.0, lr.mul(a.lr, a.floats[Derived::kWeightDecay]));
  }
  // The variant's decay of one element: the grad with the penalty, or the param decayed.
  template <uint32_t V, typename Vt, typename S>
  FO_HOST_DEVICE FO_INLINE static Vt decayed(Vt grad, Vt& param, S weight_decay,
                                             S decay_factor) {
    if constexpr ((V & kL2) != 0) grad = add_l2_penalty(grad, param, weight_decay);
    if constexpr ((V & kDecoupled) != 0) param = decay_weights(param, decay_factor);
    return grad;
  }
};

// The number of per-tensor state lists of an optimizer.
template <typename Optim>
FO_HOST_DEVICE constexpr int num_states() {
  return static_cast<int>(Optim::kStateNames.size());
}

// [note: the step's state]
// What scalars() reads of a tensor's per-tensor state: state[j] is state j after this
// step's advance, rounded as it is stored; state[num_states + j] is state j as stored
// before it. torch.optim computes most steps from the advanced values (the step count
// after `step += 1`), some from the old ones (a step size that the previous step computed
// for this one). Both engines and the CPU op lay it out so; this many doubles per tensor:
template <typename Optim>
FO_HOST_DEVICE constexpr int step_state_size() {
  return 2 * num_states<Optim>();
}

// [note: row math]
// An optimizer that takes sparse grads (fused_optim/spec.py SparseGrads) has a row math:
// a struct, listed in FO_FOR_EACH_ROW_MATH (optimizers.h), that steps one element of a
// row the grad touches, for the row-sparse engine (fused_optim/_sparse.py,
// csrc/sparse_rows.cpp, triton_kernels/sparse.py):
//
//   static constexpr const char* kMath;      its name, the spec's SparseGrads.math
//   kStates                                  the element-wise states it reads and writes
//   kConstants                               its per-tensor constants (computed by the
//                                            spec's SparseGrads.constants, in double)
//   kCoalesce                                true: the engine sums a row's duplicate
//                                            entries first (in the order of torch's
//                                            coalesce()) and calls update once per
//                                            element; false: once per entry, in index order
//   update<R>(p, g, s, c)                    p and s[] the element's param and states, g
//                                            its (summed, signed) grad, c the tensor's
//                                            constants, all in the opmath type
//                                            R::opmath; R is the storage's rounding
//                                            (the engine's): R::r(x) rounds x to the
//                                            storage dtype, which torch's sparse path
//                                            does after every op, and
//                                            R::add_scaled(p, alpha, x) is torch's
//                                            p.add_(x, alpha=alpha) on that storage (one
//                                            fused multiply-add in float32 / float64;
//                                            alpha rounded to the dtype, then a rounded
//                                            product and sum, in bfloat16 / float16)
//
// torch.optim's sparse paths are sequences of tensor ops on the values, each rounding
// to the param's dtype: the row maths write out every rounding.

// torch's p.add_(x, alpha=alpha) on a storage whose rounding is R::r (an engine's
// R::add_scaled, [note: row math]): one fused multiply-add in float32 / float64
// (kHalf false); in bfloat16 / float16 alpha rounded to the dtype, then a rounded
// product and a rounded sum, as torch's reduced-precision add kernel does.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable  // R::r is __device__ in the CUDA engine
#endif
template <typename R, bool kHalf, typename O>
FO_HOST_DEVICE FO_INLINE O add_scaled_as_torch(O p, O alpha, O x) {
  if constexpr (kHalf) {
    return R::r(p + R::r(R::r(alpha) * x));
  } else {
    return fma_op(alpha, x, p);
  }
}

// Every list a call of Optim may have: the required ones plus the optional ones present.
template <typename Optim>
FO_HOST_DEVICE constexpr uint32_t required_lists() {
  return (bit(Optim::kLists) - 1) & ~Optim::kOptionalLists;
}

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
