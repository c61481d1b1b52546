// The arguments of one optimizer call as every C++ kernel sees them. Plain data only (see
// [note: one instruction set per translation unit] in fused_optim/macros.h): the CPU
// kernels, the CUDA kernels (which receive it by value) and the C++ tests share it.
//
// An op's float and bool arguments arrive in the optimizer's own order, the order of its
// schema (fused_optim/<optimizer>.py declares it, the math header names the indices and
// csrc/ops.cpp checks that the two agree when the op is registered). lr is separate: it
// travels as a tensor, and torch.optim rounds its arithmetic to that tensor's dtype
// ([note: lr arithmetic] in stages.h).
#pragma once

#include <cstdint>

namespace fused_optim {
namespace math {

// The most float / bool arguments and per-tensor state lists an optimizer may have.
constexpr int kMaxFloats = 8;
constexpr int kMaxFlags = 8;
constexpr int kMaxStates = 4;

// The dtype lr's arithmetic rounds to: float64 for a Python float (and a float64 tensor),
// else the lr tensor's dtype.
enum class LrDType : int8_t { kFloat64 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct Args {
  double floats[kMaxFloats];  // the op's float arguments, in schema order
  bool flags[kMaxFlags];      // the op's bool arguments, in schema order
  double lr;
  LrDType lr_dtype;
  // The params' storage dtype, for a math that rounds as torch's ops on them round
  // (Muon's stages: an intermediate value stored in the param's dtype, an alpha cast to
  // an op's dtype). Set by the ops layer from params[0].
  LrDType param_dtype;
};

}  // namespace math
}  // namespace fused_optim
