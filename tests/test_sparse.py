"""Sparse grads: SparseAdam, and SGD / Adagrad on sparse grads, through the row-sparse
engine (fused_optim/_sparse.py) on every backend that has one here, against torch.optim.

What is compared: several steps of embedding-shaped params whose grads come from
``nn.Embedding(sparse=True)``-like COO tensors (duplicate indices, rows never touched, a
step without lookups), general COO indices (2-D indices of a matrix, 1-D params, 3-D
params with one sparse dim), coalesced grads, mixed sparse and dense params in one
group, maximize, tensor lr, state_dict both ways, GradScaler, torch.optim's refusals,
torch's optim_db sparse configs, and opcheck of the engine's op.

Tolerances, measured (torch 2.13 CPU, this machine):
  * the reference backend runs torch.optim's own sparse ops: bit-equal.
  * states (exp_avg, exp_avg_sq, sum): bit-equal on every backend and dtype: their math
    has no square root, and the engine sums duplicates in the order coalesce() does.
  * params, float32 / float64: torch's CPU sqrt is not correctly rounded (19.7% of
    float32 results of sqrt_ on 1e5 random values are 1 ulp from numpy's correctly
    rounded sqrt, 1.4% of float64), ours is, so SparseAdam and Adagrad params part by
    an ulp of the update at times: measured <= 5.4 ulps of the element after 6 steps.
    Allowed: 2 ulps of the param's largest element per step. SGD has no sqrt: bit-equal.
  * params, bfloat16 / float16: bit-equal here (the roundings absorb the sqrt's ulp);
    allowed: 1 ulp of the dtype at the param's largest element per step, since another
    machine's torch sqrt may differ.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import Tensor

import fused_optim
from _oracle import outcome
from fused_optim import _extension

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
STEPS = 4

# (class name, options, dtypes): the optim_db sparse configs of torch and the options
# each optimizer takes with sparse grads.
CONFIGS = [
    ("SparseAdam", {"lr": 4e-2}),
    ("SparseAdam", {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True}),
    ("Adagrad", {"lr": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.1,
                 "maximize": True}),
    ("SGD", {"lr": 4.8e-3}),
    ("SGD", {"lr": 4.8e-3, "maximize": True}),
    ("SGD", {"lr": 4.8e-3, "momentum": 0.9}),  # torch's sparse momentum buffer
    ("SGD", {"lr": 4.8e-3, "momentum": 0.9, "dampening": 0.1, "nesterov": False}),
]


def _config_id(c) -> str:
    name, opts = c
    return name + "".join(f"-{k}={v}" for k, v in opts.items() if k != "lr")


def sparse_backends() -> list[str]:
    """Backends with a sparse engine that can run CPU tensors here."""
    out = []
    for name, why in fused_optim.available_backends("cpu", torch.float32).items():
        if why is None and fused_optim.backends.get_backend(name).sparse_step is not None:
            out.append(name)
    return out


BACKENDS = [b for b in sparse_backends() if b != "triton"]  # triton: tests/test_triton.py


def embedding_grad(num: int, dim: int, lookups: int, dtype: torch.dtype,
                   gen: torch.Generator, hot: int | None = None) -> Tensor:
    """An uncoalesced COO grad as nn.Embedding(sparse=True) makes it: one value row per
    lookup, duplicates included; rows drawn from the first `hot` rows (default: half of
    them, so the others are never touched)."""
    idx = torch.randint(0, hot or max(1, num // 2), (lookups,), generator=gen)
    values = torch.randn(lookups, dim, generator=gen, dtype=torch.float64).to(dtype)
    if dtype == torch.float16:
        values = values.clamp(-4, 4)
    return torch.sparse_coo_tensor(idx[None], values, (num, dim))


def _tolerance(dtype: torch.dtype, name: str, steps: int, scale: float) -> dict:
    """See the module docstring: SGD's sparse math has no sqrt and is bit-equal."""
    if name == "SGD":
        return {"rtol": 0, "atol": 0}
    ulps = 2 if dtype in (torch.float32, torch.float64) else 1
    return {"rtol": 0, "atol": ulps * steps * torch.finfo(dtype).eps * scale}


def _assert_param(name: str, dtype: torch.dtype, steps: int, ours: Tensor, theirs: Tensor,
                  label: str, exact: bool = False) -> None:
    scale = theirs.detach().double().abs().max().item() if theirs.numel() else 0.0
    tol = {"rtol": 0, "atol": 0} if exact else _tolerance(dtype, name, steps, scale)
    torch.testing.assert_close(ours.detach(), theirs.detach(), equal_nan=True, msg=lambda m: (
        f"{label}: {m}"), **tol)


