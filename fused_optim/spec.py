"""An optimizer's spec: what every generic part of fused_optim reads instead of naming it.

An element-wise optimizer is its math and a declarative spec (DESIGN.md, "An optimizer
is its spec and its math"). The spec says

  * its element-wise lists: one tensor per param, shaped like it, each kept in the
    param's state under a torch.optim key (``exp_avg``), some only under an option
    (``max_exp_avg_sq`` with amsgrad, ``momentum_buffer`` with momentum);
  * its per-tensor scalar state: one one-element float tensor per param (``step``,
    a running product, a step size), which the kernels read and write;
  * its float and bool arguments, and where each is read from a param group;

and from it come the op schema (torch.ops.fused_optim.<name>_, csrc/ops.cpp), the fake
kernel (_fake.py), the eager entry's keys (csrc/eager.cpp), the reference dispatch
(_reference.py), the Triton launcher's lists (triton_kernels/launcher.py), the state
FusedOptimizer creates and checks (optimizer.py), the test tables and the benchmark's
byte model. The math is written once per kernel language, under the spec's name:
``csrc/include/fused_optim/math/<name>.h`` (C++), ``<name>_update`` and friends in
``triton_kernels/math.py``, and the ``reference`` function given here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

__all__ = ["StateList", "ScalarState", "FromGroup", "Hyper", "SparseGrads", "Spec",
           "initial_value", "register", "specs", "get"]


@dataclass(frozen=True)
class FromGroup:
    """A state's initial value read from the param group when the state is created
    (e.g. a per-element or per-tensor step size that starts at the group's lr)."""

    key: str


def initial_value(init: float | str | FromGroup, group: dict[str, Any],
                  defaults: dict[str, Any]) -> Any:
    """The value a new state tensor starts at: ``init`` itself, the defaults key a str
    names (torch.optim.Adagrad fills its sums with its constructor's
    ``initial_accumulator_value``, whatever a group says), or the group's key
    (``FromGroup``); a tensor value (a tensor lr) as a 0-dim tensor."""
    if isinstance(init, FromGroup):
        value = group[init.key]
    elif isinstance(init, str):
        value = defaults[init]
    else:
        value = init
    if hasattr(value, "dim") and value.dim() != 0:
        value = value.reshape(())
    return value


@dataclass(frozen=True)
class StateList:
    """An element-wise state list: ``arg`` in the op, ``key`` in each param's state.

    ``when`` names the hyperparameter that keeps the list: present when it is true or
    non-zero (``"amsgrad"``, ``"momentum"``), always when None. ``init`` is the value a
    new state tensor is filled with (see ``initial_value``).

    ``dtype``: a work list's fixed storage dtype ("bfloat16"), whatever the params' (and
    with no memory policy): a value the math writes into it is rounded to the params'
    dtype first, then to this one, as torch's ``.to(dtype)`` of a tensor of the params'
    dtype ([note: bf16 work lists] in csrc/include/fused_optim/math/optimizer.h; Muon's
    Newton-Schulz input and output). None: the memory policy's state dtype.
    """

    arg: str
    key: str
    when: str | None = None
    init: float | str | FromGroup = 0.0
    dtype: str | None = None


@dataclass(frozen=True)
class ScalarState:
    """Per-tensor scalar state: ``arg`` in the op (a list of one-element tensors), ``key``
    in each param's state, a float32 tensor (float64 under a float64 default dtype) on
    the param's device starting at ``init`` (see ``initial_value``). The kernels read
    and write it themselves: on a GPU it never leaves the device. ``host_read``:
    torch.optim reads it with ``.item()`` in its default path, which fails on meta
    tensors; so does this optimizer there, with torch's error."""

    arg: str
    key: str
    init: float | str | FromGroup = 0.0
    host_read: bool = False


@dataclass(frozen=True)
class Hyper:
    """A float or bool argument of the op. Read from the param group's ``group_key``
    (default: ``name``), element ``index`` of it when given (``betas``); with
    ``group_key=""`` the optimizer supplies it per call (a first step's flag, see
    FusedOptimizer._split_call), ``kind()`` (False, 0.0) in a call it does not set."""

    name: str
    kind: type = float
    group_key: str | None = None
    index: int | None = None

    def value(self, group: dict[str, Any]) -> Any:
        v = group[self.group_key or self.name]
        if self.index is not None:
            v = v[self.index]
        return self.kind(v)


@dataclass(frozen=True)
class SparseGrads:
    """How an optimizer steps a param whose grad is a sparse COO tensor (as
    ``nn.Embedding(sparse=True)`` makes them): on the rows the grad touches only, through
    the row-sparse engine (fused_optim/_sparse.py), whose every backend runs the row math
    named ``math`` (C++: the struct of that name in csrc/include/fused_optim/math/ listed in
    FO_FOR_EACH_ROW_MATH; Triton: ``<math>_rows`` in triton_kernels/math.py).

    * ``only``: True when the optimizer takes sparse grads only (torch.optim.SparseAdam;
      a dense grad raises ``dense_error``), False when it takes both.
    * ``states``: the element-wise state keys the row math reads and writes, in order.
    * ``coalesce``: True when duplicate indices are summed first, in the order torch's
      ``coalesce()`` sums them, and each touched row is updated once; False when each
      entry updates its row in turn, in index order (torch's ``param.add_(sparse)``).
    * ``constants(group, state)``: advances the param's per-tensor state (its step) as
      torch.optim does and returns the row math's per-tensor constants, as Python floats
      (torch.optim computes them in Python floats too).
    * ``reference(param, grad, states, constants)``: the row math as torch.optim runs it,
      in torch ops on a 2-D param ([rows, row length]) and its signed, uncoalesced grad.
    * ``engine(group)``: raises the error torch.optim raises for options it refuses with
      sparse grads; returns False for options the row math does not cover, whose sparse
      params the class's ``_sparse_torch_step`` then runs in torch ops.
    """

    only: bool
    math: str
    states: tuple[str, ...]
    coalesce: bool
    constants: Callable[[dict[str, Any], dict[str, Any]], list[float]]
    reference: Callable[..., None]
    engine: Callable[[dict[str, Any]], bool] | None = None
    dense_error: str | None = None


@dataclass(frozen=True)
class Spec:
    """The spec of one element-wise optimizer (one op: Adam and AdamW share ``adam``).

    ``reference`` is the optimizer's math in plain torch (see _reference.py for its
    signature); ``state_at_init`` says that torch.optim creates the state of every param
    in ``__init__`` rather than at each param's first step; ``bench`` holds the
    options the benchmark runs it with (e.g. a momentum, so that a buffer is kept).
    ``stages_of`` names the optimizer class whose element-wise stages the op runs when
    it is not a FusedOptimizer's whole step (Muon's, around its Newton-Schulz run: that
    class calls the backends itself).
    """

    name: str
    lists: tuple[StateList, ...]
    scalars: tuple[ScalarState, ...]
    hypers: tuple[Hyper, ...]
    reference: Callable[..., Any]
    state_at_init: bool = False
    bench: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    sparse: SparseGrads | None = None
    stages_of: str | None = None

    @property
    def op(self) -> str:
        return self.name + "_"

    # What the generic code reads on every step, computed once per spec (a frozen
    # dataclass keeps a __dict__, where cached_property stores them).

    @cached_property
    def floats(self) -> tuple[Hyper, ...]:
        return tuple(h for h in self.hypers if h.kind is float)

    @cached_property
    def flags(self) -> tuple[Hyper, ...]:
        return tuple(h for h in self.hypers if h.kind is bool)

    @cached_property
    def host_read(self) -> bool:
        """Whether torch.optim reads a per-tensor state on the host (ScalarState.host_read)."""
        return any(s.host_read for s in self.scalars)

    @cached_property
    def group_hypers(self) -> tuple[Hyper, ...]:
        """The arguments read from a param group (all but the per-call ones)."""
        return tuple(h for h in self.hypers if h.group_key != "")

    @cached_property
    def _list_args(self) -> tuple[str, ...]:
        return ("params", "grads", *(s.arg for s in self.lists))

    def list_args(self) -> tuple[str, ...]:
        """Every list argument of the op, in order: params, grads, the state lists."""
        return self._list_args

    def has(self, lst: StateList, hyper: dict[str, Any]) -> bool:
        """Whether a call with these hyperparameters keeps list ``lst``."""
        return lst.when is None or bool(hyper[lst.when])

    def present(self, hyper: dict[str, Any]) -> list[StateList]:
        """The state lists a call with these hyperparameters keeps, in op order."""
        return [s for s in self.lists if self.has(s, hyper)]

    def state_keys(self, group: dict[str, Any]) -> list[str]:
        """The per-param state keys kept under a param group's options."""
        hyper = {h.name: group[h.group_key or h.name] for h in self.group_hypers}
        return [s.key for s in self.scalars] + [s.key for s in self.present(hyper)]

    def schema(self, namespace: str = "fused_optim") -> str:
        """The op's schema: lists (mutated), then keyword-only lr, floats, flags,
        torch.amp.GradScaler's grad_scale / found_inf, and the memory policy's lists
        (``POLICY_ARGS``: each row's fp32 master copy and int64 rng_state, or None)."""
        letters = iter("abcdefghijklmnopqrstuvwxyz")
        lists = [f"Tensor({next(letters)}!)[] {a}"
                 for a in [*self.list_args(), *(s.arg for s in self.scalars)]]
        args = (["Tensor lr"] + [f"float {h.name}" for h in self.floats]
                + [f"bool {h.name}" for h in self.flags]
                + ["Tensor? grad_scale=None", "Tensor? found_inf=None"]
                + [f"Tensor({next(letters)}!)[]? {a}=None" for a in POLICY_ARGS])
        return f"{namespace}::{self.op}({', '.join(lists)}, *, {', '.join(args)}) -> ()"

    @cached_property
    def fixed_dtypes(self) -> dict[str, str]:
        """List arg -> its fixed storage dtype name, for the work lists that have one."""
        return {s.arg: s.dtype for s in self.lists if s.dtype is not None}

    def when(self) -> dict[str, str]:
        """Optional list -> the hyperparameter that keeps it (for csrc/ops.cpp)."""
        return {s.arg: s.when for s in self.lists if s.when is not None}


# The memory policy's optional lists of every op (fused_optim/_policy.py).
POLICY_ARGS = ("master_params", "rng_states")

_SPECS: dict[str, Spec] = {}
_HOOKS: list[Callable[[Spec], None]] = []


def register(spec: Spec) -> Spec:
    """Adds a spec (idempotent) and runs every registration hook on it: the C++ op and
    its fake kernel (_ops.py), the Triton op when that backend loads."""
    if spec.name in _SPECS:
        if _SPECS[spec.name] is not spec:
            raise ValueError(f"fused_optim: a different spec named {spec.name!r} exists")
        return spec
    _SPECS[spec.name] = spec
    for hook in _HOOKS:
        hook(spec)
    return spec


def on_register(hook: Callable[[Spec], None]) -> None:
    """Runs hook(spec) for every spec registered, now and later."""
    _HOOKS.append(hook)
    for spec in list(_SPECS.values()):
        hook(spec)


def specs() -> list[Spec]:
    """Every registered spec, in registration order."""
    return list(_SPECS.values())


def get(name: str) -> Spec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"fused_optim: no optimizer spec {name!r}; known: "
                         f"{', '.join(_SPECS)}") from None
