"""fused_optim.Adafactor against torch.optim.Adafactor (its for-loop, the default).

Every backend that has a factored engine on this machine ("reference"; "cpu" when the
extension has torch.ops.fused_optim.adafactor_; "triton" under the interpreter, in
tests/test_adafactor_triton.py) runs many steps on 1-D, 2-D, 3-D, non-square and
awkward shapes with every option, and is compared to torch after every step.

[note: Adafactor tolerances]
Bit-equality with torch is not possible: the step depends on four reductions (the
param's norm, row and column sums of grad^2, the update's norm) whose summation order
is torch's business (its vectorized, cascaded sums; ours per engine). A different sum
moves a norm by a few ulps of the dtype, which moves alpha, the clipping denominator
and the factors by as much, and every element of the update with them; the error then
carries over steps through the param and the factors. Measured here (12 steps, shapes
below): fp64 <= 1e-15 relative (bar: 1e-10), fp32 <= 2e-6 relative to the tensor's
largest element, so fp32 is checked at 2e-5; bf16 / fp16 params are checked against
torch at 2 ulps of the dtype (2 ** -7, 2 ** -10) relative to the tensor's largest
element: the same roundings as torch, except where a sum lands on the other side of a
rounding boundary.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fused_optim import Adafactor
from fused_optim._factored import engine_for

SHAPES = [(3, 5), (4,), (2, 3, 7), (1,), (), (1, 1), (7, 1), (1, 9), (4097,), (17, 243),
          (2, 2, 3, 4)]

# relative to the largest |element| of each tensor (see [note: Adafactor tolerances]).
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2 * 2.0**-7,
        torch.float16: 2 * 2.0**-10}

CASES = [
    {},
    {"lr": 0.5},
    {"weight_decay": 0.1},
    {"maximize": True},
    {"eps": (1e-3, 1e-3)},
    {"eps": (0.0, 0.0)},
    {"beta2_decay": -0.5},
    {"d": 1.5},
    {"foreach": True},
    {"lr": "tensor"},
    {"lr": 0.3, "weight_decay": 0.2, "maximize": True, "eps": (1e-4, 1e-2), "beta2_decay": -1.0,
     "d": 2.0},
]


def _backends() -> list[str]:
    """The backends whose factored engine runs here; "cuda" / "triton" (on a GPU) step
    CUDA copies of the params, compared with torch's CPU for-loop."""
    out = ["reference"]
    if engine_for("cpu", torch.device("cpu"), torch.float32, True)[0] == "cpu":
        out.append("cpu")
    if torch.cuda.is_available():
        for name in ("cuda", "triton"):
            try:
                if engine_for(name, torch.device("cuda"), torch.float32, True)[0] == name:
                    out.append(name)
            except ValueError:
                pass
    return out


