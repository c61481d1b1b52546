// How both engines run an optimizer of fused_optim/optimizers.h: the template variant a
// call selects (dispatch_variant), what one element of a step does (ElementStep), and a
// tensor's per-tensor state as it is read, advanced and stored (advance_state). The CPU
// engine (csrc/cpu/kernels_impl.h), the CUDA engine (csrc/cuda/engine.cuh) and the ops
// layer (csrc/registry.cpp, csrc/ops_cpu.cpp) share these definitions, so the backends
// cannot disagree on them. Host C++ and nvcc alike; the dispatch is host code only.
//
// [note: compiled variants]
// A call's template variant is: the optional lists it has (Optim::kOptionalLists: amsgrad's,
// momentum's), the optimizer's own variant bits (Optim::variant), and whether grads are
// unscaled (grad_scale given). Each subset is a template argument, so every one is
// compiled, and Optim::valid<LISTS, V>() names the few no call can select (a variant bit
// that needs an optional list, without it): those are never instantiated. The ops check a call
// against valid_call before any kernel runs (TORCH_CHECK in CheckedCall, csrc/ops_common.h),
// so a call that selects no compiled variant fails the same way on every device; the
// engines, which never see one, refuse it too (dispatch_variant returns false).
#pragma once

#include <cstdint>
#include <type_traits>

#include "fused_optim/macros.h"
#include "fused_optim/math/args.h"
#include "fused_optim/math/optimizer.h"

