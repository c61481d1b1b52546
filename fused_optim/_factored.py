"""The factored-moment engine: steps whose update needs per-tensor reductions (Adafactor).

torch.optim.Adafactor keeps, per param of 2+ dims viewed as ``[B, m, n]`` (dims -2 and -1
factored, every leading index its own matrix), a row factor ``row_var`` ``[..., m, 1]``
and a column factor ``col_var`` ``[..., 1, n]`` of the second moment, and a full
``variance`` for a param of fewer dims. Its update needs four per-tensor reductions
(the param's norm, the row and column sums of grad^2, the update's norm), which torch
reads on the host (``.item()``, two syncs per param). Here every backend runs them on
the params' device, for every tensor of a (device, dtype) bucket at once:

    pass 1  reads param and grad: sum(param^2), per row sum_j g^2, per column
            sum_i g^2 (a vector's variance is updated here, element-wise);
    scalars per tensor and per row / column (tiny, on the device): step + 1, the
            factors' lerp, their mean, alpha = max(eps2, RMS(param)) * rho_t;
    pass 2  reads grad (and a vector's variance): sum(update^2), the update recomputed
            from the factors, never stored;
    scalars per tensor: the clipping denominator, the step's alpha;
    pass 3  reads param and grad, writes param: the decay and the update.

Bytes per element (fp32, a factored param): 8 + 4 + 12 = 24, three passes over the grad,
plus O(m + n) for the factors (a vector's variance: +8 in pass 1, +4 in pass 2).

A call is ``engine(params, grads, row_vars, col_vars, variances, state_steps, *, lr,
beta2_decay, eps1, eps2, d, weight_decay, maximize)`` over one bucket: the first
``len(row_vars)`` params are the factored ones (with their ``row_var`` and ``col_var``
as torch.optim keeps them), the rest have ``variances``, in that order; lr is a
one-element tensor (a float lr as float64), eps1 already resolved (torch's ``None``:
the dtype's eps). The arithmetic follows torch's for-loop (_single_tensor_adafactor)
op by op, with each intermediate tensor torch materializes rounded to the param's dtype
(a no-op for fp32 / fp64 params); only the order of the sums differs.

Backends: "reference" (this module, plain torch, no host sync), "cpu"
(torch.ops.fused_optim.adafactor_, csrc/factored.cpp + csrc/cpu/factored_impl.h), "cuda"
(the same op, csrc/cuda/factored_cuda.cu + factored.cu; compiled, not yet run on a GPU),
"triton" (triton_kernels/factored.py). A bucket whose selected backend has no factored
engine (or whose tensors are not contiguous) runs on the reference.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from fused_optim._reference import lr_div, lr_mul, lr_sub_from, opmath_of
from fused_optim.backends import select_backend

__all__ = ["reference_adafactor", "engine_for", "adafactor_scalars"]


def _rounder(dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """x -> x rounded to `dtype` and back to its opmath (a no-op for fp32 / fp64)."""
    om = opmath_of(dtype)
    if dtype == om:
        return lambda x: x
    return lambda x: x.to(dtype).to(om)


def _lerp(start: Tensor, end: Tensor, weight: Tensor) -> Tensor:
    # ATen's two-branch lerp (exact at weight 0 and 1), weight a 0-dim tensor.
    return torch.where(weight < 0.5, start + weight * (end - start),
                       end - (end - start) * (1 - weight))


def _python_max(a: Tensor | float, b: Tensor) -> Tensor:
    """Python's max(a, b) with a float a and a tensor b: b where b > a, else a (a NaN b
    gives a, as in torch.optim's host code)."""
    return torch.where(b > a, b, torch.as_tensor(a, dtype=b.dtype, device=b.device))


def adafactor_scalars(step: Tensor, lr: Tensor, beta2_decay: float, eps2: float,
                      param_norm: Tensor, numel: int) -> tuple[Tensor, Tensor, Tensor]:
    """(1 - beta2_t, alpha, whether rho_t is lr) of one tensor's step, as float64 tensors
    on the param's device: torch's ``step_float ** beta2_decay``, ``min(lr, 1 /
    step_float ** 0.5)`` and ``max(eps2, norm / numel ** 0.5) * rho_t``, with lr
    arithmetic in lr's dtype where torch does it with a tensor lr."""
    s = step.to(torch.float64)
    weight = s**beta2_decay
    inv_sqrt = 1 / s.sqrt()
    lr_d = lr.to(device=s.device)
    # min(lr, x) returns lr unless x < lr (compared in lr's dtype).
    rho_is_lr = ~(inv_sqrt.to(lr_d.dtype) < lr_d)
    rms = _python_max(eps2, param_norm.to(torch.float64) / math.sqrt(numel))
    alpha = torch.where(rho_is_lr, lr_mul(lr_d, rms).to(torch.float64), rms * inv_sqrt)
    return weight, alpha, rho_is_lr


