"""torch.optim's implementation switches, as fused_optim takes them.

fused_optim runs one implementation whatever ``foreach``, ``fused`` and ``capturable``
say, but it accepts exactly what torch.optim accepts and rejects what torch.optim
rejects, with its exception and message: the whole matrix of the four flags, on CPU and
meta tensors, float and tensor lr, is compared outcome by outcome with torch.optim's.
``differentiable=True`` is accepted as torch.optim accepts it and gives torch's numbers
and gradients: such a group runs the reference math in torch ops, under autograd.
"""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch

from _oracle import assert_row_close, outcome, scalar_keys
from _tables import DEFAULT_CASES, FULL_CASES, OPTIMIZERS, case_ids, tolerance

pytestmark = pytest.mark.usefixtures("oracle_threads")

ROWS = {row.fused.__name__: row for row in OPTIMIZERS}


def _flag_values(cls) -> dict[str, list]:
    sig = inspect.signature(cls)
    values = {"foreach": [None, False, True], "fused": [None, False, True],
              "capturable": [False, True], "differentiable": [False, True]}
    return {k: v for k, v in values.items() if k in sig.parameters}


@pytest.mark.parametrize("name", list(ROWS))
def test_flag_matrix_matches_torch(name):
    """Every combination of foreach / fused / capturable / differentiable (those the
    class takes), for float32 and float16 params on CPU and float32 on meta, with a
    float and a tensor lr: construction and one step succeed or fail exactly as
    torch.optim's (exception type and message)."""
    row = ROWS[name]
    flags = _flag_values(row.torch)
    assert flags == _flag_values(row.fused), "the flag arguments differ from torch's"
    mismatches = []
    for values in itertools.product(*flags.values()):
        kw = dict(zip(flags, values))
        for device, dtype in (("cpu", torch.float32), ("cpu", torch.float16),
                              ("meta", torch.float32)):
            for lr in (0.1, "tensor"):
                def run(cls):
                    def step():
                        p = torch.zeros(3, device=device, dtype=dtype, requires_grad=True)
                        lr_value = torch.tensor(0.1) if lr == "tensor" else lr
                        opt = cls([p], lr=lr_value, **kw)
                        p.grad = torch.ones(3, device=device, dtype=dtype)
                        opt.step()
                    return outcome(step, quiet=True)

                theirs, ours = run(row.torch), run(row.fused)
                if theirs != ours:
                    mismatches.append(f"{kw} {device} {dtype} lr={lr}:\n  torch: {theirs}\n"
                                      f"  fused_optim: {ours}")
    assert not mismatches, "\n".join(mismatches)


# Float64 ulps of each value's magnitude (fp64 params, float64 step counters). The step's
# outputs: the same operations up to order, within the table's float64 tolerance
# (tests/_tables.py tolerance(); measured <= 1.1 ulps). Their gradients chain the step's
# derivative through autograd, a few more operations: DIFF_TOL, measured <= 9.6 ulps
# (torch 2.13, CPU; Adagrad with every option, the gradient with respect to the grad;
# Adam / AdamW <= 7.9, the others <= 3.9), so 32 keeps a ~3x margin. With torch's default
# float32 step counters, torch.optim's differentiable path computes its per-tensor
# scalars as float32 tensor arithmetic on the step (``1 - beta2 ** step`` loses ~2e-5
# relative at step 3 with beta2 = 0.999), where fused_optim computes them in double as
# torch's default path does in Python floats; the comparison therefore uses float64
# counters, where both compute in double.
DIFF_TOL = 32.0


