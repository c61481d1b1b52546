"""The dispatcher ops torch.ops.fused_optim.<name>_, one per optimizer spec: registration,
schema, torch.library.opcheck over every option case of the table (each selects its own
kernel template) with and without GradScaler's arguments, the C++ kernels against the
reference backend, and fake kernels that validate like the C++ ones.

Inputs come from the optimizer itself: a few reference-backend steps on random grads
give every state list realistic values (RMSprop's centered average below its square
average, Adagrad's sums positive, ...), then the op's arguments are read off the
optimizer (its lists and per-tensor state, fused_optim/spec.py) and copied.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fused_optim  # noqa: F401  (loads _C, registers the ops)
from _oracle import assert_scalar_state_close, cpu_capability
from _tables import (
    DEFAULT_CASES,
    FULL_CASES,
    OPTIMIZER_CASES,
    OPTIMIZERS,
    case_ids,
    case_named,
    cpu_capabilities,
)
from fused_optim import _extension, _reference
from fused_optim.spec import POLICY_ARGS, specs

pytestmark = [pytest.mark.skipif(_extension.C is None, reason="fused_optim._C is not built"),
              pytest.mark.usefixtures("oracle_threads")]

SHAPES = [(3,), (4, 5), (17,)]
SCALERS = [None, 0.0, 1.0]  # no GradScaler, a finite step, a skipped step (found_inf)


def _scaler_id(scaler):
    return {None: "plain", 0.0: "scaled", 1.0: "skipped"}[scaler]


def op_inputs(case, dtype=torch.float32, scaler=None, first_step=False):
    """(op, args, kwargs) of one call of case's op on realistic state: the params after
    two reference steps, fresh grads. `first_step` sets the call-time flags of the spec
    (SGD's is_first_step)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
              for s in SHAPES]
    opt = case.fused(params, backend="reference", **case.options)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
        if _ < 2:
            opt.step()
    group = opt.param_groups[0]
    lists, states = opt._group_lists(group)
    spec = opt.spec
    hyper = opt._hyper(group)
    for h in spec.hypers:
        if h.group_key == "":
            hyper[h.name] = h.kind(first_step)
    args = tuple([t.detach().clone() for t in lst] for lst in (*lists, *states))
    kwargs = dict(lr=torch.tensor(case.options["lr"]), **hyper)
    if scaler is not None:
        kwargs.update(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(scaler))
    return getattr(torch.ops.fused_optim, spec.op), args, kwargs


def _call_flags(case):
    """The call-time flags worth testing for case: is_first_step only with momentum."""
    spec = case.spec
    if any(h.group_key == "" for h in spec.hypers) and case.options.get("momentum", 0):
        return [False, True]
    return [False]


OP_CASES = [pytest.param(c, s, f, id=f"{c.id}-{_scaler_id(s)}{'-first' if f else ''}")
            for c in OPTIMIZER_CASES for s in SCALERS for f in _call_flags(c)]
# The full opcheck (its aot_dispatch_dynamic part costs ~1 s here): every optimizer's
# cases with every option on and its default, without and with a scaler.
FULL_OP_CASES = [pytest.param(c, s, id=f"{c.id}-{_scaler_id(s)}")
                 for c in {c.id: c for c in FULL_CASES + DEFAULT_CASES}.values()
                 for s in (None, 0.0)]


def test_every_spec_is_registered_with_its_schema():
    assert {s.op for s in specs()} >= {row.fused.spec.op for row in OPTIMIZERS}
    # A spec that takes sparse grads only (SparseAdam) has no dense op: its engine's op
    # is tests/test_sparse.py's.
    for spec in [s for s in specs() if s.sparse is None or not s.sparse.only]:
        qualname = f"fused_optim::{spec.op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"), \
            "no fake / meta kernel"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "ADInplaceOrView")
        schema = getattr(torch.ops.fused_optim, spec.op).default._schema
        written = [a.name for a in schema.arguments
                   if a.alias_info is not None and a.alias_info.is_write]
        assert written == [*spec.list_args(), *(s.arg for s in spec.scalars), *POLICY_ARGS]
        assert str(schema) == spec.schema()
        assert len(schema.returns) == 0


