// The eager entry (csrc/eager.cpp) and the C++ signatures of the ops it calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <pybind11/pybind11.h>

namespace fused_optim {

// The unboxed signatures of the schemas in csrc/ops.cpp, as every device's kernel
// implements them (the dispatcher checks the match when the entry looks the op up).
using AdamOpSignature = void(at::TensorList params, at::TensorList grads,
                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                             at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                             const at::Tensor& lr, double beta1, double beta2,
                             double weight_decay, double eps, bool amsgrad, bool maximize,
                             bool decoupled_weight_decay,
                             const c10::optional<at::Tensor>& grad_scale,
                             const c10::optional<at::Tensor>& found_inf);
using SgdOpSignature = void(at::TensorList params, at::TensorList grads,
                            at::TensorList momentum_buffers, const at::Tensor& lr,
                            double momentum, double dampening, double weight_decay,
                            bool nesterov, bool maximize, bool is_first_step,
                            const c10::optional<at::Tensor>& grad_scale,
                            const c10::optional<at::Tensor>& found_inf);

// Adds fused_optim._C.adam_group_ / sgd_group_.
void bind_eager(pybind11::module_& m);

}  // namespace fused_optim
