"""SGD: a drop-in for torch.optim.SGD."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fused_optim.optimizer import _BACKEND_DOC, FusedOptimizer


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
    dampening or weight_decay is rejected, and sparse gradients raise (use torch.optim.SGD
    for those).

    .. math::
       \begin{aligned}
            & g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1}      \\
            & b_t \leftarrow g_t \text{ (first step)}, \quad
              b_t \leftarrow \mu b_{t-1} + (1-\tau) g_t \text{ (later steps)}             \\
            & g_t \leftarrow g_t + \mu b_t \text{ if nesterov, else } b_t
              \qquad \theta_t \leftarrow \theta_{t-1} - \gamma g_t
       \end{aligned}

    Args:
        params (iterable): parameters or param groups to optimize.
        lr (float or Tensor, optional): learning rate (default: 1e-3).
        momentum (float, optional): momentum factor (default: 0).
        dampening (float, optional): dampening for momentum (default: 0).
        weight_decay (float, optional): L2 penalty (default: 0).
        nesterov (bool, optional): Nesterov momentum (default: False).
        maximize (bool, optional): maximize the objective (default: False).
        foreach, fused (optional): accepted for torch.optim compatibility and kept in the
            param groups; every fused_optim step is fused.
        differentiable (bool, optional): must be False.
        {backend}

    Example:
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()

    References: Sutskever et al., "On the importance of initialization and momentum in
    deep learning" (2013).
    """

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
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if differentiable:
            raise RuntimeError(
                "fused_optim.SGD does not support differentiable=True: its kernels are not "
                "differentiable; use torch.optim.SGD"
            )
        super().__init__(params, defaults, backend=backend)

    def _group_defaults(self) -> dict[str, Any]:
        return {
            "nesterov": False,
            "maximize": False,
            "foreach": None,
            "differentiable": False,
            "fused": None,
        }

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        return ["momentum_buffer"] if group["momentum"] != 0 else []

    def _check_loaded_state(self, group, p, state, where) -> None:
        # torch.optim.SGD may save momentum_buffer=None for a param that never stepped.
        if state.get("momentum_buffer", 0) is None:
            del state["momentum_buffer"]
            if not state:
                return
        super()._check_loaded_state(group, p, state, where)

    def _init_group(self, group, params, grads, momentum_buffer_list) -> bool:
        """Fills the lists with the group's params that have grads; momentum buffers are
        None until a param's first step, as in torch.optim.SGD."""
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "fused_optim.SGD does not support sparse gradients; "
                    "use torch.optim.SGD for sparse gradients"
                )
            params.append(p)
            grads.append(p.grad)
            if group["momentum"] != 0:
                momentum_buffer_list.append(self.state[p].get("momentum_buffer"))
        return False

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and
                returns the loss.
        """
        loss = self._evaluate_closure(closure)
        for group in self.param_groups:
            hyper = dict(
                momentum=float(group["momentum"]),
                dampening=float(group["dampening"]),
                weight_decay=float(group["weight_decay"]),
                nesterov=bool(group["nesterov"]),
                maximize=bool(group["maximize"]),
            )
            # Every buffer exists (or none is needed): one call from C++. A param's first
            # momentum step takes the path below.
            if self._step_group_eager(group, "sgd_", **hyper):
                continue
            params, grads, momentum_buffer_list = [], [], []
            self._init_group(group, params, grads, momentum_buffer_list)
            if not params:
                continue
            if group["momentum"] == 0:
                self._run_buckets(group, "sgd_", [params, grads, []], [],
                                  is_first_step=False, **hyper)
                continue
            # A buffer's first step copies the gradient into it (torch.optim.SGD's
            # clone): the kernels take that as a flag, so new and existing buffers go in
            # separate calls (both only when params gain grads mid-training).
            first = [i for i, b in enumerate(momentum_buffer_list) if b is None]
            for i in first:
                buf = torch.zeros_like(params[i], memory_format=torch.preserve_format)
                momentum_buffer_list[i] = buf
                self.state[params[i]]["momentum_buffer"] = buf
            first_set = set(first)
            later = [i for i in range(len(params)) if i not in first_set]
            for indices, is_first in ((first, True), (later, False)):
                if not indices:
                    continue
                if len(indices) == len(params):
                    lists = [params, grads, momentum_buffer_list]
                else:
                    lists = [[lst[i] for i in indices]
                             for lst in (params, grads, momentum_buffer_list)]
                self._run_buckets(group, "sgd_", lists, [], is_first_step=is_first, **hyper)
            found_inf = getattr(self, "found_inf", None)
            if first and found_inf is not None and hyper["dampening"] != 0.0:
                # A skipped first step (GradScaler found an inf) must leave the params
                # without a buffer, as torch.optim.SGD never steps then: a zero buffer
                # would make the next step b = (1 - dampening) * g instead of b = g.
                # (With dampening 0 the two agree, so no sync there.) This reads
                # found_inf on the host, once, on a param's first step only.
                if bool(found_inf.reshape(()).item() != 0):
                    for i in first:
                        del self.state[params[i]]["momentum_buffer"]
        return loss


SGD.__doc__ = SGD.__doc__.replace("{backend}", _BACKEND_DOC)
