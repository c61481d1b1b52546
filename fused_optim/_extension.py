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


# op_has_kernel answers from this table: torch.compile cannot trace the dispatcher query
# itself, and a step compiled with fullgraph=True may be the first to select a backend.
_HAS_KERNEL: dict[tuple[str, str], bool] = {}


def op_has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether torch.ops.fused_optim.<op_name> has a kernel for dispatch_key."""
    if C is None:
        return False
    key = (op_name, dispatch_key)
    known = _HAS_KERNEL.get(key)
    if known is None:
        known = _HAS_KERNEL[key] = torch._C._dispatch_has_kernel_for_dispatch_key(
            f"fused_optim::{op_name}", dispatch_key)
    return known


if C is not None:
    for _op in ("adam_", "sgd_"):
        for _key in ("CPU", "CUDA"):
            op_has_kernel(_op, _key)
