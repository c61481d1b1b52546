"""The base class of fused_optim's optimizers: torch.optim bookkeeping, fused dispatch.

A subclass (Adam, SGD, ...) provides what torch.optim's class provides: validation,
defaults, ``_init_group`` (lazy state with torch.optim's keys) and a ``step`` that
gathers the group's flat tensor lists. This class does the rest, once for every
algorithm:

  * turns complex tensors into real views and DTensors into their local shards,
  * groups the rows (one param with its grad and state) by (device, dtype),
  * picks a backend per bucket (fused_optim.backends) and makes ONE call per bucket,
    or, in eager mode, one call per group through the backend's C++ group entry
    (``_step_group_eager``), which reads the group's rows itself,
  * passes lr as a tensor and grad_scale / found_inf (torch.amp.GradScaler) per device,
  * keeps state_dict() loadable both ways with the torch.optim class.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from fused_optim.backends import get_backend, select_backend

_BACKEND_DOC = """backend (str, optional): which implementation runs the step: "auto" (default:
            the environment variable FUSED_OPTIM_BACKEND if set, else the fastest backend
            that can run each (device, dtype) bucket), "cpu", "cuda", "triton" or
            "reference". A named backend that cannot run a bucket raises ValueError."""


def _check_backend_name(backend: Any) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto":
        get_backend(backend)  # ValueError for unknown names


def _dtensor_type():
    # Only look for DTensor if the user's program has imported it: importing
    # torch.distributed.tensor ourselves would cost every user start-up time.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def _kernel_view(t: Tensor, dtensor_type) -> Tensor:
    """The tensor a kernel updates for `t`: a DTensor's local shard, a complex
    tensor's real view; in place on the original storage either way."""
    if dtensor_type is not None and isinstance(t, dtensor_type):
        t = t.to_local()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t


def _same_dense_layout(row: list[Tensor]) -> bool:
    """True when a kernel may treat the row as flat arrays of one layout."""
    if all(t.is_contiguous() for t in row):
        return True
    first = row[0]
    dense = first.is_contiguous(memory_format=torch.channels_last) or (
        first.dim() == 5 and first.is_contiguous(memory_format=torch.channels_last_3d)
    )
    return dense and all(t.stride() == first.stride() for t in row[1:])


