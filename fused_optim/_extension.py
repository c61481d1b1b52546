"""Loads the compiled extension fused_optim._C, or records why it is missing.

Importing _C registers the C++ ops (torch.ops.fused_optim.*). Without it (a source
checkout never built, or a build for another torch), the package still imports and runs
on the reference backend; the first optimizer step says so once (see backends.py).
"""

from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libtorch, which _C links against)

C = None
LOAD_ERROR: str | None = None

try:
    C = importlib.import_module("fused_optim._C")
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = f"fused_optim._C is not available ({exc})"


def op_has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether torch.ops.fused_optim.<op_name> has a kernel for dispatch_key."""
    if C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_optim::{op_name}", dispatch_key)
