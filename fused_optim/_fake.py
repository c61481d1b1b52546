"""Fake (meta) kernels of the C++ ops, for torch.compile and torch.library.opcheck.

The ops mutate their list arguments and return nothing, so under FakeTensors there is
nothing to compute: the schema's alias annotations already tell the compiler what
changes. What a fake kernel does is check the inputs the way the C++ kernels do
(csrc/ops_common.h, same messages), so that bad input raises the same RuntimeError when
traced, and when a call mixes devices: the dispatcher sends a call with any 'meta'
tensor to this kernel, never to the C++ one. One kernel serves every op: it reads the
op's spec. The checks of a call's list counts and of grad_scale / found_inf are shared
with the Triton launcher (``present_lists``, ``check_count``, ``check_device_scalar``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from fused_optim._policy import POLICIES
from fused_optim.spec import Spec

__all__ = ["register_fake_kernel", "check_call", "present_lists", "check_count",
           "check_device_scalar", "state_dtype_of", "check_list_dtype", "check_policy"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_count(op: str, name: str, tensors: Sequence[Tensor], expected: int) -> None:
    """One tensor per param in list `name` of a call (csrc/ops_common.h's message)."""
    torch._check(len(tensors) == expected, lambda: (
        f"{op}: expected {expected} {name} (one per param), got {len(tensors)}"))


def present_lists(spec: Spec, op: str, by_arg: dict[str, Sequence[Tensor]],
                  h: dict[str, Any]) -> list[tuple[str, Sequence[Tensor]]]:
    """(name, tensors) of each list a call of spec's op keeps under its arguments `h`,
    params and grads first; a list the call's options leave out must be empty (checked
    here, with csrc/ops_common.h's message)."""
    present = [("params", by_arg["params"]), ("grads", by_arg["grads"])]
    for s in spec.lists:
        if spec.has(s, h):
            present.append((s.arg, by_arg[s.arg]))
        else:
            value = h[s.when]
            shown = "False" if isinstance(value, bool) else f"{value:g}"
            torch._check(len(by_arg[s.arg]) == 0, lambda: (
                f"{op}: {s.arg} must be empty when {s.when}={shown}, got {len(by_arg[s.arg])}"))
    return present


def check_device_scalar(op: str, name: str, t: Tensor, device: torch.device) -> None:
    """grad_scale / found_inf: a one-element float32 tensor on the params' device."""
    torch._check(t.numel() == 1, lambda: (
        f"{op}: {name} must be a one-element tensor, got shape {list(t.shape)}"))
    torch._check(t.dtype == torch.float32, lambda: f"{op}: {name} must be float32, got {t.dtype}")
    torch._check(t.device == device, lambda: (
        f"{op}: {name} is on {t.device} but the params are on {device}"))


def state_dtype_of(lists: Sequence[tuple[str, Sequence[Tensor]]], master: bool,
                   stochastic: bool) -> torch.dtype:
    """The dtype the state lists of a call (its present lists, params first) must have:
    the first state tensor's where params, states and policy lists make a policy the
    engines run (fused_optim/_policy.py), else the params' (as CheckedLists in
    csrc/ops_common.h)."""
    dtype = lists[0][1][0].dtype
    if len(lists) > 2 and lists[2][1]:
        first = lists[2][1][0].dtype
        if (dtype, first, master, stochastic) in POLICIES:
            return first
    return dtype


def check_list_dtype(op: str, lists: Sequence[tuple[str, Sequence[Tensor]]], k: int, i: int,
                     dtype: torch.dtype, state_dtype: torch.dtype,
                     fixed: dict[str, str] | None = None) -> None:
    """Tensor i of list k of a call (its present lists) has its storage dtype: params and
    grads `dtype`, state lists `state_dtype`, a work list its fixed dtype (`fixed`, the
    spec's fixed_dtypes) (csrc/ops_common.h check_row's messages)."""
    name, tensors = lists[k]
    if fixed and name in fixed:
        t, want = tensors[i], getattr(torch, fixed[name])
        torch._check(t.dtype == want, lambda: (
            f"{op}: {name}[{i}] must be {str(want).removeprefix('torch.')} (a "
            f"{str(want).removeprefix('torch.')} work list), got {t.dtype}"))
        return
    name, t = lists[k][0], lists[k][1][i]
    if k < 2 or state_dtype == dtype:
        torch._check(t.dtype == dtype, lambda: (
            f"{op}: all tensors of one call must have one dtype; {name}[{i}] is "
            f"{t.dtype}, params[0] is {dtype}"))
    else:
        torch._check(t.dtype == state_dtype, lambda: (
            f"{op}: the state lists of one call must have one dtype; {name}[{i}] is "
            f"{t.dtype}, {lists[2][0]}[0] is {state_dtype}"))


def _check_bucket(op: str, lists: Sequence[tuple[str, Sequence[Tensor]]],
                  master: bool = False, stochastic: bool = False,
                  fixed: dict[str, str] | None = None) -> None:
    """As check_bucket in csrc/ops_common.h."""
    params = lists[0][1]
    for name, tensors in lists:
        check_count(op, name, tensors, len(params))
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    torch._check(dtype in _FLOAT_DTYPES, lambda: (
        f"{op}: parameters must be float32, float64, float16 or bfloat16, got {dtype}"))
    state_dtype = state_dtype_of(lists, master, stochastic)
    for i, p in enumerate(params):
        for k, (name, tensors) in enumerate(lists):
            t = tensors[i]
            torch._check(t.layout == torch.strided, lambda: (
                f"{op}: {name}[{i}] is sparse; fused_optim kernels take dense tensors only"))
            torch._check(t.device == device, lambda: (
                f"{op}: all tensors of one call must be on one device; {name}[{i}] is on "
                f"{t.device}, params[0] on {device}"))
            check_list_dtype(op, lists, k, i, dtype, state_dtype, fixed)
            torch._check(t.shape == p.shape, lambda: (
                f"{op}: {name}[{i}] has shape {list(t.shape)} but params[{i}] has shape "
                f"{list(p.shape)}"))


def _check_scalars(op: str, name: str, tensors: Sequence[Tensor], expected: int,
                   device: torch.device) -> None:
    """As check_scalars: one-element float tensors on the params' device or the CPU."""
    check_count(op, name, tensors, expected)
    for i, t in enumerate(tensors):
        torch._check(t.numel() == 1, lambda: f"{op}: {name}[{i}] must be a one-element tensor")
        torch._check(t.dtype in (torch.float32, torch.float64), lambda: (
            f"{op}: {name}[{i}] must be float32 or float64, got {t.dtype}"))
        torch._check(t.device == device or t.device.type == "cpu", lambda: (
            f"{op}: {name}[{i}] is on {t.device} but the params are on {device}"))


def _check_common(op: str, params: Sequence[Tensor], lr: Tensor, grad_scale: Tensor | None,
                  found_inf: Tensor | None) -> None:
    torch._check(lr.numel() == 1, lambda: (
        f"{op}: lr must be a one-element tensor, got shape {list(lr.shape)}"))
    if not params:
        return
    device = params[0].device
    torch._check(lr.device.type == "cpu" or lr.device == device, lambda: (
        f"{op}: lr is on {lr.device} but the params are on {device}"))
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None:
            check_device_scalar(op, name, t, device)


def _check_policy_lists(op: str, params: Sequence[Tensor], master: Sequence[Tensor] | None,
                        rng: Sequence[Tensor] | None) -> None:
    """As check_policy_lists in csrc/ops_common.h."""
    if master:
        check_count(op, "master_params", master, len(params))
        for i, (m, p) in enumerate(zip(master, params)):
            torch._check(m.dtype == torch.float32 and m.layout == torch.strided, lambda: (
                f"{op}: master_params[{i}] must be a dense float32 tensor"))
            torch._check(m.device == p.device, lambda: (
                f"{op}: master_params[{i}] is on {m.device} but the params are on {p.device}"))
            torch._check(m.shape == p.shape and (m.numel() <= 1 or m.stride() == p.stride()),
                         lambda: (f"{op}: master_params[{i}] must have the sizes and strides "
                                  f"of params[{i}]"))
    if rng:
        check_count(op, "rng_states", rng, len(params))
        for i, (r, p) in enumerate(zip(rng, params)):
            torch._check(r.dtype == torch.int64 and r.numel() == 2 and r.is_contiguous(),
                         lambda: (f"{op}: rng_states[{i}] must be a contiguous int64 tensor "
                                  "[seed, offset]"))
            torch._check(r.device == p.device, lambda: (
                f"{op}: rng_states[{i}] is on {r.device} but the params are on {p.device}"))


def check_policy(op: str, present: Sequence[tuple[str, Sequence[Tensor]]],
                 master: Sequence[Tensor] | None, rng: Sequence[Tensor] | None) -> None:
    """A call's memory policy lists (check_policy_lists in csrc/ops_common.h), and that
    with them the call's dtypes make a policy the engines run (its present lists, params
    first, already checked by list and dtype)."""
    params = present[0][1]
    _check_policy_lists(op, params, master, rng)
    if params and (master or rng):
        dtype = params[0].dtype
        state = state_dtype_of(present, bool(master), bool(rng))
        torch._check((dtype, state, bool(master), bool(rng)) in POLICIES
                     or (state == dtype and not master and not rng), lambda: (
            f"{op}: no memory policy for {dtype} params with {state} states"
            + (", master_params" if master else "")
            + (", rng_states" if rng else "")
            + " (fused_optim/_policy.py lists the policies the engines run)"))


def check_call(spec: Spec, op: str, lists: Sequence[Sequence[Tensor]], lr: Tensor,
               grad_scale: Tensor | None, found_inf: Tensor | None, h: dict[str, Any],
               master_params: Sequence[Tensor] | None = None,
               rng_states: Sequence[Tensor] | None = None) -> None:
    """The checks of csrc/ops_common.h on one call of spec's op, with its messages."""
    args = spec.list_args()
    by_arg = dict(zip(args, lists))
    present = present_lists(spec, op, by_arg, h)
    _check_bucket(op, present, bool(master_params), bool(rng_states), spec.fixed_dtypes)
    params = by_arg["params"]
    check_policy(op, present, master_params, rng_states)
    _check_common(op, params, lr, grad_scale, found_inf)
    if params:
        for s, tensors in zip(spec.scalars, lists[len(args):]):
            _check_scalars(op, s.arg, tensors, len(params), params[0].device)


def register_fake_kernel(spec: Spec) -> None:
    """Registers the fake kernel of torch.ops.fused_optim.<spec.op>."""
    n_lists = len(spec.list_args()) + len(spec.scalars)
    op = f"fused_optim::{spec.op}"

    def fake(*lists, lr, grad_scale=None, found_inf=None, master_params=None,
             rng_states=None, **h) -> None:
        check_call(spec, op, lists[:n_lists], lr, grad_scale, found_inf, h, master_params,
                   rng_states)
        return None

    torch.library.register_fake(op, fake)
