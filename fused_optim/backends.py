"""One registry of backends, and the rule that picks one per (device, dtype) bucket.

A backend runs one optimizer step over one bucket: lists of tensors that share a device
and a dtype. Every backend implements one function, ``step(spec, *lists, lr=..., **args)``,
with the arguments of the optimizer's op (its schema, fused_optim/spec.py), for every
optimizer, so the optimizer classes never know which one ran. Backends:

  "cpu"        csrc/cpu: C++, one OpenMP-style parallel region + SIMD, CPU tensors
  "cuda"       csrc/cuda: C++/CUDA multi-tensor engine, CUDA tensors
  "triton"     triton_kernels: Triton multi-tensor kernels, GPU tensors
  "reference"  fused_optim/_reference.py: plain torch; the definition and the fallback

Selection, per param group (``backend=`` argument, default "auto"):
  * "auto" (or unset) -> the environment variable FUSED_OPTIM_BACKEND if set, else the
    first backend in AUTO_ORDER[device type] that can run the bucket;
  * a backend name -> that backend, and a ValueError naming the reason if it cannot run
    the bucket (an explicit request is never silently replaced).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "Backend",
    "register_backend",
    "get_backend",
    "select_backend",
    "available_backends",
    "backend_names",
    "AUTO_ORDER",
]

# Preference order of "auto" per device type. The Triton backend comes after the CUDA
# C++ one until measurements on a GPU say otherwise (see triton_kernels/README).
AUTO_ORDER: dict[str, list[str]] = {
    "cpu": ["cpu", "reference"],
    "cuda": ["cuda", "triton", "reference"],
}
DEFAULT_AUTO_ORDER = ["reference"]


@dataclass(frozen=True)
class Backend:
    """A backend: a name, an availability check and one step function for every
    optimizer.

    ``unavailable`` returns None when the backend can run a bucket of this device and
    dtype, else a one-line reason. ``step(spec, *lists, lr=..., grad_scale=...,
    found_inf=..., **hyper)`` takes the arguments of the spec's op (the lists in schema
    order, then its keyword arguments) and mutates the lists. ``step_group`` is an
    optional whole-group entry (csrc/eager.cpp): one eager step of a param group read
    straight from its params list and the optimizer's state, or False (nothing
    changed) when the group needs the list path; see FusedOptimizer._step_group_eager.
    ``sparse_step`` is the row-sparse engine's entry (fused_optim/_sparse.py), None
    where the backend has none; ``sparse_group`` an optional faster way in
    (csrc/eager.cpp sparse_step_): ``sparse_group(math, params, states, constants,
    maximize)`` with the params and states as they are and their grads read from the
    params, or False (nothing changed) outside its common case. ``policies``: whether
    ``step`` takes a memory policy's lists (``master_params``, ``rng_states``) and
    per-list storage dtypes (fused_optim/_policy.py).
    ``work_lists``: whether ``step`` runs a spec with bf16 work lists
    (``StateList(dtype="bfloat16")``: Muon's element-wise stages).
    """

    name: str
    unavailable: Callable[[torch.device, torch.dtype], str | None]
    step: Callable[..., None]
    step_group: Callable[..., bool] | None = None
    sparse_step: Callable[..., None] | None = None
    policies: bool = False
    work_lists: bool = False
    sparse_group: Callable[..., bool] | None = None


_REGISTRY: dict[str, Backend] = {}
_SELECTED: dict[tuple[str, str, int | None, torch.dtype], Backend] = {}
_FELL_BACK_WARNED: set[tuple[str, str]] = set()


def register_backend(backend: Backend) -> None:
    """Adds or replaces a backend. Later selections see it."""
    _REGISTRY[backend.name] = backend
    _SELECTED.clear()


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    _load_builtin_backends()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"fused_optim: unknown backend {name!r}; known backends: "
            f"{', '.join(['auto', *_REGISTRY])}"
        ) from None


def available_backends(device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> dict[str, str | None]:
    """Every registered backend -> None if it can run (device, dtype), else the reason."""
    _load_builtin_backends()
    device = torch.device(device)
    return {name: b.unavailable(device, dtype) for name, b in _REGISTRY.items()}


def select_backend(requested: str | None, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs a bucket of (device, dtype) for a group's ``backend=``."""
    key = (requested or "auto", device.type, device.index, dtype)
    hit = _SELECTED.get(key)
    if hit is not None:
        return hit
    _load_builtin_backends()
    name = requested or "auto"
    if name == "auto":
        name = os.environ.get("FUSED_OPTIM_BACKEND", "auto") or "auto"
    if name != "auto":
        backend = get_backend(name)
        reason = backend.unavailable(device, dtype)
        if reason is not None:
            raise ValueError(
                f"fused_optim: backend {name!r} was requested but cannot run "
                f"{dtype} tensors on {device}: {reason}"
            )
        chosen = backend
    else:
        chosen = None
        reasons = []
        for candidate in AUTO_ORDER.get(device.type, DEFAULT_AUTO_ORDER):
            backend = _REGISTRY.get(candidate)
            if backend is None:
                continue
            reason = backend.unavailable(device, dtype)
            if reason is None:
                chosen = backend
                break
            reasons.append(f"{candidate}: {reason}")
        if chosen is None:
            raise ValueError(
                f"fused_optim: no backend can run {dtype} tensors on {device} "
                f"({'; '.join(reasons) or 'none registered'})"
            )
        if chosen.name == "reference" and reasons:
            once = (device.type, str(dtype))
            if once not in _FELL_BACK_WARNED:
                _FELL_BACK_WARNED.add(once)
                warnings.warn(
                    "fused_optim: using the pure-torch reference backend for "
                    f"{dtype} on {device.type} ({'; '.join(reasons)})",
                    stacklevel=3,
                )
    _SELECTED[key] = chosen
    return chosen


_LOADED = False


def _load_builtin_backends() -> None:
    """Registers the built-in backends on first use (importing them is not free)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from fused_optim import _native, _reference  # noqa: F401  (register on import)

    try:
        from fused_optim import _triton_backend  # noqa: F401
    except ImportError:
        pass
