"""Adafactor: a drop-in for torch.optim.Adafactor, on the factored-moment engine."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fused_optim._factored import engine_for
from fused_optim.optimizer import (
    FusedOptimizer,
    _check_backend_name,
    _lr_tensor,
    _scalar_dtype,
)


class Adafactor(FusedOptimizer):
    r"""Implements Adafactor, with the per-tensor reductions its update needs (the
    param's RMS, the row and column means of the squared gradient, the update's RMS)
    computed on the params' device for every tensor of a (device, dtype) bucket at once:
    no host sync in a step, three passes over each gradient
    (fused_optim/_factored.py).

    The numbers, arguments, defaults, validation errors and state (``step``,
    ``row_var`` / ``col_var`` for params of 2+ dims, ``variance`` for the others) are
    those of :class:`torch.optim.Adafactor`, and ``state_dict()`` loads both ways with
    it. ``step`` is kept on the param's device (torch keeps it on the CPU), so a GPU
    step never waits for the host.

    .. math::
       \begin{aligned}
            & G_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}), \quad
              \widehat\beta_{2_t} \leftarrow 1 - t^{\tau}, \quad
              \rho_t \leftarrow \min(\gamma, 1/\sqrt t), \quad
              \alpha_t \leftarrow \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\rho_t     \\
            & \theta_t \leftarrow \theta_{t-1}(1 - \gamma\lambda)                         \\
            & \text{dim} > 1: \; R_t \leftarrow \mathrm{lerp}(R_{t-1},
              \mathrm{mean}_{-1}(G_t^2), 1-\widehat\beta_{2_t}), \;
              C_t \leftarrow \mathrm{lerp}(C_{t-1}, \mathrm{mean}_{-2}(G_t^2),
              1-\widehat\beta_{2_t}), \;
              \widehat V_t \leftarrow R_t C_t / \max(\mathrm{mean}_{-2}(R_t), \epsilon_1) \\
            & \text{else}: \; \widehat V_t \leftarrow \mathrm{lerp}(\widehat V_{t-1},
              G_t^2, 1-\widehat\beta_{2_t})                                              \\
            & U_t \leftarrow G_t / \sqrt{\max(\widehat V_t, \epsilon_1^2)}, \quad
              \theta_t \leftarrow \theta_t - \alpha_t\, U_t / \max(1, \mathrm{RMS}(U_t)/d)
       \end{aligned}

    Args:
        {params}
        lr (float or Tensor, optional): the largest relative step size rho_t, and the
            weight decay's coefficient (default: 1e-2).
        beta2_decay (float, optional): the decay rate of beta2 (default: -0.8).
        eps (Tuple[float or None, float], optional): epsilon1, the floor of the second
            moment estimate (None: the params' dtype's machine epsilon), and epsilon2,
            the floor of the param's RMS (default: (None, 1e-3)).
        d (float, optional): the clipping threshold of the update's RMS (default: 1.0).
        weight_decay (float, optional): weight decay coefficient (default: 0.0).
        foreach (bool, optional): accepted and kept in the param groups, as torch.optim
            takes it; every fused_optim step is fused and needs no host sync.
        {maximize}
        {backend}

    Example:
        >>> model = torch.nn.Linear(64, 32)
        >>> opt = Adafactor(model.parameters(), lr=1e-2)
        >>> model(torch.randn(8, 64)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()

    Reference: Shazeer and Stern, "Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost" (https://arxiv.org/abs/1804.04235), as torch.optim.Adafactor states it.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        backend: str = "auto",
    ) -> None:
        # torch.optim.Adafactor's checks and messages, in its order.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 >= beta2_decay:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        if eps[0] is not None and not 0.0 <= eps[0]:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not 0.0 <= eps[1]:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not 1.0 <= d:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}")
        _check_backend_name(backend)
        defaults = {"lr": lr, "beta2_decay": beta2_decay, "eps": eps, "d": d,
                    "weight_decay": weight_decay, "foreach": foreach, "maximize": maximize,
                    "backend": backend}
        # torch.optim's constructor: no spec-driven state (the factors are not shaped like
        # the params), and GradScaler unscales and checks found_inf itself, as it does for
        # torch.optim.Adafactor (whose step refuses grad_scale / found_inf).
        Optimizer.__init__(self, params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        Optimizer.__setstate__(self, state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("backend", "auto")
            if "differentiable" in self.defaults:  # torch.optim.Optimizer adds it
                group.setdefault("differentiable", False)
            for p in group["params"]:
                p_state = self.state.get(p, [])
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=_scalar_dtype())

    # -- state ---------------------------------------------------------------------------

    def _state_keys(self, group: dict[str, Any], p: Tensor | None = None) -> list[str]:
        if p is not None and p.dim() > 1:
            return ["step", "row_var", "col_var"]
        return ["step", "variance"]

    def _check_loaded_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                            where: str) -> None:
        expected = self._state_keys(group, p)
        missing = [k for k in expected if k not in state]
        if missing:
            raise ValueError(
                f"Adafactor.load_state_dict: the state of {where} has keys {sorted(state)} "
                f"but Adafactor needs {expected} (missing {missing}); is the state_dict "
                "from another optimizer?")
        step = state["step"]
        if not isinstance(step, Tensor):
            step = torch.tensor(float(step), dtype=_scalar_dtype())
        dtype = step.dtype if step.dtype in (torch.float32, torch.float64) else torch.float32
        state["step"] = step.to(device=p.device, dtype=dtype)
        shapes = {"variance": tuple(p.shape)}
        if p.dim() > 1:
            shapes = {"row_var": (*p.shape[:-1], 1), "col_var": (*p.shape[:-2], 1, p.shape[-1])}
        for key, shape in shapes.items():
            value = state[key]
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"Adafactor.load_state_dict: state {key!r} of {where} has "
                                 f"shape {got} but {shape} was expected for a param of shape "
                                 f"{tuple(p.shape)}")
            if not value.is_contiguous():
                state[key] = value.contiguous()

    def _create_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                      hyper: dict[str, Any] | None = None) -> None:
        """torch.optim.Adafactor's state, with the step on the param's device."""
        grad = p.grad
        state["step"] = torch.tensor(0.0, dtype=_scalar_dtype(), device=p.device)
        if grad.dim() > 1:
            row_shape = list(grad.shape)
            row_shape[-1] = 1
            state["row_var"] = grad.new_zeros(row_shape)
            col_shape = list(grad.shape)
            col_shape[-2] = 1
            state["col_var"] = grad.new_zeros(col_shape)
        else:
            state["variance"] = torch.zeros_like(grad, memory_format=torch.preserve_format)

    # -- the step ------------------------------------------------------------------------

    def _step_group(self, group: dict[str, Any]) -> None:
        params = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("Adafactor does not support complex parameters")
            if p.grad.is_sparse:
                raise RuntimeError("Adafactor does not support sparse gradients")
            params.append(p)
        if not params:
            return
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                self._create_state(group, p, state)
        eps1, eps2 = group["eps"]
        if eps1 is None:
            # torch's for-loop takes the dtype of the group's first param with a grad
            # for every param of the group.
            eps1 = torch.finfo(params[0].dtype).eps
        # Buckets by (device, dtype, compiled engine or reference): factored params first.
        buckets: dict[tuple, list[Tensor]] = {}
        for p in params:
            state = self.state[p]
            factored = "row_var" in state
            tensors = [p, p.grad, state["step"]]
            if factored:
                tensors += [state["row_var"], state["col_var"]]
            else:
                tensors.append(state["variance"])
            dense = all(t.is_contiguous() for t in tensors)
            buckets.setdefault((p.device, p.dtype, dense), []).append(p)
        for (device, dtype, dense), bucket in buckets.items():
            _, engine = engine_for(group.get("backend", "auto"), device, dtype, dense)
            factored = [p for p in bucket if "row_var" in self.state[p]]
            vectors = [p for p in bucket if "row_var" not in self.state[p]]
            ordered = factored + vectors
            row_vars = [self.state[p]["row_var"] for p in factored]
            col_vars = [self.state[p]["col_var"] for p in factored]
            variances = [self.state[p]["variance"] for p in vectors]
            engine(
                ordered, [p.grad for p in ordered],
                row_vars, col_vars, variances,
                [self.state[p]["step"] for p in ordered],
                lr=_lr_tensor(group["lr"], device),
                beta2_decay=float(group["beta2_decay"]),
                eps1=float(eps1), eps2=float(eps2), d=float(group["d"]),
                weight_decay=float(group["weight_decay"]),
                maximize=bool(group["maximize"]),
            )