class FusedOptimizer(Optimizer):
    """torch.optim.Optimizer plus the fused, backend-dispatched step machinery."""

    def __init__(self, params, defaults: dict[str, Any], *, backend: str = "auto") -> None:
        _check_backend_name(backend)
        defaults = dict(defaults)
        defaults["backend"] = backend
        super().__init__(params, defaults)
        # torch.amp.GradScaler then passes grad_scale / found_inf instead of unscaling
        # grads and syncing on found_inf itself.
        self._step_supports_amp_scaling = True

    # -- torch.optim contract ----------------------------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("backend", "auto")
            for key, value in self._group_defaults().items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "backend" in param_group:
            _check_backend_name(param_group["backend"])
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict of this class or of the torch.optim class it replaces.

        Groups saved without ``backend`` (by torch.optim) keep this optimizer's choice.
        Every param's state is checked against what this optimizer keeps for it (keys,
        shapes), so a state_dict of another optimizer or model raises a ValueError naming
        the param instead of failing later inside a kernel.
        """
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict expects a dict with 'state' and "
                "'param_groups', as returned by state_dict()"
            )
        current = [g.get("backend", "auto") for g in self.param_groups]
        saved_groups = [
            {"backend": backend, **g}
            for g, backend in zip(state_dict["param_groups"], current + ["auto"] * len(state_dict["param_groups"]))
        ]
        # torch.optim's load_state_dict replaces self.state and self.param_groups with new
        # objects; a state_dict that fails the checks below puts the old ones back, so a
        # rejected load leaves the optimizer as it was.
        old_state, old_groups = self.state, self.param_groups
        super().load_state_dict({**state_dict, "param_groups": saved_groups})
        try:
            for gi, group in enumerate(self.param_groups):
                _check_backend_name(group["backend"])
                lacking = [k for k in self.defaults if k not in group]
                if lacking:
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: param group {gi} has no "
                        f"{lacking}; is the state_dict from another optimizer?"
                    )
                for pi, p in enumerate(group["params"]):
                    state = self.state.get(p)
                    if state:
                        self._check_loaded_state(group, p, state, f"group {gi}, param {pi}")
        except BaseException:
            self.state, self.param_groups = old_state, old_groups
            raise

    def _check_loaded_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                            where: str) -> None:
        expected = self._state_keys(group)
        missing = [k for k in expected if k not in state]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state of {where} has keys "
                f"{sorted(state)} but {type(self).__name__} needs {expected} "
                f"(missing {missing}); is the state_dict from another optimizer?"
            )
        for key in expected:
            value = state[key]
            if key == "step":
                if not isinstance(value, Tensor):
                    value = torch.tensor(float(value))
                state["step"] = value.to(device=p.device, dtype=torch.float32)
                continue
            if not isinstance(value, Tensor) or value.shape != p.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: state {key!r} of {where} has "
                    f"shape {shape} but the param has shape {tuple(p.shape)}"
                )
            if value.numel() > 1 and value.stride() != p.stride():
                # Saved from params of another memory layout (torch.optim keeps any):
                # the kernels read a row's tensors at the same offsets, so the state takes
                # the param's layout, once, here.
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    # -- what subclasses provide ---------------------------------------------------

    def _group_defaults(self) -> dict[str, Any]:
        """Keys a group loaded from an older state_dict may lack, with their defaults."""
        return {}

    def _state_keys(self, group: dict[str, Any]) -> list[str]:
        """The per-param state keys this optimizer keeps under the group's options."""
        raise NotImplementedError

    # -- the fused step ------------------------------------------------------------

    @staticmethod
    def _evaluate_closure(closure) -> Any:
        """torch.optim's closure protocol: re-evaluate the loss with grad enabled."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _step_group_eager(self, group: dict[str, Any], algorithm: str, **hyper: Any) -> bool:
        """Runs the group's step through its backend's C++ group entry, if it has one and
        the group is the common case; False (nothing changed) sends the group down the
        list path (``_init_group`` + ``_run_buckets``).

        The entry (csrc/eager.cpp) reads each param's grad and state straight from the
        objects and calls the same kernel the list path's op would: the list path spends
        ~1 us per param in Python and op entry (4 ms a step at 2,048 params on the dev
        machine), the entry ~0.7 us without building a Python object. It takes plain
        tensors on one device with one real dtype, contiguous, with all their state;
        everything else (first steps, complex, DTensor, other layouts, sparse grads and
        every error message) stays on the list path. Never while tracing or under a
        torch-function or dispatch mode: those must see the op itself.
        """
        params = group["params"]
        if not params or not _eager_possible():
            return False
        p0 = params[0]
        dtype = p0.dtype
        if dtype.is_complex:
            return False
        device = p0.device
        try:
            backend = select_backend(group["backend"], device, dtype)
        except ValueError:
            return False  # the list path raises it, for the bucket it concerns
        entry = getattr(backend, algorithm + "group_")
        if entry is None:
            return False
        return entry(
            params,
            self.state,
            lr=_lr_tensor(group["lr"], device),
            grad_scale=_on_device(getattr(self, "grad_scale", None), device),
            found_inf=_on_device(getattr(self, "found_inf", None), device),
            **hyper,
        )

    def _run_buckets(self, group: dict[str, Any], algorithm: str,
                     elementwise: list[list[Tensor]], per_tensor: list[list[Tensor]],
                     **hyper: Any) -> None:
        """Calls the backend's `algorithm` once per (device, dtype) bucket.

        `elementwise` are parallel lists of tensors shaped like the params (params
        first); a list may be empty (e.g. max_exp_avg_sqs without amsgrad) and then stays
        empty in every bucket. `per_tensor` are lists of one-element tensors, one per
        param (step counters). The backend gets `*elementwise, *per_tensor` in order.
        """
        params = elementwise[0]
        if not params:
            return
        buckets = self._single_bucket(elementwise, per_tensor)
        if buckets is None:
            buckets = self._split_buckets(elementwise, per_tensor)

        lr = group["lr"]
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        per_device: dict[torch.device, tuple] = {}
        for (device, dtype, dense), bucket in buckets.items():
            if device not in per_device:
                per_device[device] = (
                    _on_device(grad_scale, device),
                    _on_device(found_inf, device),
                    _lr_tensor(lr, device),
                )
            gs, fi, lr_t = per_device[device]
            backend = select_backend(group["backend"], device, dtype)
            if not dense and backend.name != "reference":
                # Rows whose tensors do not share one dense layout (e.g. a strided view
                # as a param): the compiled kernels index flat memory, the reference
                # uses torch ops and handles any strides.
                backend = get_backend("reference")
            fn: Callable[..., None] = getattr(backend, algorithm)
            fn(*bucket, lr=lr_t, grad_scale=gs, found_inf=fi, **hyper)

    @staticmethod
    def _single_bucket(elementwise: list[list[Tensor]], per_tensor: list[list[Tensor]]):
        """The common case in one cheap pass: every param on one device with one real
        dtype, plain tensors, params and grads contiguous. Returns None otherwise.
        (At 2048 params this costs ~1 ms here; torch._C's grouping costs ~2.4 ms.)"""
        params, grads = elementwise[0], elementwise[1]
        keys = {(p.device, p.dtype) for p in params}
        if len(keys) != 1:
            return None
        device, dtype = next(iter(keys))
        if dtype.is_complex:
            return None
        dtensor_type = _dtensor_type()
        if dtensor_type is not None and any(isinstance(p, dtensor_type) for p in params):
            return None
        if not all(p.is_contiguous() and g.is_contiguous() for p, g in zip(params, grads)):
            return None
        # States are created like their params (preserve_format); the ops check every
        # tensor's layout in C++ and raise rather than misread memory.
        return {(device, dtype, True): [*elementwise, *per_tensor]}

    @staticmethod
    def _split_buckets(elementwise: list[list[Tensor]], per_tensor: list[list[Tensor]]):
        """Rows grouped by (device, dtype, dense layout), through real views and local
        shards."""
        params = elementwise[0]
        dtensor_type = _dtensor_type()
        n = len(params)
        used = [len(lst) == n for lst in elementwise]
        n_lists = len(elementwise) + len(per_tensor)
        buckets: dict[tuple[torch.device, torch.dtype, bool], list[list[Tensor]]] = {}
        for i in range(n):
            row = [_kernel_view(lst[i], dtensor_type)
                   for lst, u in zip(elementwise, used) if u]
            p = row[0]
            key = (p.device, p.dtype, _same_dense_layout(row))
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = [[] for _ in range(n_lists)]
            j = 0
            for k, u in enumerate(used):
                if u:
                    bucket[k].append(row[j])
                    j += 1
            for k, lst in enumerate(per_tensor):
                bucket[len(elementwise) + k].append(lst[i])
        return buckets


def _eager_possible() -> bool:
    """True when nothing traces or intercepts torch calls, so a step may call kernels
    directly instead of through a dispatcher op."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack() > 0
    )


def _on_device(t: Tensor | None, device: torch.device) -> Tensor | None:
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)


def _lr_tensor(lr: float | Tensor, device: torch.device) -> Tensor:
    """lr as the ops take it: a one-element tensor (so a compiled step never
    specializes on its value). A tensor lr is used as given when it is on the CPU or
    on the params' device; a float becomes a float64 CPU scalar (exact, no transfer)."""
    if isinstance(lr, Tensor):
        if lr.device.type == "cpu" or lr.device == device:
            return lr
        return lr.to(device, non_blocking=True)
    return torch.tensor(float(lr), dtype=torch.float64)
