"""The row-sparse engine: the step of every param whose grad is a sparse COO tensor.

An ``nn.Embedding(sparse=True)`` grad names the rows a batch looked up, once per lookup
(duplicates included), with one value row each. torch.optim coalesces it (sorts and sums
the duplicates, single-threaded) and runs several sparse-tensor ops per param. Here each
optimizer that takes sparse grads says how in its spec (``Spec.sparse``, a
``SparseGrads``) and this module does the rest, once for all of them:

  * the grad as (row index of each entry, value rows): a param of shape
    ``[*sparse dims, *dense dims]`` is a matrix of ``prod(sparse dims)`` rows of
    ``prod(dense dims)`` elements, and an entry's row is its row-major index over the
    sparse dims (the index torch's ``coalesce()`` sorts by);
  * the per-tensor constants of the row math, from ``SparseGrads.constants`` (which
    advances the step, as torch.optim does, also for a grad without entries);
  * GradScaler: values multiplied by 1 / grad_scale in place, as GradScaler's own
    unscale does; a found_inf read on the host (the sparse path's one sync) skips the
    step of every sparse param;
  * one call per (device, dtype) bucket of the backend's ``sparse_step``:
    ``sparse_step(math, params, rows, values, states, constants, maximize)`` with
    params and states as 2-D ``[rows, row length]`` views, rows int64 ``[nnz]``, values
    ``[nnz, row length]`` in the param's dtype, states in the spec's order (state-major:
    all params' first state, then the second, ...), constants a float64 CPU tensor
    ``[params, constants]``. Every backend runs the same row math: coalesce (or not, see
    ``SparseGrads.coalesce``), then one pass over the touched rows that gathers the
    state, updates, and scatters back;
  * the backend: the group's, or where it has none the next of its device's auto order
    that has a sparse engine, else "reference"; a backend with a ``sparse_group`` entry
    (the CPU's) takes the bucket's params, states and constants as they are and makes
    the views, rows and values itself, in C++, unless something traces the call or the
    bucket is outside the entry's common case;
  * complex params, rows that are not contiguous and ``differentiable=True`` go to the
    reference, whose row math is torch.optim's own sparse ops.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fused_optim.backends import AUTO_ORDER, DEFAULT_AUTO_ORDER, Backend, get_backend
from fused_optim.backends import select_backend

__all__ = ["coo_rows", "step_sparse", "reference_sparse_step"]


def coo_rows(param: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(param as a [rows, row length] view, each entry's row (int64 [nnz]), its values
    as [nnz, row length]) of a sparse COO grad of `param` (contiguous)."""
    sparse_dim = grad.sparse_dim()
    lead = param.shape[:sparse_dim]
    row_len = math.prod(param.shape[sparse_dim:])
    indices = grad._indices()
    values = grad._values()
    if sparse_dim == 1:
        rows = indices[0].contiguous()  # a row of the [1, nnz] indices: no copy
        if values.dim() == 2 and values.is_contiguous():
            return param.view(-1, row_len), rows, values
    else:
        # The row-major index over the sparse dims, as coalesce() flattens them.
        strides = [math.prod(lead[d + 1:]) for d in range(sparse_dim)]
        rows = (indices * torch.tensor(strides, dtype=indices.dtype,
                                       device=indices.device)[:, None]).sum(0)
    nnz = values.shape[0]
    return (param.view(-1, row_len), rows.contiguous(),
            values.reshape(nnz, row_len).contiguous())


def _sparse_backend(requested: str | None, device: torch.device, dtype: torch.dtype) -> Backend:
    backend = select_backend(requested, device, dtype)
    if backend.sparse_step is not None:
        return backend
    for name in AUTO_ORDER.get(device.type, DEFAULT_AUTO_ORDER):
        try:
            candidate = get_backend(name)
        except ValueError:
            continue
        if candidate.sparse_step is not None and candidate.unavailable(device, dtype) is None:
            return candidate
    return get_backend("reference")


