"""Rprop: a drop-in for torch.optim.Rprop."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_optim.optimizer import FusedOptimizer, check_lr
from fused_optim.spec import FromGroup, Hyper, ScalarState, Spec, StateList


def rprop_reference(x: dict[str, Tensor], grad: Tensor, state: dict[str, Tensor], lr: Tensor,
                    h: dict[str, Any]) -> None:
    """One Rprop step of one tensor in plain torch (see fused_optim/_reference.py); the
    kernels' math (math/rprop.h, triton_kernels/math.py) follows it op by op."""
    g = grad
    prod = g * x["prev"]
    one = torch.ones_like(prod)
    factor = torch.where(prod > 0, h["etaplus"] * one,
                         torch.where(prod < 0, h["etaminus"] * one, one))
    step_size = torch.clamp(x["step_size"] * factor, h["step_size_min"], h["step_size_max"])
    g = torch.where(prod < 0, 0.0, g)
    x["param"] = x["param"] + (-g.sign()) * step_size
    x["prev"], x["step_size"] = g, step_size
    state["step"] = state["step"] + 1


class Rprop(FusedOptimizer):
    r"""Implements the resilient backpropagation algorithm, with every bucket of tensors
    updated by one fused kernel call.

    The numbers, arguments, defaults, validation errors and state (``step``, ``prev``,
    ``step_size``) are those of :class:`torch.optim.Rprop`, and ``state_dict()`` loads
    both ways with it. ``step`` is kept on the param's device (torch.optim keeps it on
    the CPU unless ``capturable``).

    .. math::
       \begin{aligned}
            & g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) \qquad
              \eta \leftarrow \eta_+ \text{ if } g_t g_{t-1} > 0,\;
              \eta_- \text{ if } g_t g_{t-1} < 0, \text{ else } 1                      \\
            & s_t \leftarrow \mathrm{clamp}(s_{t-1}\eta, \Gamma_{min}, \Gamma_{max})
              \qquad g_t \leftarrow 0 \text{ if } g_t g_{t-1} < 0                     \\
            & \theta_t \leftarrow \theta_{t-1} - \mathrm{sign}(g_t)\, s_t
       \end{aligned}

    with :math:`s` the ``step_size`` state (starting at lr) and :math:`g_{t-1}` the
    ``prev`` state.

    Args:
        {params}
        lr (float or Tensor, optional): the initial step size (default: 1e-2).
        etas (Tuple[float, float], optional): the multiplicative decrease and increase
            factors :math:`(\eta_-, \eta_+)` (default: (0.5, 1.2)).
        step_sizes (Tuple[float, float], optional): the least and largest step sizes
            (default: (1e-6, 50)).
        {flags}
        {maximize}
        {differentiable}
        {backend}
        {policy}

    Example:
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = Rprop(model.parameters())
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()

    References: Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation
    Learning: The RPROP Algorithm" (1993).
    """

    _memory_policy = True

    spec = Spec(
        name="rprop",
        lists=(StateList("prevs", "prev"),
               StateList("step_sizes", "step_size", init=FromGroup("lr"))),
        scalars=(ScalarState("state_steps", "step"),),
        hypers=(Hyper("step_size_min", float, "step_sizes", 0),
                Hyper("step_size_max", float, "step_sizes", 1),
                Hyper("etaminus", float, "etas", 0), Hyper("etaplus", float, "etas", 1),
                Hyper("maximize", bool)),
        reference=rprop_reference,
    )
    _capturable_xla = (True, True)  # torch.optim.Rprop names xla on both paths

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50),
        *,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        # The checks and messages of torch.optim.Rprop, in its order.
        check_lr(lr)
        if not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")
        defaults = {
            "lr": lr,
            "etas": etas,
            "step_sizes": step_sizes,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding)
