"""Registers each optimizer's op from its spec: torch.ops.fused_optim.<name>_ with its C++
kernels (csrc/ops.cpp checks the schema against the C++ math of that name) and its fake
kernel (_fake.py). Runs for every spec as it is registered (fused_optim/spec.py), when
the compiled extension is present; without it the reference backend needs no op.
"""

from __future__ import annotations

from fused_optim import _extension, _fake
from fused_optim.spec import Spec, on_register


def _register(spec: Spec) -> None:
    if _extension.C is None or spec.op not in _extension.C.compiled_ops():
        return
    if _extension.C.register_op(spec.schema(), spec.when()):
        _fake.register_fake_kernel(spec)


on_register(_register)
