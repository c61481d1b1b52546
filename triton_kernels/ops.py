"""The Triton backend's operators: torch.ops.fused_optim_triton.adam_ / sgd_.

Same schemas and semantics as the C++ ops (csrc/ops.cpp): one call = one bucket (one
device, one dtype); lists are mutated in place; lr, the step counters, grad_scale and
found_inf are tensors read by the kernels; found_inf != 0 changes nothing, steps
included; grads are divided by grad_scale and written back unscaled.

They are torch.library.triton_op, so torch.compile traces into them (see
[note: torch.compile] in launcher.py):
  * eager calls with real tensors launch ONE table kernel per call (launcher.adam_table);
  * functionalized calls (torch.compile / torch.export: FunctionalTensor arguments)
    launch the per-tensor kernels through torch.library.wrap_triton, whose tensor
    arguments the compiler can see;
  * FakeTensor / meta calls (the fake kernel) do nothing: the op returns nothing and
    its schema declares what it mutates.
"""

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from .launcher import (adam_per_tensor, adam_table, kernels_interpreted, sgd_per_tensor,
                       sgd_table)

__all__ = ["adam_", "sgd_"]


def _tracing_mode(tensors: list[Tensor]) -> str | None:
    """None for real tensors; "fake" for FakeTensor / meta tensors (a fake kernel: the
    op returns nothing and its schema declares the mutations, so there is nothing to
    do); "functional" when torch.compile / torch.export functionalize the op and must
    see its kernels."""
    if not tensors:
        return None
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(tensors[0], FunctionalTensor):
        if kernels_interpreted():
            raise NotImplementedError(
                "fused_optim_triton: torch.compile of the Triton backend needs a GPU; "
                "interpreted kernels (TRITON_INTERPRET=1) cannot be traced")
        return "functional"
    if isinstance(tensors[0], FakeTensor) or tensors[0].device.type == "meta":
        return "fake"
    return None


# The ops take lr, grad_scale and found_inf positionally (custom ops cannot have
# keyword-only tensors); adam_ / sgd_ below keep the C++ ops' keyword signature.


@triton_op(
    "fused_optim_triton::adam_",
    mutates_args={"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                  "state_steps"},
)
def _adam_op(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
             exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor],
             state_steps: list[Tensor], lr: Tensor, grad_scale: Optional[Tensor],
             found_inf: Optional[Tensor], beta1: float, beta2: float, weight_decay: float,
             eps: float, amsgrad: bool, maximize: bool,
             decoupled_weight_decay: bool) -> None:
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                  amsgrad=amsgrad, maximize=maximize,
                  decoupled_weight_decay=decoupled_weight_decay, grad_scale=grad_scale,
                  found_inf=found_inf)
    mode = _tracing_mode(params)
    if mode == "functional":
        adam_per_tensor(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                        **kwargs)
    elif mode is None:
        adam_table(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                   **kwargs)


@triton_op(
    "fused_optim_triton::sgd_",
    mutates_args={"params", "grads", "momentum_buffers"},
)
def _sgd_op(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
            lr: Tensor, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
            momentum: float, dampening: float, weight_decay: float, nesterov: bool,
            maximize: bool, is_first_step: bool) -> None:
    kwargs = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                  nesterov=nesterov, maximize=maximize, is_first_step=is_first_step,
                  grad_scale=grad_scale, found_inf=found_inf)
    mode = _tracing_mode(params)
    if mode == "functional":
        sgd_per_tensor(params, grads, momentum_buffers, **kwargs)
    elif mode is None:
        sgd_table(params, grads, momentum_buffers, **kwargs)


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr,
          beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
          grad_scale=None, found_inf=None) -> None:
    """One Adam / AdamW step over one bucket (the signature of torch.ops.fused_optim.adam_)."""
    torch.ops.fused_optim_triton.adam_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, grad_scale,
        found_inf, beta1, beta2, weight_decay, eps, amsgrad, maximize,
        decoupled_weight_decay)


def sgd_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay,
         nesterov, maximize, is_first_step, grad_scale=None, found_inf=None) -> None:
    """One SGD step over one bucket (the signature of torch.ops.fused_optim.sgd_)."""
    torch.ops.fused_optim_triton.sgd_(
        params, grads, momentum_buffers, lr, grad_scale, found_inf, momentum, dampening,
        weight_decay, nesterov, maximize, is_first_step)
