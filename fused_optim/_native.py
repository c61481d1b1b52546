"""The C++ backends: "cpu" (csrc/cpu) and "cuda" (csrc/cuda).

Both also run the row-sparse engine (fused_optim/_sparse.py) through one op,
torch.ops.fused_optim.sparse_rows_ (csrc/sparse_rows.cpp, csrc/cuda/sparse_rows_cuda.cu).

Both call the same dispatcher ops, torch.ops.fused_optim.<name>_ (registered from each
optimizer's spec, _ops.py); the dispatcher picks the CPU or CUDA kernel from the
tensors' device. They are two registry entries so a user can ask for one explicitly and
get a clear error where it cannot run.
"""

from __future__ import annotations

import torch

from fused_optim import _extension
from fused_optim.backends import Backend, register_backend

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _step(spec, *lists, **kwargs) -> None:
    # The op bumps the version counters of what it mutates (csrc/ops.cpp, [note:
    # version counters of mutated tensors]).
    getattr(torch.ops.fused_optim, spec.op)(*lists, **kwargs)


def _sparse_step(math, params, rows, values, states, constants, *, maximize) -> None:
    # The row-sparse engine's op (CPU or CUDA kernel by the tensors' device); it bumps the
    # versions of what it mutates, as the optimizers' ops do.
    torch.ops.fused_optim.sparse_rows_(params, rows, values, states, constants, math=math,
                                       maximize=maximize)


if _extension.C is not None:
    @torch.library.register_fake("fused_optim::sparse_rows_")
    def _sparse_rows_fake(params, rows, values, states, constants, *, math, maximize):
        return None


def _unavailable_for(device_type: str, dispatch_key: str):
    def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
        if _extension.C is None:
            return _extension.LOAD_ERROR
        if device.type != device_type:
            return f"runs {device_type} tensors only"
        if dtype not in _DTYPES:
            return f"dtype {dtype} is not supported (float32, float64, float16, bfloat16 are)"
        if not _extension.has_kernels(dispatch_key):
            return f"fused_optim._C was built without {device_type.upper()} kernels"
        return None

    return unavailable


# The eager group entry (csrc/eager.cpp) runs the same implementation as the ops, for
# whichever device the group's params are on.
_ENTRY = getattr(_extension.C, "step_group_", None)

# The row-sparse engine's CPU entry (csrc/eager.cpp sparse_step_): the op's CPU
# implementation, its views and constants made in C++.
_SPARSE_ENTRY = getattr(_extension.C, "sparse_step_", None)

register_backend(Backend("cpu", _unavailable_for("cpu", "CPU"), _step, _ENTRY, _sparse_step,
                         policies=True, sparse_group=_SPARSE_ENTRY, work_lists=True))
register_backend(Backend("cuda", _unavailable_for("cuda", "CUDA"), _step, _ENTRY, _sparse_step,
                         policies=True, work_lists=True))
