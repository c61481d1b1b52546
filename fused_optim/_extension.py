"""Loads the compiled extension fused_optim._C, or records why it is missing.

_C holds the C++ kernels; the ops themselves (torch.ops.fused_optim.*) are registered
from the optimizers' specs when their classes are defined (_ops.py). Without _C (a source
checkout never built, or a build for another torch), the package still imports and runs
on the reference backend; the first optimizer step says so once (see backends.py).
"""

from __future__ import annotations

import importlib

import torch

C = None
LOAD_ERROR: str | None = None

try:
    C = importlib.import_module("fused_optim._C")
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = f"fused_optim._C is not available ({exc})"


# Read once, here: torch.compile cannot trace these calls, and a step compiled with
# fullgraph=True may be the first to select a backend.
_KERNELS = {
    "CPU": C is not None,
    "CUDA": C is not None and bool(C.build_info()["cuda"]),
}


def has_kernels(dispatch_key: str) -> bool:
    """Whether _C holds kernels for dispatch_key ("CPU", "CUDA")."""
    return _KERNELS.get(dispatch_key, False)


def op_has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether torch.ops.fused_optim.<op_name> has a kernel for dispatch_key."""
    if C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_optim::{op_name}",
                                                          dispatch_key)
