"""RAdam: a drop-in for torch.optim.RAdam."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_optim._reference import weight_decayed
from fused_optim.optimizer import FusedOptimizer, check_eps_betas_weight_decay, check_lr
from fused_optim.spec import Hyper, ScalarState, Spec, StateList


def radam_reference(x: dict[str, Tensor], grad: Tensor, state: dict[str, Tensor], lr: Tensor,
                    h: dict[str, Any]) -> None:
    """One RAdam step of one tensor in plain torch (see fused_optim/_reference.py); the
    kernels' math (math/radam.h, triton_kernels/math.py) follows it op by op. The
    per-tensor branch on rho_t > 5 is a torch.where (no host sync)."""
    p, g = x["param"], grad
    opmath = p.dtype
    beta1, beta2 = h["beta1"], h["beta2"]
    p, g = weight_decayed(p, g, lr, h)
    exp_avg = torch.lerp(x["exp_avg"], g, 1 - beta1)
    exp_avg_sq = x["exp_avg_sq"] * beta2 + ((1 - beta2) * g) * g
    step = state["step"] + 1
    step64 = step.to(torch.float64)
    beta2_t = beta2**step64
    bias_correction1 = 1 - beta1**step64
    bias_correction2 = 1 - beta2_t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step64 * beta2_t / bias_correction2
    rectified = rho_t > 5.0
    rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
    rect = torch.where(rectified, rect, 0.0).to(opmath)  # no NaN where not taken
    update = (exp_avg / bias_correction1.to(opmath)) * lr.to(opmath)
    adaptive_lr = (1 / (exp_avg_sq.sqrt() + h["eps"])) * (bias_correction2**0.5).to(opmath)
    x["param"] = torch.where(rectified, p - (update * adaptive_lr) * rect, p - update)
    x["exp_avg"], x["exp_avg_sq"] = exp_avg, exp_avg_sq
    state["step"] = step


class RAdam(FusedOptimizer):
    r"""Implements RAdam (rectified Adam), with every bucket of tensors updated by one
    fused kernel call.

    The numbers, arguments, defaults, validation errors and state (``step``,
    ``exp_avg``, ``exp_avg_sq``) are those of :class:`torch.optim.RAdam`, and
    ``state_dict()`` loads both ways with it. ``step`` is kept on the param's device
    (torch.optim keeps it on the CPU unless ``capturable``).

    .. math::
       \begin{aligned}
            & g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
              \;(\textbf{+}\lambda\theta_{t-1}\text{ unless decoupled})
              \qquad \theta_{t-1} \leftarrow \theta_{t-1}(1-\gamma\lambda)
              \text{ if decoupled}                                                    \\
            & m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \qquad
              v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \qquad
              \hat m_t \leftarrow m_t / (1-\beta_1^t)                                  \\
            & \rho_\infty \leftarrow 2/(1-\beta_2) - 1 \qquad
              \rho_t \leftarrow \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)               \\
            & \theta_t \leftarrow \theta_{t-1} - \gamma \hat m_t \, r_t
              \sqrt{1-\beta_2^t} / (\sqrt{v_t} + \epsilon) \text{ if } \rho_t > 5,
              \text{ else } \theta_{t-1} - \gamma \hat m_t                             \\
            & r_t = \sqrt{(\rho_t-4)(\rho_t-2)\rho_\infty /
              ((\rho_\infty-4)(\rho_\infty-2)\rho_t)}
       \end{aligned}

    The branch is taken per tensor (it depends on each tensor's own step), inside the
    kernel: no host sync.

    Args:
        {params}
        lr (float or Tensor, optional): learning rate (default: 1e-3).
        betas (Tuple[float, float], optional): coefficients of the running averages of
            the gradient and its square (default: (0.9, 0.999)).
        eps (float, optional): added to the denominator (default: 1e-8).
        weight_decay (float, optional): weight decay (default: 0).
        decoupled_weight_decay (bool, optional): AdamW-style decoupled decay, as in
            RAdamW (default: False).
        {flags}
        {maximize}
        {differentiable}
        {backend}
        {policy}

    Example:
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = RAdam(model.parameters())
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()

    References: Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond"
    (2019); Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2017).
    """

    _memory_policy = True

    spec = Spec(
        name="radam",
        lists=(StateList("exp_avgs", "exp_avg"), StateList("exp_avg_sqs", "exp_avg_sq")),
        scalars=(ScalarState("state_steps", "step"),),
        hypers=(Hyper("beta1", float, "betas", 0), Hyper("beta2", float, "betas", 1),
                Hyper("eps"), Hyper("weight_decay"), Hyper("maximize", bool),
                Hyper("decoupled_weight_decay", bool)),
        reference=radam_reference,
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        # The checks and messages of torch.optim.RAdam, in its order.
        check_lr(lr)
        check_eps_betas_weight_decay(eps, betas, weight_decay)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "decoupled_weight_decay": decoupled_weight_decay,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding)

    def _group_defaults(self) -> dict[str, Any]:
        return {**super()._group_defaults(), "decoupled_weight_decay": False}
