// Hyperparameters of one optimizer call, as the ops receive them. Plain data only (see
// [note: one instruction set per translation unit] in fused_optim/macros.h).
#pragma once

namespace fused_optim {
namespace math {

// How weight decay enters Adam: torch.optim.Adam's L2 penalty adds weight_decay * param
// to the gradient; AdamW's decoupled decay shrinks the param by 1 - lr * weight_decay.
enum class WeightDecay : int { kNone = 0, kL2 = 1, kDecoupled = 2 };

struct AdamHyper {
  double lr;
  double beta1;
  double beta2;
  double weight_decay;
  double eps;
  bool amsgrad;
  bool maximize;
  WeightDecay weight_decay_mode;
};

struct SgdHyper {
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
  bool is_first_step;
};

}  // namespace math
}  // namespace fused_optim
