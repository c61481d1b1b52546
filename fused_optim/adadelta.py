"""Adadelta: a drop-in for torch.optim.Adadelta."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_optim.optimizer import FusedOptimizer, check_lr
from fused_optim.spec import Hyper, ScalarState, Spec, StateList


def adadelta_reference(x: dict[str, Tensor], grad: Tensor, state: dict[str, Tensor], lr: Tensor,
                       h: dict[str, Any]) -> None:
    """One Adadelta step of one tensor in plain torch (see fused_optim/_reference.py); the
    kernels' math (math/adadelta.h, triton_kernels/math.py) follows it op by op."""
    p, g = x["param"], grad
    rho, eps = h["rho"], h["eps"]
    if h["weight_decay"] != 0:
        g = g + h["weight_decay"] * p
    square_avg = x["square_avg"] * rho + ((1 - rho) * g) * g
    std = (square_avg + eps).sqrt()
    delta = ((x["acc_delta"] + eps).sqrt() / std) * g
    x["acc_delta"] = x["acc_delta"] * rho + ((1 - rho) * delta) * delta
    x["param"] = p + (-lr).to(p.dtype) * delta
    x["square_avg"] = square_avg
    state["step"] = state["step"] + 1


class Adadelta(FusedOptimizer):
    r"""Implements Adadelta, with every bucket of tensors updated by one fused kernel call.

    The numbers, arguments, defaults, validation errors and state (``step``,
    ``square_avg``, ``acc_delta``) are those of :class:`torch.optim.Adadelta`, and
    ``state_dict()`` loads both ways with it.

    .. math::
       \begin{aligned}
            & g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1}
              \qquad v_t \leftarrow \rho v_{t-1} + (1 - \rho) g_t^2                  \\
            & \Delta x_t \leftarrow \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t
              \qquad u_t \leftarrow \rho u_{t-1} + (1 - \rho) \Delta x_t^2
              \qquad \theta_t \leftarrow \theta_{t-1} - \gamma \Delta x_t
       \end{aligned}

    with :math:`v` the ``square_avg`` and :math:`u` the ``acc_delta`` state.

    Args:
        {params}
        lr (float or Tensor, optional): coefficient of the update (default: 1.0).
        rho (float, optional): coefficient of the running averages (default: 0.9).
        eps (float, optional): added inside the square roots (default: 1e-6).
        weight_decay (float, optional): L2 penalty (default: 0).
        {flags}
        {maximize}
        {differentiable}
        {backend}
        {policy}

    Example:
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = Adadelta(model.parameters())
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()

    References: Zeiler, "ADADELTA: An Adaptive Learning Rate Method" (2012).
    """

    _memory_policy = True

    spec = Spec(
        name="adadelta",
        lists=(StateList("square_avgs", "square_avg"), StateList("acc_deltas", "acc_delta")),
        scalars=(ScalarState("state_steps", "step"),),
        hypers=(Hyper("rho"), Hyper("eps"), Hyper("weight_decay"), Hyper("maximize", bool)),
        reference=adadelta_reference,
    )
    _capturable_xla = (False, False)  # torch.optim.Adadelta names no xla on either path

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        # The checks and messages of torch.optim.Adadelta, in its order.
        check_lr(lr)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "rho": rho,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "capturable": capturable,
            "foreach": foreach,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding)
