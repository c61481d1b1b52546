"""Adam and AdamW: drop-ins for torch.optim.Adam / torch.optim.AdamW."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_optim.optimizer import _BACKEND_DOC, FusedOptimizer


def _to_scalar(x: Any) -> Any:
    # As torch.optim: a one-element tensor hyperparameter becomes a 0-dim tensor.
    if isinstance(x, Tensor) and x.dim() != 0:
        return x.squeeze()
    return x


def _as_float(x: Any) -> float:
    # Beta tensors are read once per step; on a GPU that is a sync, as in torch.optim's
    # non-capturable path. Floats (the common case) cost nothing.
    return float(x)


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
        params (iterable): parameters or param groups to optimize.
        lr (float or Tensor, optional): learning rate (default: 1e-3). A tensor lr on the
            params' device keeps a compiled or CUDA-graph-captured step valid as it changes.
        betas (Tuple[float, float], optional): coefficients of the running averages of
            the gradient and its square (default: (0.9, 0.999)).
        eps (float, optional): added to the denominator (default: 1e-8).
        weight_decay (float, optional): weight decay (default: 0).
        amsgrad (bool, optional): use the AMSGrad variant (default: False).
        foreach, fused, capturable (optional): accepted for torch.optim compatibility and
            kept in the param groups; every fused_optim step is fused and needs no host
            sync, so they change nothing.
        maximize (bool, optional): maximize the objective (default: False).
        differentiable (bool, optional): must be False; the fused kernels are not
            differentiable (use torch.optim for that).
        decoupled_weight_decay (bool, optional): AdamW's decoupled decay (default: False).
        {backend}

    Example:
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = Adam(model.parameters(), lr=1e-3)
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()

    References: Kingma & Ba, "Adam: A Method for Stochastic Optimization" (2014);
    Reddi et al., "On the Convergence of Adam and Beyond" (2018);
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2017).
    """

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
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
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
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if differentiable:
            raise RuntimeError(
                f"fused_optim.{type(self).__name__} does not support differentiable=True: "
                f"its kernels are not differentiable; use torch.optim.{type(self).__name__}"
            )
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
        super().__init__(params, defaults, backend=backend)

    def _group_defaults(self) -> dict[str, Any]:
        return {
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": False,
        }

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        keys = ["step", "exp_avg", "exp_avg_sq"]
        if group["amsgrad"]:
            keys.append("max_exp_avg_sq")
        return keys

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                    state_steps) -> None:
        """Fills the lists with the group's params that have grads and their state,
        creating the state on first use with torch.optim.Adam's keys and dtypes (the
        step counter on the param's device, as torch's fused Adam keeps it). This loop
        runs per param per step, so it is kept lean (complex params are found later,
        from the bucket's dtype)."""
        amsgrad = group["amsgrad"]
        state_of = self.state
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    "Adam does not support sparse gradients, please consider SparseAdam instead"
                )
            params.append(p)
            grads.append(grad)
            state = state_of[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if amsgrad:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and
                returns the loss.
        """
        loss = self._evaluate_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(
                beta1=_as_float(beta1),
                beta2=_as_float(beta2),
                weight_decay=float(group["weight_decay"]),
                eps=float(group["eps"]),
                amsgrad=bool(group["amsgrad"]),
                maximize=bool(group["maximize"]),
                decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            )
            if self._step_group_eager(group, "adam_", **hyper):
                continue
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = (
                [], [], [], [], [], []
            )
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                             state_steps)
            self._run_buckets(
                group,
                "adam_",
                [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs],
                [state_steps],
                **hyper,
            )
        return loss


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
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        # As torch.optim.AdamW: loading any state keeps the decay decoupled.
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


Adam.__doc__ = Adam.__doc__.replace("{backend}", _BACKEND_DOC)