def reference_adafactor(params: list[Tensor], grads: list[Tensor], row_vars: list[Tensor],
                        col_vars: list[Tensor], variances: list[Tensor],
                        state_steps: list[Tensor], *, lr: Tensor, beta2_decay: float,
                        eps1: float, eps2: float, d: float, weight_decay: float,
                        maximize: bool) -> None:
    """The reference engine: each tensor's step in torch ops (see the module docstring),
    no host sync."""
    n_factored = len(row_vars)
    for i, (p, g, step) in enumerate(zip(params, grads, state_steps)):
        dtype = p.dtype
        om = opmath_of(dtype)
        r = _rounder(dtype)
        numel = p.numel()
        if numel == 0:
            step.add_(1)
            continue
        lr_d = lr.reshape(()).to(p.device)
        P = p.to(om)
        G = g.to(om)
        if maximize:
            G = -G
        step.add_(1)
        param_norm = r(P.square().sum().sqrt())
        weight, alpha, rho_is_lr = adafactor_scalars(step.to(p.device), lr_d, beta2_decay,
                                                     eps2, param_norm, numel)
        w = weight.to(om)
        if i < n_factored:
            rv, cv = row_vars[i], col_vars[i]
            m, n = p.shape[-2], p.shape[-1]
            G3 = G.reshape(-1, m, n)
            sq = G3.square()
            row_mean = r(r(r(sq.sum(-1).sqrt()).square()) / n)
            col_mean = r(r(r(sq.sum(-2).sqrt()).square()) / m)
            R = r(_lerp(rv.to(om).reshape(-1, m), row_mean, w))
            C = r(_lerp(cv.to(om).reshape(-1, n), col_mean, w))
            rv.copy_(R.reshape(rv.shape))
            cv.copy_(C.reshape(cv.shape))
            mean = r(R.sum(-1, keepdim=True) / m)
            mean = torch.clamp_min(mean, r(torch.tensor(eps1, dtype=om)))
            V = r(r(R[:, :, None] * C[:, None, :]) / mean[:, :, None]).reshape(G.shape)
        else:
            var = variances[i - n_factored]
            V = r(_lerp(var.to(om), r(G * G), w))
            var.copy_(V)
        V = torch.clamp_min(V, r(torch.tensor(eps1 * eps1, dtype=om)))
        U = r(r(1 / V.sqrt()) * G)
        update_norm = r(U.square().sum().sqrt()).to(torch.float64)
        denom = _python_max(1.0, update_norm / (math.sqrt(numel) * d))
        step_alpha = torch.where(rho_is_lr, lr_div(-alpha.to(lr_d.dtype), denom).to(torch.float64),
                                 -alpha / denom)
        if weight_decay != 0:
            factor = lr_sub_from(1, lr_mul(lr_d, weight_decay)).to(om)
            P = r(P * factor)
        if om == dtype:
            # p.add_(u, alpha=a): one fused multiply-add (emulated in float64 for fp32).
            wide = torch.float64
            P = (P.to(wide) + step_alpha.to(om).to(wide) * U.to(wide)).to(om)
        else:
            P = r(P + r(r(step_alpha.to(om)) * U))
        p.copy_(P)


def _native_adafactor(*args: Any, **kwargs: Any) -> None:
    # The op bumps the versions of what it mutates, as the optimizers' ops do.
    torch.ops.fused_optim.adafactor_(*args, **kwargs)


def _register_fake() -> None:
    if not _has_native_op():
        return

    @torch.library.register_fake("fused_optim::adafactor_")
    def _adafactor_fake(params, grads, row_vars, col_vars, variances, state_steps, *, lr,
                        beta2_decay, eps1, eps2, d, weight_decay, maximize):
        torch._check(len(grads) == len(params) and len(state_steps) == len(params),
                     lambda: "fused_optim::adafactor_: expected one grad and one state_step "
                             "per param")
        torch._check(len(row_vars) == len(col_vars)
                     and len(row_vars) + len(variances) == len(params),
                     lambda: "fused_optim::adafactor_: expected row_vars and col_vars for the "
                             "first params and variances for the rest")
        return None


def _triton_adafactor(*args: Any, **kwargs: Any) -> None:
    from fused_optim.triton_kernels import factored

    factored.adafactor(*args, **kwargs)


def _has_native_op() -> bool:
    try:
        return hasattr(torch.ops.fused_optim, "adafactor_")
    except (AttributeError, RuntimeError):
        return False


def engine_for(requested: str | None, device: torch.device, dtype: torch.dtype,
               dense: bool) -> tuple[str, Callable[..., None]]:
    """(backend name, engine) for a bucket: the group's backend where it has a factored
    engine, else the reference (also for rows that are not contiguous)."""
    backend = select_backend(requested, device, dtype)
    if not dense:
        return "reference", reference_adafactor
    if backend.name == "cpu" and _has_native_op():
        return "cpu", _native_adafactor
    if backend.name == "cuda" and _has_native_op() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "fused_optim::adafactor_", "CUDA"):
        return "cuda", _native_adafactor
    if backend.name == "triton":
        return "triton", _triton_adafactor
    return "reference", reference_adafactor


_register_fake()
