// Element-wise stages that optimizers are assembled from.
//
// Each stage is a tiny inline function on opmath values (float for fp32/fp16/bf16
// storage, double for fp64). An algorithm chains them inside one kernel, so every
// optimizer shares one definition of "decay the weights" or "lerp a moment" and no
// stage streams memory on its own (cf. optax's scale_by_adam / add_decayed_weights,
// chained here at compile time rather than at run time).
//
// The formulas follow torch.optim's single-tensor ("for-loop") implementations
// operation by operation, so results agree with torch to rounding.
//
// V is the type of element values, S of per-tensor scalars: both float (or double) in
// the scalar kernels; on x86 CPUs with AVX2 the engine also instantiates the stages
// with V = vfloat8, eight fp32 lanes (see [note: half precision in registers] in
// csrc/cpu/kernels_impl.h). Lane by lane that is the same IEEE operations in the same
// order, so both instantiations give the same bits.
#pragma once

#if !defined(__CUDACC__)
#include <cmath>
#endif

#include "fused_optim/macros.h"
#include "fused_optim/math/args.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

// [note: lr arithmetic]
// torch.optim computes with lr as the user gave it: a Python float in double, a tensor in
// the tensor's dtype. With a float32 lr, `lr / bias_correction1` is a float32 tensor (the
// Python float rounded to float32 first, as a tensor-scalar op rounds its scalar), and
// `1 - lr * weight_decay` rounds twice in float32: measured with torch 2.13, AdamW(lr=
// torch.tensor(0.01), weight_decay=0.1) on float64 params ends 8.3e-8 away from lr=0.01
// after 3 steps. The per-tensor scalars therefore do every operation that involves lr
// through LrMath: in double, with operands and result rounded as lr's dtype rounds them.
// One +, -, * or / computed in double and rounded to float equals the float operation
// (double has more than 2 * 24 + 2 bits); bf16 / fp16 tensors compute in float and round
// the float result once, as ATen's CPU kernels do.
FO_HOST_DEVICE inline double round_to_float(double x) {
  return static_cast<double>(static_cast<float>(x));
}

// x rounded to float where `to_float`, else x. A bit mask, not a branch: with GCC 12 at
// -O2 and up, jump threading dropped the rounding of `flag ? round_to_float(v) : v` (and
// of the same as an if) in a per-tensor state update once advance_state was inlined into
// the registry's entry: the value was stored unrounded (right with -O1 or
// -fno-thread-jumps). The per-tensor state updates that round on a run-time flag use
// this.
FO_HOST_DEVICE inline double round_to_float_if(double x, bool to_float) {
  const double r = round_to_float(x);
  uint64_t xb, rb;
  __builtin_memcpy(&xb, &x, sizeof xb);
  __builtin_memcpy(&rb, &r, sizeof rb);
  const uint64_t take = uint64_t{0} - static_cast<uint64_t>(to_float);
  const uint64_t bits = (rb & take) | (xb & ~take);
  double out;
  __builtin_memcpy(&out, &bits, sizeof out);
  return out;
}

// x rounded to nearest even with `mantissa_bits` explicit bits, normal exponents down to
// min_exponent (frexp's convention) and overflow above max_finite to infinity.
FO_HOST_DEVICE inline double round_to_bits(double x, int mantissa_bits, int min_exponent,
                                           double max_finite) {
  if (!(x == x) || x == 0.0 || x - x != 0.0) return x;  // NaN, zero, inf
  int e;
  (void)::frexp(x, &e);
  if (e < min_exponent) e = min_exponent;  // subnormals: a fixed quantum
  const double quantum = ::ldexp(1.0, e - 1 - mantissa_bits);
  const double r = ::rint(x / quantum) * quantum;  // rint: to nearest even
  // Past the largest finite value: infinity (ldexp overflows to it).
  return r > max_finite || r < -max_finite ? ::ldexp(r, 1024) : r;
}

struct LrMath {
  LrDType dtype;

  // A Python float operand, as a tensor op of lr's dtype takes it (its opmath).
  FO_HOST_DEVICE double operand(double x) const {
    return dtype == LrDType::kFloat64 ? x : round_to_float(x);
  }
  // A result stored in a tensor of lr's dtype.
  FO_HOST_DEVICE double result(double x) const {
    switch (dtype) {
      case LrDType::kFloat64: return x;
      case LrDType::kFloat32: return round_to_float(x);
      case LrDType::kFloat16: return round_to_bits(round_to_float(x), 10, -13, 65504.0);
      case LrDType::kBFloat16:
        return round_to_bits(round_to_float(x), 7, -125, 3.3895313892515355e38);
    }
    return x;
  }
  FO_HOST_DEVICE double mul(double a, double b) const { return result(operand(a) * operand(b)); }
  FO_HOST_DEVICE double div(double a, double b) const { return result(operand(a) / operand(b)); }
  FO_HOST_DEVICE double sub(double a, double b) const { return result(operand(a) - operand(b)); }
  FO_HOST_DEVICE double add(double a, double b) const { return result(operand(a) + operand(b)); }
  // a ** b for a Python float b: ATen's CPU pow of a float32 tensor by a scalar takes the
  // exponent as a double (std::pow(float, double): a double pow, rounded once).
  FO_HOST_DEVICE double pow(double a, double b) const { return result(::pow(operand(a), b)); }
};

FO_HOST_DEVICE inline LrMath lr_math(const Args& a) { return LrMath{a.lr_dtype}; }