def _assert_states(fused, oracle, ps, tps, label: str) -> None:
    for i, (p, tp) in enumerate(zip(ps, tps)):
        a, b = fused.state.get(p, {}), oracle.state.get(tp, {})
        assert sorted(a) == sorted(b), f"{label} param {i}: state keys {sorted(a)} vs {sorted(b)}"
        for key in b:
            x, y = a[key], b[key]
            if not isinstance(y, Tensor):
                assert x == y and type(x) is type(y), f"{label} {key}: {x!r} vs {y!r}"
                continue
            assert x.layout == y.layout, f"{label} {key}: layout {x.layout} vs {y.layout}"
            if y.is_sparse:
                x, y = x.coalesce().to_dense(), y.coalesce().to_dense()
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{label} state {key}: {m}")


def _run_pair(name: str, options: dict, backend: str, dtype: torch.dtype,
              shapes: list[tuple[int, int]], grads_of_step, steps: int = STEPS,
              dense_too: bool = False):
    """(fused, oracle, fused params, oracle params) after `steps` steps with the same
    grads (grads_of_step(step) -> one grad per param, or None for no grad); None when
    torch.optim raised, and fused_optim raised the same."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    tps = [torch.nn.Parameter(p.clone()) for p in params]
    extra = []
    if dense_too:
        extra = [torch.nn.Parameter(torch.randn(3, 5, generator=gen, dtype=torch.float64)
                                    .to(dtype)) for _ in range(2)]
    textra = [torch.nn.Parameter(e.detach().clone()) for e in extra]
    fused = getattr(fused_optim, name)(ps + extra, backend=backend, **options)
    oracle = getattr(torch.optim, name)(tps + textra, **options)
    for step in range(steps):
        grads = grads_of_step(step)
        for p, tp, g in zip(ps, tps, grads):
            p.grad = None if g is None else g.clone()
            tp.grad = None if g is None else g.clone()
        for e, te in zip(extra, textra):
            g = torch.randn(e.shape, generator=gen, dtype=torch.float64).to(dtype)
            e.grad, te.grad = g.clone(), g.clone()
        theirs, ours = outcome(oracle.step), outcome(fused.step)
        assert ours == theirs, f"step {step}"
        if theirs is not None:  # torch refuses (SGD's sparse momentum in float16): so do we
            return None
    return fused, oracle, ps + extra, tps + textra


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_embedding_parity(config, dtype, backend):
    """Two embedding tables, 4 steps: duplicates, untouched rows, a step without lookups
    (step 2 of the second table), a param without a grad (step 1 of the first)."""
    name, options = config
    gen = torch.Generator().manual_seed(1)
    shapes = [(40, 16), (23, 5)]

    def grads(step):
        g0 = None if step == 1 else embedding_grad(40, 16, 60, dtype, gen)
        g1 = embedding_grad(23, 5, 0 if step == 2 else 9, dtype, gen)
        return [g0, g1]

    result = _run_pair(name, options, backend, dtype, shapes, grads)
    if result is None:
        return
    fused, oracle, ps, tps = result
    exact = backend == "reference"
    for i, (p, tp) in enumerate(zip(ps, tps)):
        _assert_param(name, dtype, STEPS, p, tp, f"{name} {backend} param {i}", exact=exact)
    _assert_states(fused, oracle, ps, tps, f"{name} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["coo2d", "vector", "3d", "coalesced", "noncontig"])
@pytest.mark.parametrize("name", ["SparseAdam", "Adagrad", "SGD"])
def test_general_coo(name, layout, backend):
    """COO grads other than an embedding's: 2-D indices of a matrix (every dim sparse),
    a 1-D param, a 3-D param with one sparse dim, an already coalesced grad, and a
    non-contiguous param (the reference's torch ops run it)."""
    dtype = torch.float32
    gen = torch.Generator().manual_seed(2)
    shape = {"coo2d": (9, 7), "vector": (31,), "3d": (11, 3, 4), "coalesced": (17, 6),
             "noncontig": (6, 10)}[layout]

    def grads(step):
        nnz = 15
        if layout == "coo2d":
            idx = torch.stack([torch.randint(0, 9, (nnz,), generator=gen),
                               torch.randint(0, 7, (nnz,), generator=gen)])
            g = torch.sparse_coo_tensor(idx, torch.randn(nnz, generator=gen), shape)
        elif layout == "vector":
            g = torch.sparse_coo_tensor(torch.randint(0, 31, (1, nnz), generator=gen),
                                        torch.randn(nnz, generator=gen), shape)
        elif layout == "3d":
            g = torch.sparse_coo_tensor(torch.randint(0, 11, (1, nnz), generator=gen),
                                        torch.randn(nnz, 3, 4, generator=gen), shape)
        else:
            g = torch.sparse_coo_tensor(torch.randint(0, shape[0], (1, nnz), generator=gen),
                                        torch.randn(nnz, shape[1], generator=gen), shape)
            if layout == "coalesced":
                g = g.coalesce()
        return [g]

    if layout == "noncontig":
        gen0 = torch.Generator().manual_seed(0)
        base = torch.randn(10, 6, generator=gen0)
        p, tp = (torch.nn.Parameter(base.clone().t()) for _ in range(2))
        assert not p.is_contiguous()
        fused = getattr(fused_optim, name)([p], backend=backend, lr=0.05)
        oracle = getattr(torch.optim, name)([tp], lr=0.05)
        for step in range(STEPS):
            (g,) = grads(step)
            p.grad, tp.grad = g.clone(), g.clone()
            fused.step()
            oracle.step()
        ps, tps = [p], [tp]
    else:
        fused, oracle, ps, tps = _run_pair(name, {"lr": 0.05}, backend, dtype, [shape], grads)
    _assert_param(name, dtype, STEPS, ps[0], tps[0], f"{name} {layout} {backend}",
                  exact=backend == "reference")
    _assert_states(fused, oracle, ps, tps, f"{name} {layout} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["Adagrad", "SGD"])
def test_sparse_and_dense_params_in_one_group(name, backend):
    """An embedding with sparse grads beside dense params in the same group: each goes
    to its engine, with the same results as torch."""
    dtype = torch.float32
    gen = torch.Generator().manual_seed(3)
    fused, oracle, ps, tps = _run_pair(
        name, {"lr": 0.05}, backend, dtype, [(30, 8)],
        lambda step: [embedding_grad(30, 8, 40, dtype, gen)], dense_too=True)
    _assert_param(name, dtype, STEPS, ps[0], tps[0], f"{name} sparse param",
                  exact=backend == "reference")
    _assert_states(fused, oracle, ps[:1], tps[:1], name)
    for i, (p, tp) in enumerate(zip(ps[1:], tps[1:])):
        # The dense engine (the reference: torch ops, but not torch's fused multiply-adds),
        # within the dense parity tests' budget (tests/_tables.py): 4 ulps a step.
        scale = tp.detach().abs().max().item()
        torch.testing.assert_close(p.detach(), tp.detach(), rtol=0,
                                   atol=4 * STEPS * torch.finfo(dtype).eps * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_and_lr_scheduler(backend):
    """A tensor lr and torch's optim_db sparse schedulers (StepLR; ReduceLROnPlateau for
    Adagrad) change the lr between steps as in torch."""
    for name, sched in [("SparseAdam", "step"), ("Adagrad", "plateau"), ("SGD", "step")]:
        gen = torch.Generator().manual_seed(4)
        p0 = torch.randn(20, 4, generator=gen)
        p, tp = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
        lr = torch.tensor(0.05)
        fused = getattr(fused_optim, name)([p], lr=lr.clone(), backend=backend)
        oracle = getattr(torch.optim, name)([tp], lr=lr.clone())
        if sched == "step":
            s1 = torch.optim.lr_scheduler.StepLR(fused, step_size=2, gamma=0.5)
            s2 = torch.optim.lr_scheduler.StepLR(oracle, step_size=2, gamma=0.5)
        else:
            s1 = torch.optim.lr_scheduler.ReduceLROnPlateau(fused, patience=0, factor=0.5)
            s2 = torch.optim.lr_scheduler.ReduceLROnPlateau(oracle, patience=0, factor=0.5)
        for step in range(5):
            g = embedding_grad(20, 4, 12, torch.float32, gen)
            p.grad, tp.grad = g.clone(), g.clone()
            fused.step()
            oracle.step()
            if sched == "step":
                s1.step()
                s2.step()
            else:
                s1.step(1.0)
                s2.step(1.0)
        _assert_param(name, torch.float32, 5, p, tp, f"{name} {sched}",
                      exact=backend == "reference")


@pytest.mark.parametrize("name", ["SparseAdam", "Adagrad", "SGD"])
def test_state_dict_both_ways(name):
    """Two steps in one library, the state_dict loaded into the other, two more steps in
    each: the same as four steps of torch.optim alone."""
    options = {"lr": 0.05, **({"momentum": 0.9} if name == "SGD" else {})}
    gen = torch.Generator().manual_seed(5)
    grads = [embedding_grad(25, 6, 30, torch.float32, gen) for _ in range(4)]
    p0 = torch.randn(25, 6, generator=gen)

    def run(first, second):
        p = torch.nn.Parameter(p0.clone())
        a = first([p], **options)
        for g in grads[:2]:
            p.grad = g.clone()
            a.step()
        sd = copy.deepcopy(a.state_dict())
        b = second([p], **options)
        b.load_state_dict(sd)
        for g in grads[2:]:
            p.grad = g.clone()
            b.step()
        return p, b

    fcls, tcls = getattr(fused_optim, name), getattr(torch.optim, name)
    ref, ref_opt = run(tcls, tcls)
    for first, second in [(fcls, tcls), (tcls, fcls), (fcls, fcls)]:
        p, opt = run(first, second)
        _assert_param(name, torch.float32, 4, p, ref, f"{first.__module__} -> {second.__module__}")
        if name == "SparseAdam":
            assert opt.state[p]["step"] == 4 and isinstance(opt.state[p]["step"], int)


def test_sparse_adam_state_is_torchs():
    """SparseAdam's state: step a Python int, dense moments, created at a param's first
    sparse grad; a step without lookups advances the step only."""
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = fused_optim.SparseAdam(emb.parameters())
    assert not opt.state
    emb(torch.tensor([1, 1, 4])).sum().backward()
    opt.step()
    state = opt.state[emb.weight]
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"]
    assert state["step"] == 1 and isinstance(state["step"], int)
    assert state["exp_avg"].shape == (10, 3) and state["exp_avg"].layout == torch.strided
    assert torch.count_nonzero(state["exp_avg"].abs().sum(1)) == 2  # rows 1 and 4 only
    before = emb.weight.detach().clone()
    emb.weight.grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long),
                                              torch.zeros(0, 3), (10, 3))
    opt.step()
    assert state["step"] == 2 and torch.equal(emb.weight.detach(), before)


# ---------------------------------------------------------------------------------------
# What torch.optim refuses, refused the same way


def _refusal(make, grad_fn, name):
    p, tp = torch.ones(5, 3, requires_grad=True), torch.ones(5, 3, requires_grad=True)
    fused, oracle = make(fused_optim, p), make(torch.optim, tp)
    p.grad, tp.grad = grad_fn(), grad_fn()
    theirs, ours = outcome(oracle.step), outcome(fused.step)
    assert theirs is not None, f"{name}: torch accepted it"
    assert ours == theirs, name
    assert torch.equal(p.detach(), torch.ones(5, 3)), f"{name}: the param changed"


def _sparse_grad():
    return torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.ones(2, 3), (5, 3))