def _device(backend: str) -> str:
    """Where a backend's parity runs step: "cuda" on a GPU, the CPU otherwise (and for
    Triton under the interpreter)."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()
                             and os.environ.get("TRITON_INTERPRET") != "1"):
        return "cuda"
    return "cpu"


BACKENDS = _backends()
CPU_BACKENDS = [b for b in BACKENDS if _device(b) == "cpu"]


def _case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items()) or "default"


def _options(case: dict, dtype: torch.dtype) -> dict:
    case = dict(case)
    if case.get("lr") == "tensor":
        case["lr"] = torch.tensor(0.02, dtype=torch.float32)
    return case


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if a.numel() == 0:
        return 0.0
    scale = a.abs().max().clamp_min(1e-300)
    return ((a - b).abs().max() / scale).item()


def run_parity(dtype, shapes, case, backend, steps, rtol=None, grads_like=None):
    torch.manual_seed(0)
    rtol = RTOL[dtype] if rtol is None else rtol
    init = [torch.randn(s, dtype=torch.float64).to(dtype) for s in shapes]
    device = _device(backend)
    ref = [p.clone().requires_grad_() for p in init]
    ours = [p.clone().to(device).requires_grad_() for p in init]
    opt_ref = torch.optim.Adafactor(ref, **_options(case, dtype))
    opt = Adafactor(ours, backend=backend, **_options(case, dtype))
    for step in range(steps):
        for a, b in zip(ref, ours):
            g = torch.randn(a.shape, dtype=torch.float64).to(dtype)
            if step % 4 == 3:
                g = g * 1e-3  # small grads: the eps1 floors and clipping both matter
            a.grad, b.grad = g.clone(), g.clone().to(device)
        opt_ref.step()
        opt.step()
        for i, (a, b) in enumerate(zip(ref, ours)):
            err = _rel_err(a.detach(), b.detach())
            assert err <= rtol, f"step {step}, param {i} {tuple(a.shape)}: {err:.3g} > {rtol:g}"
            for key, value in opt_ref.state[a].items():
                mine = opt.state[b][key]
                assert mine.shape == value.shape and mine.dtype == value.dtype, key
                err = _rel_err(value, mine)
                assert err <= rtol, f"step {step}, param {i} state {key}: {err:.3g}"
    return opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_parity(backend, case, dtype):
    run_parity(dtype, SHAPES, case, backend, steps=12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_parity_half(backend, dtype):
    run_parity(dtype, [(3, 5), (33,), (2, 9, 17)], {"weight_decay": 0.1}, backend, steps=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_steps_large(backend):
    # Shapes that cross the CPU engine's row blocks and chunks; many steps.
    run_parity(torch.float32, [(129, 257), (3, 70, 33), (20000,)], {"weight_decay": 0.01},
               backend, steps=30)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_group_eps1_from_first_param(backend):
    """eps=(None, ...) with params of two dtypes in one group: torch's for-loop takes the
    first param's dtype eps for all (a float64 first param gives a float32 one 2e-16)."""
    torch.manual_seed(0)
    init = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float32)]
    ref = [p.clone().requires_grad_() for p in init]
    ours = [p.clone().requires_grad_() for p in init]
    opt_ref, opt = torch.optim.Adafactor(ref), Adafactor(ours, backend=backend)
    for _ in range(3):
        for a, b in zip(ref, ours):
            g = torch.zeros_like(a)
            g[0, 0] = 1.0
            a.grad, b.grad = g.clone(), g.clone()
        opt_ref.step()
        opt.step()
    for a, b in zip(ref, ours):
        assert _rel_err(a.detach(), b.detach()) <= RTOL[a.dtype]


def test_state_dict_both_ways():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    twin.load_state_dict(model.state_dict())
    ours, theirs = Adafactor(model.parameters(), lr=0.05), torch.optim.Adafactor(
        twin.parameters(), lr=0.05)
    x = torch.randn(4, 6)

    def one_step(m, o):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()

    for _ in range(3):
        one_step(model, ours)
        one_step(twin, theirs)
    # ours -> torch
    fresh_torch = torch.optim.Adafactor(twin.parameters(), lr=0.05)
    fresh_torch.load_state_dict(ours.state_dict())
    for p in twin.parameters():
        assert set(fresh_torch.state[p]) == set(theirs.state[p])
    # torch -> ours
    fresh = Adafactor(model.parameters(), lr=0.05)
    fresh.load_state_dict(theirs.state_dict())
    for p in model.parameters():
        st = fresh.state[p]
        assert set(st) == ({"step", "row_var", "col_var"} if p.dim() > 1 else {"step", "variance"})
        assert st["step"].device == p.device
    assert fresh.param_groups[0]["backend"] == "auto"
    one_step(model, fresh)
    one_step(twin, fresh_torch)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert _rel_err(b.detach(), a.detach()) <= RTOL[torch.float32]


def test_load_state_dict_rejects_wrong_shapes():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = Adafactor([p])
    p.grad = torch.randn(3, 4)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["row_var"] = torch.zeros(4, 1)
    with pytest.raises(ValueError, match="row_var"):
        Adafactor([p]).load_state_dict(sd)