def unscale_and_check_skip(opt: Any, params: list[Tensor]) -> bool:
    """torch.amp.GradScaler's part of a sparse step: the grads' values multiplied by
    1 / grad_scale in place (as GradScaler unscales them itself for torch.optim), then
    True when found_inf is set (read on the host: the sparse path's one sync for it), so
    that nothing of the step runs."""
    grad_scale = getattr(opt, "grad_scale", None)
    found_inf = getattr(opt, "found_inf", None)
    if grad_scale is not None:
        inv_scale = grad_scale.double().reciprocal().float()
        for p in params:
            values = p.grad._values()
            values.mul_(inv_scale.to(values.device))
    return found_inf is not None and bool(found_inf.reshape(()).item() != 0)


def step_sparse(opt: Any, group: dict[str, Any], params: list[Tensor],
                hyper: dict[str, Any], engine: bool = True) -> None:
    """One step of a group's params whose grads are sparse (see the module docstring);
    `engine` False: the options are outside the row math (``SparseGrads.engine``)."""
    from fused_optim.optimizer import _eager_possible

    spec = opt.spec
    rule = spec.sparse
    if unscale_and_check_skip(opt, params):
        return
    if not engine:
        opt._sparse_torch_step(group, params)
        return
    state_of = opt.state
    needs_state = bool(rule.states or spec.scalars)
    buckets: dict[tuple, list[int]] = {}
    consts: list[list[float]] = []
    for i, p in enumerate(params):
        state = state_of[p] if needs_state else {}
        if needs_state:
            opt._create_state(group, p, state, hyper)
        consts.append(rule.constants(group, state))
        dense = p.is_contiguous() and not p.is_complex()
        ref = not dense or bool(group.get("differentiable"))
        buckets.setdefault((p.device, p.dtype, ref), []).append(i)
    maximize = bool(hyper.get("maximize", group.get("maximize", False)))
    for (device, dtype, ref), rows in buckets.items():
        backend = get_backend("reference") if ref else _sparse_backend(
            group.get("backend", "auto"), device, dtype)
        if backend.sparse_group is not None and _eager_possible():
            # The params and states as they are, in C++ (csrc/eager.cpp sparse_step_).
            bucket = [params[i] for i in rows]
            if backend.sparse_group(rule.math, bucket,
                                    [state_of[p][key] for key in rule.states for p in bucket],
                                    [consts[i] for i in rows], maximize):
                continue
        views, entry_rows, values = [], [], []
        states: list[list[Tensor]] = [[] for _ in rule.states]
        for i in rows:
            p = params[i]
            if backend.name == "reference":
                # The reference runs torch's sparse ops: the param, its grad as the
                # "rows" and the states as they are.
                views.append(p)
                entry_rows.append(p.grad)
                values.append(p.grad._values())
                for j, key in enumerate(rule.states):
                    states[j].append(state_of[p][key])
                continue
            view, r, v = coo_rows(p, p.grad)
            views.append(view)
            entry_rows.append(r)
            values.append(v)
            for j, key in enumerate(rule.states):
                states[j].append(state_of[p][key].view(view.shape))
        c = torch.tensor([consts[i] for i in rows], dtype=torch.float64).reshape(len(rows), -1)
        backend.sparse_step(rule.math, views, entry_rows, values,
                            [t for lst in states for t in lst], c, maximize=maximize)


def reference_sparse_step(math_name: str, params: list[Tensor], grads: list[Tensor],
                          _values: list[Tensor], states: list[Tensor], constants: Tensor,
                          maximize: bool) -> None:
    """The reference backend's sparse_step: each param's row math in torch.optim's own
    sparse ops (``SparseGrads.reference``), on the param and its sparse grad as given
    (the reference takes the grads, not rows and values)."""
    from fused_optim.spec import specs

    rule = next(s.sparse for s in specs() if s.sparse is not None and s.sparse.math == math_name)
    n = len(params)
    n_states = len(states) // n if n else 0
    for i, (p, g) in enumerate(zip(params, grads)):
        g = -g if maximize else g
        rule.reference(p, g, [states[j * n + i] for j in range(n_states)],
                       constants[i].tolist())