// torch.amp.GradScaler: the grad divided by the loss scale, in place, so the kernel
// stores it back and grads are left unscaled, as torch's fused optimizers leave them.
template <bool UNSCALE, typename V, typename S>
FO_HOST_DEVICE FO_INLINE V unscale_grad(V& grad, S grad_scale) {
  if constexpr (UNSCALE) grad = grad / grad_scale;
  return grad;
}

// grad.add(param, alpha=weight_decay)
template <typename V, typename S>
FO_HOST_DEVICE FO_INLINE V add_l2_penalty(V grad, V param, S weight_decay) {
  return grad + weight_decay * param;
}

// avg.mul_(decay).addcmul_(x, x, value=1 - decay): a running average of squares, with
// addcmul's order ((value * x) * x).
template <typename V, typename S>
FO_HOST_DEVICE FO_INLINE V average_square(V avg, V x, S decay, S one_minus_decay) {
  return avg * decay + (one_minus_decay * x) * x;
}

// param.mul_(1 - lr * weight_decay); the factor is computed once per tensor.
template <typename V, typename S>
FO_HOST_DEVICE FO_INLINE V decay_weights(V param, S decay_factor) {
  return param * decay_factor;
}

// torch.lerp(start, end, weight) with ATen's two-branch formula, exact at weight 0
// and 1: start + w * (end - start) for w < 0.5, else end - (end - start) * (1 - w).
// Written as one expression whose condition only selects values, never arithmetic:
// w - 1 is exactly -(1 - w), so the result is bit-identical, and no FP operation sits
// in a branch (GCC does not if-convert those under -ftrapping-math, which kept the
// bf16 element loop scalar).
template <typename V, typename S>
FO_HOST_DEVICE FO_INLINE V lerp(V start, V end, S weight) {
  const bool from_start = weight < S(0.5);
  const S coefficient = from_start ? weight : weight - S(1);
  const V base = from_start ? start : end;
  return base + coefficient * (end - start);
}

// Correctly rounded square root in the opmath type, on host and device.
FO_HOST_DEVICE FO_INLINE float sqrt_op(float x) {
#if defined(__CUDA_ARCH__)
  return ::sqrtf(x);
#else
  return __builtin_sqrtf(x);
#endif
}
FO_HOST_DEVICE FO_INLINE double sqrt_op(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return __builtin_sqrt(x);
#endif
}

// a * b + c with one rounding (a fused multiply-add), on host and device.
FO_HOST_DEVICE FO_INLINE float fma_op(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return ::fmaf(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}
FO_HOST_DEVICE FO_INLINE double fma_op(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#else
  return __builtin_fma(a, b, c);
#endif
}

// |x| (torch.abs: the sign bit cleared, NaN stays NaN), on host and device.
FO_HOST_DEVICE FO_INLINE float abs_op(float x) {
#if defined(__CUDA_ARCH__)
  return ::fabsf(x);
#else
  return __builtin_fabsf(x);
#endif
}
FO_HOST_DEVICE FO_INLINE double abs_op(double x) {
#if defined(__CUDA_ARCH__)
  return ::fabs(x);
#else
  return __builtin_fabs(x);
#endif
}

#if defined(FO_CPU_VEC8)
typedef float vfloat8 __attribute__((vector_size(32)));
FO_INLINE vfloat8 sqrt_op(vfloat8 x) { return (vfloat8)_mm256_sqrt_ps((__m256)x); }
FO_INLINE vfloat8 abs_op(vfloat8 x) {
  return (vfloat8)_mm256_andnot_ps(_mm256_set1_ps(-0.0f), (__m256)x);
}
#endif

// torch.lerp(start, end, weight) as ATen's kernels compute it (Lerp.h, the CPU's
// lerp_vec): |weight| < 0.5 picks start + w * (end - start), else end - (end - start) *
// (1 - w), each with ONE rounding (a fused multiply-add; measured bit-equal to torch
// 2.13's lerp_ on the dev CPU in fp64, fp32, bf16 and fp16, tails included). `lerp`
// above is the two-rounding form the older maths were checked against.
template <typename S>
FO_HOST_DEVICE FO_INLINE S lerp_fused(S start, S end, S weight) {
  const bool from_start = (weight < S(0) ? -weight : weight) < S(0.5);
  return fma_op(from_start ? weight : weight - S(1), end - start, from_start ? start : end);
}

// x rounded to bfloat16 (nearest even) and widened back: the value a bf16 tensor op
// stores. NaN stays NaN.
FO_HOST_DEVICE FO_INLINE float round_bf16(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof u);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  float out;
  __builtin_memcpy(&out, &r, sizeof out);
  return (u & 0x7fffffffu) > 0x7f800000u ? x : out;
}
FO_HOST_DEVICE FO_INLINE double round_bf16(double x) {
  return round_bf16(static_cast<float>(x));
}

// x rounded to float16 (nearest even, subnormals, overflow to inf) and widened back.
FO_HOST_DEVICE FO_INLINE float round_f16(float x) {
  return static_cast<float>(round_to_bits(static_cast<double>(x), 10, -13, 65504.0));
}
FO_HOST_DEVICE FO_INLINE double round_f16(double x) {
  return round_f16(static_cast<float>(x));
}

// torch.maximum: propagates NaN from either side.
template <typename V>
FO_HOST_DEVICE FO_INLINE V maximum(V a, V b) {
  return (a != a) ? a : ((b != b) ? b : (a > b ? a : b));
}

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
