"""fused_optim.LBFGS against torch.optim.LBFGS: numbers, host syncs, the contract.

What is compared: many ``step(closure)`` calls (each up to max_iter iterations) on the
Rosenbrock function, a least-squares problem and an ill-conditioned quadratic, over
params of sizes 1, 3 and 4097 (plus a param the loss does not use, whose grad stays None,
which torch gathers as zeros), with and without the strong Wolfe line search, torch's
options (history wrap, max_eval, early convergence on tolerance_grad / tolerance_change,
lr, tensor lr), fp64 and fp32; after every step the params, and at the end every state
key (``func_evals`` / ``n_iter`` / list lengths exactly). Then the host syncs of a step
(``aten::_local_scalar_dense`` under a TorchDispatchMode) against torch's, state_dict
both ways, torch's validation errors, torch's optim_db LBFGS configs, lr schedulers,
hooks, pickling, complex params and sparse grads.

Tolerances (fused_optim/lbfgs.py [note: LBFGS numbers]: the same algebra as torch in
another order, so rounding differs), measured on this machine (torch 2.13 CPU):
  * fp64: 1e-10 of the params' largest magnitude, after every step: measured 7.6e-16
    (least squares), 5.9e-14 (quadratic), 1.4e-12 (Rosenbrock) over STEPS steps of
    MAX_ITER iterations. Longer Rosenbrock runs amplify rounding (torch against itself
    from a start moved by one ulp: 2e-11 with the line search over 10 steps of 20
    iterations, 5e-7 without), so a case above 1e-10 is held to SPREAD times torch's own
    spread instead (none needs it at these lengths; test_long_run_* runs one).
  * fp32: within FP32_RTOL (5e-4) of torch's fp32 params on least squares and the
    quadratic (measured <= 2.9e-7 and <= 1.6e-4: the quadratic with an exact line search
    makes directions nearly conjugate to the stored steps, where the inner-product form
    cancels); and on every problem as close to the fp64 run as torch's fp32 run is,
    within FP32_SPREAD (32) times torch's distance + 16 ulps (measured up to 17x on that
    quadratic, <= 1.1x on least squares; Rosenbrock's fp32 runs part from fp64 by
    different line-search decisions, 0.7-2.4, alike for both). One direction's error is
    checked against torch's own fp32 error in test_direction_matches_torch_recursion.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import fused_optim
from fused_optim.lbfgs import _History

FP64_RTOL = 1e-10
FP32_RTOL = 5e-4
FP32_SPREAD = 32.0
SIZES = (1, 3, 4097)
MAX_ITER = 5
STEPS = 4
SPREAD = 10.0


# ---------------------------------------------------------------------------------------
# Problems: f(params) over the concatenation x of the params (the last param unused).


def _flat(params: list[Tensor]) -> Tensor:
    return torch.cat([p.reshape(-1) for p in params[:-1]])


def rosenbrock(params: list[Tensor], data) -> Tensor:
    x = _flat(params)
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def least_squares(params: list[Tensor], data) -> Tensor:
    a, b = data
    r = a @ _flat(params) - b
    return 0.5 * (r * r).sum()


def quadratic(params: list[Tensor], data) -> Tensor:
    diag, b = data
    x = _flat(params)
    return (0.5 * diag * x * x - b * x).sum()


def _data(name: str, n: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(11)
    if name == "least_squares":
        a = torch.randn(300, n, generator=gen, dtype=torch.float64) / n ** 0.5
        return a.to(dtype), torch.randn(300, generator=gen, dtype=torch.float64).to(dtype)
    if name == "quadratic":
        diag = torch.logspace(0, 3, n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
        return diag.to(dtype), torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    return None


PROBLEMS = {"rosenbrock": rosenbrock, "least_squares": least_squares, "quadratic": quadratic}


def _start(name: str, sizes, dtype: torch.dtype) -> list[Tensor]:
    gen = torch.Generator().manual_seed(5)
    scale = 0.3 if name == "rosenbrock" else 1.0
    params = [torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in sizes]
    params.append(torch.randn(2, generator=gen, dtype=torch.float64))  # never has a grad
    return [torch.nn.Parameter(p.to(dtype)) for p in params]


def run(cls, problem: str, dtype: torch.dtype, options: dict, steps: int, sizes=SIZES,
        start_dtype: torch.dtype | None = None, perturb: float = 0.0):
    """`steps` calls of step(closure); the params after each, the optimizer, the
    losses returned. `perturb`: the start multiplied by 1 + perturb (torch's spread)."""
    params = _start(problem, sizes, start_dtype or dtype)
    params = [torch.nn.Parameter((p.detach().double() * (1 + perturb)).to(dtype))
              for p in params]
    data = _data(problem, sum(sizes), dtype)
    fn = PROBLEMS[problem]
    opt = cls(params, **options)

    def closure():
        opt.zero_grad()
        loss = fn(params, data)
        loss.backward()
        return loss

    trajectory, losses = [], []
    for _ in range(steps):
        losses.append(float(opt.step(closure).detach()))
        trajectory.append(torch.cat([p.detach().reshape(-1).clone() for p in params]))
    return trajectory, opt, params, losses


def _rel(a: Tensor, b: Tensor) -> float:
    scale = b.double().abs().max().item()
    return ((a.double() - b.double()).abs().max().item() / scale) if scale else 0.0


def _max_rel(ta: list[Tensor], tb: list[Tensor]) -> float:
    return max(_rel(a, b) for a, b in zip(ta, tb))


def _assert_state_matches(fused, oracle, params, tparams, rtol: float) -> None:
    a, b = fused.state[params[0]], oracle.state[tparams[0]]
    assert sorted(a) == sorted(b)
    for key in ("func_evals", "n_iter"):
        assert a[key] == b[key], f"{key}: {a[key]} vs {b[key]}"
    for key in ("old_dirs", "old_stps", "ro", "al"):
        if key in b:
            assert len(a[key]) == len(b[key]), key
    for key, va in a.items():
        vb = b[key]
        if key in ("func_evals", "n_iter"):
            continue
        if isinstance(vb, list):
            # a list (al, ro, old_dirs, ...) is compared at the scale of its largest
            # entry: al_i is ~0 where a direction is conjugate to s_i (a cancellation
            # in torch's order and in ours alike)
            assert [x is None for x in va] == [x is None for x in vb], key
            pairs = [(x, y) for x, y in zip(va, vb) if y is not None]
            scale = max([y.double().abs().max().item() for _, y in pairs] + [1e-300])
        else:
            pairs = [(va, vb)]
            scale = None
        for x, y in pairs:
            assert isinstance(x, Tensor) == isinstance(y, Tensor), (key, type(x), type(y))
            if isinstance(y, Tensor):
                assert x.dtype == y.dtype and x.shape == y.shape, (key, x.dtype, y.dtype)
                s = scale if scale is not None else max(y.double().abs().max().item(), 1e-300)
                err = (x.double() - y.double()).abs().max().item()
                assert err <= rtol * s, (key, err, s)
            else:
                assert type(x) is type(y), (key, x, y)
                assert abs(x - y) <= rtol * max(abs(y), 1e-300), (key, x, y)


# ---------------------------------------------------------------------------------------
# Parity

OPTION_CASES = [
    {},
    {"history_size": 3, "max_iter": 7},  # the ring wraps every step
    {"max_eval": 5},  # the line search / iterations cut by max_eval
    {"lr": 0.5, "max_iter": 4},
    {"tolerance_grad": 1e-3},  # early convergence: a step that returns at once
    {"tolerance_change": 1e-4},
]


def _cases():
    for problem in PROBLEMS:
        for ls in (None, "strong_wolfe"):
            for opts in OPTION_CASES:
                yield pytest.param(problem, ls, opts,
                                   id=f"{problem}-{ls or 'fixed'}-" + (
                                       ",".join(f"{k}={v}" for k, v in opts.items()) or "default"))


def _steps(problem: str, options: dict) -> tuple[dict, int]:
    """STEPS calls of MAX_ITER iterations (torch's recursion costs ~10 small ops per
    stored pair and iteration: longer runs are test_long_run's)."""
    return {"max_iter": MAX_ITER, **options}, STEPS


def _torch_spread(problem, dtype, options, steps) -> float:
    """How far torch's own run moves when its start moves by one ulp (relative): the
    amplification of rounding along this trajectory."""
    eps = torch.finfo(dtype).eps
    base, *_ = run(torch.optim.LBFGS, problem, dtype, options, steps)
    moved, *_ = run(torch.optim.LBFGS, problem, dtype, options, steps, perturb=eps)
    return _max_rel(moved, base)


@pytest.mark.parametrize("problem,line_search,options", list(_cases()))
def test_parity_fp64(problem, line_search, options):
    options, steps = _steps(problem, {"line_search_fn": line_search, **options})
    ours, fused, ps, lf = run(fused_optim.LBFGS, problem, torch.float64, options, steps)
    theirs, oracle, tps, lt = run(torch.optim.LBFGS, problem, torch.float64, options, steps)
    err = _max_rel(ours, theirs)
    print(f"fp64 {problem} {options}: {err:.3g}")
    if err > FP64_RTOL:
        # a trajectory that amplifies rounding: compare with torch's own spread
        spread = _torch_spread(problem, torch.float64, options, steps)
        print(f"fp64 {problem} {options}: {err:.3g}, torch spread {spread:.3g}")
        assert err <= SPREAD * spread, (
            f"max relative difference {err:.3g}; torch's own spread {spread:.3g}")
        return
    _assert_state_matches(fused, oracle, ps, tps, 1e-6)
    assert lf == pytest.approx(lt, rel=1e-9)


@pytest.mark.parametrize("problem,line_search,options", list(_cases()))
def test_parity_fp32(problem, line_search, options):
    options, steps = _steps(problem, {"line_search_fn": line_search, **options})
    ours, *_ = run(fused_optim.LBFGS, problem, torch.float32, options, steps,
                   start_dtype=torch.float32)
    theirs, *_ = run(torch.optim.LBFGS, problem, torch.float32, options, steps,
                     start_dtype=torch.float32)
    truth, *_ = run(torch.optim.LBFGS, problem, torch.float64, options, steps,
                    start_dtype=torch.float32)
    torch_err = _max_rel(theirs, truth)
    our_err = _max_rel(ours, truth)
    print(f"fp32 {problem} {options}: ours {our_err:.3g} torch {torch_err:.3g} from fp64; "
          f"to torch {_max_rel(ours, theirs):.3g}")
    ulps = 16 * torch.finfo(torch.float32).eps
    assert our_err <= FP32_SPREAD * torch_err + ulps, (
        f"fused fp32 is {our_err:.3g} from the fp64 run, torch fp32 {torch_err:.3g}")
    if problem != "rosenbrock":
        err = _max_rel(ours, theirs)
        assert err <= FP32_RTOL, f"max relative difference to torch fp32 {err:.3g}"


def test_long_run_within_torchs_own_spread():
    """Rosenbrock, 10 steps of 20 iterations with history 100, fp64: the trajectory
    amplifies rounding (see the module docstring), so the bar is torch's own spread."""
    options = {"line_search_fn": "strong_wolfe"}
    ours, fused, ps, _ = run(fused_optim.LBFGS, "rosenbrock", torch.float64, options, 10,
                             sizes=(3, 4))
    theirs, oracle, tps, _ = run(torch.optim.LBFGS, "rosenbrock", torch.float64, options, 10,
                                 sizes=(3, 4))
    err = _max_rel(ours, theirs)
    if err > FP64_RTOL:
        spread = _torch_spread_sizes("rosenbrock", options, 10, (3, 4))
        assert err <= SPREAD * spread, (err, spread)
    a, b = fused.state[ps[0]], oracle.state[tps[0]]
    assert a["func_evals"] == b["func_evals"] and a["n_iter"] == b["n_iter"]
    assert len(a["old_dirs"]) == len(b["old_dirs"])


def test_full_history_reuses_its_buffer():
    """Once history_size pairs are stored, steps reuse the ring's rows: the buffer keeps
    history_size + 1 slots and its storage (it once grew by a slot, and was copied whole,
    at every step)."""
    x = torch.nn.Parameter(torch.linspace(-1, 1, 64, dtype=torch.float64))  # 64 >= 2 * 4^2
    scale = torch.linspace(1, 50, 64, dtype=torch.float64)
    opt = fused_optim.LBFGS([x], history_size=3, max_iter=4, tolerance_grad=0.0,
                            tolerance_change=0.0)

    def closure():
        opt.zero_grad()
        loss = (scale * x * x).sum() + x.sin().sum()
        loss.backward()
        return loss

    seen = []
    for _ in range(6):
        opt.step(closure)
        hist = opt._history
        seen.append((hist.capacity, hist.buf.data_ptr()))
        assert len(opt.state[x]["old_dirs"]) <= 3
    assert len(opt.state[x]["old_dirs"]) == 3
    assert all(cap == 4 for cap, _ in seen[1:]), seen
    assert len({ptr for _, ptr in seen[1:]}) == 1, seen
    # on the CPU the whole ring from the first step ([note: LBFGS buffer on the CPU])
    assert seen[0] == seen[1], seen


def test_small_rows_grow_the_buffer_by_steps():
    """Where the ring's Gram matrices are not small beside a row, the buffer grows with
    the history instead (the pairs a step can add), and the numbers do not change."""
    x = torch.nn.Parameter(torch.linspace(-1, 1, 64, dtype=torch.float64))
    opt = fused_optim.LBFGS([x], history_size=10, max_iter=2, tolerance_grad=0.0,
                            tolerance_change=0.0)

    def closure():
        opt.zero_grad()
        loss = (x * x * torch.arange(1, 65, dtype=torch.float64)).sum()
        loss.backward()
        return loss

    caps = []
    for _ in range(4):
        opt.step(closure)
        caps.append(opt._history.capacity)
    assert caps[0] < caps[-1] <= 11, caps


def _torch_spread_sizes(problem, options, steps, sizes) -> float:
    eps = torch.finfo(torch.float64).eps
    base, *_ = run(torch.optim.LBFGS, problem, torch.float64, options, steps, sizes=sizes)
    moved, *_ = run(torch.optim.LBFGS, problem, torch.float64, options, steps, sizes=sizes,
                    perturb=eps)
    return _max_rel(moved, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direction_matches_torch_recursion(dtype):
    """One direction from a stored history (torch's state after 6 iterations), against
    torch's two-loop recursion, both against the recursion in fp64: ours within 32x of
    torch's own error in fp32 (measured 0.8-20x: the inner-product form cancels where
    torch's vectors do), 1e-13 in fp64 (measured 4e-15)."""
    gen = torch.Generator().manual_seed(3)
    n = 4101
    diag = torch.logspace(0, 3, n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    for ls in ("strong_wolfe", None):
        x = torch.nn.Parameter(torch.randn(n, dtype=torch.float64, generator=gen))
        opt = torch.optim.LBFGS([x], line_search_fn=ls, max_iter=6)

        def closure():
            opt.zero_grad()
            loss = (0.5 * diag * x * x - b * x).sum()
            loss.backward()
            return loss

        opt.step(closure)
        st = opt.state[x]
        g = x.grad.detach().clone()
        lists = st["old_dirs"], st["old_stps"], st["ro"]
        ref = _torch_direction(g, *lists, st["H_diag"])
        c = [[v.to(dtype) for v in lst] for lst in lists]
        theirs = _torch_direction(g.to(dtype), *c, st["H_diag"].to(dtype))
        hist = _History.from_lists(g.to(dtype), 100, *c, None, 10)
        hist.grad_row.copy_(g)
        hist.set_products(*hist.products())
        al = [None] * 100
        ours = hist.direction(st["H_diag"].to(dtype), al)
        torch_err = ((theirs.double() - ref).norm() / ref.norm()).item()
        our_err = ((ours.double() - ref).norm() / ref.norm()).item()
        if dtype == torch.float64:
            assert our_err <= 1e-13, our_err
        else:
            assert our_err <= 32 * torch_err + 1e-7, (our_err, torch_err)
        assert all(isinstance(a, Tensor) and a.dim() == 0 for a in al[: len(c[0])])


def _torch_direction(g, dirs, stps, ro, h):
    q = g.neg()
    al = [None] * len(dirs)
    for i in range(len(dirs) - 1, -1, -1):
        al[i] = stps[i].dot(q) * ro[i]
        q.add_(dirs[i], alpha=-al[i])
    r = torch.mul(q, h)
    for i in range(len(dirs)):
        be = dirs[i].dot(r) * ro[i]
        r.add_(stps[i], alpha=al[i] - be)
    return r


# ---------------------------------------------------------------------------------------
# Host syncs


class _CountLocalScalarDense(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_host_syncs_only_the_algorithms_decisions(line_search):
    """aten::_local_scalar_dense calls per step: torch reads two per stored pair per
    iteration in its recursion (add_(alpha=tensor)); ours reads only the decisions:
    per iteration the loss, the optimality test, ys > 1e-10, gtd > -tolerance_change and
    the lack-of-progress test (one more for the first step size), plus the line search's
    comparisons."""
    counts = {}
    for cls in (fused_optim.LBFGS, torch.optim.LBFGS):
        params = _start("quadratic", (50,), torch.float64)
        data = _data("quadratic", 50, torch.float64)
        opt = cls(params, max_iter=10, line_search_fn=line_search, tolerance_grad=1e-14,
                  tolerance_change=1e-16)

        def closure():
            opt.zero_grad()
            loss = quadratic(params, data)
            loss.backward()
            return loss

        per_step = []
        for _ in range(3):
            with _CountLocalScalarDense() as mode:
                opt.step(closure)
            per_step.append(mode.count)
        counts[cls.__module__] = (per_step, opt.state[params[0]]["n_iter"],
                                  opt.state[params[0]]["func_evals"])
    ours, iters, evals = counts["fused_optim.lbfgs"]
    theirs, t_iters, t_evals = counts["torch.optim.lbfgs"]
    assert (iters, evals) == (t_iters, t_evals)
    assert all(a <= b for a, b in zip(ours, theirs)), (ours, theirs)
    if line_search is None:
        # 5 decisions per iteration (+1 for the first step size), 2 for the first eval
        assert sum(ours) <= 5 * iters + 2 * 3 + 1, (ours, iters)
    # torch: 2 reads per stored pair per iteration on top of that
    assert sum(theirs) - sum(ours) >= iters * 2, (ours, theirs)


# ---------------------------------------------------------------------------------------
# The contract


def _closure_for(opt, params, problem="least_squares"):
    data = _data(problem, sum(p.numel() for p in params[:-1]), params[0].dtype)

    def closure():
        opt.zero_grad()
        loss = PROBLEMS[problem](params, data)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("direction", ["fused->torch", "torch->fused", "fused->fused"])
@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_state_dict_switch_mid_training(direction, line_search):
    """3 steps with one class, state_dict (through torch.save), load into the other, 3
    more: the trajectory of a torch run that never switched (history_size 4 so the
    loaded history wraps afterwards)."""
    first, second = {"fused->torch": (fused_optim.LBFGS, torch.optim.LBFGS),
                     "torch->fused": (torch.optim.LBFGS, fused_optim.LBFGS),
                     "fused->fused": (fused_optim.LBFGS, fused_optim.LBFGS)}[direction]
    options = {"line_search_fn": line_search, "history_size": 4, "max_iter": 3}
    never, *_ = run(torch.optim.LBFGS, "least_squares", torch.float64, options, 6)
    params = _start("least_squares", SIZES, torch.float64)
    opt = first(params, **options)
    closure = _closure_for(opt, params)
    traj = []
    for _ in range(3):
        opt.step(closure)
        traj.append(torch.cat([p.detach().reshape(-1).clone() for p in params]))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    assert sorted(saved["state"][0]) == sorted(
        ["func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag",
         "prev_flat_grad", "prev_loss", "al"])
    opt2 = second(params, **options)
    opt2.load_state_dict(saved)
    closure = _closure_for(opt2, params)
    for _ in range(3):
        opt2.step(closure)
        traj.append(torch.cat([p.detach().reshape(-1).clone() for p in params]))
    assert _max_rel(traj, never) <= FP64_RTOL


def test_state_dict_format_matches_torch():
    options = {"line_search_fn": "strong_wolfe", "history_size": 3, "max_iter": 6}
    _, fused, _, _ = run(fused_optim.LBFGS, "quadratic", torch.float32, options, 2)
    _, oracle, _, _ = run(torch.optim.LBFGS, "quadratic", torch.float32, options, 2)
    a, b = fused.state_dict(), oracle.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert sorted(a["state"]) == sorted(b["state"]) == [0]
    for key, value in b["state"][0].items():
        mine = a["state"][0][key]
        assert type(mine) is type(value), key
        if isinstance(value, list):
            assert len(mine) == len(value)
            for x, y in zip(mine, value):
                assert type(x) is type(y) and (y is None or (x.shape == y.shape and x.dtype == y.dtype))
        elif isinstance(value, Tensor):
            assert mine.shape == value.shape and mine.dtype == value.dtype, key


def test_pickle_and_deepcopy():
    """A copy (which keeps the state but not the buffer) continues as the original."""
    options = {"history_size": 4, "max_iter": 4}
    for clone in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        params = _start("least_squares", SIZES, torch.float64)
        opt = fused_optim.LBFGS(params, **options)
        opt.step(_closure_for(opt, params))
        twin = clone((opt, params))
        opt.step(_closure_for(opt, params))
        opt2, params2 = twin
        opt2.step(_closure_for(opt2, params2))
        for p, q in zip(params, params2):
            assert _rel(q.detach(), p.detach()) <= FP64_RTOL


def test_validation_errors_match_torch():
    p = torch.nn.Parameter(torch.randn(3))
    q = torch.nn.Parameter(torch.randn(3))
    cases = [
        ([{"params": [p]}, {"params": [q]}], {}),
        ([p], {"lr": -1.0}),
        ([p], {"lr": torch.tensor([0.1, 0.2])}),
        (p, {}),
        ([{"params": p}, {"params": p}], {}),
    ]
    for params, kwargs in cases:
        with pytest.raises(Exception) as theirs:
            torch.optim.LBFGS(params, **kwargs)
        with pytest.raises(type(theirs.value)) as ours:
            fused_optim.LBFGS(params, **kwargs)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match=r"LBFGS doesn't support per-parameter options \(parameter groups\)"):
        fused_optim.LBFGS([{"params": [p]}, {"params": [q]}])
    # a closure is required; an unknown line search is refused at the first step
    for cls in (torch.optim.LBFGS, fused_optim.LBFGS):
        with pytest.raises(TypeError):
            cls([p]).step()
        params = _start("quadratic", (3,), torch.float32)
        opt = cls(params, line_search_fn="backtracking")
        with pytest.raises(RuntimeError, match="only 'strong_wolfe' is supported"):
            opt.step(_closure_for(opt, params, "quadratic"))


def test_signature_and_defaults_match_torch():
    import inspect

    assert (list(inspect.signature(fused_optim.LBFGS.__init__).parameters)
            == list(inspect.signature(torch.optim.LBFGS.__init__).parameters))
    p = torch.nn.Parameter(torch.randn(3))
    assert fused_optim.LBFGS([p]).defaults == torch.optim.LBFGS([p]).defaults
    assert fused_optim.LBFGS([p], max_iter=8).defaults["max_eval"] == 10


# torch.testing._internal.common_optimizers.optim_inputs_func_lbfgs (torch 2.13): its
# configs, copied because importing optim_db needs expecttest, which the dev environment
# lacks; test_optim_db_configs_are_torchs checks them against optim_db where it imports.
OPTIM_DB_CONFIGS = [
    ("default", {}),
    ("non-default lr", {"lr": 0.01}),
    ("Tensor lr", {"lr": torch.tensor(0.001)}),
    ("tolerance_grad", {"tolerance_grad": 1e-6}),
    ("strong_wolfe", {"line_search_fn": "strong_wolfe"}),
]


def test_optim_db_configs_are_torchs():
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_optimizers import optim_db

    info = next(o for o in optim_db if o.optim_cls is torch.optim.LBFGS)
    got = [(c.desc, c.kwargs) for c in info.optim_inputs_func(device="cpu")]
    assert [d for d, _ in got] == [d for d, _ in OPTIM_DB_CONFIGS]
    for (_, a), (_, b) in zip(got, OPTIM_DB_CONFIGS):
        assert a.keys() == b.keys()


@pytest.mark.parametrize("config", OPTIM_DB_CONFIGS, ids=[c[0] for c in OPTIM_DB_CONFIGS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optim_db_configs(config, dtype):
    """torch's optim_db LBFGS configs, 5 steps on a small problem (torch's
    test_rosenbrock-like 2-param start plus the awkward sizes), against torch.optim."""
    _, options = config
    options = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in options.items()}
    opts_t = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in options.items()}
    ours, fused, ps, _ = run(fused_optim.LBFGS, "least_squares", dtype, options, 5)
    theirs, oracle, tps, _ = run(torch.optim.LBFGS, "least_squares", dtype, opts_t, 5)
    err = _max_rel(ours, theirs)
    assert err <= (FP64_RTOL if dtype == torch.float64 else FP32_RTOL), err
    a, b = fused.state[ps[0]], oracle.state[tps[0]]
    assert (a["func_evals"], a["n_iter"]) == (b["func_evals"], b["n_iter"])
    assert type(a["t"]) is type(b["t"])


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lr_scheduler(tensor_lr):
    trajs = []
    for cls in (fused_optim.LBFGS, torch.optim.LBFGS):
        params = _start("least_squares", SIZES, torch.float64)
        lr = torch.tensor(0.8, dtype=torch.float64) if tensor_lr else 0.8
        opt = cls(params, lr=lr, max_iter=3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        closure = _closure_for(opt, params)
        traj = []
        for _ in range(5):
            opt.step(closure)
            sched.step()
            traj.append(torch.cat([p.detach().reshape(-1).clone() for p in params]))
        trajs.append(traj)
    assert _max_rel(trajs[0], trajs[1]) <= FP64_RTOL


def test_hooks_run_like_torch():
    params = _start("least_squares", SIZES, torch.float64)
    opt = fused_optim.LBFGS(params, max_iter=2)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd") or sd)
    opt.step(_closure_for(opt, params))
    opt.state_dict()
    assert calls == ["pre", "post", "sd"]


def test_closure_runs_with_grad_enabled_and_loss_is_returned():
    params = _start("least_squares", SIZES, torch.float64)
    opt = fused_optim.LBFGS(params, max_iter=2)
    inner = _closure_for(opt, params)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        return inner()

    with torch.no_grad():
        loss = opt.step(closure)
    assert all(seen) and loss.requires_grad


def test_complex_params_and_sparse_grads_match_torch():
    """torch gathers a complex grad as real pairs and densifies a sparse grad."""
    outs = []
    for cls in (fused_optim.LBFGS, torch.optim.LBFGS):
        gen = torch.Generator().manual_seed(2)
        z = torch.nn.Parameter(torch.randn(5, dtype=torch.complex128, generator=gen))
        e = torch.nn.Embedding(6, 3, sparse=True).double()
        with torch.no_grad():
            e.weight.copy_(torch.randn(6, 3, generator=gen, dtype=torch.float64))
        params = [z, e.weight]
        opt = cls(params, max_iter=4, line_search_fn="strong_wolfe")
        idx = torch.tensor([0, 2, 2, 5])

        def closure():
            opt.zero_grad()
            loss = (z.abs() ** 2 - z.real).sum() + (e(idx) ** 2).sum() - e(idx).sum()
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        outs.append([p.detach().clone() for p in params])
    for a, b in zip(*outs):
        assert _rel(torch.view_as_real(a) if a.is_complex() else a,
                    torch.view_as_real(b) if b.is_complex() else b) <= FP64_RTOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params_run_like_torch(dtype):
    """torch's LBFGS runs on bf16 / fp16 params (its dots in those dtypes); ours too (the
    m x m solves in fp32, al and the coefficients rounded to the dtype): same state
    types, params within 10% (measured <= 8% in bf16, 0.1% in fp16 after 2-3 steps; the
    half-precision dots round differently; a third fp16 step overflows, in torch too)."""
    options = {"max_iter": 5, "line_search_fn": "strong_wolfe"}
    ours, fused, ps, _ = run(fused_optim.LBFGS, "least_squares", dtype, options, 2,
                             start_dtype=dtype)
    theirs, oracle, tps, _ = run(torch.optim.LBFGS, "least_squares", dtype, options, 2,
                                 start_dtype=dtype)
    assert all(torch.isfinite(t).all() for t in ours)
    assert _max_rel(ours, theirs) <= 0.1
    a, b = fused.state[ps[0]], oracle.state[tps[0]]
    assert a["d"].dtype == b["d"].dtype and a["al"][0].dtype == b["al"][0].dtype


@pytest.mark.parametrize("n", [(1 << 17) - 1, 1 << 17, 300_001])
def test_row_products_in_column_blocks(n):
    """[note: row products in column blocks] (fused_optim/lbfgs.py): the blocked products
    (several blocks and a tail here, one block below 2 x _MIN_BLOCK) against torch.mv in
    float64, and an LBFGS run of that size against torch.optim's."""
    from fused_optim.lbfgs import _blocks, rows_times, times_rows

    gen = torch.Generator().manual_seed(n)
    rows = torch.randn(7, n, generator=gen, dtype=torch.float64)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    c = torch.randn(7, generator=gen, dtype=torch.float64)
    assert (_blocks(rows) > 1) == (n >= 2 * (1 << 16))
    torch.testing.assert_close(rows_times(rows, v), torch.mv(rows, v), rtol=1e-13, atol=0)
    torch.testing.assert_close(times_rows(c, rows), torch.mv(rows.t(), c), rtol=1e-13,
                               atol=1e-13)
    assert rows_times(rows[:0], v).shape == (0,)
    # A quadratic of n unknowns, 2 steps of 6 iterations: fp64 within FP64_RTOL.
    a = torch.linspace(1, 100, n, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    finals = []
    for cls in (fused_optim.LBFGS, torch.optim.LBFGS):
        x = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        opt = cls([x], max_iter=6, history_size=4)

        def closure():
            opt.zero_grad()
            loss = 0.5 * (a * x * x).sum() - (b * x).sum()
            loss.backward()
            return loss

        for _ in range(2):
            opt.step(closure)
        finals.append(x.detach())
    assert _max_rel([finals[0]], [finals[1]]) <= FP64_RTOL


# ---------------------------------------------------------------------------------------
# The row-pass ops of the CPU ([note: LBFGS row passes on the CPU] in fused_optim/lbfgs.py;
# csrc/lbfgs.cpp): opcheck, every CPU kernel variant to the bit, against float64 sums.

def _row_ops_built() -> bool:
    from fused_optim.lbfgs import _row_ops_for

    return _row_ops_for(torch.zeros(1))


needs_row_ops = pytest.mark.skipif(not _row_ops_built(),
                                   reason="fused_optim._C has no lbfgs ops (not built)")
# several 64K-element column blocks and a tail; one short block
ROW_OP_SIZES = (2 * 65536 + 4099, 4097)


def _row_op_inputs(n, dtype, slot=1, rows=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    buf = torch.randn(1 + rows + 2, n, generator=gen, dtype=torch.float64).to(dtype)
    prev = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    d = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    coef = torch.randn(1 + rows, generator=gen, dtype=torch.float64).to(dtype)
    return buf, prev, d, torch.tensor(0.37, dtype=torch.float64), slot, rows, coef


@needs_row_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_row_ops_opcheck(dtype):
    buf, prev, d, t, slot, rows, coef = _row_op_inputs(ROW_OP_SIZES[0], dtype)
    torch.library.opcheck(torch.ops.fused_optim.lbfgs_products_.default,
                          (buf, prev, d, t, slot, rows))
    torch.library.opcheck(torch.ops.fused_optim.lbfgs_direction.default,
                          (buf[: 1 + rows], coef))


def _capabilities():
    from fused_optim import _extension

    return list(_extension.C.supported_cpu_capabilities()) if _extension.C is not None else []


@needs_row_ops
@pytest.mark.parametrize("n", ROW_OP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_row_ops_match_torch_on_every_cpu_variant(n, dtype):
    """The candidate pair and prev as torch's ops make them (bit for bit); the dots and the
    direction within their rounding of float64 sums (fp32: the dots add in runs, the
    direction row after row in fp32, as torch's recursion adds); every kernel variant the
    same bits; the versions of buf and prev bumped."""
    from fused_optim import _extension

    results = []
    cap_before = _extension.C.cpu_capability()
    try:
        for cap in _capabilities():
            _extension.C.set_cpu_capability(cap)
            buf, prev, d, t, slot, rows, coef = _row_op_inputs(n, dtype)
            g, prev0 = buf[0].clone(), prev.clone()
            versions = buf._version, prev._version
            out = torch.ops.fused_optim.lbfgs_products_(buf, prev, d, t, slot, rows)
            assert buf._version > versions[0] and prev._version > versions[1]
            y, s = buf[1 + 2 * slot], buf[2 + 2 * slot]
            assert torch.equal(y, g.sub(prev0)) and torch.equal(s, d.mul(t.item()))
            assert torch.equal(prev, g)
            # a sum's error bound: k eps sum |a_i b_i|, k = 64 (at most 32 terms a lane in
            # the storage dtype, then float64: [note: LBFGS sums] in csrc/cpu/lbfgs_impl.h)
            tol = 64 * torch.finfo(dtype).eps
            wide, mag = buf.double(), buf.double().abs()
            ys, yy = y.double(), y.double().abs()
            want = torch.cat([wide[1: 1 + rows] @ wide[0],
                              torch.stack([ys @ s.double(), ys @ ys])])
            bound = torch.cat([mag[1: 1 + rows] @ mag[0],
                               torch.stack([yy @ s.double().abs(), yy @ yy])])
            assert ((out.double() - want).abs() <= tol * bound).all()
            d_new, stats = torch.ops.fused_optim.lbfgs_direction(buf[: 1 + rows], coef)
            exact = coef.double() @ wide[: 1 + rows]
            # rows + 1 terms added in the storage dtype, then rounded
            assert ((d_new.double() - exact).abs()
                    <= (rows + 2) * torch.finfo(dtype).eps * (coef.double().abs() @ mag[: 1 + rows])).all()
            assert stats[1] == d_new.abs().max()
            assert (stats[0].double() - wide[0] @ d_new.double()).abs() <= tol * (mag[0] @ d_new.double().abs())
            results.append((buf, prev, out, d_new, stats))
    finally:
        _extension.C.set_cpu_capability(cap_before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@needs_row_ops
def test_row_ops_nan_and_bad_calls():
    buf, prev, d, t, slot, rows, coef = _row_op_inputs(300, torch.float32)
    coef[3] = float("nan")
    _, stats = torch.ops.fused_optim.lbfgs_direction(buf[: 1 + rows], coef)
    assert stats.isnan().all()  # max |d| is NaN, as d.abs().max() is
    with pytest.raises(RuntimeError, match="slot"):
        torch.ops.fused_optim.lbfgs_products_(buf, prev, d, t, 3, rows)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fused_optim.lbfgs_products_(buf, prev.double(), d, t, slot, rows)
    with pytest.raises(RuntimeError, match="coefficient"):
        torch.ops.fused_optim.lbfgs_direction(buf[: 1 + rows], coef[:-1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_torch_op_path_where_the_row_ops_do_not_apply(monkeypatch, dtype):
    """The row passes as torch ops (other devices, half types, no _C), here on the CPU:
    still torch.optim's numbers."""
    import fused_optim.lbfgs as lbfgs

    monkeypatch.setattr(lbfgs, "_row_ops_for", lambda like: False)
    options = {"line_search_fn": "strong_wolfe", "max_iter": MAX_ITER, "history_size": 3}
    ours, *_ = run(fused_optim.LBFGS, "least_squares", dtype, options, STEPS)
    theirs, *_ = run(torch.optim.LBFGS, "least_squares", dtype, options, STEPS)
    assert _max_rel(ours, theirs) <= (FP64_RTOL if dtype == torch.float64 else FP32_RTOL)