def test_signature_defaults_and_doc():
    import inspect

    ours = inspect.signature(Adafactor.__init__).parameters
    theirs = inspect.signature(torch.optim.Adafactor.__init__).parameters
    for name, param in theirs.items():
        assert name in ours, name
        assert ours[name].default == param.default, name
        assert ours[name].kind == param.kind, name
    opt = Adafactor([torch.nn.Parameter(torch.randn(2))])
    ref = torch.optim.Adafactor([torch.nn.Parameter(torch.randn(2))])
    assert {k: v for k, v in opt.defaults.items() if k != "backend"} == ref.defaults
    for key in ("{params}", "{maximize}", "{backend}"):
        assert key not in Adafactor.__doc__


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1.0}, "Learning rate should be >= 0 but is: -1.0"),
    ({"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
    ({"beta2_decay": 0.8}, "beta2_decay should be <= 0 but is: 0.8"),
    ({"eps": (-1e-30, 1e-3)}, "epsilon1 should be >= 0 but is: -1e-30"),
    ({"eps": (None, -1.0)}, "epsilon2 should be >= 0 but is: -1.0"),
    ({"d": 0.5}, "Clipping threshold d should be >= 1 but is: 0.5"),
    ({"weight_decay": -0.1}, "weight_decay should be >= 0 but is: -0.1"),
])
def test_validation_errors(kwargs, message):
    for cls in (torch.optim.Adafactor, Adafactor):
        with pytest.raises(ValueError, match=re.escape(message)):
            cls([torch.nn.Parameter(torch.randn(2))], **kwargs)


def test_complex_and_sparse_errors():
    p = torch.nn.Parameter(torch.randn(2, 3, dtype=torch.complex64))
    p.grad = torch.randn_like(p)
    for cls in (torch.optim.Adafactor, Adafactor):
        with pytest.raises(RuntimeError, match="Adafactor does not support complex parameters"):
            cls([p]).step()
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    for cls in (torch.optim.Adafactor, Adafactor):
        with pytest.raises(RuntimeError, match="Adafactor does not support sparse gradients"):
            cls(emb.parameters()).step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_host_sync(backend):
    """A step calls no aten::_local_scalar_dense (no .item(), float(tensor) or bool(tensor))."""

    class CountSyncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.syncs = 0
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.syncs += 1
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    params = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 5), (3,), (2, 3, 4)]]
    for lr in (0.01, torch.tensor(0.01)):
        opt = Adafactor(params, lr=lr, weight_decay=0.1, backend=backend)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # state created
        with CountSyncs() as mode:
            opt.step()
        assert mode.syncs == 0, mode.ops
        if backend == "cpu":
            assert "fused_optim.adafactor_.default" in mode.ops


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scheduler_closure_hooks(backend):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    opt = Adafactor(model.parameters(), lr=0.1, backend=backend)
    ref = torch.optim.Adafactor(twin.parameters(), lr=0.1)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref)]
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    x = torch.randn(5, 4)
    for _ in range(4):
        losses = []
        for m, o in ((model, opt), (twin, ref)):
            def closure(m=m, o=o):
                o.zero_grad()
                loss = m(x).square().sum()
                loss.backward()
                return loss
            losses.append(o.step(closure))
        assert torch.equal(losses[0], losses[1]) or _rel_err(losses[1], losses[0]) < 1e-5
        for s in scheds:
            s.step()
    assert calls == ["pre", "post"] * 4
    for a, b in zip(model.parameters(), twin.parameters()):
        assert _rel_err(b.detach(), a.detach()) <= RTOL[torch.float32]


