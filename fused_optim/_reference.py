"""The "reference" backend: plain torch, one tensor at a time.

This is the definition of what every other backend computes (the C++ math in
csrc/include/fused_optim/math/ and the Triton math in triton_kernels/ follow it
operation by operation), the oracle of the low-precision tests, and the last fallback
when no compiled backend can run a bucket. It takes the ops' arguments (csrc/ops.cpp):

  * compute in opmath (float64 for float64 storage, float32 otherwise), round once when
    storing, as the fused kernels do;
  * per-tensor bias corrections from each tensor's own step, in float64, as torch.optim
    computes them in Python floats;
  * found_inf != 0 leaves every tensor untouched, steps included, without a host sync
    (the update is computed and then selected away with torch.where);
  * grads are divided by grad_scale and left unscaled.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_optim.backends import Backend, register_backend


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _store(dst: Tensor, value: Tensor, keep: Tensor | None) -> None:
    """dst <- value, or dst unchanged where the step is skipped (found_inf)."""
    if keep is None:
        dst.copy_(value)
    else:
        dst.copy_(torch.where(keep, value, dst.to(value.dtype)))


def _skip_mask(found_inf: Tensor | None) -> Tensor | None:
    return None if found_inf is None else (found_inf.reshape(()) == 0)


def _unscaled_grad(grad: Tensor, opmath: torch.dtype, grad_scale: Tensor | None,
                   keep: Tensor | None) -> Tensor:
    g = grad.to(opmath, copy=True)
    if grad_scale is not None:
        g = g / grad_scale.reshape(()).to(device=g.device, dtype=opmath)
        _store(grad, g, keep)
    return g


def adam_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
          exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor],
          *, lr: Tensor, beta1: float, beta2: float, weight_decay: float, eps: float,
          amsgrad: bool, maximize: bool, decoupled_weight_decay: bool,
          grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    keep = _skip_mask(found_inf)
    for i, param in enumerate(params):
        opmath = _opmath(param.dtype)
        lr64 = lr.reshape(()).to(device=param.device, dtype=torch.float64)
        p = param.to(opmath, copy=True)
        g = _unscaled_grad(grads[i], opmath, grad_scale, keep)
        m = exp_avgs[i].to(opmath, copy=True)
        v = exp_avg_sqs[i].to(opmath, copy=True)
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p * (1 - lr64 * weight_decay).to(opmath)
            else:
                g = g + weight_decay * p
        m = torch.lerp(m, g, 1 - beta1)
        v = v * beta2 + (1 - beta2) * (g * g)
        second_moment = v
        if amsgrad:
            vmax = torch.maximum(max_exp_avg_sqs[i].to(opmath), v)
            second_moment = vmax
        step = state_steps[i] + 1
        step64 = step.to(device=param.device, dtype=torch.float64)
        bias_correction1 = 1 - beta1**step64
        bias_correction2 = 1 - beta2**step64
        neg_step_size = (-(lr64 / bias_correction1)).to(opmath)
        # torch.optim divides by sqrt(1 - beta2^t); the kernels multiply by its
        # reciprocal, computed in double (one division less per element, <= 1 ulp).
        inv_bias_correction2_sqrt = (1 / bias_correction2.sqrt()).to(opmath)
        denom = second_moment.sqrt() * inv_bias_correction2_sqrt + eps
        p = p + neg_step_size * (m / denom)

        _store(param, p, keep)
        _store(exp_avgs[i], m, keep)
        _store(exp_avg_sqs[i], v, keep)
        if amsgrad:
            _store(max_exp_avg_sqs[i], vmax, keep)
        _store(state_steps[i], step, None if keep is None else keep.to(step.device))


def sgd_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *,
         lr: Tensor, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
         maximize: bool, is_first_step: bool, grad_scale: Tensor | None = None,
         found_inf: Tensor | None = None) -> None:
    keep = _skip_mask(found_inf)
    for i, param in enumerate(params):
        opmath = _opmath(param.dtype)
        neg_lr = (-lr.reshape(()).to(device=param.device, dtype=torch.float64)).to(opmath)
        p = param.to(opmath, copy=True)
        g = _unscaled_grad(grads[i], opmath, grad_scale, keep)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0:
            if is_first_step:
                buf = g.clone()
            else:
                buf = momentum_buffers[i].to(opmath) * momentum + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
            _store(momentum_buffers[i], buf, keep)
        p = p + neg_lr * g
        _store(param, p, keep)


def _unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    if not dtype.is_floating_point:
        return f"dtype {dtype} is not a floating-point type"
    return None


register_backend(Backend("reference", _unavailable, adam_, sgd_))