@pytest.mark.parametrize("what", ["sparse_adam_dense", "adagrad_weight_decay",
                                  "adagrad_fused", "sgd_weight_decay", "sgd_fused"])
def test_refusals_match_torch(what):
    make = {
        "sparse_adam_dense": lambda m, p: m.SparseAdam([p]),
        "adagrad_weight_decay": lambda m, p: m.Adagrad([p], weight_decay=0.1),
        "adagrad_fused": lambda m, p: m.Adagrad([p], fused=True),
        "sgd_weight_decay": lambda m, p: m.SGD([p], lr=0.1, weight_decay=0.1),
        "sgd_fused": lambda m, p: m.SGD([p], lr=0.1, fused=True),
    }[what]
    grad = (lambda: torch.ones(5, 3)) if what == "sparse_adam_dense" else _sparse_grad
    _refusal(make, grad, what)


def test_sparse_adam_constructor_checks():
    p = torch.nn.Parameter(torch.ones(3))
    for kwargs in [{"lr": 0.0}, {"lr": -1.0}, {"eps": 0.0}, {"betas": (1.0, 0.9)},
                   {"betas": (0.9, -0.1)}, {"lr": torch.tensor([0.1, 0.2])}]:
        theirs = outcome(lambda: torch.optim.SparseAdam([p], **kwargs))
        ours = outcome(lambda: fused_optim.SparseAdam([p], **kwargs))
        assert theirs is not None and ours == theirs, kwargs
    c = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    s = torch.ones(3).to_sparse().requires_grad_()
    for params in [[p, c], [s]]:
        theirs = outcome(lambda: torch.optim.SparseAdam(params))
        ours = outcome(lambda: fused_optim.SparseAdam(params))
        assert theirs is not None and ours == theirs