def _diff_step(cls, p, grad, state, lr, options):
    """One differentiable step as torch's own tests take it: a non-leaf copy of p with a
    grad and state that require grad; returns the new param and state tensors."""
    p = p.clone()
    p.grad = grad
    opt = cls([p], lr=lr, differentiable=True, **options)
    opt.state[p].update({k: v.clone() for k, v in state.items()})
    opt.step()
    new_state = {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    return p, new_state


def _initial_state(case, p, grad):
    """Realistic state after two plain steps of torch.optim, in float64, detached."""
    q = p.detach().clone().requires_grad_()
    opt = case.torch([q], foreach=False, **case.options)
    for _ in range(2):
        q.grad = grad.detach().clone()
        opt.step()
    state = {k: v.detach().clone() for k, v in opt.state[q].items() if isinstance(v, torch.Tensor)}
    for key in scalar_keys(case) & state.keys():
        state[key] = state[key].double()  # see DIFF_TOL
    return state


@pytest.mark.parametrize("case", DEFAULT_CASES + FULL_CASES, ids=case_ids(DEFAULT_CASES + FULL_CASES))
def test_differentiable_matches_torch_numbers_and_gradients(case):
    """differentiable=True: the step's outputs and the gradients of a random projection
    of them with respect to the param, the grad, every floating state tensor and a
    tensor lr equal torch.optim's: the outputs within the fp64 tolerance of
    tests/_tables.py, the gradients within DIFF_TOL."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    g0 = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    state0 = _initial_state(case, p0, g0)
    options = {k: v for k, v in case.options.items() if k != "lr"}
    # A tensor lr whose gradient torch.optim records where it can (Adam, SGD); others
    # take lr as a Python number in their differentiable path (addcdiv_'s value).
    lr_tensor = outcome(lambda: _diff_step(
        case.torch, p0.clone().requires_grad_(), g0.clone(), state0,
        torch.tensor(case.options["lr"], dtype=torch.float64, requires_grad=True),
        options), quiet=True) is None
    results = []
    for cls in (case.torch, case.fused):
        p = p0.clone().requires_grad_()
        grad = g0.clone().requires_grad_()
        lr = case.options["lr"]
        if lr_tensor:
            lr = torch.tensor(lr, dtype=torch.float64, requires_grad=True)
        state = {k: (v.clone().requires_grad_()
                     if v.is_floating_point() and k not in scalar_keys(case) else v.clone())
                 for k, v in state0.items()}
        new_p, new_state = _diff_step(cls, p, grad, state, lr, options)
        outputs = [new_p] + [new_state[k] for k in sorted(new_state)]
        inputs = [p, grad] + ([lr] if lr_tensor else [])
        inputs += [state[k] for k in sorted(state) if state[k].requires_grad]
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i),
                               dtype=torch.float64) for i, o in enumerate(outputs)]
        total = sum((w * o).sum() for w, o in zip(weights, outputs) if o.requires_grad)
        grads = torch.autograd.grad(total, inputs, allow_unused=True)
        results.append(([o.detach() for o in outputs], grads, sorted(new_state)))
    (t_out, t_grads, t_keys), (f_out, f_grads, f_keys) = results
    assert t_keys == f_keys
    # Tolerances: see DIFF_TOL.
    for i, (a, b) in enumerate(zip(f_out, t_out)):
        assert_row_close(f"{case.id} output {i}", a, b, torch.maximum(a.abs(), b.abs()),
                         torch.float64, tolerance(torch.float64, case.fused).ulps)
    for i, (a, b) in enumerate(zip(f_grads, t_grads)):
        assert (a is None) == (b is None), f"{case.id}: gradient {i} is None on one side only"
        if a is not None:
            assert_row_close(f"{case.id} gradient {i}", a, b, torch.maximum(a.abs(), b.abs()),
                             torch.float64, DIFF_TOL)


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=case_ids(DEFAULT_CASES))
def test_differentiable_gradcheck(case):
    """torch.autograd.gradcheck of one differentiable step, as torch.optim's own tests
    check theirs: the gradients autograd records are the derivatives of the step."""
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(4, generator=gen, dtype=torch.float64)
    g0 = torch.randn(4, generator=gen, dtype=torch.float64)
    state0 = _initial_state(case, p0, g0)
    keys = sorted(k for k, v in state0.items()
                  if v.is_floating_point() and k not in scalar_keys(case))
    options = {k: v for k, v in case.options.items() if k != "lr"}

    def fn(p, grad, *values):
        state = {**state0, **dict(zip(keys, values))}
        new_p, new_state = _diff_step(case.fused, p, grad, state, case.options["lr"], options)
        return (new_p, *(new_state[k] for k in keys))

    inputs = (p0.clone().requires_grad_(), g0.clone().requires_grad_(),
              *(state0[k].clone().requires_grad_() for k in keys))
    # Finite differences of 1e-8: the states after two steps can be as small as 1e-6
    # (Adadelta's acc_delta), where gradcheck's default 1e-6 would not be local.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-8)