def test_extension_shares_torchs_cpp_runtime():
    # _C must not carry its own copy of libstdc++ (setup.py _torch_libstdcxx): a private
    # copy's locale is never initialized, and the first error message formatting an
    # integer crashed there (bench/results/nvidia-h200/NOTES.md). nm comes with binutils,
    # which the compiler that built _C needs.
    import shutil
    import subprocess

    nm = shutil.which("nm")
    assert nm is not None, "nm (binutils) is needed to inspect fused_optim._C"
    out = subprocess.run([nm, "-D", "--defined-only", _extension.C.__file__],
                         capture_output=True, text=True, check=True).stdout
    runtime = [line.split()[-1] for line in out.splitlines()
               if line.split()[1:2] == ["T"]
               and line.split()[-1].startswith(("_ZNSt6locale", "_ZNSt8ios_base", "_ZNSo"))]
    assert not runtime, f"fused_optim._C defines libstdc++'s own symbols: {runtime[:5]}"
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[4\]"):
        torch.ops.fused_optim.adam_(
            [torch.zeros(5)], [torch.zeros(4)], [torch.zeros(5)], [torch.zeros(5)], [],
            [torch.zeros(())], lr=torch.tensor(0.1), beta1=0.9, beta2=0.999, weight_decay=0.0,
            eps=1e-8, amsgrad=False, maximize=False, decoupled_weight_decay=False)


def test_schema_that_disagrees_with_the_cpp_math_is_rejected():
    """csrc/ops.cpp binds a schema to the C++ math by name: a spec whose lists or
    arguments differ from the math of that name fails at registration, naming both."""
    import dataclasses

    from fused_optim.spec import Hyper

    spec = fused_optim.Adam.spec
    renamed = dataclasses.replace(spec, hypers=(Hyper("beta_one", float, "betas", 0),
                                                *spec.hypers[1:]))
    with pytest.raises(ValueError, match=r"float arguments \[beta_one, .*\] where the C\+\+ "
                                         r"math has \[beta1, "):
        _extension.C.register_op(renamed.schema(), renamed.when())
    with pytest.raises(ValueError, match="optional in the C\\+\\+ math but not in the spec"):
        _extension.C.register_op(spec.schema(), {})
    with pytest.raises(ValueError, match="no C\\+\\+ math"):
        _extension.C.register_op(spec.schema().replace("adam_", "nosuch_"), spec.when())
    assert _extension.C.register_op(spec.schema(), spec.when()) is False  # exists already


@pytest.mark.parametrize("case,scaler", FULL_OP_CASES)
def test_opcheck(case, scaler):
    op, args, kwargs = op_inputs(case, scaler=scaler)
    torch.library.opcheck(op.default, args, kwargs)


@pytest.mark.parametrize("case,scaler,first", OP_CASES)
def test_opcheck_every_case(case, scaler, first):
    """Schema, autograd registration and fake tensors on every option case."""
    op, args, kwargs = op_inputs(case, scaler=scaler, first_step=first)
    torch.library.opcheck(op.default, args, kwargs,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", FULL_CASES, ids=case_ids(FULL_CASES))
def test_opcheck_other_dtypes(case, dtype):
    op, args, kwargs = op_inputs(case, dtype, scaler=0.0)
    torch.library.opcheck(op.default, args, kwargs)


@pytest.mark.parametrize("cap", cpu_capabilities())
@pytest.mark.parametrize("case,scaler,first", OP_CASES)
def test_op_matches_reference_backend(case, scaler, first, cap):
    """The C++ op and the reference backend on the same inputs, every option case, every
    CPU kernel variant: the same per-tensor state, and tensors within 4 fp32 ulps of their
    magnitude (one step; see tests/_tables.py)."""
    op, args, kwargs = op_inputs(case, scaler=scaler, first_step=first)
    ref_args = tuple([t.clone() for t in lst] for lst in args)
    ref_kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with cpu_capability(cap):
        op(*args, **kwargs)
    _reference.step(case.spec, *ref_args, **ref_kwargs)
    n_lists = len(case.spec.list_args())
    for li, (lst, ref) in enumerate(zip(args, ref_args)):
        for ti, (a, b) in enumerate(zip(lst, ref)):
            if li >= n_lists:
                assert torch.equal(a, b), f"{case.id}: state list {li} tensor {ti}: {a} != {b}"
                continue
            scale = torch.maximum(a.abs(), b.abs()).max().clamp_min(1e-30)
            err = ((a - b).abs().max() / (torch.finfo(torch.float32).eps * scale)).item()
            assert err <= 4, f"{case.id} list {li} tensor {ti}: {err:.2f} ulps"


STATEFUL_CASES = [c for c in DEFAULT_CASES if c.spec.scalars]


@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64],
                         ids=["float32", "float64"])