def test_optim_db_configs():
    """torch's own Adafactor configs (optim_db): each optimizer input, many steps, and
    each error input raising what torch raises."""
    pytest.importorskip("expecttest")  # torch.testing._internal imports it
    from torch.testing._internal.common_optimizers import optim_db

    info = next(i for i in optim_db if i.optim_cls is torch.optim.Adafactor)
    inputs = info.optim_inputs_func(device="cpu", dtype=torch.float64)
    assert inputs
    for backend in BACKENDS:
        for inp in inputs:
            run_parity(torch.float64, [(5, 4), (4,), (2, 3, 3)], inp.kwargs, backend, steps=8)
            run_parity(torch.float32, [(5, 4), (4,), (2, 3, 3)], inp.kwargs, backend, steps=8)
    for err in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        inp = err.optimizer_error_input
        params = inp.params
        if params is None:
            params = [torch.nn.Parameter(torch.randn(2, 2))]
        if err.error_type is UserWarning:
            with pytest.warns(UserWarning, match=err.error_regex):
                Adafactor(params, **inp.kwargs)
            continue
        with pytest.raises(err.error_type, match=err.error_regex):
            opt = Adafactor(params, **inp.kwargs)
            opt.step()


def test_param_without_grad_and_empty_group():
    a = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(5))
    opt = Adafactor([{"params": [a, b]}, {"params": []}])
    a.grad = torch.randn(3, 4)
    opt.step()
    assert b not in opt.state and set(opt.state[a]) == {"step", "row_var", "col_var"}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_param(backend):
    torch.manual_seed(0)
    base = torch.randn(6, 8)
    ours = base.clone().t().requires_grad_()
    ref = base.clone().t().requires_grad_()
    opt, opt_ref = Adafactor([ours], backend=backend), torch.optim.Adafactor([ref])
    for _ in range(3):
        g = torch.randn(8, 6)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
    assert _rel_err(ref.detach(), ours.detach()) <= RTOL[torch.float32]


# ---------------------------------------------------------------------------------------
# The C++ op: opcheck, every CPU kernel variant against the reference engine.

needs_cpu_op = pytest.mark.skipif("cpu" not in BACKENDS,
                                  reason="fused_optim._C has no adafactor_ op (not built)")


