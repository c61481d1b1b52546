"""SparseAdam: a drop-in for torch.optim.SparseAdam."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fused_optim.optimizer import FusedOptimizer, check_betas
from fused_optim.spec import Hyper, SparseGrads, Spec, StateList


def sparse_adam_constants(group: dict[str, Any], state: dict[str, Any]) -> list[float]:
    """Advances the param's step (a Python int, as torch.optim.SparseAdam keeps it) and
    returns the row math's constants: 1 - beta1, 1 - beta2, eps, -step_size, each as
    torch.optim computes it (in Python floats; with a tensor lr, step_size in lr's
    dtype, read on the host as torch's Scalar conversion reads it)."""
    state["step"] = state.get("step", 0) + 1
    step = state["step"]
    beta1, beta2 = group["betas"]
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    # torch's expression: with a tensor lr, tensor arithmetic in lr's dtype.
    step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1
    if isinstance(step_size, Tensor):
        step_size = step_size.item()
    return [1 - beta1, 1 - beta2, group["eps"], -step_size]


def sparse_adam_reference(param: Tensor, grad: Tensor, states: list[Tensor],
                          c: list[float]) -> None:
    """torch.optim's sparse_adam on one param (grad signed, uncoalesced): the moments and
    the param change at the grad's rows only. Each op rounds to the param's dtype."""
    exp_avg, exp_avg_sq = states
    one_minus_beta1, one_minus_beta2, eps, neg_step_size = c
    grad = grad.coalesce()  # the update is non-linear: the indices must be unique
    indices, values = grad._indices(), grad._values()
    if values.numel() == 0:
        return
    size = grad.size()

    def make_sparse(v: Tensor) -> Tensor:
        return torch.sparse_coo_tensor(indices, v, size)

    old_exp_avg = exp_avg.sparse_mask(grad)._values()
    exp_avg_update = values.sub(old_exp_avg).mul_(one_minus_beta1)
    exp_avg.add_(make_sparse(exp_avg_update))
    old_exp_avg_sq = exp_avg_sq.sparse_mask(grad)._values()
    exp_avg_sq_update = values.pow(2).sub_(old_exp_avg_sq).mul_(one_minus_beta2)
    exp_avg_sq.add_(make_sparse(exp_avg_sq_update))
    numer = exp_avg_update.add_(old_exp_avg)
    denom = exp_avg_sq_update.add_(old_exp_avg_sq).sqrt_().add_(eps)
    param.add_(make_sparse(neg_step_size * numer.div_(denom)))


def _unused_dense_reference(*_args: Any) -> None:
    raise RuntimeError("SparseAdam does not support dense gradients, please consider Adam instead")


class SparseAdam(FusedOptimizer):
    r"""Implements the masked Adam of :class:`torch.optim.SparseAdam` for sparse
    gradients (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``): the
    moments and the param change at the rows a step's gradient touches only.

    Every bucket of sparse params is one call of the row-sparse engine: the duplicate
    indices are summed in parallel (in the order torch's ``coalesce()`` sums them), and
    one pass over the touched rows of every param reads each row's moments, updates
    them and the param, and writes them back. The numbers, arguments, defaults,
    validation errors (dense gradients, sparse or complex params) and state (``step``, a
    Python int, ``exp_avg``, ``exp_avg_sq``) are torch.optim.SparseAdam's, and
    ``state_dict()`` loads both ways with it.

    .. math::
       \begin{aligned}
            & \text{for each row } r \text{ of } g_t: \quad
              m_r \leftarrow m_r + (1 - \beta_1)(g_r - m_r), \quad
              v_r \leftarrow v_r + (1 - \beta_2)(g_r^2 - v_r)                    \\
            & \theta_r \leftarrow \theta_r - \gamma
              \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\, \frac{m_r}{\sqrt{v_r} + \epsilon}
       \end{aligned}

    Args:
        {params}
        lr (float or Tensor, optional): learning rate (default: 1e-3).
        betas (Tuple[float, float], optional): coefficients of the running averages of
            the gradient and its square (default: (0.9, 0.999)).
        eps (float, optional): added to the denominator (default: 1e-8).
        {maximize}
        {backend}

    Example:
        >>> emb = torch.nn.Embedding(1000, 16, sparse=True)
        >>> opt = SparseAdam(emb.parameters(), lr=1e-2)
        >>> emb(torch.randint(0, 1000, (64,))).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    spec = Spec(
        name="sparse_adam",
        lists=(StateList("exp_avgs", "exp_avg"), StateList("exp_avg_sqs", "exp_avg_sq")),
        scalars=(),
        hypers=(Hyper("beta1", group_key="betas", index=0),
                Hyper("beta2", group_key="betas", index=1), Hyper("eps"),
                Hyper("maximize", bool)),
        reference=_unused_dense_reference,
        sparse=SparseGrads(
            only=True, math="sparse_adam", states=("exp_avg", "exp_avg_sq"), coalesce=True,
            constants=sparse_adam_constants, reference=sparse_adam_reference,
            dense_error="SparseAdam does not support dense gradients, please consider Adam "
                        "instead"),
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        # torch.optim.SparseAdam's checks and messages, in its order.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        check_betas(betas)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "maximize": maximize}
        super().__init__(params, defaults, backend=backend)
        sparse_params, complex_params = [], []
        for index, group in enumerate(self.param_groups):
            for d_index, p in enumerate(group["params"]):
                if p.is_sparse:
                    sparse_params.append([index, d_index])
                if p.is_complex():
                    complex_params.append([index, d_index])
        if sparse_params:
            raise ValueError(f"Sparse params at indices {sparse_params}: SparseAdam requires "
                             "dense parameter tensors")
        if complex_params:
            raise ValueError(f"Complex params at indices {complex_params}: SparseAdam does not "
                             "support complex parameters")

    _host_state_keys = ("step",)

    def _state_keys(self, group: dict[str, Any], p=None) -> list[str]:
        return ["step", *super()._state_keys(group, p)]

    def _check_loaded_state(self, group, p, state, where) -> None:
        super()._check_loaded_state(group, p, state, where)
        if isinstance(state["step"], Tensor):  # step is a Python int in torch.optim.SparseAdam
            state["step"] = int(state["step"].item())
