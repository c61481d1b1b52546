"""The Triton backend's operators: torch.ops.fused_optim_triton.<name>_, one per optimizer.

Same schemas and semantics as the C++ ops (fused_optim/spec.py generates both from an
optimizer's spec): one call = one bucket (one device, one dtype); lists are mutated in
place; lr, the per-tensor state, grad_scale and found_inf are tensors read by the
kernels; found_inf != 0 changes nothing, state included; grads are divided by
grad_scale and written back unscaled.

They are torch.library.triton_op, so torch.compile traces into them (see
[note: torch.compile] in launcher.py):
  * eager calls with real tensors launch ONE table kernel per call (launcher.step_table);
  * functionalized calls (torch.compile / torch.export: FunctionalTensor arguments)
    launch the per-tensor kernels through torch.library.wrap_triton, whose tensor
    arguments the compiler can see;
  * FakeTensor / meta calls (the fake kernel) do nothing: the op returns nothing and
    its schema declares what it mutates.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from fused_optim.spec import Spec, on_register

from .launcher import kernels_interpreted, step_per_tensor, step_table

__all__ = ["step"]


def _tracing_mode(tensors: list[Tensor]) -> str | None:
    """None for real tensors; "fake" for FakeTensor / meta tensors (a fake kernel: the
    op returns nothing and its schema declares the mutations, so there is nothing to
    do); "functional" when torch.compile / torch.export functionalize the op and must
    see its kernels."""
    if not tensors:
        return None
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(tensors[0], FunctionalTensor):
        if kernels_interpreted():
            raise NotImplementedError(
                "fused_optim_triton: torch.compile of the Triton backend needs a GPU; "
                "interpreted kernels (TRITON_INTERPRET=1) cannot be traced")
        return "functional"
    if isinstance(tensors[0], FakeTensor) or tensors[0].device.type == "meta":
        return "fake"
    return None


# The ops take every argument positionally (custom ops cannot have keyword-only
# tensors): the lists, lr, grad_scale, found_inf, the spec's float and bool arguments,
# then the memory policy's master_params and rng_states (fused_optim/_policy.py), each
# an empty list when the call has none (torch.library's schema inference takes no
# optional tensor lists: `Tensor(a!)[]`, not the C++ ops' `Tensor(a!)[]? = None`);
# step() below keeps the C++ ops' keyword signature.
_ORDER: dict[str, list[str]] = {}


def _register(spec: Spec) -> None:
    """Defines torch.ops.fused_optim_triton.<spec.op> from the spec: triton_op infers
    the schema from a signature, which is built here from the spec's arguments. A spec
    that takes sparse grads only has no dense op."""
    if spec.sparse is not None and spec.sparse.only:
        return
    lists = [*spec.list_args(), *(s.arg for s in spec.scalars)]
    names = [h.name for h in (*spec.floats, *spec.flags)]
    policy = ["master_params", "rng_states"]
    _ORDER[spec.op] = names

    def impl(*args) -> None:
        mode = _tracing_mode(args[0])
        if mode is not None and mode != "functional":
            return
        kwargs = dict(zip(("lr", "grad_scale", "found_inf", *names, *policy),
                          args[len(lists):]))
        fn = step_per_tensor if mode == "functional" else step_table
        fn(spec, *args[:len(lists)], **kwargs)

    P = inspect.Parameter
    params = [P(a, P.POSITIONAL_OR_KEYWORD, annotation=list[Tensor]) for a in lists]
    params += [P("lr", P.POSITIONAL_OR_KEYWORD, annotation=Tensor)]
    params += [P(a, P.POSITIONAL_OR_KEYWORD, annotation=Optional[Tensor])
               for a in ("grad_scale", "found_inf")]
    params += [P(h.name, P.POSITIONAL_OR_KEYWORD, annotation=h.kind)
               for h in (*spec.floats, *spec.flags)]
    params += [P(a, P.POSITIONAL_OR_KEYWORD, annotation=list[Tensor]) for a in policy]
    impl.__signature__ = inspect.Signature(params, return_annotation=None)
    impl.__name__ = spec.op
    triton_op(f"fused_optim_triton::{spec.op}", impl, mutates_args=lists + policy)


on_register(_register)


def step(spec: Spec, *lists, lr, grad_scale=None, found_inf=None, master_params=None,
         rng_states=None, **h) -> None:
    """One step of `spec`'s optimizer over one bucket, through its Triton op (the
    signature of torch.ops.fused_optim.<name>_)."""
    getattr(torch.ops.fused_optim_triton, spec.op)(
        *lists, lr, grad_scale, found_inf, *(h[name] for name in _ORDER[spec.op]),
        list(master_params or ()), list(rng_states or ()))
