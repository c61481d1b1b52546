"""Bytes moved per parameter element by one optimizer step: algorithm x storage policy.

An element-wise optimizer step streams every tensor it touches once. What it touches is a
property of the algorithm (which tensors are read, which written); how many bytes each
costs is a property of the storage policy (the dtype of params, grads and each state).

The algorithm comes from the optimizer's spec (fused_optim/spec.py, ``algorithm_for``):
the param is read and written, the grad read, and every element-wise state list the run's
options keep (a list with ``when`` only when that option is on) read and written; the
per-tensor scalar state (a step counter: a few bytes per tensor) is left out.

    fp32 AdamW (exp_avg, exp_avg_sq): reads p, g, m, v = 16 B   writes p, m, v = 12 B   28 B
    bf16 AdamW (all bf16):            reads 4 x 2 B    =  8 B   writes 3 x 2 B =  6 B   14 B
    bf16 params + fp32 m, v:          reads 2+2+4+4    = 12 B   writes 2+4+4   = 10 B   22 B
    fp32, one state list (a momentum buffer): reads p, g, s = 12 B  writes p, s = 8 B  20 B

Achieved GB/s is these algorithmic bytes over the step time: what an ideal single-pass
kernel must move, so a multi-pass implementation (torch's for-loop and foreach) is charged
for the work, not for its extra passes.

The storage policy of a run is read off the optimizer itself after its first step
(``policy_of``): each provider keeps its states in the dtype it chooses (torch keeps them
in the param dtype, DeepSpeedCPUAdam in fp32, 8-bit optimizers in 1 B plus block scales),
and the GB/s of each provider is computed with the bytes that provider actually moves.

A step on sparse grads (an embedding shape: ``nn.Embedding(sparse=True)``) touches rows,
not the table (``sparse_bytes_per_step``): for each distinct row the lookups touch, the
param row and every state row are read and written once; each grad entry (one per
lookup, duplicates included) is read once, with its int64 row index:

    per touched row element   reads p + each state, writes p + each state
    per lookup                reads row_len grad values + 8 B of index

    fp32 SparseAdam (exp_avg, exp_avg_sq): 24 B per touched element + 4 B per grad value
    fp32 Adagrad (sum): 16 B; fp32 SGD (no state): 8 B; + 4 B per grad value each
    + 8 B per lookup

The distinct rows are counted on the grads the run draws (a step's coalesced nnz).
Coalescing itself (sorting the indices, summing duplicates) moves no more than this in an
ideal kernel that sums the entries of a row as it reads them, and is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Algorithm", "algorithm_for", "algorithm_of_spec", "StoragePolicy",
           "bytes_per_element", "sparse_bytes_per_step", "policy_of", "INDEX_BYTES"]

# An nn.Embedding grad's row indices are int64.
INDEX_BYTES = 8


@dataclass(frozen=True)
class Algorithm:
    """Which per-element tensors one step reads and writes. "param" and "grad" are the
    param and its gradient; every other name is an optimizer state of the param's size
    (the state key in torch.optim's state dict)."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]

    @property
    def states(self) -> tuple[str, ...]:
        return tuple(n for n in self.reads if n not in ("param", "grad"))


def algorithm_of_spec(spec, options: dict[str, Any], name: str | None = None) -> Algorithm:
    """The tensors one step of ``spec`` touches under ``options`` (a param group's
    hyperparameters by their group keys, e.g. an optimizer's defaults)."""
    hyper = {}
    for h in spec.group_hypers:   # a per-call argument (a first-step flag) keeps no list
        try:
            hyper[h.name] = h.value(options)
        except (KeyError, IndexError, TypeError):
            hyper[h.name] = options.get(h.name)
    states = tuple(s.key for s in spec.present(hyper))
    return Algorithm(name or spec.name, ("param", "grad", *states), ("param", *states))


def algorithm_for(optim: str, options: dict[str, Any] | None = None, *,
                  sparse: bool = False) -> Algorithm:
    """The algorithm of a benchmarked optimizer (its name: the fused_optim class name
    lowercased) under the benchmark's hyperparameters (of its sparse-grad cases with
    ``sparse``), updated with ``options``."""
    from .providers import Hyper

    hyper = Hyper.for_optim(optim, sparse=sparse)
    return algorithm_of_spec(hyper.spec, {**hyper.values, **(options or {})}, optim)


@dataclass(frozen=True)
class StoragePolicy:
    """Bytes per param element of each tensor role. ``states`` maps a state name to its
    bytes per element (fractional for block-quantized states: 1 B + a scale per block);
    a state not named takes ``default_state``."""

    param: float
    grad: float
    default_state: float
    states: dict[str, float] = field(default_factory=dict)

    @classmethod
    def uniform(cls, dtype: torch.dtype, state_dtype: torch.dtype | None = None) -> StoragePolicy:
        size = _itemsize(dtype)
        return cls(size, size, _itemsize(state_dtype) if state_dtype is not None else size)

    def bytes_of(self, role: str) -> float:
        if role == "param":
            return self.param
        if role == "grad":
            return self.grad
        return self.states.get(role, self.default_state)

    def describe(self) -> str:
        st = sorted(set(self.states.values())) or [self.default_state]
        return f"p{_fmt(self.param)} g{_fmt(self.grad)} s{'/'.join(_fmt(s) for s in st)}"


def bytes_per_element(algorithm: str | Algorithm, policy: StoragePolicy) -> tuple[float, float]:
    """(bytes read, bytes written) per param element by one step; ``algorithm`` may be an
    optimizer's benchmark name (``algorithm_for``)."""
    alg = algorithm_for(algorithm) if isinstance(algorithm, str) else algorithm
    return (sum(policy.bytes_of(r) for r in alg.reads),
            sum(policy.bytes_of(w) for w in alg.writes))


def sparse_bytes_per_step(algorithm: str | Algorithm, policy: StoragePolicy, *,
                          unique_rows: float, lookups: int, row_len: int,
                          index_bytes: int = INDEX_BYTES) -> tuple[float, float]:
    """(bytes read, bytes written) by one step on a sparse grad (see the module doc):
    ``unique_rows`` distinct rows of ``row_len`` elements touched by ``lookups`` entries.
    ``policy.grad`` is the bytes of one grad value."""
    alg = algorithm_for(algorithm, sparse=True) if isinstance(algorithm, str) else algorithm
    touched = unique_rows * row_len
    read = (touched * sum(policy.bytes_of(r) for r in alg.reads if r != "grad")
            + lookups * (row_len * policy.grad + index_bytes))
    write = touched * sum(policy.bytes_of(w) for w in alg.writes)
    return read, write


def policy_of(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> tuple[Algorithm, StoragePolicy]:
    """The algorithm and storage policy an optimizer really runs, read from its state
    after at least one step.

    Every state tensor that is not 0-dim counts as read and written once per step, with
    its actual storage (nbytes / param numel, so block scales of 8-bit states are
    included). 0-dim and non-tensor states (``step``) are ignored. States that a provider keeps outside
    ``optimizer.state`` (none of the providers here) would be missed.
    """
    numel = sum(p.numel() for p in params)
    grad_bytes = sum(_nbytes(p.grad) for p in params if p.grad is not None)
    param_bytes = sum(_nbytes(p) for p in params)
    per_state: dict[str, float] = {}
    for p in params:
        for name, value in optimizer.state.get(p, {}).items():
            for sub_name, t in _state_tensors(name, value):
                if t.dim() == 0:   # the step counter, a scalar
                    continue
                per_state[sub_name] = per_state.get(sub_name, 0.0) + _nbytes(t)
    states = {k: v / numel for k, v in per_state.items()}
    names = tuple(sorted(states))
    alg = Algorithm("observed", ("param", "grad", *names), ("param", *names))
    return alg, StoragePolicy(param_bytes / numel, grad_bytes / numel, 0.0, states)


def _state_tensors(name, value):
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if isinstance(v, torch.Tensor):
                yield f"{name}.{i}", v


def _nbytes(t: torch.Tensor) -> float:
    # Tensor subclasses (torchao's quantized states) report their logical size through
    # numel(); their inner tensors hold the real bytes.
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        try:
            names, _ = t.__tensor_flatten__()
            return float(sum(_nbytes(getattr(t, n)) for n in names))
        except Exception:  # noqa: BLE001  (fall back to the logical size)
            pass
    return float(t.numel() * t.element_size())


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _fmt(x: float) -> str:
    return f"{x:g}" if x == int(x) else f"{x:.2f}"
