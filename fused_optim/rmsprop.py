"""RMSprop: a drop-in for torch.optim.RMSprop."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_optim.optimizer import FusedOptimizer, check_lr
from fused_optim.spec import Hyper, ScalarState, Spec, StateList


def rmsprop_reference(x: dict[str, Tensor], grad: Tensor, state: dict[str, Tensor], lr: Tensor,
                      h: dict[str, Any]) -> None:
    """One RMSprop step of one tensor in plain torch (see fused_optim/_reference.py); the
    kernels' math (math/rmsprop.h, triton_kernels/math.py) follows it op by op."""
    p, g = x["param"], grad
    alpha = h["alpha"]
    if h["weight_decay"] != 0:
        g = g + h["weight_decay"] * p
    square_avg = x["square_avg"] * alpha + ((1 - alpha) * g) * g
    if "grad_avg" in x:
        x["grad_avg"] = grad_avg = torch.lerp(x["grad_avg"], g, 1 - alpha)
        avg = (square_avg - grad_avg * grad_avg).sqrt()
    else:
        avg = square_avg.sqrt()
    avg = avg + h["eps"]
    neg_lr = (-lr).to(p.dtype)
    if "momentum_buffer" in x:
        x["momentum_buffer"] = buf = x["momentum_buffer"] * h["momentum"] + g / avg
        x["param"] = p + neg_lr * buf
    else:
        x["param"] = p + (neg_lr * g) / avg
    x["square_avg"] = square_avg
    state["step"] = state["step"] + 1


class RMSprop(FusedOptimizer):
    r"""Implements RMSprop, with every bucket of tensors updated by one fused kernel call.

    The numbers, arguments, defaults, validation errors and state (``step``,
    ``square_avg``, ``momentum_buffer`` with momentum, ``grad_avg`` when centered) are
    those of :class:`torch.optim.RMSprop`, and ``state_dict()`` loads both ways with it.

    .. math::
       \begin{aligned}
            & g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1}
              \qquad v_t \leftarrow \alpha v_{t-1} + (1 - \alpha) g_t^2                \\
            & \tilde v_t \leftarrow v_t - a_t^2, \;
              a_t \leftarrow a_{t-1} + (1 - \alpha)(g_t - a_{t-1})
              \text{ if centered, else } \tilde v_t \leftarrow v_t                    \\
            & b_t \leftarrow \mu b_{t-1} + g_t / (\sqrt{\tilde v_t} + \epsilon), \;
              \theta_t \leftarrow \theta_{t-1} - \gamma b_t \text{ if } \mu > 0,
              \text{ else } \theta_t \leftarrow \theta_{t-1} - \gamma g_t / (\sqrt{\tilde v_t} + \epsilon)
       \end{aligned}

    Args:
        {params}
        lr (float or Tensor, optional): learning rate (default: 1e-2).
        alpha (float, optional): smoothing constant (default: 0.99).
        eps (float, optional): added to the denominator (default: 1e-8).
        weight_decay (float, optional): L2 penalty (default: 0).
        momentum (float, optional): momentum factor (default: 0).
        centered (bool, optional): normalize by the gradient's estimated variance
            (default: False).
        {flags}
        {maximize}
        {differentiable}
        {backend}
        {policy}

    Example:
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = RMSprop(model.parameters(), lr=1e-3, centered=True, momentum=0.9)
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()

    References: Hinton, Srivastava & Swersky, "Neural Networks for Machine Learning",
    lecture 6e (2012); Graves, "Generating Sequences With Recurrent Neural Networks"
    (2013), for the centered variant.
    """

    _memory_policy = True

    spec = Spec(
        name="rmsprop",
        lists=(StateList("square_avgs", "square_avg"),
               StateList("grad_avgs", "grad_avg", when="centered"),
               StateList("momentum_buffer_list", "momentum_buffer", when="momentum")),
        scalars=(ScalarState("state_steps", "step"),),
        hypers=(Hyper("alpha"), Hyper("eps"), Hyper("weight_decay"), Hyper("momentum"),
                Hyper("centered", bool), Hyper("maximize", bool)),
        reference=rmsprop_reference,
    )
    _capturable_xla = (True, True)  # torch.optim.RMSprop names xla on both paths

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        # The checks and messages of torch.optim.RMSprop, in its order.
        check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding)

    def _group_defaults(self) -> dict[str, Any]:
        return {**super()._group_defaults(), "momentum": 0, "centered": False}

