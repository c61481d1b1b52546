"""The "reference" backend: plain torch, one tensor at a time, for every optimizer.

Each optimizer's math in plain torch is its spec's ``reference`` function (next to its
class, e.g. fused_optim/adam.py); this module runs it over a bucket the way the fused
kernels run theirs. It is the definition of what every other backend computes (the C++
math in csrc/include/fused_optim/math/ and the Triton math in triton_kernels/ follow
it operation by operation), the oracle of the low-precision tests, the last fallback
when no compiled backend can run a bucket, and the path of ``differentiable=True``
(every operation is an autograd op). It takes the ops' arguments (fused_optim/spec.py):

  * compute in opmath (float64 for float64 storage, float32 otherwise), round once when
    storing, as the fused kernels do;
  * per-tensor scalars from each tensor's own state, in float64, as torch.optim computes
    them in Python floats; arithmetic with lr in lr's dtype ([note: lr arithmetic] in
    csrc/include/fused_optim/math/stages.h: ``lr_mul``, ``lr_div`` below);
  * found_inf != 0 leaves every tensor untouched, state included, without a host sync
    (the update is computed and then selected away with torch.where);
  * grads are divided by grad_scale and left unscaled, then negated for maximize;
  * a memory policy (fused_optim/_policy.py) changes storage only: each state tensor is
    read and written in its own dtype; with ``master_params`` the math updates the fp32
    copy and the param is written rounded from it; with ``rng_states`` bf16 stores round
    stochastically ([note: the policy's random bits] there).

A spec's reference function is called per param as
``reference(x, grad, state, lr, h)``: ``x`` maps "param" and the key of each state list
the call has ("exp_avg") to opmath copies, ``grad`` is the unscaled, signed grad,
``state`` maps each per-tensor state key ("step") to its tensor, ``lr`` is a 0-dim
tensor of lr's dtype, ``h`` the float and bool arguments by name and ``param_dtype``,
the params' storage dtype (for a math that rounds as torch's ops in that dtype do). It
replaces the entries of ``x`` and ``state`` with their new values; an entry of ``x`` it
leaves as it is (the same object) is not stored back. A work list of a fixed dtype
(``StateList.dtype``) is stored rounded to the params' dtype, then to its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_optim import _policy
from fused_optim.backends import Backend, register_backend
from fused_optim.spec import Spec

__all__ = ["step", "lr_mul", "lr_div", "lr_sub_from", "lr_add_to", "lr_pow", "opmath_of",
           "weight_decayed"]


def opmath_of(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic on `dtype` values runs in (tensors and lr alike)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lr_mul(lr: Tensor, x: float | Tensor) -> Tensor:
    """lr * x as torch.optim computes it with this lr: in lr's dtype (a Python float x
    rounded to it first, as a tensor-scalar op does)."""
    om = opmath_of(lr.dtype)
    return (lr.to(om) * _as(x, om, lr)).to(lr.dtype)


def lr_div(lr: Tensor, x: float | Tensor) -> Tensor:
    """lr / x in lr's dtype (see lr_mul)."""
    om = opmath_of(lr.dtype)
    return (lr.to(om) / _as(x, om, lr)).to(lr.dtype)


def lr_sub_from(a: float, t: Tensor) -> Tensor:
    """a - t for a tensor t of lr's dtype, in that dtype (torch's ``1 - lr * wd``)."""
    om = opmath_of(t.dtype)
    return (a - t.to(om)).to(t.dtype)


def lr_add_to(a: float, t: Tensor) -> Tensor:
    """a + t for a tensor t of lr's dtype, in that dtype (torch's ``1 + lambd * lr * t``)."""
    om = opmath_of(t.dtype)
    return (a + t.to(om)).to(t.dtype)


def lr_pow(t: Tensor, exponent: float) -> Tensor:
    """t ** exponent for a tensor t of lr's dtype, in that dtype."""
    om = opmath_of(t.dtype)
    return (t.to(om) ** exponent).to(t.dtype)


def weight_decayed(p: Tensor, g: Tensor, lr: Tensor, h: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(param, grad) after the Adam family's weight decay (h's ``weight_decay``,
    ``decoupled_weight_decay``): none at 0; decoupled, p * (1 - lr * weight_decay) in
    lr's dtype; else the L2 penalty, g + weight_decay * p (math/optimizer.h's
    WithWeightDecayModes and Adam's variant)."""
    weight_decay = h["weight_decay"]
    if weight_decay == 0:
        return p, g
    if h["decoupled_weight_decay"]:
        return p * lr_sub_from(1, lr_mul(lr, weight_decay)).to(p.dtype), g
    return p, g + weight_decay * p