@pytest.mark.parametrize("case", STATEFUL_CASES, ids=case_ids(STATEFUL_CASES))
def test_state_advances_once_and_never_with_found_inf(case, step_dtype):
    """Each per-tensor state advances once per call, in its own dtype: a step count by
    one, the others (NAdam's mu_product, ASGD's eta and mu) to the reference's values."""
    op, args, kwargs = op_inputs(case)
    n_lists = len(case.spec.list_args())
    states = [[s.to(step_dtype) for s in lst] for lst in args[n_lists:]]
    before = [[s.item() for s in lst] for lst in states]
    expected = [[s.clone() for s in lst] for lst in states]
    _reference.step(case.spec, *[[t.clone() for t in lst] for lst in args[:n_lists]],
                    *expected, **kwargs)
    op(*args[:n_lists], *states, **kwargs)
    for s, lst, old, want in zip(case.spec.scalars, states, before, expected):
        if s.key == "step":
            assert [t.item() for t in lst] == [v + 1 for v in old]
        for a, b in zip(lst, want):
            assert_scalar_state_close(f"{case.id} {s.key}", s.key, a, b)
        assert all(t.dtype == step_dtype for t in lst)
    op, args, kwargs = op_inputs(case, scaler=1.0)
    snapshot = [[t.clone() for t in lst] for lst in args]
    op(*args, **kwargs)
    for lst, old in zip(args, snapshot):
        assert all(torch.equal(a, b) for a, b in zip(lst, old)), "found_inf changed input"


def _op_devices():
    cuda = torch.cuda.is_available() and _extension.op_has_kernel("adam_", "CUDA")
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not cuda, reason="no CUDA device or no CUDA kernels in fused_optim._C"))]


@pytest.mark.parametrize("device", _op_devices())
@pytest.mark.parametrize("case", STATEFUL_CASES, ids=case_ids(STATEFUL_CASES))
def test_aliased_state_advances_once_per_param(case, device):
    """One state tensor passed for params 0 and 2 (as torch.optim would step it if two
    params shared their `step` tensor) advances once per param, in param order, and each
    param computes with the value after its own advance: torch.optim's for-loop does
    `step_t += 1` per param. So the call equals the same rows passed one call at a time,
    bit for bit, on every device ([note: aliased state] in csrc/cuda/kernel_api.h)."""
    op, args, kwargs = op_inputs(case)
    n_lists = len(case.spec.list_args())

    def rows():
        lists = [[t.to(device, copy=True) for t in lst] for lst in args[:n_lists]]
        states = []
        for lst in args[n_lists:]:
            shared, own = lst[0].to(device, copy=True), lst[1].to(device, copy=True)
            states.append([shared, own, shared])
        return lists, states

    lists, states = rows()
    before = [[s.item() for s in lst] for lst in states]
    op(*lists, *states, **kwargs)
    one_lists, one_states = rows()
    for i in range(len(one_lists[0])):
        op(*[[lst[i]] if lst else [] for lst in one_lists],
           *[[lst[i]] for lst in one_states], **kwargs)
    for li, (got, want) in enumerate(zip(lists + states, one_lists + one_states)):
        for ti, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"{case.id} on {device}: list {li} tensor {ti}"
    for s, lst, old in zip(case.spec.scalars, states, before):
        if s.key == "step":
            assert [t.item() for t in lst] == [old[0] + 2, old[1] + 1, old[0] + 2]


