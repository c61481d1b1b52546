"""The base class of fused_optim's optimizers: torch.optim bookkeeping, fused dispatch.

A subclass provides what torch.optim's class provides: its signature,
validation and defaults, and its spec (fused_optim/spec.py: state lists and keys,
per-tensor state, arguments). This class does the rest, once for every optimizer, by
reading the spec:

  * creates each param's state lazily with torch.optim's keys (``_init_group``),
  * turns complex tensors into real views and DTensors into their local shards,
  * groups the rows (one param with its grad and state) by (device, dtype),
  * picks a backend per bucket (fused_optim.backends) and makes ONE call per bucket,
    or, in eager mode, one call per group through the backend's C++ group entry
    (``_step_group_eager``), which reads the group's rows itself,
  * passes lr as a tensor and grad_scale / found_inf (torch.amp.GradScaler) per device,
  * keeps state_dict() loadable both ways with the torch.optim class.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from fused_optim import _ops  # noqa: F401  (registers each spec's op as it is registered)
from fused_optim import _policy
from fused_optim._sparse import step_sparse
from fused_optim.backends import AUTO_ORDER, get_backend, select_backend
from fused_optim.spec import Spec, initial_value, register

_BACKEND_DOC = """backend (str, optional): which implementation runs the step: "auto" (default:
            the environment variable FUSED_OPTIM_BACKEND if set, else the fastest backend
            that can run each (device, dtype) bucket), "cpu", "cuda", "triton" or
            "reference". A named backend that cannot run a bucket raises ValueError."""


_POLICY_DOC = """state_dtype (torch.dtype, optional): the dtype of every element-wise state
            tensor (e.g. torch.bfloat16 for fp32 params); None (default) keeps torch.optim's.
        master_weights (bool, optional): keep an fp32 copy of bf16/fp16 params (state key
            ``master_param``), updated by the kernels, which write the rounded param in
            the same pass (default: False).
        stochastic_rounding (bool, optional): round every bf16 store stochastically from a
            seeded counter-based generator (state key ``rng_state``) (default: False).
            See fused_optim/_policy.py for the combinations each param dtype takes."""


# torch.optim's __setstate__ defaults of the flags its classes share (each class sets
# those it takes).
_FLAG_DEFAULTS = {"foreach": None, "maximize": False, "differentiable": False,
                  "capturable": False, "fused": None}


def _arg_docs(cls: type) -> dict[str, str]:
    """The argument docs every optimizer class shares, spliced into its docstring in
    place of ``{params}``, ``{flags}``, ``{maximize}``, ``{differentiable}`` and
    ``{backend}`` (cf. torch.optim's _params_doc, _foreach_doc ...)."""
    sig = inspect.signature(cls.__init__).parameters
    flags = [f for f in ("foreach", "fused", "capturable") if f in sig]
    return {
        "params": "params (iterable): parameters or param groups to optimize.",
        "flags": (f"{', '.join(flags)} (optional): accepted and refused where torch.optim "
                  "accepts and\n            refuses them, and kept in the param groups; "
                  "every fused_optim step is fused\n            and needs no host sync."),
        "maximize": "maximize (bool, optional): maximize the objective (default: False).",
        "differentiable": ("differentiable (bool, optional): record the step for autograd, as "
                           "torch.optim\n            does (default: False); such groups run "
                           "the reference math in torch ops."),
        "backend": _BACKEND_DOC,
        "policy": _POLICY_DOC,
    }


def check_lr(lr: Any) -> None:
    """torch.optim's first checks of lr, with its messages."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_betas(betas: Any) -> None:
    """torch.optim's checks of betas (each in [0, 1)), with its messages."""
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")


def check_eps_betas_weight_decay(eps: Any, betas: Any, weight_decay: Any) -> None:
    """torch.optim's checks of eps, betas and weight_decay in the Adam family (Adam,
    Adamax, NAdam, RAdam), in its order, with its messages."""
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    check_betas(betas)
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def check_fused_flags(fused: Any, foreach: Any, differentiable: Any) -> None:
    """torch.optim's checks of fused=True against the other flags, with its messages."""
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


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
    """torch.optim.Optimizer plus the fused, backend-dispatched step machinery, driven by
    the subclass's ``spec``."""

    spec: ClassVar[Spec]
    # The RuntimeError a sparse grad raises (torch's message where torch raises one).
    _sparse_error: ClassVar[str | None] = None
    # How torch.optim's single-tensor and foreach paths of this optimizer check
    # capturable=True (whether "xla" is in the devices they name, and whether its foreach
    # path checks capturable before differentiable): see _check_torch_paths.
    _capturable_xla: ClassVar[tuple[bool, bool]] = (True, False)
    # What those checks' messages name (single-tensor path, foreach path).
    _capturable_names: ClassVar[tuple[str, str]] = ("params and state_steps",) * 2
    _foreach_capturable_first: ClassVar[bool] = False
    # Per-param state torch.optim keeps as Python values (SparseAdam's int step): a
    # loaded state_dict must have them; they are not tensors to check.
    _host_state_keys: ClassVar[tuple[str, ...]] = ()
    _foreach_rejects_differentiable: ClassVar[bool] = True
    # Whether the class takes a memory policy (fused_optim/_policy.py): the element-wise
    # optimizers do.
    _memory_policy: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "spec" in cls.__dict__:
            register(cls.spec)  # defines its op (fused_optim/_ops.py)
        if cls.__doc__:
            for key, text in _arg_docs(cls).items():
                cls.__doc__ = cls.__doc__.replace("{" + key + "}", text)

    def __init__(self, params, defaults: dict[str, Any], *, backend: str = "auto",
                 **policy: Any) -> None:
        _check_backend_name(backend)
        defaults = dict(defaults)
        defaults["backend"] = backend
        if self._memory_policy:
            unknown = set(policy) - set(_policy.POLICY_KEYS)
            if unknown:
                raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments "
                                f"{sorted(unknown)}")
            defaults.update({k: policy.get(k, v) for k, v in _policy.POLICY_KEYS.items()})
        elif policy:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments "
                            f"{sorted(policy)}")
        super().__init__(params, defaults)
        # torch.amp.GradScaler then passes grad_scale / found_inf instead of unscaling
        # grads and syncing on found_inf itself.
        self._step_supports_amp_scaling = True
        if self.spec.state_at_init:
            # As torch.optim does for such optimizers: every param's state exists
            # from the start.
            for group in self.param_groups:
                hyper = self._hyper(group)
                for p in group["params"]:
                    self._create_state(group, p, self.state[p], hyper)

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
        if not self._memory_policy:
            for key in _policy.POLICY_KEYS:
                if key in param_group:
                    raise ValueError(f"{type(self).__name__} takes no memory policy "
                                     f"({key} was given)")
        super().add_param_group(param_group)
        if self._memory_policy:
            try:
                _policy.check_group(self.param_groups[-1], type(self).__name__)
            except ValueError:
                self.param_groups.pop()
                raise

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
        if self._memory_policy:
            # The optimizer's memory policy, not the saved one, says how states are kept
            # (a state_dict of any policy, or torch.optim's, loads into any policy).
            # torch.optim's load casts every state tensor to its param's dtype: the
            # policy's tensors pass through it wrapped, and are cast here, after.
            for g, mine in zip(saved_groups, self.param_groups):
                g.update({k: mine[k] for k in _policy.POLICY_KEYS})
            state_dict = {**state_dict, "state": _wrap_policy_tensors(
                state_dict.get("state", {}), {s.key for s in self.spec.scalars})}
        # torch.optim's load_state_dict replaces self.state and self.param_groups with new
        # objects; a state_dict that fails the checks below puts the old ones back, so a
        # rejected load leaves the optimizer as it was.
        old_state, old_groups = self.state, self.param_groups
        super().load_state_dict({**state_dict, "param_groups": saved_groups})
        try:
            if self._memory_policy:
                for group in self.param_groups:
                    for p in group["params"]:
                        if self.state.get(p):
                            self._apply_policy_to_loaded(group, p, self.state[p])
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

    def torch_state_dict(self) -> dict[str, Any]:
        """This optimizer's state_dict as torch.optim's class saves it: the memory
        policy's state keys (``master_param``, ``rng_state``) and group keys dropped.
        Loads into the torch.optim class, which casts the states to its params' dtype
        (a plain ``state_dict()`` loads too, but leaves the policy's keys in its state)."""
        sd = self.state_dict()
        if not self._memory_policy:
            return sd
        state = {pid: {k: v for k, v in st.items()
                       if k not in (_policy.MASTER_KEY, _policy.RNG_KEY)}
                 for pid, st in sd["state"].items()}
        groups = [{k: v for k, v in g.items() if k not in _policy.POLICY_KEYS}
                  for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def _apply_policy_to_loaded(self, group: dict[str, Any], p: Tensor,
                                state: dict[str, Any]) -> None:
        """A loaded param's state under the group's policy: element-wise states in the
        policy's dtype, the master copy (fp32) and rng_state where the policy keeps them
        (made from the param where the state_dict had none), dropped where it does not."""
        policy = _policy.policy_of(group)
        dtype = _policy.state_dtype(policy, p.dtype) if p.is_floating_point() else None
        keep = self._policy_keys(policy, p)
        for key in list(state):
            value = state[key]
            if not isinstance(value, _Wrapped):
                continue
            t = value.tensor
            if key in (_policy.MASTER_KEY, _policy.RNG_KEY):
                if key not in keep:
                    del state[key]
                    continue
                wanted = torch.float32 if key == _policy.MASTER_KEY else torch.int64
            else:
                wanted = dtype if dtype is not None and t.is_floating_point() else t.dtype
            state[key] = t.to(device=p.device, dtype=wanted)
        if _policy.MASTER_KEY in keep and _policy.MASTER_KEY not in state:
            state[_policy.MASTER_KEY] = torch.empty_like(
                p, dtype=torch.float32, memory_format=torch.preserve_format).copy_(p.detach())
        if _policy.RNG_KEY in keep and _policy.RNG_KEY not in state:
            state[_policy.RNG_KEY] = _policy.new_rng_state(p, self._param_index(p))

    def _check_loaded_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                            where: str) -> None:
        expected = self._state_keys(group, p)
        missing = [k for k in expected if k not in state]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state of {where} has keys "
                f"{sorted(state)} but {type(self).__name__} needs {expected} "
                f"(missing {missing}); is the state_dict from another optimizer?"
            )
        scalar_keys = {s.key for s in self.spec.scalars}
        for key in expected:
            if key in self._host_state_keys:
                continue
            if key == _policy.RNG_KEY:
                value = state[key]
                if (not isinstance(value, Tensor) or value.dtype != torch.int64
                        or value.shape != (2,)):
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: state {key!r} of {where} "
                        "must be an int64 tensor [seed, offset]")
                continue
            value = state[key]
            if key in scalar_keys:
                if not isinstance(value, Tensor):
                    value = torch.tensor(float(value), dtype=_scalar_dtype())
                dtype = value.dtype if value.dtype in (torch.float32, torch.float64) else (
                    torch.float32)
                state[key] = value.to(device=p.device, dtype=dtype)
                continue
            if not isinstance(value, Tensor) or value.shape != p.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: state {key!r} of {where} has "
                    f"shape {shape} but the param has shape {tuple(p.shape)}"
                )
            if value.layout == torch.strided and value.numel() > 1 and value.stride() != p.stride():
                # Saved from params of another memory layout (torch.optim keeps any):
                # the kernels read a row's tensors at the same offsets, so the state takes
                # the param's layout, once, here.
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    def _group_defaults(self) -> dict[str, Any]:
        """Keys a group loaded from an older state_dict may lack, with their defaults
        (torch.optim's ``__setstate__`` defaults): the flags this optimizer takes; a
        subclass adds its own options."""
        defaults = {k: v for k, v in _FLAG_DEFAULTS.items() if k in self.defaults}
        if self._memory_policy:
            defaults.update(_policy.POLICY_KEYS)
        return defaults

    def _state_keys(self, group: dict[str, Any], p: Tensor | None = None) -> list[str]:
        """The per-param state keys this optimizer keeps under the group's options (for
        param `p`, when given: the memory policy's keys too)."""
        keys = self.spec.state_keys(group)
        if p is not None and self._memory_policy:
            keys += self._policy_keys(_policy.policy_of(group), p)
        return keys

    @staticmethod
    def _policy_keys(policy: _policy.Policy, p: Tensor) -> list[str]:
        """The state keys a memory policy adds to param p's state."""
        if policy.default:
            return []
        return ([_policy.MASTER_KEY] if policy.master_weights else []) + (
            [_policy.RNG_KEY] if policy.stochastic_rounding else [])

    def _param_index(self, p: Tensor) -> int:
        """p's index among the optimizer's params, in group order (state_dict's ids)."""
        index = 0
        for group in self.param_groups:
            for q in group["params"]:
                if q is p:
                    return index
                index += 1
        return index

    # -- state -------------------------------------------------------------------------

    def _create_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                      hyper: dict[str, Any] | None = None) -> None:
        """Fills a param's missing state with torch.optim's keys, dtypes and initial
        values (the step counters on the param's device: the kernels read them there
        without a host sync). `hyper`: the group's ``_hyper``, when the caller has it."""
        spec = self.spec
        for s in spec.scalars:
            if s.key not in state:
                init = initial_value(s.init, group, self.defaults)
                state[s.key] = torch.as_tensor(init, dtype=_scalar_dtype(group),
                                               device=p.device).detach().clone()
        if hyper is None:
            hyper = self._hyper(group)
        policy = _policy.policy_of(group) if self._memory_policy else None
        # The state lists' dtype: the param's (torch.optim's), or the policy's.
        dtype = p.dtype if policy is None else _policy.state_dtype(policy, p.dtype)
        for s in spec.present(hyper):
            if s.key in state:
                continue
            init = initial_value(s.init, group, self.defaults)
            if isinstance(init, Tensor):
                # A tensor lr (a state list may start at the group's lr): copied on the
                # device, no host sync; both parts of a complex param take it, as
                # torch's complex(lr, lr).
                t = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
                (torch.view_as_real(t) if t.is_complex() else t).copy_(init.detach())
                state[s.key] = t
            elif init == 0:
                state[s.key] = torch.zeros_like(p, dtype=dtype,
                                                memory_format=torch.preserve_format)
            else:
                value = complex(init, init) if p.is_complex() else init
                state[s.key] = torch.full_like(p, value, dtype=dtype,
                                               memory_format=torch.preserve_format)
        if policy is not None and not policy.default:
            if policy.master_weights and _policy.MASTER_KEY not in state:
                state[_policy.MASTER_KEY] = torch.empty_like(
                    p, dtype=torch.float32, memory_format=torch.preserve_format).copy_(p.detach())
            if policy.stochastic_rounding and _policy.RNG_KEY not in state:
                state[_policy.RNG_KEY] = _policy.new_rng_state(p, self._param_index(p))

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        """The op's float and bool arguments for a param group (spec order), a per-call
        one (``group_key=""``) at its default, ``kind()`` (see ``_split_call``).

        Computed once per group and step and passed down: ``Hyper.value`` converts with
        float() / bool(), a host sync for a tensor hyperparameter on a GPU."""
        return {h.name: h.value(group) if h.group_key != "" else h.kind()
                for h in self.spec.hypers}

    def _init_group(self, group: dict[str, Any], *lists: list[Tensor],
                    hyper: dict[str, Any] | None = None,
                    policy_lists: tuple[list[Tensor], list[Tensor]] | None = None) -> bool:
        """Fills `lists`, one empty list per op list argument (spec.list_args()) and per
        per-tensor state list, with the group's params that have grads, their grads and
        state (a list the group's options leave out stays empty), creating state on
        first use; given one more list, appends to it the index of each row whose state
        this call created (for ``_split_call``). Every grad is checked first (and with
        fused=True every param that gets state, torch's device and dtype check), so a
        rejected step creates no state. `hyper`: the group's ``_hyper``, when the caller
        has it. `policy_lists`: two lists that receive each row's master copy and
        rng_state, when the group's memory policy keeps them (else they stay empty).

        torch.optim's protocol (the lists filled in place, a constant returned):
        torch.compile runs ``_init_group`` eagerly instead of tracing it, and installs
        guards on what it read."""
        spec = self.spec
        if hyper is None:
            hyper = self._hyper(group)
        n_lists = len(spec.list_args()) + len(spec.scalars)
        with_grad = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in with_grad):
            if spec.sparse is None:
                raise RuntimeError(self._sparse_error
                                   or f"{type(self).__name__} does not support sparse gradients")
            # Stepped by the row-sparse engine (_step_group, fused_optim/_sparse.py).
            with_grad = [p for p in with_grad if not p.grad.is_sparse]
        present = [(s.key, lists[2 + i]) for i, s in enumerate(spec.lists) if spec.has(s, hyper)]
        states = [(s.key, lists[len(spec.lists) + 2 + j]) for j, s in enumerate(spec.scalars)]
        policy = _policy.policy_of(group) if self._memory_policy else None
        if policy is not None and not policy.default and policy_lists is not None:
            keys = [_policy.MASTER_KEY, _policy.RNG_KEY]
            states = states + [(k, lst) for k, lst in zip(keys, policy_lists)
                               if k in self._policy_keys(policy, None)]
        needed = {key for key, _ in (*states, *present)}
        # One look-up per param (a tensor's hash is a Python call): its state, or
        # _NO_STATE; the rows that lack a key get their state below (a group that keeps
        # no state adds no entry, as torch.optim and the eager entry add none).
        state_of = self.state
        rows = [state_of.get(p, _NO_STATE) for p in with_grad]
        new_rows = [i for i, state in enumerate(rows) if not state.keys() >= needed]
        if group.get("fused"):
            self._check_fused(with_grad if not self._fused_checked
                              else [with_grad[i] for i in new_rows])
        for i in new_rows:
            p = with_grad[i]
            rows[i] = state_of[p]
            self._create_state(group, p, rows[i], hyper)
        if len(lists) > n_lists:
            lists[n_lists].extend(new_rows)
        lists[0].extend(with_grad)
        lists[1].extend(p.grad for p in with_grad)
        for state in rows:
            for key, lst in present:
                lst.append(state[key])
            for key, lst in states:
                lst.append(state[key])
        return False

    # -- the fused step ------------------------------------------------------------

    @staticmethod
    def _evaluate_closure(closure) -> Any:
        """torch.optim's closure protocol: re-evaluate the loss with grad enabled."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and
                returns the loss.
        """
        loss = self._evaluate_closure(closure)
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            for group in self.param_groups:
                self._step_group(group)
        return loss

    def _check_torch_paths(self, group: dict[str, Any]) -> None:
        """What torch.optim checks on the implementation `foreach` / `fused` select, and
        raises for, with its messages (fused_optim runs one implementation whatever they
        say, so it accepts what torch accepts and rejects what torch rejects):

          * fused=True: every param a floating-point tensor of a device with fused
            kernels (torch's own check), on a param's first step (in _init_group, as
            torch does it);
          * foreach=True: no differentiable=True, and with capturable=True params on a
            device torch can capture;
          * otherwise (the single-tensor path) with capturable=True the same devices.
        Not while compiling: torch.compile decides capturable itself, as in torch.optim
        ([note: torch.compile x capturable] there).
        """
        if group.get("fused") or not (group.get("foreach") or group.get("capturable")
                                      or group.get("differentiable")):
            return
        if torch.compiler.is_compiling():
            return
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        from torch.optim import optimizer as torch_optimizer

        def check_capturable(supports_xla: bool, names: str) -> None:
            if not group.get("capturable"):
                return
            devices = torch_optimizer._get_capturable_supported_devices(supports_xla)
            if not all(p.device.type in devices for p in params):
                raise AssertionError(
                    f"If capturable=True, {names} must be on supported devices: {devices}.")

        single_xla, foreach_xla = self._capturable_xla
        single_names, foreach_names = self._capturable_names
        if group.get("foreach"):
            if self._foreach_capturable_first:
                check_capturable(foreach_xla, foreach_names)
            if group.get("differentiable") and self._foreach_rejects_differentiable:
                raise AssertionError("_foreach ops don't support autograd")
            check_capturable(foreach_xla, foreach_names)
        else:
            check_capturable(single_xla, single_names)

    def _check_fused(self, params: list[Tensor]) -> None:
        """fused=True: torch's own device and dtype check, of every param with a grad at
        the first step, then of each param at its first step (_init_group)."""
        from torch.optim import optimizer as torch_optimizer

        for p in params:
            torch_optimizer._device_dtype_check_for_fused(p)
        self._fused_checked = True

    _fused_checked = False

    @property
    def _sparse_groups(self) -> set[int]:
        """ids of the param groups whose last step had sparse grads (see _step_group)."""
        groups = self.__dict__.get("_sparse_group_ids")
        if groups is None:
            groups = self.__dict__["_sparse_group_ids"] = set()
        return groups

    def _step_group(self, group: dict[str, Any]) -> None:
        """One step of one param group: the eager entry, else lists, the group's calls
        (``_split_call``), buckets, backends."""
        self._check_torch_paths(group)
        hyper = self._hyper(group)
        rule = self.spec.sparse
        # The eager entry takes dense grads only (and returns False, having changed
        # nothing, at a sparse one): groups with sparse grads take the list path, and a
        # group that had them last step does not try the entry first (a cold attempt
        # cost 0.08 ms of a 1.7 ms SGD step at Embedding(1M, 64)).
        sparse_before = rule is not None and (rule.only or id(group) in self._sparse_groups)
        if not sparse_before and self._step_group_eager(group, hyper):
            return
        sparse, dense = self._sparse_params(group)
        if rule is not None and not rule.only:
            (self._sparse_groups.add if sparse else self._sparse_groups.discard)(id(group))
        engine = self._check_sparse(group, sparse)
        if dense:
            new_rows: list[int] = []
            lists, states = self._group_lists(group, hyper, new_rows)
            for call_lists, call_states, call_hyper in self._split_call(
                    group, lists, states, hyper, new_rows):
                self._run_buckets(group, call_lists, call_states, call_hyper)
        if sparse:
            step_sparse(self, group, sparse, hyper, engine)

    def _sparse_params(self, group: dict[str, Any]) -> tuple[list[Tensor], bool]:
        """(the group's params whose grads are sparse, whether the dense path has work:
        a dense grad, or no grad at all, whose state a dense step may still create); for
        an optimizer that takes sparse grads only (``SparseGrads.only``), every param
        with a grad, after torch's error for a dense one."""
        rule = self.spec.sparse
        with_grad = [p for p in group["params"] if p.grad is not None]
        if rule is not None and rule.only:
            if any(not p.grad.is_sparse for p in with_grad):
                raise RuntimeError(rule.dense_error)
            return with_grad, False
        sparse = [p for p in with_grad if p.grad.is_sparse]
        return sparse, len(sparse) < len(with_grad) or not with_grad

    def _check_sparse(self, group: dict[str, Any], sparse: list[Tensor]) -> bool:
        """Before anything changes: the error for sparse grads this optimizer or these
        options refuse (torch's), and whether the row-sparse engine runs them (else
        ``_sparse_torch_step``)."""
        if not sparse:
            return True
        rule = self.spec.sparse
        if rule is None:
            raise RuntimeError(self._sparse_error
                               or f"{type(self).__name__} does not support sparse gradients")
        if self._memory_policy and not _policy.policy_of(group).default:
            raise RuntimeError(f"{type(self).__name__}: sparse gradients take no memory policy "
                               "(state_dtype, master_weights, stochastic_rounding) yet")
        return rule.engine is None or rule.engine(group)

    def _sparse_torch_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """The step of sparse-grad params under options the row math does not cover
        (``SparseGrads.engine`` returned False), in torch.optim's own ops."""
        raise NotImplementedError(f"{type(self).__name__}: no torch path for these sparse options")

    def _group_lists(self, group: dict[str, Any], hyper: dict[str, Any] | None = None,
                     new_rows: list[int] | None = None,
                     ) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
        """(the op's lists, the per-tensor state lists) of a group (_init_group);
        `new_rows`, when given, receives the index of each row whose state was created."""
        n = len(self.spec.list_args())
        lists: list[list[Tensor]] = [[] for _ in range(n + len(self.spec.scalars))]
        policy_lists = ([], [])
        self._init_group(group, *lists, *([] if new_rows is None else [new_rows]), hyper=hyper,
                         policy_lists=policy_lists)
        states = lists[n:]
        if self._memory_policy and not _policy.policy_of(group).default:
            states += list(policy_lists)  # _run_buckets passes them by keyword
        return lists[:n], states

    def _split_call(self, group: dict[str, Any], lists: list[list[Tensor]],
                    states: list[list[Tensor]], hyper: dict[str, Any], new_rows: list[int],
                    ) -> list[tuple[list[list[Tensor]], list[list[Tensor]], dict[str, Any]]]:
        """The calls that step a group's rows: (lists, states, hyper) each, run through
        ``_run_buckets`` in order. The default is one call with the group's ``hyper``.

        An optimizer with a per-call argument (``group_key=""``) overrides this to give
        it per call, e.g. by whether a row's state was created by this step (its index
        in `new_rows`). The eager entry, which only takes a group whose rows all have
        their state, passes such an argument at its default (see ``_hyper``), so that
        default must be its value for rows with state."""
        return [(lists, states, hyper)]

    @staticmethod
    def _rows(lists: list[list[Tensor]], rows: list[int]) -> list[list[Tensor]]:
        """`lists` restricted to `rows` (an empty list stays empty)."""
        return [[lst[i] for i in rows] if lst else lst for lst in lists]

    def _step_group_eager(self, group: dict[str, Any], hyper: dict[str, Any]) -> bool:
        """Runs the group's step through its backend's C++ group entry, if it has one and
        the group is the common case; False (nothing changed) sends the group down the
        list path (``_init_group`` + ``_run_buckets``).

        The entry (csrc/eager.cpp) reads each param's grad and state straight from the
        objects and runs the op's own implementation: the list path spends ~1 us per
        param in Python and op entry (4 ms a step at 2,048 params on the dev machine),
        the entry ~0.7 us without building a Python object. It takes plain tensors on
        one device with one real dtype, contiguous, with all their state; everything
        else (first steps, complex, DTensor, other layouts, sparse grads and every error
        message) stays on the list path. Never while tracing or under a torch-function
        or dispatch mode: those must see the op itself.
        """
        params = group["params"]
        if not params or not _eager_possible() or group.get("differentiable"):
            return False
        if self._memory_policy and not _policy.policy_of(group).default:
            return False  # the entry reads torch.optim's state keys only
        p0 = params[0]
        dtype = p0.dtype
        if dtype.is_complex:
            return False
        device = p0.device
        try:
            backend = select_backend(group["backend"], device, dtype)
        except ValueError:
            return False  # the list path raises it, for the bucket it concerns
        entry = backend.step_group
        if entry is None:
            return False
        spec = self.spec
        lr, grad_scale, found_inf = self._device_args(group, device)
        return entry(
            spec.op,
            params,
            self.state,
            [s.key if spec.has(s, hyper) else None for s in spec.lists],
            [s.key for s in spec.scalars],
            lr,
            [hyper[h.name] for h in spec.floats],
            [hyper[h.name] for h in spec.flags],
            grad_scale,
            found_inf,
        )

    def _device_args(self, group: dict[str, Any], device: torch.device,
                     ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(lr, grad_scale, found_inf) as the ops take them for params on `device`."""
        return (_lr_tensor(group["lr"], device),
                _on_device(getattr(self, "grad_scale", None), device),
                _on_device(getattr(self, "found_inf", None), device))

    def _run_buckets(self, group: dict[str, Any], lists: list[list[Tensor]],
                     states: list[list[Tensor]], hyper: dict[str, Any]) -> None:
        """Calls the backend's step once per (device, dtype) bucket.

        `lists` are the op's element-wise lists, tensors shaped like the params (params
        first); a list may be empty (e.g. max_exp_avg_sqs without amsgrad) and then stays
        empty in every bucket. `states` are lists of one-element tensors, one per param
        (step counters), then, under a memory policy, the rows' master copies and
        rng_states (either may be empty). The backend gets `*lists, *states` in order,
        the policy's lists as ``master_params`` and ``rng_states``.
        """
        params = lists[0]
        if not params:
            return
        n_scalars = len(self.spec.scalars)
        has_policy = len(states) > n_scalars
        buckets = self._single_bucket(lists, states)
        if buckets is None:
            buckets = self._split_buckets(lists, states)

        differentiable = bool(group.get("differentiable", False))
        per_device: dict[torch.device, tuple] = {}
        for (device, dtype, dense), bucket in buckets.items():
            if device.type == "meta" and self.spec.host_read and not group.get("capturable"):
                # torch.optim reads such a state with .item() (ScalarState.host_read):
                # on meta params that raises, after the state is created, as here.
                raise RuntimeError("Tensor.item() cannot be called on meta tensors")
            if device not in per_device:
                per_device[device] = self._device_args(group, device)
            lr_t, gs, fi = per_device[device]
            backend = select_backend(group["backend"], device, dtype)
            if (not dense or differentiable) and backend.name != "reference":
                # Rows whose tensors do not share one dense layout (e.g. a strided view
                # as a param): the compiled kernels index flat memory, the reference
                # uses torch ops and handles any strides. differentiable=True: the
                # reference's torch ops record the step for autograd.
                backend = get_backend("reference")
            if not has_policy:
                backend.step(self.spec, *bucket, lr=lr_t, grad_scale=gs, found_inf=fi, **hyper)
                continue
            if not backend.policies:
                backend = _policy_fallback(group, backend, device, dtype)
            n = len(lists) + n_scalars
            backend.step(self.spec, *bucket[:n], lr=lr_t, grad_scale=gs, found_inf=fi,
                         master_params=bucket[n] or None, rng_states=bucket[n + 1] or None,
                         **hyper)

    @staticmethod
    def _single_bucket(lists: list[list[Tensor]], states: list[list[Tensor]]):
        """The common case in one cheap pass: every param on one device with one real
        dtype, plain tensors, params and grads contiguous. Returns None otherwise.
        (At 2048 params this costs ~1 ms here; torch._C's grouping costs ~2.4 ms.)"""
        params, grads = lists[0], lists[1]
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
        return {(device, dtype, True): [*lists, *states]}

    @staticmethod
    def _split_buckets(lists: list[list[Tensor]], states: list[list[Tensor]]):
        """Rows grouped by (device, dtype, dense layout), through real views and local
        shards."""
        params = lists[0]
        dtensor_type = _dtensor_type()
        n = len(params)
        used = [len(lst) == n for lst in lists]
        n_lists = len(lists) + len(states)
        buckets: dict[tuple[torch.device, torch.dtype, bool], list[list[Tensor]]] = {}
        for i in range(n):
            row = [_kernel_view(lst[i], dtensor_type) for lst, u in zip(lists, used) if u]
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
            for k, lst in enumerate(states):
                if lst:  # a policy's list may be empty
                    bucket[len(lists) + k].append(lst[i])
        return buckets


_POLICY_WARNED: set[tuple[str, str]] = set()


def _policy_fallback(group: dict[str, Any], backend, device: torch.device,
                     dtype: torch.dtype):
    """The backend that runs a memory policy in place of `backend`, which has none: under
    backend="auto" the next one in AUTO_ORDER that has policies and can run the bucket
    (saying so once), else a ValueError."""
    if group["backend"] != "auto":
        raise ValueError(f"fused_optim: backend {backend.name!r} has no memory policy "
                         f"(state_dtype, master_weights, stochastic_rounding) yet; use "
                         f"backend='auto' or 'reference' for {dtype} on {device}")
    chosen = get_backend("reference")
    for name in AUTO_ORDER.get(device.type, []):
        candidate = get_backend(name)
        if candidate.policies and candidate.unavailable(device, dtype) is None:
            chosen = candidate
            break
    once = (backend.name, device.type)
    if once not in _POLICY_WARNED:
        _POLICY_WARNED.add(once)
        warnings.warn(f"fused_optim: backend {backend.name!r} has no memory policy yet; "
                      f"backend {chosen.name!r} runs these {device.type} buckets", stacklevel=4)
    return chosen


# The state _init_group reads for a param that has none (never written).
_NO_STATE: Mapping[str, Any] = MappingProxyType({})


class _Wrapped:
    """A state tensor carried through torch.optim's load_state_dict uncast (it casts
    tensors only): see FusedOptimizer.load_state_dict."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def _wrap_policy_tensors(state: dict, scalar_keys: set[str]) -> dict:
    """A saved state with each element-wise state tensor, master copy and rng_state
    wrapped (the per-tensor scalars, which torch.optim treats apart, as they are)."""
    return {pid: {k: _Wrapped(v) if isinstance(v, Tensor) and k not in scalar_keys else v
                  for k, v in st.items()} if isinstance(st, dict) else st
            for pid, st in state.items()}


def _scalar_dtype(group: dict[str, Any] | None = None) -> torch.dtype:
    """The dtype torch.optim gives a new step counter: float32, or float64 when the
    default dtype is float64 (torch.optim.optimizer._get_scalar_dtype), float32 with
    fused=True."""
    if group is not None and group.get("fused"):
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


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
