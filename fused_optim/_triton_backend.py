"""The "triton" backend: Triton multi-tensor kernels (triton_kernels/, shipped as
fused_optim.triton_kernels).

Registering the backend imports nothing from Triton: the kernels are imported on first
use (first availability check of a bucket the backend could run, or first step), so the
package imports, and says why the backend is unavailable, without triton installed.

Where it runs:
  * CUDA (and ROCm) tensors, with triton installed and a working Triton driver;
  * CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1, set before the
    kernels are first imported): that is how CI tests the kernels without a GPU.
Storage dtypes: float32, float16, bfloat16 (math in float32) and float64 (math in
float64), and the memory policies of fused_optim/_policy.py (states of another dtype,
fp32 master copies, stochastic rounding into bf16), and work lists of a fixed dtype
(Muon's bf16 updates: [note: work lists] in triton_kernels/launcher.py). It has a
row-sparse engine (sparse grads: fused_optim/_sparse.py), in triton_kernels/sparse.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from fused_optim.backends import Backend, register_backend

__all__ = ["load_kernels", "unavailable"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_kernels: ModuleType | None = None
_load_error: str | None = None
_driver_error: dict[str, str | None] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _ensure_subpackage() -> None:
    """Makes ``fused_optim.triton_kernels`` importable from a source checkout too.

    An installed wheel (or an editable install) maps triton_kernels/ to that name via
    setup.py's package_dir; a plain checkout on sys.path has no such directory, so the
    package is loaded from <repo>/triton_kernels under its packaged name.
    """
    name = "fused_optim.triton_kernels"
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
        return
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
    source = Path(__file__).resolve().parent.parent / "triton_kernels"
    init = source / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError(f"{name} is neither installed nor at {source}", name=name)
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(source)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    setattr(sys.modules["fused_optim"], "triton_kernels", module)


def load_kernels() -> ModuleType:
    """Imports the Triton ops (registering torch.ops.fused_optim_triton.*) and the
    row-sparse engine (triton_kernels/sparse.py), and returns the module
    fused_optim.triton_kernels.ops. Raises ImportError if that fails. Both are imported
    together so that their kernels are of one flavour, compiled or interpreted (decided
    by TRITON_INTERPRET when a kernel is defined)."""
    global _kernels, _load_error
    if _kernels is not None:
        return _kernels
    if _load_error is not None:
        raise ImportError(_load_error)
    try:
        _ensure_subpackage()
        ops = importlib.import_module("fused_optim.triton_kernels.ops")
        importlib.import_module("fused_optim.triton_kernels.sparse")
        _kernels = ops
    except Exception as exc:  # ImportError, or a triton too old for the kernels' API
        _load_error = f"the Triton kernels failed to import ({type(exc).__name__}: {exc})"
        raise ImportError(_load_error) from exc
    return _kernels


def _kernels_interpreted() -> bool | None:
    """Whether the loaded kernels run in the interpreter; None if not loaded yet."""
    launcher = sys.modules.get("fused_optim.triton_kernels.launcher")
    if launcher is None:
        return None
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return None
    return isinstance(launcher._table_kernel, InterpretedFunction)


def _driver_unavailable(device_type: str) -> str | None:
    if device_type not in _driver_error:
        try:
            import triton

            triton.runtime.driver.active.get_current_target()
            _driver_error[device_type] = None
        except Exception as exc:  # "0 active drivers", no GPU, broken install
            _driver_error[device_type] = f"no working Triton driver ({exc})"
    return _driver_error[device_type]


def _triton_installed() -> bool:
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None  # None: imports of it are blocked
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if this backend can run a bucket of (device, dtype), else the reason."""
    if not _triton_installed():
        return "triton is not installed (pip install triton)"
    if dtype not in _DTYPES:
        return f"dtype {dtype} is not supported (float32, float16, bfloat16, float64 are)"
    interpret = _interpreting()
    if device.type == "cpu":
        if not interpret:
            return ("CPU tensors run only under the Triton interpreter "
                    "(set TRITON_INTERPRET=1 before the first use)")
    elif device.type == "cuda":
        if not interpret:
            reason = _driver_unavailable(device.type)
            if reason is not None:
                return reason
    else:
        return f"device type {device.type!r} is not supported (cuda; cpu when interpreting)"
    try:
        load_kernels()
    except ImportError as exc:
        return str(exc)
    interpreted = _kernels_interpreted()
    if interpreted is not None and interpreted != interpret:
        return ("the Triton kernels were defined with TRITON_INTERPRET="
                f"{'1' if interpreted else 'unset'} but it is now "
                f"{'1' if interpret else 'unset'}; it must be set before their first import")
    return None


def _step(spec, *lists, **kwargs) -> None:
    load_kernels().step(spec, *lists, **kwargs)


def _sparse_step(math, params, rows, values, states, constants, *, maximize) -> None:
    # The row-sparse engine (fused_optim/_sparse.py): one launch per bucket.
    load_kernels()
    sys.modules["fused_optim.triton_kernels.sparse"].sparse_step(
        math, params, rows, values, states, constants, maximize=maximize)


register_backend(Backend("triton", unavailable, _step, sparse_step=_sparse_step,
                         policies=True, work_lists=True))
