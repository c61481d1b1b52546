"""Adamax: a drop-in for torch.optim.Adamax."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_optim._reference import lr_div
from fused_optim.optimizer import FusedOptimizer, check_eps_betas_weight_decay, check_lr
from fused_optim.spec import Hyper, ScalarState, Spec, StateList


def adamax_reference(x: dict[str, Tensor], grad: Tensor, state: dict[str, Tensor], lr: Tensor,
                     h: dict[str, Any]) -> None:
    """One Adamax step of one tensor in plain torch (see fused_optim/_reference.py); the
    kernels' math (math/adamax.h, triton_kernels/math.py) follows it op by op."""
    p, g = x["param"], grad
    beta1 = h["beta1"]
    if h["weight_decay"] != 0:
        g = g + h["weight_decay"] * p
    exp_avg = torch.lerp(x["exp_avg"], g, 1 - beta1)
    exp_inf = torch.maximum(x["exp_inf"] * h["beta2"], g.abs() + h["eps"])
    step = state["step"] + 1
    clr = lr_div(lr, 1 - beta1 ** step.to(torch.float64))
    x["param"] = p + ((-clr).to(p.dtype) * exp_avg) / exp_inf
    x["exp_avg"], x["exp_inf"] = exp_avg, exp_inf
    state["step"] = step


class Adamax(FusedOptimizer):
    r"""Implements Adamax (Adam with the infinity norm), with every bucket of tensors
    updated by one fused kernel call.

    The numbers, arguments, defaults, validation errors and state (``step``,
    ``exp_avg``, ``exp_inf``) are those of :class:`torch.optim.Adamax`, and
    ``state_dict()`` loads both ways with it.

    .. math::
       \begin{aligned}
            & g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1}
              \qquad m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t              \\
            & u_t \leftarrow \max(\beta_2 u_{t-1}, |g_t| + \epsilon)
              \qquad \theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\, m_t / u_t
       \end{aligned}

    with :math:`u` the ``exp_inf`` state; the maximum propagates NaN, as torch.maximum.

    Args:
        {params}
        lr (float or Tensor, optional): learning rate (default: 2e-3).
        betas (Tuple[float, float], optional): coefficients of the running average of
            the gradient and of the infinity norm (default: (0.9, 0.999)).
        eps (float, optional): added to the infinity norm (default: 1e-8).
        weight_decay (float, optional): L2 penalty (default: 0).
        {flags}
        {maximize}
        {differentiable}
        {backend}
        {policy}

    Example:
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = Adamax(model.parameters())
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()

    References: Kingma & Ba, "Adam: A Method for Stochastic Optimization" (2014),
    section 7.1.
    """

    _memory_policy = True

    spec = Spec(
        name="adamax",
        lists=(StateList("exp_avgs", "exp_avg"), StateList("exp_infs", "exp_inf")),
        scalars=(ScalarState("state_steps", "step"),),
        hypers=(Hyper("beta1", float, "betas", 0), Hyper("beta2", float, "betas", 1),
                Hyper("eps"), Hyper("weight_decay"), Hyper("maximize", bool)),
        reference=adamax_reference,
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        # The checks and messages of torch.optim.Adamax, in its order.
        check_lr(lr)
        check_eps_betas_weight_decay(eps, betas, weight_decay)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding)