@pytest.mark.parametrize("scaler", [None, 0.0], ids=["plain", "scaled"])
@pytest.mark.parametrize("case", FULL_CASES, ids=case_ids(FULL_CASES))
def test_raw_op_bumps_the_versions_of_what_it_writes(case, scaler):
    """Every list and state tensor the op writes gets a new version; the grads only when
    they are written (unscaled, with grad_scale), as torch.optim leaves a grad's version
    alone; lr and the scaler's tensors never."""
    op, args, kwargs = op_inputs(case, scaler=scaler)
    before = [[t._version for t in lst] for lst in args]
    scalars_before = {k: v._version for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    op(*args, **kwargs)
    for li, (lst, versions) in enumerate(zip(args, before)):
        for t, v in zip(lst, versions):
            if li == 1 and scaler is None:
                assert t._version == v, f"{case.id}: a grad was marked modified"
            else:
                assert t._version > v, f"{case.id}: list {li} not marked as modified"
    for k, v in scalars_before.items():
        assert kwargs[k]._version == v, f"{case.id}: {k} was marked modified"


# The fake kernels check what the C++ kernels check, with the same messages, so a traced
# program fails like an eager one. (Calls with a meta tensor only ever reach the fake
# kernel: tests/test_bad_input.py.)
_ADAM = case_named("Adam", DEFAULT_CASES)  # no amsgrad: its list is absent
_SGD_MOMENTUM = case_named("SGD", DEFAULT_CASES, momentum=0.9)
FAKE_BAD = [
    (_ADAM, lambda a, k: a.__setitem__(1, a[1][:2]), "expected 3 grads (one per param), got 2"),
    (_ADAM, lambda a, k: a[3].__setitem__(0, torch.zeros(5)),
     "exp_avg_sqs[0] has shape [5] but params[0] has shape [3]"),
    (_ADAM, lambda a, k: a[2].__setitem__(1, a[2][1].double()),
     "all tensors of one call must have one dtype"),
    (_ADAM, lambda a, k: k.__setitem__("lr", torch.ones(2)),
     "lr must be a one-element tensor, got shape [2]"),
    (_ADAM, lambda a, k: k.__setitem__("amsgrad", True),
     "expected 3 max_exp_avg_sqs (one per param), got 0"),
    (_ADAM, lambda a, k: a[5].__setitem__(0, torch.tensor(1)),
     "state_steps[0] must be float32 or float64, got torch.int64"),
    (_SGD_MOMENTUM, lambda a, k: a.__setitem__(2, a[2][:1]),
     "expected 3 momentum_buffers (one per param), got 1"),
    (_SGD_MOMENTUM, lambda a, k: k.__setitem__("momentum", 0.0),
     "momentum_buffers must be empty when momentum=0, got 3"),
    (_SGD_MOMENTUM, lambda a, k: k.update(grad_scale=torch.tensor(1.0),
                                          found_inf=torch.tensor(0.0, dtype=torch.float64)),
     "found_inf must be float32, got torch.float64"),
]


@pytest.mark.parametrize("case,edit,fragment", FAKE_BAD, ids=[f[2][:40] for f in FAKE_BAD])
def test_fake_kernel_validates_like_cpu_kernel(case, edit, fragment):
    for fake in (False, True):
        fn, args, kwargs = op_inputs(case)
        args = list(args)
        edit(args, kwargs)
        if fake:
            mode = FakeTensorMode()
            args = [[mode.from_tensor(t) for t in lst] for lst in args]
            kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                      for k, v in kwargs.items()}
            with mode, pytest.raises(RuntimeError) as err:
                fn(*args, **kwargs)
        else:
            with pytest.raises(RuntimeError) as err:
                fn(*args, **kwargs)
        message = str(err.value)
        # dtype spellings differ (C++ "Long", Python "torch.int64"): compare the rest
        if "got torch." in fragment and not fake:
            assert fragment.split(", got")[0] in message, message
        else:
            assert fragment in message, message
