"""Adam and AdamW: drop-ins for torch.optim.Adam / torch.optim.AdamW."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_optim._reference import lr_div, weight_decayed
from fused_optim.optimizer import (
    FusedOptimizer,
    check_eps_betas_weight_decay,
    check_fused_flags,
)
from fused_optim.spec import Hyper, ScalarState, Spec, StateList


def _to_scalar(x: Any) -> Any:
    # As torch.optim: a one-element tensor hyperparameter becomes a 0-dim tensor.
    if isinstance(x, Tensor) and x.dim() != 0:
        return x.squeeze()
    return x


def adam_reference(x: dict[str, Tensor], grad: Tensor, state: dict[str, Tensor], lr: Tensor,
                   h: dict[str, Any]) -> None:
    """One Adam step of one tensor in plain torch (see fused_optim/_reference.py); the
    kernels' math (math/adam.h, triton_kernels/math.py) follows it op by op."""
    p, g, m, v = x["param"], grad, x["exp_avg"], x["exp_avg_sq"]
    opmath = p.dtype
    beta1, beta2, eps = h["beta1"], h["beta2"], h["eps"]
    p, g = weight_decayed(p, g, lr, h)
    m = torch.lerp(m, g, 1 - beta1)
    v = v * beta2 + (1 - beta2) * (g * g)
    second_moment = v
    if "max_exp_avg_sq" in x:
        x["max_exp_avg_sq"] = second_moment = torch.maximum(x["max_exp_avg_sq"], v)
    step = state["step"] + 1
    step64 = step.to(torch.float64)
    bias_correction1 = 1 - beta1**step64
    bias_correction2 = 1 - beta2**step64
    neg_step_size = (-lr_div(lr, bias_correction1)).to(opmath)
    # torch.optim divides by sqrt(1 - beta2^t); the kernels multiply by its
    # reciprocal, computed in double (one division less per element, <= 1 ulp).
    inv_bias_correction2_sqrt = (1 / bias_correction2.sqrt()).to(opmath)
    denom = second_moment.sqrt() * inv_bias_correction2_sqrt + eps
    x["param"] = p + neg_step_size * (m / denom)
    x["exp_avg"], x["exp_avg_sq"] = m, v
    state["step"] = step


class Adam(FusedOptimizer):
    r"""Implements Adam, with every bucket of tensors updated by one fused kernel call.

    The numbers, arguments, defaults, validation errors and state (``step``,
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) are those of
    :class:`torch.optim.Adam`, and ``state_dict()`` loads both ways with it.

    .. math::
       \begin{aligned}
            & g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
              \;(\textbf{+}\lambda\theta_{t-1}\text{ unless decoupled})
              \qquad \theta_{t-1} \leftarrow \theta_{t-1}(1-\gamma\lambda)
              \text{ if decoupled}                                                    \\
            & m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \qquad
              v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \qquad
              v_t^{max} \leftarrow \max(v_{t-1}^{max}, v_t) \text{ if amsgrad}         \\
            & \theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1-\beta_1^t} \,
              m_t \Big/ \Big(\sqrt{v_t^{(max)}} \big/ \sqrt{1-\beta_2^t} + \epsilon\Big)
       \end{aligned}

    Args:
        {params}
        lr (float or Tensor, optional): learning rate (default: 1e-3). A tensor lr on the
            params' device keeps a compiled or CUDA-graph-captured step valid as it changes.
        betas (Tuple[float, float], optional): coefficients of the running averages of
            the gradient and its square (default: (0.9, 0.999)).
        eps (float, optional): added to the denominator (default: 1e-8).
        weight_decay (float, optional): weight decay (default: 0).
        amsgrad (bool, optional): use the AMSGrad variant (default: False).
        {flags}
        {maximize}
        {differentiable}
        decoupled_weight_decay (bool, optional): AdamW's decoupled decay (default: False).
        {backend}
        {policy}

    Example:
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = Adam(model.parameters(), lr=1e-3)
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()

    References: Kingma & Ba, "Adam: A Method for Stochastic Optimization" (2014);
    Reddi et al., "On the Convergence of Adam and Beyond" (2018);
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2017).
    """

    _memory_policy = True

    spec = Spec(
        name="adam",
        lists=(StateList("exp_avgs", "exp_avg"), StateList("exp_avg_sqs", "exp_avg_sq"),
               StateList("max_exp_avg_sqs", "max_exp_avg_sq", when="amsgrad")),
        scalars=(ScalarState("state_steps", "step"),),
        hypers=(Hyper("beta1", float, "betas", 0), Hyper("beta2", float, "betas", 1),
                Hyper("weight_decay"), Hyper("eps"), Hyper("amsgrad", bool),
                Hyper("maximize", bool), Hyper("decoupled_weight_decay", bool)),
        reference=adam_reference,
    )
    _sparse_error = "Adam does not support sparse gradients, please consider SparseAdam instead"
    _foreach_capturable_first = True

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        # The checks and messages of torch.optim.Adam, in its order.
        if isinstance(lr, Tensor):
            if foreach and not capturable:
                raise ValueError(
                    "lr as a Tensor is not supported for capturable=False and foreach=True"
                )
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        check_eps_betas_weight_decay(eps, betas, weight_decay)
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        for index, beta in enumerate(betas):
            if isinstance(beta, Tensor):
                if not capturable and foreach:
                    raise ValueError(
                        f"betas[{index}] as a Tensor is not supported for capturable=False "
                        "and foreach=True"
                    )
                if beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{index}] must be 1-element")
        check_fused_flags(fused, foreach, differentiable)
        betas = tuple(map(_to_scalar, betas))
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding)

    def _group_defaults(self) -> dict[str, Any]:
        return {**super()._group_defaults(), "amsgrad": False, "decoupled_weight_decay": False}


class AdamW(Adam):
    r"""Implements AdamW: Adam with decoupled weight decay (default 1e-2).

    A drop-in for :class:`torch.optim.AdamW`; see :class:`Adam` for the algorithm, the
    arguments and the state.

    Example:
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            backend=backend,
            state_dtype=state_dtype,
            master_weights=master_weights,
            stochastic_rounding=stochastic_rounding,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        # As torch.optim.AdamW: loading any state keeps the decay decoupled.
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

