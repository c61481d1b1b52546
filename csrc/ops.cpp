// The op schemas, declared once for every backend (CPU here, CUDA in csrc/cuda/).
//
// Alias annotations name what each op mutates. `lr` travels as a tensor and the step
// counters live in `state_steps`, so changing either never changes a compiled graph;
// `grad_scale` (grads are divided by it, and left unscaled) and `found_inf` (when
// non-zero the op changes nothing at all, steps included) serve torch.amp.GradScaler.
#include <torch/library.h>

TORCH_LIBRARY(fused_optim, m) {
  m.def(
      "adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, *, "
      "Tensor lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, *, "
      "Tensor lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool is_first_step, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
}
