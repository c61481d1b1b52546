"""ASGD: a drop-in for torch.optim.ASGD."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_optim._reference import lr_add_to, lr_div, lr_mul, lr_pow
from fused_optim.optimizer import FusedOptimizer, check_lr
from fused_optim.spec import FromGroup, Hyper, ScalarState, Spec, StateList


def asgd_reference(x: dict[str, Tensor], grad: Tensor, state: dict[str, Tensor], lr: Tensor,
                   h: dict[str, Any]) -> None:
    """One ASGD step of one tensor in plain torch (see fused_optim/_reference.py); the
    kernels' math (math/asgd.h, triton_kernels/math.py) follows it op by op. The step
    uses the eta and mu the previous step stored, then computes the next ones."""
    p, g = x["param"], grad
    opmath = p.dtype
    lambd = h["lambd"]
    if h["weight_decay"] != 0:
        g = g + h["weight_decay"] * p
    # torch.optim reads them as Python floats (.item()): no gradient flows through them,
    # and they are copied before advance() overwrites the state.
    eta = state["eta"].detach().to(torch.float64, copy=True)
    mu = state["mu"].detach().clone()
    p = p * (1 - lambd * eta).to(opmath)
    p = p + (-eta).to(opmath) * g
    x["ax"] = torch.where(mu != 1, x["ax"] + (p - x["ax"]) * mu.to(opmath), p)
    x["param"] = p
    step = state["step"] + 1
    step64 = step.to(torch.float64)
    # lr / ((1 + lambd * lr * step) ** alpha) in lr's dtype; 1 / max(1, step - t0).
    base = lr_add_to(1.0, lr_mul(lr_mul(lr, lambd), step64))
    eta = lr_div(lr, lr_pow(base, h["alpha"]))
    since_t0 = step64 - h["t0"]
    mu = 1 / torch.where(since_t0 > 1, since_t0, 1.0)
    # torch stores torch.as_tensor(value): a Python float in the default dtype, which the
    # step's dtype records (math/asgd.h).
    as_tensor = step.dtype
    state["eta"] = eta.to(as_tensor) if eta.dtype == torch.float64 else eta
    state["mu"] = mu.to(as_tensor)
    state["step"] = step


class ASGD(FusedOptimizer):
    r"""Implements averaged stochastic gradient descent, with every bucket of tensors
    updated by one fused kernel call.

    The numbers, arguments, defaults, validation errors and state (``step``, ``eta``,
    ``mu``, ``ax``) are those of :class:`torch.optim.ASGD`, and ``state_dict()`` loads
    both ways with it. ``eta`` and ``mu`` are one-element tensors on the param's device
    that the kernels read and rewrite (no host sync).

    .. math::
       \begin{aligned}
            & g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) + w\theta_{t-1} \qquad
              \theta_t \leftarrow \theta_{t-1}(1 - \lambda\eta_t) - \eta_t g_t         \\
            & \bar\theta_t \leftarrow \bar\theta_{t-1} + \mu_t(\theta_t - \bar\theta_{t-1})
              \text{ if } \mu_t \ne 1, \text{ else } \theta_t                          \\
            & \eta_{t+1} \leftarrow \gamma / (1 + \lambda\gamma t)^\alpha \qquad
              \mu_{t+1} \leftarrow 1 / \max(1, t - t_0)
       \end{aligned}

    with :math:`\bar\theta` the ``ax`` state and :math:`\eta_1 = \gamma`, :math:`\mu_1 = 1`.

    Args:
        {params}
        lr (float or Tensor, optional): learning rate (default: 1e-2).
        lambd (float, optional): decay term (default: 1e-4).
        alpha (float, optional): power for the eta update (default: 0.75).
        t0 (float, optional): the step at which averaging starts (default: 1e6).
        weight_decay (float, optional): L2 penalty (default: 0).
        {flags}
        {maximize}
        {differentiable}
        {backend}
        {policy}

    Example:
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = ASGD(model.parameters(), lr=1e-2)
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()

    References: Polyak & Juditsky, "Acceleration of Stochastic Approximation by
    Averaging" (1992).
    """

    _memory_policy = True

    spec = Spec(
        name="asgd",
        lists=(StateList("axs", "ax"),),
        scalars=(ScalarState("state_steps", "step"),
                 ScalarState("etas", "eta", init=FromGroup("lr"), host_read=True),
                 ScalarState("mus", "mu", init=1.0, host_read=True)),
        hypers=(Hyper("lambd"), Hyper("alpha"), Hyper("t0"), Hyper("weight_decay"),
                Hyper("maximize", bool)),
        reference=asgd_reference,
    )
    _capturable_names = ("params, mus, etas, and state_steps",) * 2

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        *,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        # The checks and messages of torch.optim.ASGD, in its order.
        check_lr(lr)
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "lambd": lambd,
            "alpha": alpha,
            "t0": t0,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding)
