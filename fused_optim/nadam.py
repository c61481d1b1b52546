"""NAdam: a drop-in for torch.optim.NAdam."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_optim._reference import lr_div, lr_mul, weight_decayed
from fused_optim.optimizer import FusedOptimizer, check_eps_betas_weight_decay, check_lr
from fused_optim.spec import Hyper, ScalarState, Spec, StateList


def nadam_reference(x: dict[str, Tensor], grad: Tensor, state: dict[str, Tensor], lr: Tensor,
                    h: dict[str, Any]) -> None:
    """One NAdam step of one tensor in plain torch (see fused_optim/_reference.py); the
    kernels' math (math/nadam.h, triton_kernels/math.py) follows it op by op."""
    p, g = x["param"], grad
    opmath = p.dtype
    beta1, beta2 = h["beta1"], h["beta2"]
    p, g = weight_decayed(p, g, lr, h)
    step = state["step"] + 1
    step64 = step.to(torch.float64)
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step64 * h["momentum_decay"]))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step64 + 1) * h["momentum_decay"]))
    # torch's `mu_product *= mu`: in the state's dtype, mu rounded to it first.
    mu_product = state["mu_product"] * mu.to(state["mu_product"].dtype)
    mu_product64 = mu_product.to(torch.float64)
    exp_avg = torch.lerp(x["exp_avg"], g, 1 - beta1)
    exp_avg_sq = x["exp_avg_sq"] * beta2 + ((1 - beta2) * g) * g
    denom = (exp_avg_sq / (1 - beta2**step64).to(opmath)).sqrt() + h["eps"]
    grad_coef = lr_div(lr_mul(-lr, 1.0 - mu), 1.0 - mu_product64).to(opmath)
    exp_avg_coef = lr_div(lr_mul(-lr, mu_next), 1.0 - mu_product64 * mu_next).to(opmath)
    p = p + (grad_coef * g) / denom
    x["param"] = p + (exp_avg_coef * exp_avg) / denom
    x["exp_avg"], x["exp_avg_sq"] = exp_avg, exp_avg_sq
    state["step"], state["mu_product"] = step, mu_product


class NAdam(FusedOptimizer):
    r"""Implements NAdam (Adam with Nesterov momentum), with every bucket of tensors
    updated by one fused kernel call.

    The numbers, arguments, defaults, validation errors and state (``step``,
    ``mu_product``, ``exp_avg``, ``exp_avg_sq``) are those of :class:`torch.optim.NAdam`,
    and ``state_dict()`` loads both ways with it. ``step`` and ``mu_product`` are kept on
    the param's device (torch.optim keeps them on the CPU unless ``capturable``): the
    kernels read and advance them there, without a host sync.

    .. math::
       \begin{aligned}
            & g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
              \;(\textbf{+}\lambda\theta_{t-1}\text{ unless decoupled})
              \qquad \theta_{t-1} \leftarrow \theta_{t-1}(1-\gamma\lambda)
              \text{ if decoupled}                                                    \\
            & \mu_t \leftarrow \beta_1 \big(1 - \tfrac12 0.96^{t\psi}\big) \qquad
              m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \qquad
              v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2                       \\
            & \theta_t \leftarrow \theta_{t-1}
              - \gamma \frac{1-\mu_t}{1-\prod_{i\le t}\mu_i} \frac{g_t}{d_t}
              - \gamma \frac{\mu_{t+1}}{1-\prod_{i\le t+1}\mu_i} \frac{m_t}{d_t},
              \qquad d_t = \sqrt{v_t / (1-\beta_2^t)} + \epsilon
       \end{aligned}

    with :math:`\psi` the ``momentum_decay``.

    Args:
        {params}
        lr (float or Tensor, optional): learning rate (default: 2e-3).
        betas (Tuple[float, float], optional): coefficients of the running averages of
            the gradient and its square (default: (0.9, 0.999)).
        eps (float, optional): added to the denominator (default: 1e-8).
        weight_decay (float, optional): weight decay (default: 0).
        momentum_decay (float, optional): the momentum decay :math:`\psi` (default: 4e-3).
        decoupled_weight_decay (bool, optional): AdamW-style decoupled decay, as in
            NAdamW (default: False).
        {flags}
        {maximize}
        {differentiable}
        {backend}
        {policy}

    Example:
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = NAdam(model.parameters())
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()

    References: Dozat, "Incorporating Nesterov Momentum into Adam" (2016);
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2017).
    """

    _memory_policy = True

    spec = Spec(
        name="nadam",
        lists=(StateList("exp_avgs", "exp_avg"), StateList("exp_avg_sqs", "exp_avg_sq")),
        scalars=(ScalarState("state_steps", "step"),
                 ScalarState("mu_products", "mu_product", init=1.0)),
        hypers=(Hyper("beta1", float, "betas", 0), Hyper("beta2", float, "betas", 1),
                Hyper("eps"), Hyper("weight_decay"), Hyper("momentum_decay"),
                Hyper("maximize", bool), Hyper("decoupled_weight_decay", bool)),
        reference=nadam_reference,
    )
    _capturable_names = ("params, mu_products and state_steps",
                         "params, mu_products, and state_steps")

    def __init__(
        self,
        params,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
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
        # The checks and messages of torch.optim.NAdam, in its order.
        check_lr(lr)
        check_eps_betas_weight_decay(eps, betas, weight_decay)
        if not 0.0 <= momentum_decay:
            raise ValueError(f"Invalid momentum_decay value: {momentum_decay}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding)

    def _group_defaults(self) -> dict[str, Any]:
        return {**super()._group_defaults(), "decoupled_weight_decay": False}
