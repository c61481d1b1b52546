"""SGD: a drop-in for torch.optim.SGD."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fused_optim.optimizer import FusedOptimizer, check_fused_flags
from fused_optim.spec import Hyper, SparseGrads, Spec, StateList


def sgd_reference(x: dict[str, Tensor], grad: Tensor, state: dict[str, Tensor], lr: Tensor,
                  h: dict[str, Any]) -> None:
    """One SGD step of one tensor in plain torch (see fused_optim/_reference.py)."""
    p, g = x["param"], grad
    opmath = p.dtype
    momentum = h["momentum"]
    if h["weight_decay"] != 0:
        g = g + h["weight_decay"] * p
    if "momentum_buffer" in x:
        if h["is_first_step"]:
            buf = g.clone()
        else:
            buf = x["momentum_buffer"] * momentum + (1 - h["dampening"]) * g
        g = g + momentum * buf if h["nesterov"] else buf
        x["momentum_buffer"] = buf
    x["param"] = p + (-lr).to(opmath) * g


def sgd_sparse_engine(group: dict[str, Any]) -> bool:
    """torch.optim.SGD's refusals of sparse grads; the row math runs plain SGD (no
    momentum), the class's torch path (_sparse_torch_step) the momentum buffer, which
    torch keeps as a sparse tensor."""
    if group.get("fused"):
        raise RuntimeError("`_fused_sgd` does not support sparse gradients")
    if group["weight_decay"] != 0:
        # torch's grad.add(param, alpha=weight_decay) with a sparse grad
        raise RuntimeError("add(sparse, dense) is not supported. Use add(dense, sparse) instead.")
    return group["momentum"] == 0


def sgd_sparse_constants(group: dict[str, Any], _state: dict[str, Any]) -> list[float]:
    """The row math's constant: -lr (a tensor lr read on the host, as torch.optim.SGD's
    sparse path does)."""
    lr = group["lr"]
    return [-(float(lr.item()) if isinstance(lr, Tensor) else lr)]


def sgd_sparse_reference(param: Tensor, grad: Tensor, _states: list[Tensor],
                         c: list[float]) -> None:
    """torch.optim.SGD's update of one param by a sparse grad (signed, uncoalesced):
    param.add_(grad, alpha=-lr), which adds each entry to its row in turn."""
    param.add_(grad, alpha=c[0])


def _is_nan(x: Any) -> bool:
    if isinstance(x, Tensor):
        return bool(torch.isnan(x).any())
    return isinstance(x, float) and math.isnan(x)


class SGD(FusedOptimizer):
    r"""Implements stochastic gradient descent (optionally with momentum), with every
    bucket of tensors updated by one fused kernel call.

    The numbers, arguments, defaults, validation errors and state (``momentum_buffer``
    when momentum is non-zero) are those of :class:`torch.optim.SGD`, and
    ``state_dict()`` loads both ways with it. Unlike torch.optim.SGD, a NaN lr, momentum,
    dampening or weight_decay is rejected. Sparse gradients (``nn.Embedding(sparse=True)``)
    are stepped as torch.optim.SGD steps them: by the row-sparse engine without momentum,
    in torch's own sparse ops with it (torch keeps a sparse momentum buffer).

    .. math::
       \begin{aligned}
            & g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1}      \\
            & b_t \leftarrow g_t \text{ (first step)}, \quad
              b_t \leftarrow \mu b_{t-1} + (1-\tau) g_t \text{ (later steps)}             \\
            & g_t \leftarrow g_t + \mu b_t \text{ if nesterov, else } b_t
              \qquad \theta_t \leftarrow \theta_{t-1} - \gamma g_t
       \end{aligned}

    Args:
        {params}
        lr (float or Tensor, optional): learning rate (default: 1e-3).
        momentum (float, optional): momentum factor (default: 0).
        dampening (float, optional): dampening for momentum (default: 0).
        weight_decay (float, optional): L2 penalty (default: 0).
        nesterov (bool, optional): Nesterov momentum (default: False).
        {maximize}
        {flags}
        {differentiable}
        {backend}
        {policy}

    Example:
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()

    References: Sutskever et al., "On the importance of initialization and momentum in
    deep learning" (2013).
    """

    _memory_policy = True

    spec = Spec(
        name="sgd",
        lists=(StateList("momentum_buffers", "momentum_buffer", when="momentum"),),
        scalars=(),
        hypers=(Hyper("momentum"), Hyper("dampening"), Hyper("weight_decay"),
                Hyper("nesterov", bool), Hyper("maximize", bool),
                Hyper("is_first_step", bool, group_key="")),
        reference=sgd_reference,
        bench={"momentum": 0.9},
        sparse=SparseGrads(only=False, math="sgd", states=(), coalesce=False,
                           constants=sgd_sparse_constants, reference=sgd_sparse_reference,
                           engine=sgd_sparse_engine),
    )
    _foreach_rejects_differentiable = False  # torch.optim.SGD's foreach path has no check

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        # torch.optim.SGD's checks and messages; NaN is rejected with the same messages.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0 or _is_nan(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0 or _is_nan(momentum):
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0 or _is_nan(weight_decay):
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if _is_nan(dampening):
            raise ValueError(f"Invalid dampening value: {dampening}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_fused_flags(fused, foreach, differentiable)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype,
                         master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding)

    def _group_defaults(self) -> dict[str, Any]:
        # torch.optim.SGD's __setstate__ defaults fused to False (the others to None).
        return {**super()._group_defaults(), "nesterov": False, "fused": False}

    def _check_loaded_state(self, group, p, state, where) -> None:
        # torch.optim.SGD may save momentum_buffer=None for a param that never stepped.
        if state.get("momentum_buffer", 0) is None:
            del state["momentum_buffer"]
            if not state:
                return
        super()._check_loaded_state(group, p, state, where)

    def _sparse_torch_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """torch.optim.SGD's single-tensor step of params with sparse grads and momentum:
        the momentum buffer starts as a (sparse) copy of the grad and stays sparse.
        (GradScaler's unscale and skip ran before: fused_optim/_sparse.py.)"""
        lr = -sgd_sparse_constants(group, {})[0]
        momentum, dampening = group["momentum"], group["dampening"]
        for p in params:
            grad = -p.grad if group["maximize"] else p.grad
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
            p.add_(grad, alpha=-lr)

    def _split_call(self, group, lists, states, hyper, new_rows):
        if lists[2] and any(b.is_sparse for b in lists[2]):
            # A buffer made sparse by a sparse grad (torch keeps it so); torch's
            # buf.mul_(momentum).add_(dense grad) then raises this.
            raise RuntimeError("add(sparse, dense) is not supported. Use add(dense, sparse) "
                               "instead.")
        return self._split_first_step(group, lists, states, hyper, new_rows)

    def _split_first_step(self, group, lists, states, hyper, new_rows):
        """A momentum buffer is created on its param's first step as a copy of the
        (decayed) grad, as torch.optim.SGD does: the kernels take that as a flag
        (is_first_step), so the rows whose buffer this step created and the others go in
        separate calls (both only when params gain grads mid-training)."""
        if not new_rows:
            return [(lists, states, hyper)]
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and hyper["dampening"] != 0.0:
            # A skipped first step (GradScaler found an inf) must leave the params
            # without a buffer, as torch.optim.SGD never steps then: a zero buffer
            # would make the next step b = (1 - dampening) * g instead of b = g.
            # (With dampening 0 the two agree, so no sync there.) This reads
            # found_inf on the host, once, on a param's first step only; the calls
            # below then change nothing.
            if bool(found_inf.reshape(()).item() != 0):
                for i in new_rows:
                    del self.state[lists[0][i]]["momentum_buffer"]
        first = {**hyper, "is_first_step": True}
        if len(new_rows) == len(lists[0]):
            return [(lists, states, first)]
        new = set(new_rows)
        later = [i for i in range(len(lists[0])) if i not in new]
        return [(self._rows(lists, new_rows), self._rows(states, new_rows), first),
                (self._rows(lists, later), self._rows(states, later), hyper)]
