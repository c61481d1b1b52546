"""Fake (meta) kernels of the C++ ops, for torch.compile and torch.library.opcheck.

The ops mutate their list arguments and return nothing, so under FakeTensors there is
nothing to compute: the schema's alias annotations already tell the compiler what
changes.
"""

from __future__ import annotations

import torch

from fused_optim import _extension

if _extension.C is not None:

    @torch.library.register_fake("fused_optim::adam_")
    def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
                   lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
                   decoupled_weight_decay, grad_scale=None, found_inf=None) -> None:
        return None

    @torch.library.register_fake("fused_optim::sgd_")
    def _sgd_fake(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay,
                  nesterov, maximize, is_first_step, grad_scale=None, found_inf=None) -> None:
        return None
