"""Muon: a drop-in for torch.optim.Muon, with same-shape params orthogonalized together.

A step of a param group runs, for all its params at once:

  1. momentum: one multi-tensor call, B <- lerp(B, g, 1 - momentum)
     (``torch._foreach_lerp_``, the kernel torch's ``buf.lerp_`` runs);
  2. per batch of params of one (device, dtype, shape): the update G (B, or
     lerp(g, B, momentum) with nesterov) written as bf16 into one [batch, m, n] tensor,
     then ONE batched Newton-Schulz run over it (fused_optim/_newton_schulz.py: a bmm /
     baddbmm per product instead of one mm / addmm per param);
  3. decay: one multi-tensor call per batch, p <- p * (1 - lr * weight_decay);
  4. update: one multi-tensor call per batch, p <- p - lr' O, with lr' torch's
     shape-adjusted lr (equal across a batch).

A batch is cut into chunks of at most _newton_schulz.MAX_BATCH_ELEMENTS elements, each
stepped (2-4) before the next is orthogonalized, so the extra memory is one chunk's.

Why torch's multi-tensor (foreach) ops and not the spec-driven engine for 1, 3 and 4: they
run the very kernels of torch's per-param code, so the numbers are torch's bit for bit
in every dtype, and they are a few percent of a step whose time is the Newton-Schulz
products (24 params of 1024 x 1024 fp32 on the 2-core dev CPU, under load: 65-90 ms of
element-wise work in a step of 2-9 s). Fusing them in the spec-driven engine would need
a list of another dtype (the bf16 update) and a per-param lr, concepts the spec does not
have yet, and rounding that follows torch's two separate ops (mul_, then add_).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fused_optim import _newton_schulz
from fused_optim._newton_schulz import chunks, newton_schulz_

__all__ = ["Muon"]

# torch.optim.Muon's defaults (those of Keller Jordan's Muon).
EPS = 1e-7
DEFAULT_A = 3.4445
DEFAULT_B = -4.7750
DEFAULT_C = 2.0315
DEFAULT_NS_STEPS = 5


def adjusted_lr(lr: float | Tensor, adjust_lr_fn: str | None, shape: torch.Size) -> float | Tensor:
    """lr scaled for a param of this shape, as torch.optim.Muon scales it: by
    sqrt(max(1, rows / cols)) ("original", the default), 0.2 sqrt(max(rows, cols))
    ("match_rms_adamw"), or 1."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        ratio = 1.0
    return lr * ratio


def _as_number(x: float | Tensor) -> float:
    """A hyperparameter as the Python number torch passes as an op's Scalar (a tensor's
    .item(): one host read)."""
    return x.item() if isinstance(x, Tensor) else x


