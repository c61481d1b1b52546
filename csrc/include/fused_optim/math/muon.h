// Muon's element-wise stages (fused_optim/muon.py), written once for every C++ backend:
// the two passes around its batched Newton-Schulz run, each one engine call per batch.
//
//   momentum (apply=False):  B <- lerp(B, g, 1 - momentum)
//                            U <- lerp(g, B, momentum) (nesterov) or B, stored in bf16
//   apply (apply=True):      p <- p * (1 - lr * weight_decay)
//                            p <- p + alpha O,  alpha = -lr * lr_ratio
//
// U and O share the bf16 work list `updates` ([note: bf16 work lists] in optimizer.h):
// the momentum stage writes the Newton-Schulz input into it, the apply stage reads its
// output from it. Bit for bit torch.optim.Muon's ops (torch/optim/_muon.py): buf.lerp_,
// grad.lerp(buf, momentum), .bfloat16(), param.mul_(1 - lr * weight_decay) and
// param.add_(update, alpha=-adjusted_lr), each rounded as ATen rounds it: lerp with one
// fused multiply-add in opmath (lerp_fused), the decayed param stored in the param's
// dtype before the update is added, the add one fused multiply-add in the opmath of the
// op's dtype (the param's, fp32 for fp16 params beside a bf16 update) with alpha cast
// to that dtype (bf16 for bf16 params). lr_ratio is the batch's lr adjustment (torch's
// _adjust_lr), so one call serves one shape. transposed_update: the update was the
// transpose of its param's layout in torch (a tall param's Newton-Schulz result), which
// torch's add_ runs in its strided scalar loop: for bf16 params that rounds alpha * O to
// bf16 before the sum (c10::BFloat16 arithmetic), where the vectorized loop fuses them
// (fp32, fp16 and fp64 params fuse them in both loops: measured, torch 2.13, dev CPU).
//
// Per element (fp32 params): momentum reads grad and buffer (8 B), writes the buffer and
// the bf16 update (6 B); apply reads param and update (6 B), writes the param (4 B).
#pragma once

#include "fused_optim/macros.h"
#include "fused_optim/math/optimizer.h"
#include "fused_optim/math/stages.h"

namespace fused_optim {
namespace math {
inline namespace FO_CPU_CAPABILITY {

template <typename opmath_t>
struct MuonScalars {
  opmath_t weight;    // 1 - momentum
  opmath_t momentum;
  opmath_t decay;     // 1 - lr * weight_decay, in lr's dtype
  opmath_t alpha;     // -lr * lr_ratio, cast to the add's dtype
};

struct Muon : OptimizerBase {
  static constexpr const char* kOp = "muon_";
  enum List : int { kParam, kGrad, kMomentumBuffer, kUpdate, kLists };
  static constexpr std::array<const char*, kLists> kListNames = {"params", "grads",
                                                                 "momentum_buffers", "updates"};
  static constexpr uint32_t kBFloat16Lists = bit(kUpdate);
  enum Float : int { kMomentum, kWeightDecay, kLrRatio, kFloats };
  static constexpr std::array<const char*, kFloats> kFloatNames = {"momentum", "weight_decay",
                                                                   "lr_ratio"};
  enum Flag : int { kNesterov, kApply, kTransposedUpdate, kFlags };
  static constexpr std::array<const char*, kFlags> kFlagNames = {"nesterov", "apply",
                                                                 "transposed_update"};

  // Variant bits: the stage, Nesterov (momentum stage), and the params' rounding when
  // they are bf16 or fp16 (a value torch stores in the param's dtype between two ops);
  // the strided add (kSplitAddBit: bf16 params' transposed update, apply stage).
  static constexpr uint32_t kNesterovBit = 1, kApplyBit = 2, kBf16Bit = 4, kF16Bit = 8,
                            kSplitAddBit = 16;
  static constexpr int kVariantBits = 5;
  static uint32_t variant(const Args& a) {
    const uint32_t half = a.param_dtype == LrDType::kBFloat16  ? kBf16Bit
                          : a.param_dtype == LrDType::kFloat16 ? kF16Bit
                                                               : 0;
    if (a.flags[kApply]) {
      const bool split = half == kBf16Bit && a.flags[kTransposedUpdate];
      return kApplyBit | half | (split ? kSplitAddBit : 0);
    }
    return (a.flags[kNesterov] ? kNesterovBit : 0) | half;
  }
  template <uint32_t LISTS, uint32_t V>
  FO_HOST_DEVICE static constexpr bool valid() {
    return (V & (kNesterovBit | kApplyBit)) != (kNesterovBit | kApplyBit) &&
           (V & (kBf16Bit | kF16Bit)) != (kBf16Bit | kF16Bit) &&
           (!(V & kSplitAddBit) || (V & (kApplyBit | kBf16Bit)) == (kApplyBit | kBf16Bit));
  }
  template <uint32_t LISTS, uint32_t V>
  FO_HOST_DEVICE static constexpr bool reads(int list) {
    return (V & kApplyBit) ? (list == kParam || list == kUpdate)
                           : (list == kGrad || list == kMomentumBuffer);
  }
  template <uint32_t LISTS, uint32_t V>
  FO_HOST_DEVICE static constexpr bool writes(int list) {
    return (V & kApplyBit) ? list == kParam : (list == kMomentumBuffer || list == kUpdate);
  }

  template <typename S>
  using Scalars = MuonScalars<S>;

  template <uint32_t LISTS, uint32_t V, typename S>
  FO_HOST_DEVICE static Scalars<S> scalars(const Args& a, const double*) {
    Scalars<S> s;
    const double momentum = a.floats[kMomentum];
    s.weight = static_cast<S>(1.0 - momentum);  // torch's Python float, cast by lerp_
    s.momentum = static_cast<S>(momentum);
    const LrMath lr = lr_math(a);
    s.decay = static_cast<S>(lr.sub(1.0, lr.mul(a.lr, a.floats[kWeightDecay])));
    const double alpha = -lr.mul(a.lr, a.floats[kLrRatio]);
    s.alpha = static_cast<S>((V & kBf16Bit) ? LrMath{LrDType::kBFloat16}.result(alpha) : alpha);
    return s;
  }

  // x as the params' storage holds it.
  template <uint32_t V, typename Vt>
  FO_HOST_DEVICE FO_INLINE static Vt stored(Vt x) {
    if constexpr ((V & kBf16Bit) != 0) return round_bf16(x);
    if constexpr ((V & kF16Bit) != 0) return round_f16(x);
    return x;
  }

  template <uint32_t LISTS, uint32_t V, typename Vt, typename S>
  FO_HOST_DEVICE FO_INLINE static void update(Vt (&x)[kLists], Vt grad, const Scalars<S>& s) {
    if constexpr ((V & kApplyBit) != 0) {
      const Vt decayed = stored<V>(x[kParam] * s.decay);
      if constexpr ((V & kSplitAddBit) != 0) {
        x[kParam] = decayed + stored<V>(s.alpha * x[kUpdate]);  // stored again by the engine
      } else {
        x[kParam] = fma_op(s.alpha, x[kUpdate], decayed);
      }
    } else {
      x[kMomentumBuffer] = lerp_fused(x[kMomentumBuffer], grad, s.weight);
      if constexpr ((V & kNesterovBit) != 0) {
        x[kUpdate] = lerp_fused(grad, stored<V>(x[kMomentumBuffer]), s.momentum);
      } else {
        x[kUpdate] = x[kMomentumBuffer];
      }
    }
  }
};

}  // namespace FO_CPU_CAPABILITY
}  // namespace math
}  // namespace fused_optim