namespace fused_optim {
inline namespace FO_CPU_CAPABILITY {

// ---------------------------------------------------------------------------------
// Run-time values to template arguments (host code).

// Calls f(std::integral_constant<bool, b>) so a run-time flag selects a template, and
// returns its result.
template <typename F>
FO_INLINE decltype(auto) dispatch_bool(bool b, F&& f) {
  if (b) return f(std::integral_constant<bool, true>{});
  return f(std::integral_constant<bool, false>{});
}

// Calls f(std::integral_constant<uint32_t, subset>) for the subset of the bits OPTIONAL
// that `mask` holds: one template per subset, selected at run time. Returns f's result.
template <uint32_t OPTIONAL, uint32_t CHOSEN = 0, typename F>
FO_INLINE decltype(auto) dispatch_subset(uint32_t mask, F&& f) {
  if constexpr (OPTIONAL == 0) {
    return f(std::integral_constant<uint32_t, CHOSEN>{});
  } else {
    constexpr uint32_t low = OPTIONAL & (~OPTIONAL + 1u);
    if (mask & low) return dispatch_subset<OPTIONAL & ~low, CHOSEN | low>(mask, f);
    return dispatch_subset<OPTIONAL & ~low, CHOSEN>(mask, f);
  }
}

// Calls f(lists_c, variant_c, unscale_c), integral constants of the call's present lists
// (LISTS: the required ones and the optional ones `lists` holds), its variant bits
// (Optim::variant(args)) and `unscale`, and returns true; returns false, calling nothing,
// when Optim::valid<LISTS, V>() is false ([note: compiled variants]).
template <typename Optim, typename F>
FO_INLINE bool dispatch_variant(uint32_t lists, const math::Args& args, bool unscale, F&& f) {
  constexpr uint32_t kVariants = (1u << Optim::kVariantBits) - 1u;
  const uint32_t optional = lists & Optim::kOptionalLists;
  return dispatch_subset<Optim::kOptionalLists>(optional, [&](auto optional_c) {
    return dispatch_subset<kVariants>(Optim::variant(args), [&](auto variant_c) {
      constexpr uint32_t LISTS = math::required_lists<Optim>() | decltype(optional_c)::value;
      constexpr uint32_t V = decltype(variant_c)::value;
      if constexpr (!Optim::template valid<LISTS, V>()) {
        return false;
      } else {
        dispatch_bool(unscale, [&](auto unscale_c) {
          f(std::integral_constant<uint32_t, LISTS>{}, variant_c, unscale_c);
        });
        return true;
      }
    });
  });
}

// Whether a call with the optimizer's lists `lists` and these arguments selects a
// compiled variant (dispatch_variant would run it).
template <typename Optim>
bool valid_call(uint32_t lists, const math::Args& args) {
  return dispatch_variant<Optim>(lists, args, false, [](auto, auto, auto) {});
}

// ---------------------------------------------------------------------------------
// One element of a step, as both engines' loops apply it.

// The step of one element in variant (LISTS, V, UNSCALE), on x[list] for every list of
// the optimizer (absent lists: never loaded or stored): the grad unscaled (and written
// back) and, for maximize, multiplied by -1 (exact) before the optimizer's own math.
template <typename Optim, uint32_t LISTS, uint32_t V, bool UNSCALE>
struct ElementStep {
  // Whether the loops load list `list` (a list whose old values the update never reads
  // is not loaded), and store it (the grad only when unscaled).
  static constexpr FO_HOST_DEVICE bool reads(int list) {
    return math::has<LISTS>(list) && Optim::template reads<LISTS, V>(list);
  }
  static constexpr FO_HOST_DEVICE bool writes(int list) {
    return list == Optim::kGrad
               ? UNSCALE
               : math::has<LISTS>(list) && Optim::template writes<LISTS, V>(list);
  }

  // Vt: the opmath type S, or lanes of it (math::vfloat8 on the CPU: [note: half
  // precision in registers] in csrc/cpu/kernels_impl.h). grad_scale is only read when
  // UNSCALE; grad_sign is -1 for maximize, else 1.
  template <typename Vt, typename S>
  FO_HOST_DEVICE FO_INLINE static void apply(Vt (&x)[Optim::kLists],
                                             const typename Optim::template Scalars<S>& s,
                                             S grad_scale, S grad_sign) {
    const Vt grad = math::unscale_grad<UNSCALE>(x[Optim::kGrad], grad_scale);
    Optim::template update<LISTS, V>(x, grad * grad_sign, s);
  }
};

// ---------------------------------------------------------------------------------
// Per-tensor state: one-element float32 or float64 tensors (torch's `step`), read and
// computed in double.

FO_HOST_DEVICE FO_INLINE double load_state(const void* p, bool is_double) {
  return is_double ? *static_cast<const double*>(p)
                   : static_cast<double>(*static_cast<const float*>(p));
}

// v as a state tensor of that dtype holds it: a float32 counter stops at 2^24 exactly as
// torch's `step += 1` on a float32 tensor does.
FO_HOST_DEVICE FO_INLINE double round_state(double v, bool is_double) {
  return is_double ? v : static_cast<double>(static_cast<float>(v));
}

FO_HOST_DEVICE FO_INLINE void store_state(void* p, bool is_double, double v) {
  if (is_double) {
    *static_cast<double*>(p) = v;
  } else {
    *static_cast<float*>(p) = static_cast<float>(v);
  }
}

// A tensor's step's state ([note: the step's state] in math/optimizer.h), from its
// state tensors ptrs[j] (doubles where is_double[j], else floats): state[NS + j] as
// stored, state[j] advanced (Optim::advance) and rounded to each tensor's dtype, the
// values store_state then writes. `state` holds math::step_state_size<Optim>() doubles.
template <typename Optim>
FO_HOST_DEVICE FO_INLINE void advance_state(const math::Args& args, const void* const* ptrs,
                                            const bool* is_double, double* state) {
  constexpr int NS = math::num_states<Optim>();
  FO_UNROLL
  for (int j = 0; j < NS; ++j) state[NS + j] = state[j] = load_state(ptrs[j], is_double[j]);
  Optim::advance(args, state, is_double);
  FO_UNROLL
  for (int j = 0; j < NS; ++j) state[j] = round_state(state[j], is_double[j]);
}

}  // namespace FO_CPU_CAPABILITY
}  // namespace fused_optim