class Muon(Optimizer):
    r"""Implements Muon (MomentUm Orthogonalized by Newton-Schulz) for 2-D params, with
    the Newton-Schulz iteration of all same-shape params run as one batched product.

    The numbers, arguments, defaults, validation errors and state (``momentum_buffer``)
    are those of :class:`torch.optim.Muon`, and ``state_dict()`` loads both ways with it.

    .. math::
       \begin{aligned}
            & g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
              \qquad B_t \leftarrow \mu B_{t-1} + (1 - \mu) g_t                          \\
            & \widetilde{B}_t \leftarrow (1 - \mu) g_t + \mu B_t \text{ if nesterov, else } B_t
              \qquad O_t \leftarrow \mathrm{NS}^{(a,b,c)}_k(\widetilde{B}_t;\ \varepsilon) \\
            & \theta_t \leftarrow (1 - \gamma\lambda)\,\theta_{t-1}
              - \gamma\,r(\mathrm{shape}(\theta))\, O_t
       \end{aligned}

    with :math:`B` the ``momentum_buffer`` state, :math:`\mathrm{NS}` :math:`k` steps of
    the quintic Newton-Schulz iteration in bf16 on :math:`\widetilde{B}_t / \max(\lVert
    \widetilde{B}_t\rVert_F, \varepsilon)` (transposed when it has more rows than
    columns), and :math:`r` the lr adjustment of ``adjust_lr_fn``: :math:`\sqrt{\max(1,
    A/B)}` ("original", the default) or :math:`0.2\sqrt{\max(A, B)}` ("match_rms_adamw")
    for an :math:`A \times B` param. As in torch.optim.Muon, a bf16 param's momentum
    buffer without nesterov is the iteration's input and is left divided by its norm.

    Args:
        {params} Muon takes 2-D params only (hidden layers' weights): step biases,
            embeddings and other params with another optimizer, such as AdamW.
        lr (float or Tensor, optional): learning rate (default: 1e-3).
        weight_decay (float, optional): decoupled weight decay (default: 0.1).
        momentum (float, optional): momentum factor (default: 0.95).
        nesterov (bool, optional): Nesterov momentum (default: True).
        ns_coefficients (tuple of three floats, optional): the coefficients (a, b, c) of
            the Newton-Schulz polynomial (default: (3.4445, -4.7750, 2.0315)).
        eps (float, optional): the least norm an update is divided by (default: 1e-7).
        ns_steps (int, optional): Newton-Schulz iterations, under 100 (default: 5).
        adjust_lr_fn (str, optional): "original" or "match_rms_adamw"; None means
            "original" (default: None).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False),
        ...                             torch.nn.Linear(16, 2, bias=False))
        >>> opt = Muon(model.parameters(), lr=0.02)
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()

    References: K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks"
    (2024), https://kellerjordan.github.io/posts/muon/ ; J. Liu et al., "Muon is Scalable
    for LLM Training" (2025), arXiv:2502.16982.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
        eps: float = EPS,
        ns_steps: int = DEFAULT_NS_STEPS,
        adjust_lr_fn: str | None = None,
    ) -> None:
        # torch.optim.Muon's checks, messages and order.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn is not None and adjust_lr_fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError("Muon only supports 2D parameters whereas we found a "
                                     f"parameter with size: {p.size()}")

    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    bufs: list[Tensor]) -> bool:
        """torch.optim.Muon's: the group's params with grads, their grads and momentum
        buffers (created as zeros like the grad on a param's first step)."""
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    p.grad, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        return False

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and
                returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            self._init_group(group, params, grads, bufs)
            if params:
                self._step_group(group, params, grads, bufs)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    bufs: list[Tensor]) -> None:
        coefficients, steps = group["ns_coefficients"], group["ns_steps"]
        # torch checks each grad, then (inside the iteration) its arguments, param by
        # param; here all before anything changes, raising what torch raises first.
        for i, g in enumerate(grads):
            if g.ndim != 2:
                raise ValueError("Param gradient must be a 2D matrix")
            if i == 0:
                _newton_schulz.check_arguments(coefficients, steps)
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.dim() != 0:
            lr = lr.squeeze()  # torch's _to_scalar: a tensor lr stays a (0-dim) tensor
        torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
        # Decoupled weight decay (always applied, as torch does: a multiplication by 1
        # without it), then the update, in torch's dtypes: with a tensor lr, 1 - lr * wd
        # is a tensor of lr's dtype and lr' a Python number read from one (one host
        # read per shape; torch reads it per param).
        decay = 1 - lr * group["weight_decay"]
        for rows in _batches(grads):
            shape = params[rows[0]].shape
            alpha = -_as_number(adjusted_lr(lr, group["adjust_lr_fn"], shape))
            # A chunk's params are stepped before the next chunk's update is computed:
            # extra memory stays one chunk's, whatever the model's size.
            for start, stop in chunks(len(rows), shape.numel()):
                part = rows[start:stop]
                update = self._orthogonalized([grads[i] for i in part],
                                              [bufs[i] for i in part], group)
                chunk = [params[i] for i in part]
                _decay_(chunk, decay)
                torch._foreach_add_(chunk, update, alpha=alpha)

    @staticmethod
    def _orthogonalized(grads: list[Tensor], bufs: list[Tensor],
                        group: dict[str, Any]) -> list[Tensor]:
        """The Newton-Schulz outputs (bf16) of a batch of same-shape params: the update
        (the buffer, or lerp(grad, buffer, momentum) with nesterov) cast to bf16 into one
        stacked tensor, then one batched iteration over it (or one per matrix where a
        batch would round otherwise: _newton_schulz.batch_is_exact)."""
        g0 = grads[0]
        x = torch.empty((len(grads), *g0.shape), dtype=torch.bfloat16, device=g0.device)
        slots = list(x.unbind(0))
        if group["nesterov"]:
            torch._foreach_copy_(slots, torch._foreach_lerp(grads, bufs, group["momentum"]))
        else:
            torch._foreach_copy_(slots, bufs)
        args = (group["ns_coefficients"], group["ns_steps"], group["eps"])
        if len(slots) > 1 and _newton_schulz.batch_is_exact(x.device, *g0.shape):
            out = list(newton_schulz_(x, *args).unbind(0))
        else:
            out = [newton_schulz_(slot, *args) for slot in slots]
        if not group["nesterov"]:
            # torch's iteration casts the buffer with .bfloat16(), which returns the
            # buffer itself when it is bf16, and then divides it by its norm in place:
            # so does this, for the same numbers.
            aliased = [i for i, b in enumerate(bufs) if b.dtype == torch.bfloat16]
            if aliased:
                torch._foreach_copy_([bufs[i] for i in aliased], [slots[i] for i in aliased])
        return out


def _decay_(params: list[Tensor], decay: float | Tensor) -> None:
    """p.mul_(decay) for every param, as torch's per-param ``mul_`` rounds it: in one
    multi-tensor call per dtype. (On the CPU, torch 2.13's ``_foreach_mul_`` with a
    Python scalar rounds the scalar to a bf16 / fp16 list's dtype first, and ``mul_``
    does not; given as a 0-dim float64 tensor, the scalar is rounded as ``mul_`` rounds
    it.)"""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, ps in by_dtype.items():
        if dtype.itemsize < 4 and not isinstance(decay, Tensor):
            torch._foreach_mul_(ps, torch.tensor(decay, dtype=torch.float64))
        else:
            torch._foreach_mul_(ps, decay)


def _batches(grads: list[Tensor]) -> list[list[int]]:
    """Indices of the rows grouped by (device, dtype, shape): one Newton-Schulz batch
    each."""
    batches: dict[tuple[torch.device, torch.dtype, torch.Size], list[int]] = {}
    for i, g in enumerate(grads):
        batches.setdefault((g.device, g.dtype, g.shape), []).append(i)
    return list(batches.values())