def _as(x: float | Tensor, dtype: torch.dtype, like: Tensor) -> Tensor | float:
    if isinstance(x, Tensor):
        return x.to(device=like.device, dtype=dtype)
    return torch.tensor(x, dtype=dtype, device=like.device)


def _store(dst: Tensor, value: Tensor, keep: Tensor | None) -> None:
    """dst <- value, or dst unchanged where the step is skipped (found_inf). `keep` is on
    the bucket's device; per-tensor state may be on the CPU."""
    if keep is None:
        dst.copy_(value)
    else:
        if keep.device != dst.device:
            keep = keep.to(dst.device)
        dst.copy_(torch.where(keep, value, dst.to(value.dtype)))


def _skip_mask(found_inf: Tensor | None, device: torch.device) -> Tensor | None:
    return None if found_inf is None else (found_inf.reshape(()) == 0).to(device)


def _unscaled_grad(grad: Tensor, opmath: torch.dtype, grad_scale: Tensor | None,
                   keep: Tensor | None) -> Tensor:
    """The grad in opmath, divided by `grad_scale` (0-dim, on its device) when given and
    then stored back unscaled."""
    g = grad.to(opmath, copy=True)
    if grad_scale is not None:
        g = g / grad_scale.to(opmath)
        _store(grad, g, keep)
    return g


def step(spec: Spec, *lists: list[Tensor], lr: Tensor, grad_scale: Tensor | None = None,
         found_inf: Tensor | None = None, master_params: list[Tensor] | None = None,
         rng_states: list[Tensor] | None = None, **h: Any) -> None:
    """One step of `spec`'s optimizer over one bucket (one device), with the op's
    arguments."""
    list_args = spec.list_args()
    n = len(list_args)
    by_arg = dict(zip(list_args, lists[:n]))
    states = [(s.key, t) for s, t in zip(spec.scalars, lists[n:])]
    present = [(s.key, by_arg[s.arg]) for s in spec.present(h)]
    params, grads = by_arg["params"], by_arg["grads"]
    if not params:
        return
    # lr, grad_scale and found_inf on the bucket's device, once.
    device = params[0].device
    lr = lr.reshape(()).to(device)
    if grad_scale is not None:
        grad_scale = grad_scale.reshape(()).to(device)
    keep = _skip_mask(found_inf, device)
    maximize = bool(h.get("maximize", False))
    h = {**h, "param_dtype": params[0].dtype}
    fixed = spec.fixed_dtypes
    fixed_keys = {s.key for s in spec.lists if s.dtype is not None}
    for i, param in enumerate(params):
        source = master_params[i] if master_params else param
        opmath = opmath_of(source.dtype)
        x = {"param": source.to(opmath, copy=True)}
        for key, tensors in present:
            x[key] = tensors[i].to(opmath, copy=True)
        g = _unscaled_grad(grads[i], opmath, grad_scale, keep)
        if maximize:
            g = -g
        state = {key: tensors[i] for key, tensors in states}
        loaded = dict(x)
        spec.reference(x, g, state, lr, h)
        words = None
        if rng_states:
            rng = rng_states[i]
            words = _policy.philox_words(rng[0], rng[1] + _policy.memory_offsets(param))
            _store(rng[1:], rng[1:] + param.numel(), keep)
        if x["param"] is loaded["param"]:
            pass  # left as it is (a stage that does not step the params)
        elif master_params:
            _store(source, x["param"], keep)
            _store(param, x["param"].to(param.dtype), keep)  # the copy: to nearest
        else:
            _store(param, _policy.round_to(x["param"], param.dtype, words and words[0]), keep)
        for k, (key, tensors) in enumerate(present):
            if x[key] is loaded[key]:
                continue
            if fixed and key in fixed_keys:
                _store(tensors[i], x[key].to(param.dtype).to(tensors[i].dtype), keep)
                continue
            _store(tensors[i], _policy.round_to(x[key], tensors[i].dtype,
                                                words and words[1 + k]), keep)
        for key, tensors in states:
            _store(tensors[i], state[key], keep)


def _unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    if not dtype.is_floating_point:
        return f"dtype {dtype} is not a floating-point type"
    return None


from fused_optim._sparse import reference_sparse_step  # noqa: E402

register_backend(Backend("reference", _unavailable, step, sparse_step=reference_sparse_step,
                         policies=True, work_lists=True))