def engine_inputs(dtype, lr, factored_shapes, vector_shapes, seed=0):
    """(args, kwargs) of one engine call (adafactor_'s order) on fresh state: params and
    grads drawn from `seed`, zero factors, steps 0, maximize on. Also
    tests/test_adafactor_triton.py's."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
              for s in factored_shapes + vector_shapes]
    grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in params]
    row_vars = [torch.zeros(*s[:-1], 1, dtype=dtype) for s in factored_shapes]
    col_vars = [torch.zeros(*s[:-2], 1, s[-1], dtype=dtype) for s in factored_shapes]
    variances = [torch.zeros(s, dtype=dtype) for s in vector_shapes]
    steps = [torch.tensor(0.0) for _ in params]
    kwargs = dict(lr=lr, beta2_decay=-0.8, eps1=torch.finfo(dtype).eps, eps2=1e-3, d=1.0,
                  weight_decay=0.1, maximize=True)
    return [params, grads, row_vars, col_vars, variances, steps], kwargs


def _op_inputs(dtype=torch.float32, lr=None, seed=0):
    """Arguments of one adafactor_ call after two reference steps (realistic factors)."""
    from fused_optim._factored import reference_adafactor

    args, kwargs = engine_inputs(
        dtype, torch.tensor(0.05, dtype=torch.float64) if lr is None else lr,
        [(5, 7), (2, 3, 33), (1, 1)], [(9,), (), (4097,)], seed)
    for _ in range(2):
        reference_adafactor(*args, **kwargs)
    return args, kwargs


@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    args, kwargs = _op_inputs(dtype)
    torch.library.opcheck(torch.ops.fused_optim.adafactor_.default, args, kwargs)


@needs_cpu_op
def test_op_bumps_versions():
    args, kwargs = _op_inputs()
    before = [t._version for lst in args for t in lst]
    torch.ops.fused_optim.adafactor_(*args, **kwargs)
    after = [t._version for lst in args for t in lst]
    grads = {id(t) for t in args[1]}
    for t, b, a in zip([t for lst in args for t in lst], before, after):
        assert (a == b) if id(t) in grads else (a > b)


@needs_cpu_op
def test_op_rejects_bad_calls():
    args, kwargs = _op_inputs()
    params, grads, row_vars, col_vars, variances, steps = args
    op = torch.ops.fused_optim.adafactor_
    with pytest.raises(RuntimeError, match="row_vars and col_vars for the first params"):
        op(params, grads, row_vars[:-1], col_vars, variances, steps, **kwargs)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(params, grads, [row_vars[0].expand(5, 2)] + row_vars[1:], col_vars, variances,
           steps, **kwargs)
    with pytest.raises(RuntimeError, match="one dtype"):
        op(params[:-1] + [params[-1].double()], grads, row_vars, col_vars, variances, steps,
           **kwargs)


def _capabilities():
    from fused_optim import _extension

    if _extension.C is None:
        return []
    return list(_extension.C.supported_cpu_capabilities())


@needs_cpu_op
@pytest.mark.parametrize("cap", _capabilities())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("lr", [None, torch.tensor(0.02)], ids=["float-lr", "tensor-lr"])
def test_op_matches_reference_engine(cap, dtype, lr):
    """The C++ op and the reference engine on the same inputs, every CPU kernel variant:
    the steps equal, every tensor within the sums' rounding (fp32/fp64: a few ulps of
    each tensor's largest element; half: 1 ulp of the dtype, a sum on the other side of
    a rounding boundary)."""
    from fused_optim import _extension
    from fused_optim._factored import reference_adafactor

    _extension.C.set_cpu_capability(cap)
    args, kwargs = _op_inputs(dtype, lr)
    mine = [[t.clone() for t in lst] for lst in args]
    reference_adafactor(*args, **kwargs)
    torch.ops.fused_optim.adafactor_(*mine, **kwargs)
    tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2.0**-7,
           torch.float16: 2.0**-10}[dtype]
    for lst_ref, lst_mine in zip(args, mine):
        for a, b in zip(lst_ref, lst_mine):
            assert _rel_err(a, b) <= tol, (tuple(a.shape), _rel_err(a, b))
    assert all(torch.equal(a, b) for a, b in zip(args[5], mine[5]))


def test_bench_byte_model_and_tiny_run():
    from fused_optim.bench import adafactor as bench

    shapes = bench.parse_shapes("2x3x4,1x5")
    assert shapes == [(3, 4), (3, 4), (5,)]
    assert bench.bytes_per_step(shapes, torch.float32) == 24 * 24 + 36 * 5
    out = bench.run(shapes, rounds=2, warmup=1, backend=CPU_BACKENDS[-1])
    assert out["max_rel_err_vs_forloop"] < 1e-5
    assert set(out["providers"]) == {f"fused_optim[{CPU_BACKENDS[-1]}]", "torch-forloop",
                                     "torch-foreach"}


@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
def test_op_same_bits_on_every_cpu_variant(dtype):
    """[note: sums in fixed lanes] (csrc/cpu/factored_impl.h): every instruction set sums in
    the same order, so the variants agree to the bit, as the element-wise kernels do."""
    from fused_optim import _extension

    outs = []
    for cap in _capabilities():
        _extension.C.set_cpu_capability(cap)
        args, kwargs = _op_inputs(dtype)
        for _ in range(2):
            torch.ops.fused_optim.adafactor_(*args, **kwargs)
        outs.append(args)
    for other in outs[1:]:
        for la, lb in zip(outs[0], other):
            assert all(torch.equal(a, b) for a, b in zip(la, lb))


@pytest.mark.parametrize("backend", CPU_BACKENDS[-1:])
def test_torch_compile_step(backend):
    """A compiled step (the op's fake kernel lets dynamo trace the call) gives torch's
    numbers."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 5), (3,), (2, 3, 4)]]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = Adafactor(ours, lr=0.01, weight_decay=0.1, backend=backend)
    opt_ref = torch.optim.Adafactor(ref, lr=0.01, weight_decay=0.1)
    step = torch.compile(opt.step)
    for _ in range(3):
        for a, b in zip(ours, ref):
            g = torch.randn(a.shape)
            a.grad, b.grad = g.clone(), g.clone()
        step()
        opt_ref.step()
    for a, b in zip(ref, ours):
        assert _rel_err(a.detach(), b.detach()) <= RTOL[torch.float32]
