"""The dispatcher ops torch.ops.fused_optim.adam_ / sgd_: registration, schema,
torch.library.opcheck over every flag combination that selects a different kernel, and
fake kernels that validate like the C++ ones."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fused_optim  # noqa: F401  (loads _C, registers the fake kernels)
from _oracle import cpu_capability
from _tables import cpu_capabilities
from fused_optim import _extension

pytestmark = [pytest.mark.skipif(_extension.C is None, reason="fused_optim._C is not built"),
              pytest.mark.usefixtures("oracle_threads")]

SHAPES = [(3,), (4, 5), (17,)]


def _tensors(dtype, positive=False):
    out = [torch.randn(s, dtype=torch.float64).to(dtype) for s in SHAPES]
    return [t.abs() for t in out] if positive else out


def adam_inputs(dtype=torch.float32, *, amsgrad=False, weight_decay=0.0, decoupled=False,
                maximize=False, scaler=None, step_dtype=torch.float32):
    args = (_tensors(dtype), _tensors(dtype), _tensors(dtype), _tensors(dtype, positive=True),
            _tensors(dtype, positive=True) if amsgrad else [],
            [torch.tensor(float(i + 1), dtype=step_dtype) for i in range(len(SHAPES))])
    kwargs = dict(lr=torch.tensor(0.01), beta1=0.9, beta2=0.999, weight_decay=weight_decay,
                  eps=1e-8, amsgrad=amsgrad, maximize=maximize,
                  decoupled_weight_decay=decoupled)
    if scaler is not None:
        kwargs.update(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(scaler))
    return args, kwargs


def sgd_inputs(dtype=torch.float32, *, momentum=0.0, nesterov=False, first=False,
               weight_decay=0.0, maximize=False, scaler=None):
    args = (_tensors(dtype), _tensors(dtype), _tensors(dtype) if momentum else [])
    kwargs = dict(lr=torch.tensor(0.05), momentum=momentum, dampening=0.0 if nesterov else 0.1,
                  weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                  is_first_step=first)
    if scaler is not None:
        kwargs.update(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(scaler))
    return args, kwargs


# Every combination that selects a different kernel template: amsgrad x weight-decay mode
# (none / L2 / decoupled) x maximize x (no scaler / scaler, finite / scaler, skipped).
ADAM_FLAGS = [
    dict(amsgrad=a, weight_decay=wd, decoupled=dec, maximize=m, scaler=sc)
    for a, (wd, dec), m, sc in itertools.product(
        [False, True], [(0.0, False), (0.1, False), (0.1, True)], [False, True],
        [None, 0.0, 1.0])
]
# momentum (with nesterov x first step) or none, x weight decay x maximize x scaler.
SGD_FLAGS = [
    dict(momentum=mo, nesterov=ne, first=fi, weight_decay=wd, maximize=m, scaler=sc)
    for (mo, ne, fi), wd, m, sc in itertools.product(
        [(0.0, False, False), (0.9, False, False), (0.9, True, False), (0.9, False, True),
         (0.9, True, True)],
        [0.0, 0.1], [False, True], [None, 0.0, 1.0])
]


def _flag_id(flags):
    return ",".join(f"{k}={v}" for k, v in flags.items())


def test_registration():
    for name in ("adam_", "sgd_"):
        qualname = f"fused_optim::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"), \
            "no fake / meta kernel"
        schema = getattr(torch.ops.fused_optim, name).default._schema
        written = [a.name for a in schema.arguments
                   if a.alias_info is not None and a.alias_info.is_write]
        expected = {"adam_": ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                              "state_steps"],
                    "sgd_": ["params", "grads", "momentum_buffers"]}[name]
        assert written == expected, f"{name}: mutated args {written}"
        assert len(schema.returns) == 0


# The full opcheck (its aot_dispatch_dynamic part costs ~1 s here) on every kernel
# template: Adam amsgrad x weight-decay mode x grad_scale, plus a skipped step; SGD every
# momentum / nesterov / first-step template, each with and without (weight decay, scaler).
ADAM_KERNELS = [f for f in ADAM_FLAGS if not f["maximize"] and f["scaler"] != 1.0] + [
    dict(amsgrad=True, weight_decay=0.1, decoupled=True, maximize=True, scaler=1.0)]
SGD_KERNELS = [f for f in SGD_FLAGS if not f["maximize"] and (
    (f["weight_decay"], f["scaler"]) in ((0.0, None), (0.1, 0.0)))] + [
    dict(momentum=0.9, nesterov=True, first=False, weight_decay=0.1, maximize=True,
         scaler=1.0)]


@pytest.mark.parametrize("flags", ADAM_KERNELS, ids=_flag_id)
def test_opcheck_adam(flags):
    args, kwargs = adam_inputs(**flags)
    torch.library.opcheck(torch.ops.fused_optim.adam_.default, args, kwargs)


@pytest.mark.parametrize("flags", SGD_KERNELS, ids=_flag_id)
def test_opcheck_sgd(flags):
    args, kwargs = sgd_inputs(**flags)
    torch.library.opcheck(torch.ops.fused_optim.sgd_.default, args, kwargs)


@pytest.mark.parametrize("op", ["adam_", "sgd_"])
def test_opcheck_every_flag_combination(op):
    """Schema, autograd registration and fake tensors on every flag combination."""
    flag_sets = ADAM_FLAGS if op == "adam_" else SGD_FLAGS
    make = adam_inputs if op == "adam_" else sgd_inputs
    for flags in flag_sets:
        args, kwargs = make(**flags)
        torch.library.opcheck(getattr(torch.ops.fused_optim, op).default, args, kwargs,
                              test_utils=("test_schema", "test_autograd_registration",
                                          "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_opcheck_other_dtypes(dtype):
    args, kwargs = adam_inputs(dtype, amsgrad=True, weight_decay=0.1, scaler=0.0,
                               step_dtype=torch.float64)
    torch.library.opcheck(torch.ops.fused_optim.adam_.default, args, kwargs)
    args, kwargs = sgd_inputs(dtype, momentum=0.9, weight_decay=0.1, scaler=0.0)
    torch.library.opcheck(torch.ops.fused_optim.sgd_.default, args, kwargs)


@pytest.mark.parametrize("cap", cpu_capabilities())
@pytest.mark.parametrize("op", ["adam_", "sgd_"])
def test_op_matches_reference_backend(op, cap):
    """The C++ op and the reference backend on the same inputs, every flag combination,
    every CPU kernel variant: same steps, and tensors within 4 fp32 ulps of their
    magnitude (one step; see tests/_tables.py)."""
    from fused_optim import _reference

    flag_sets = ADAM_FLAGS if op == "adam_" else SGD_FLAGS
    make = adam_inputs if op == "adam_" else sgd_inputs
    for flags in flag_sets:
        torch.manual_seed(0)
        args, kwargs = make(**flags)
        ref_args = tuple([t.clone() for t in lst] for lst in args)
        ref_kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                      for k, v in kwargs.items()}
        with cpu_capability(cap):
            getattr(torch.ops.fused_optim, op)(*args, **kwargs)
        getattr(_reference, op)(*ref_args, **ref_kwargs)
        for li, (lst, ref) in enumerate(zip(args, ref_args)):
            for ti, (a, b) in enumerate(zip(lst, ref)):
                scale = torch.maximum(a.abs(), b.abs()).max().clamp_min(1e-30)
                err = ((a - b).abs().max() / (torch.finfo(torch.float32).eps * scale)).item()
                assert err <= 4, f"{op} {_flag_id(flags)} list {li} tensor {ti}: {err:.2f} ulps"


def test_step_counters_increment_once_and_skip_with_found_inf():
    for step_dtype in (torch.float32, torch.float64):
        args, kwargs = adam_inputs(step_dtype=step_dtype)
        steps = args[5]
        torch.ops.fused_optim.adam_(*args, **kwargs)
        assert [s.item() for s in steps] == [2.0, 3.0, 4.0]
        args2, kwargs2 = adam_inputs(step_dtype=step_dtype, scaler=1.0)
        before = [[t.clone() for t in lst] for lst in args2]
        torch.ops.fused_optim.adam_(*args2, **kwargs2)
        for lst, old in zip(args2, before):
            assert all(torch.equal(a, b) for a, b in zip(lst, old)), "found_inf changed input"


@pytest.mark.parametrize("op", ["adam_", "sgd_"])
def test_raw_op_bumps_version_counters(op):
    args, kwargs = (adam_inputs(amsgrad=True, scaler=0.0) if op == "adam_"
                    else sgd_inputs(momentum=0.9, scaler=0.0))
    before = [[t._version for t in lst] for lst in args]
    getattr(torch.ops.fused_optim, op)(*args, **kwargs)
    for li, (lst, versions) in enumerate(zip(args, before)):
        for t, v in zip(lst, versions):
            assert t._version > v, f"{op}: list {li} not marked as modified"


# The fake kernels check what the C++ kernels check, with the same messages, so a traced
# program fails like an eager one. (Calls with a meta tensor only ever reach the fake
# kernel: tests/test_bad_input.py.)
FAKE_BAD = [
    ("adam_", lambda a, k: a.__setitem__(1, a[1][:2]), "expected 3 grads (one per param), got 2"),
    ("adam_", lambda a, k: a[3].__setitem__(0, torch.zeros(5)),
     "exp_avg_sqs[0] has shape [5] but params[0] has shape [3]"),
    ("adam_", lambda a, k: a[2].__setitem__(1, a[2][1].double()),
     "all tensors of one call must have one dtype"),
    ("adam_", lambda a, k: k.__setitem__("lr", torch.ones(2)),
     "lr must be a one-element tensor, got shape [2]"),
    ("adam_", lambda a, k: k.__setitem__("amsgrad", True),
     "expected 3 max_exp_avg_sqs (one per param), got 0"),
    ("adam_", lambda a, k: a[5].__setitem__(0, torch.tensor(1)),
     "state_steps[0] must be float32 or float64, got torch.int64"),
    ("sgd_", lambda a, k: a.__setitem__(2, a[2][:1]),
     "expected 3 momentum_buffers (one per param), got 1"),
    ("sgd_", lambda a, k: k.__setitem__("found_inf", torch.tensor(0.0, dtype=torch.float64)),
     "found_inf must be float32, got torch.float64"),
]


@pytest.mark.parametrize("op,edit,fragment", FAKE_BAD, ids=[f[2][:40] for f in FAKE_BAD])
def test_fake_kernel_validates_like_cpu_kernel(op, edit, fragment):
    make = adam_inputs if op == "adam_" else (lambda: sgd_inputs(momentum=0.9))
    for fake in (False, True):
        args, kwargs = make()
        args = list(args)
        edit(args, kwargs)
        fn = getattr(torch.ops.fused_optim, op)
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