def _grad_of_rows(idx: Tensor, num: int, dim: int, dtype: torch.dtype, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(idx.numel(), dim, generator=gen, dtype=torch.float64).to(dtype)
    return torch.sparse_coo_tensor(idx[None], values, (num, dim))


# Grads around torch's choice of sort in coalesce() ([note: entry order of a coalescing
# sum] in csrc/sparse_rows.cpp): below 32,768 entries std::sort, whose order among equal
# rows is its own; from 32,768 on a stable radix sort. (name, rows of the table, entries,
# rows drawn from): many entries per row on both sides of the threshold, and a grad below
# it whose rows have at most two entries (the engine's own order, no torch sort).
ORDER_CASES = [("std-sort-heavy", 64, 5000, 64), ("std-sort-last", 300, 32767, 300),
               ("radix-first", 300, 32768, 300), ("radix", 50, 40000, 50),
               ("at-most-two", 5000, 7000, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", ORDER_CASES, ids=lambda c: c[0])
def test_duplicate_sums_are_coalesce_sums(case, dtype):
    """Adagrad's sum (sum += g * g, g the coalesced grad) bit-equal to torch's after one
    step: each row's entries were added in coalesce()'s order. With many entries a row,
    the stable order (input order) gives other bits than std::sort's below the
    threshold: the comparison can tell the orders apart."""
    name, num, nnz, drawn = case
    gen = torch.Generator().manual_seed(nnz)
    if drawn is None:  # every row at most twice, in a random order
        idx = torch.cat([torch.randperm(num, generator=gen), torch.randperm(num, generator=gen)])
        idx = idx[torch.randperm(2 * num, generator=gen)][:nnz]
        assert torch.bincount(idx).max() == 2
    else:
        idx = torch.randint(0, drawn, (nnz,), generator=gen)
    grad = _grad_of_rows(idx, num, 4, dtype, seed=nnz)
    p = torch.nn.Parameter(torch.zeros(num, 4, dtype=dtype))
    tp = torch.nn.Parameter(torch.zeros(num, 4, dtype=dtype))
    ours = fused_optim.Adagrad([p], lr=0.1, backend="cpu")
    theirs = torch.optim.Adagrad([tp], lr=0.1)
    p.grad, tp.grad = grad.clone(), grad.clone()
    ours.step()
    theirs.step()
    assert torch.equal(ours.state[p]["sum"], theirs.state[tp]["sum"]), name
    if name.startswith("std-sort"):
        # The test can fail: summing in input order (a stable sort) differs here.
        stable = torch.sort(idx, stable=True).indices
        v = grad._values()[stable].to(torch.float64 if dtype == torch.float64 else dtype)
        rows = idx[stable]
        sums = torch.zeros(num, 4, dtype=dtype)
        for k in range(nnz):  # one rounding per add, as coalesce() sums
            sums[rows[k]] += v[k]
        assert not torch.equal(sums, grad.coalesce().to_dense()), name


def test_out_of_range_row_is_an_error():
    """The engine's op checks its indices instead of writing out of bounds."""
    p = torch.zeros(4, 2)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.fused_optim.sparse_rows_(
            [p], [torch.tensor([1, 4])], [torch.ones(2, 2)], [], torch.tensor([[-0.1]],
                                                                              dtype=torch.float64),
            math="sgd", maximize=False)
    with pytest.raises(RuntimeError, match="no row math 'nope'"):
        torch.ops.fused_optim.sparse_rows_([p], [torch.tensor([1])], [torch.ones(1, 2)], [],
                                           torch.zeros(1, 1, dtype=torch.float64), math="nope",
                                           maximize=False)
    assert torch.equal(p, torch.zeros(4, 2))


# ---------------------------------------------------------------------------------------
# GradScaler, the op, torch's optim_db configs


@pytest.mark.parametrize("name", ["Adagrad", "SGD"])
def test_grad_scaler(name):
    """torch.amp.GradScaler with sparse grads: fused_optim's step takes the scale (and
    unscales the values in place, as GradScaler does itself for torch.optim); a step with
    an inf is skipped entirely."""
    results = []
    for lib in (fused_optim, torch.optim):
        torch.manual_seed(6)
        emb = torch.nn.Embedding(12, 4, sparse=True)
        opt = getattr(lib, name)(emb.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        for step in range(3):
            opt.zero_grad()
            loss = emb(torch.tensor([1, 3, 3, 7])).pow(2).sum()
            if step == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        results.append((emb.weight.detach().clone(), copy.deepcopy(opt.state_dict()["state"])))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=8 * 3 * 1.2e-7)


def test_opcheck_sparse_rows():
    gen = torch.Generator().manual_seed(7)
    for math_name, n_states, n_consts in [("sparse_adam", 2, 4), ("adagrad", 1, 2), ("sgd", 0, 1)]:
        params = [torch.randn(6, 3, generator=gen), torch.randn(4, 2, generator=gen)]
        rows = [torch.tensor([5, 0, 5, 2]), torch.tensor([3])]
        values = [torch.randn(4, 3, generator=gen), torch.randn(1, 2, generator=gen)]
        states = [torch.rand(p.shape, generator=gen) for _ in range(n_states) for p in params]
        consts = torch.rand(2, n_consts, generator=gen, dtype=torch.float64)
        torch.library.opcheck(torch.ops.fused_optim.sparse_rows_.default,
                              (params, rows, values, states, consts),
                              {"math": math_name, "maximize": False})


def _rosenbrock(t: Tensor) -> Tensor:
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _drosenbrock(t: Tensor) -> Tensor:
    x, y = t
    return torch.stack((-400 * x * (y - x**2) - 2 * (1 - x), 200 * (y - x**2)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [
    ("SGD", {"lr": 4.8e-3}, ["StepLR"]),
    ("Adagrad", {"lr": 0.1}, ["StepLR", "ReduceLROnPlateau"]),
    ("SparseAdam", {"lr": 4e-2}, []),
], ids=lambda c: c[0])
def test_optim_db_sparse_configs(config, backend):
    """torch's test_rosenbrock_sparse with its optim_db sparse configs: a 2-element
    param whose grad is the Rosenbrock gradient as a sparse tensor at one random index
    per step (the other index a step later), 20 steps with the configs' schedulers."""
    name, options, schedulers = config
    init = torch.tensor([1.5, 1.5])
    results = []
    for lib in (fused_optim, torch.optim):
        torch.manual_seed(8)
        x = torch.nn.Parameter(init.clone())
        kw = {"backend": backend} if lib is fused_optim else {}
        opt = getattr(lib, name)([x], **options, **kw)
        scheds = []
        for s in schedulers:
            if s == "StepLR":
                scheds.append(torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5))
            else:
                scheds.append(torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1))
        for _ in range(20):
            def closure():
                loss = _rosenbrock(x)
                grad = _drosenbrock(x.detach())
                i = torch.randint(0, 2, ()).item()
                x.grad = torch.sparse_coo_tensor(torch.tensor([[i]]), grad[i:i + 1], (2,))
                return loss

            loss = opt.step(closure)
            for s in scheds:
                if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    s.step(loss)
                else:
                    s.step()
        results.append(x.detach().clone())
    _assert_param(name, torch.float32, 20, results[0], results[1], f"optim_db {name}",
                  exact=backend == "reference")


def test_cpu_engine_runs_every_capability():
    """The row kernels of every instruction set built (default / avx2 / avx512) give the
    same result."""
    if _extension.C is None:
        pytest.skip("fused_optim._C is not built")
    out = {}
    before = _extension.C.cpu_capability()
    try:
        for cap in _extension.C.supported_cpu_capabilities():
            _extension.C.set_cpu_capability(cap)
            gen = torch.Generator().manual_seed(9)
            res = []
            for name in ["SparseAdam", "Adagrad", "SGD"]:
                for dtype in DTYPES:
                    fused, _, ps, _ = _run_pair(
                        name, {"lr": 0.05}, "cpu", dtype, [(300, 37)],
                        lambda step: [embedding_grad(300, 37, 500, dtype, gen)], steps=2)
                    res.append(ps[0].detach().clone())
            out[cap] = res
    finally:
        _extension.C.set_cpu_capability(before)
    first = next(iter(out.values()))
    for cap, res in out.items():
        for a, b in zip(res, first):
            assert torch.equal(a, b) or torch.allclose(a, b, equal_nan=True, rtol=0, atol=0), cap
