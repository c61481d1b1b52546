"""Adagrad: a drop-in for torch.optim.Adagrad."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_optim._reference import lr_div
from fused_optim.optimizer import FusedOptimizer, check_fused_flags, check_lr
from fused_optim.spec import Hyper, ScalarState, SparseGrads, Spec, StateList


def adagrad_reference(x: dict[str, Tensor], grad: Tensor, state: dict[str, Tensor], lr: Tensor,
                      h: dict[str, Any]) -> None:
    """One Adagrad step of one tensor in plain torch (see fused_optim/_reference.py); the
    kernels' math (math/adagrad.h, triton_kernels/math.py) follows it op by op."""
    p, g = x["param"], grad
    if h["weight_decay"] != 0:
        g = g + h["weight_decay"] * p
    step = state["step"] + 1
    clr = lr_div(lr, 1 + (step.to(torch.float64) - 1) * h["lr_decay"])
    state_sum = x["sum"] + g * g
    std = state_sum.sqrt() + h["eps"]
    x["param"] = p + ((-clr).to(p.dtype) * g) / std
    x["sum"] = state_sum
    state["step"] = step


def adagrad_sparse_engine(group: dict[str, Any]) -> bool:
    """torch.optim.Adagrad's refusals of sparse grads; the row math runs every other case."""
    if group.get("fused"):
        raise RuntimeError("`fused` does not support sparse grad or complex param")
    if group["weight_decay"] != 0:
        raise RuntimeError("weight_decay option is not compatible with sparse gradients")
    return True


def adagrad_sparse_constants(group: dict[str, Any], state: dict[str, Any]) -> list[float]:
    """Advances the param's step and returns the row math's constants, eps and -clr, as
    torch.optim.Adagrad computes them (its sparse path reads the step on the host)."""
    state["step"] += 1
    step = state["step"].item()
    # torch's expression: with a tensor lr, tensor arithmetic in lr's dtype.
    clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
    if isinstance(clr, Tensor):
        clr = clr.item()
    return [group["eps"], -clr]


def adagrad_sparse_reference(param: Tensor, grad: Tensor, states: list[Tensor],
                             c: list[float]) -> None:
    """torch.optim.Adagrad's sparse update of one param (grad signed, uncoalesced): the
    sums and the param change at the grad's rows only. Each op rounds to the param's
    dtype."""
    (state_sum,) = states
    eps, neg_clr = c
    grad = grad.coalesce()  # the update is non-linear: the indices must be unique
    indices, values = grad._indices(), grad._values()
    state_sum.add_(torch.sparse_coo_tensor(indices, values.pow(2), grad.size()))
    std_values = state_sum.sparse_mask(grad)._values().sqrt_().add_(eps)
    param.add_(torch.sparse_coo_tensor(indices, values / std_values, grad.size()), alpha=neg_clr)


class Adagrad(FusedOptimizer):
    r"""Implements Adagrad, with every bucket of tensors updated by one fused kernel call.

    The numbers, arguments, defaults, validation errors and state (``step``, ``sum``,
    created for every param at construction, as torch does) are those of
    :class:`torch.optim.Adagrad`, and ``state_dict()`` loads both ways with it. Sparse
    gradients (``nn.Embedding(sparse=True)``) are stepped by the row-sparse engine at the
    rows they touch, as torch.optim.Adagrad steps them (without weight decay, which
    torch refuses with them).

    .. math::
       \begin{aligned}
            & g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1}
              \qquad \tilde\gamma \leftarrow \gamma / (1 + (t - 1)\eta)              \\
            & s_t \leftarrow s_{t-1} + g_t^2 \quad (s_0 = \tau) \qquad
              \theta_t \leftarrow \theta_{t-1} - \tilde\gamma\, g_t / (\sqrt{s_t} + \epsilon)
       \end{aligned}

    with :math:`s` the ``sum`` state, :math:`\tau` the initial accumulator value and
    :math:`\eta` the lr decay.

    Args:
        {params}
        lr (float or Tensor, optional): learning rate (default: 1e-2).
        lr_decay (float, optional): learning rate decay (default: 0).
        weight_decay (float, optional): L2 penalty (default: 0).
        initial_accumulator_value (float, optional): initial value of every ``sum``
            (default: 0); as in torch.optim, the constructor's value applies to every
            group.
        eps (float, optional): added to the denominator (default: 1e-10).
        {flags}
        {maximize}
        {differentiable}
        {backend}
        {policy}

    Example:
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = Adagrad(model.parameters(), lr=0.1)
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()

    References: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning
    and Stochastic Optimization" (JMLR 2011).
    """

    _memory_policy = True

    spec = Spec(
        name="adagrad",
        lists=(StateList("state_sums", "sum", init="initial_accumulator_value"),),
        scalars=(ScalarState("state_steps", "step"),),
        hypers=(Hyper("lr_decay"), Hyper("weight_decay"), Hyper("eps"),
                Hyper("maximize", bool)),
        reference=adagrad_reference,
        state_at_init=True,
        sparse=SparseGrads(only=False, math="adagrad", states=("sum",), coalesce=True,
                           constants=adagrad_sparse_constants,
                           reference=adagrad_sparse_reference, engine=adagrad_sparse_engine),
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        # The checks and messages of torch.optim.Adagrad, in its order.
        check_lr(lr)
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(
                f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        check_fused_flags(fused, foreach, differentiable)
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding)

    def share_memory(self) -> None:
        """Moves every ``sum`` state to shared memory, as torch.optim.Adagrad does."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

