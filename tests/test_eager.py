"""The eager group entry (csrc/eager.cpp, FusedOptimizer._step_group_eager).

An eager step of a plain param group is read in C++ and runs the op's own kernel
without the Python lists or the dispatcher. These tests pin down that it is a shortcut
and nothing more: the same bits as the list path (through torch.ops.fused_optim) for
every optimizer case and dtype, the same version bumps, the same errors; that it is
really taken; and that every case it does not own goes to the list path unchanged.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_optim
from _oracle import make_grads, make_params
from _tables import (
    DTYPES,
    FULL_CASES,
    MANY_SHAPES,
    OPTIMIZER_CASES,
    SMALL_SHAPES,
    case_ids,
    dtype_id,
)
from fused_optim import _extension, optimizer
from fused_optim.backends import select_backend

pytestmark = pytest.mark.skipif(
    _extension.C is None or getattr(_extension.C, "step_group_", None) is None,
    reason=f"the C++ extension is not built ({_extension.LOAD_ERROR})",
)


class EntryCalls:
    """Wraps the cpu backend's group entry and records what each call returned."""

    def __init__(self, monkeypatch):
        self.results: list[bool] = []
        real_select = optimizer.select_backend

        def select(requested, device, dtype):
            backend = real_select(requested, device, dtype)
            if backend.step_group is None:
                return backend
            return dataclasses.replace(backend, step_group=self._recording(backend.step_group))

        monkeypatch.setattr(optimizer, "select_backend", select)

    def _recording(self, entry):
        def call(*args, **kwargs):
            result = entry(*args, **kwargs)
            self.results.append(result)
            return result

        return call


def list_path_only(monkeypatch):
    monkeypatch.setattr(optimizer, "_eager_possible", lambda: False)


def run_steps(case, dtype, shapes, steps, seed, eager, monkeypatch, grad_mask=None):
    """Steps case.fused on the cpu backend; returns (params, optimizer, versions seen
    after each step per tensor of each row)."""
    gen = torch.Generator().manual_seed(seed)
    params = make_params(shapes, dtype, gen)
    with monkeypatch.context() as m:
        if not eager:
            list_path_only(m)
        opt = case.fused(params, backend="cpu", **case.options)
        for step in range(steps):
            grads = make_grads(shapes, dtype, gen)
            for i, (p, g) in enumerate(zip(params, grads)):
                keep = grad_mask is None or grad_mask(step, i)
                p.grad = g if keep else None
            opt.step()
    return params, opt


def assert_bitwise_equal(a_params, a_opt, b_params, b_opt):
    for i, (pa, pb) in enumerate(zip(a_params, b_params)):
        assert torch.equal(pa, pb), f"param {i} differs"
        sa, sb = a_opt.state.get(pa, {}), b_opt.state.get(pb, {})
        assert sorted(sa) == sorted(sb), f"param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sa:
            va, vb = sa[key], sb[key]
            assert va.dtype == vb.dtype and va.device == vb.device, f"param {i} {key}"
            assert torch.equal(va, vb), f"param {i}: state {key!r} differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=case_ids(OPTIMIZER_CASES))
def test_eager_entry_matches_list_path_bit_for_bit(case, dtype, monkeypatch):
    """Same kernel, same arguments: every param and state tensor equal to the bit after
    each of several steps, on awkward sizes, with the entry taken from the second step
    (the first creates the state; SGD without momentum needs none and takes it at once)."""
    calls = EntryCalls(monkeypatch)
    eager = run_steps(case, dtype, SMALL_SHAPES, 4, 0, True, monkeypatch)
    taken = list(calls.results)
    listed = run_steps(case, dtype, SMALL_SHAPES, 4, 0, False, monkeypatch)
    assert_bitwise_equal(*eager, *listed)
    # The first step creates the state, unless the optimizer keeps none (SGD without
    # momentum) or creates it at construction (Adagrad).
    fresh = case.fused([torch.zeros(2, requires_grad=True)], **case.options)
    p = fresh.param_groups[0]["params"][0]
    needs_state = not set(fresh._state_keys(fresh.param_groups[0])) <= set(fresh.state.get(p, {}))
    assert taken == ([False] + [True] * 3 if needs_state else [True] * 4)


@pytest.mark.parametrize("case", FULL_CASES, ids=case_ids(FULL_CASES))
def test_eager_entry_many_tensors_and_changing_grads(case, monkeypatch):
    """120 tensors (a parallel region), params that gain and lose grads between steps:
    a param without a grad is skipped, a param's first step (no state yet) sends the
    group to the list path for that step."""
    def mask(step, i):
        return (i + step) % 3 != 0 if i < 60 else step >= 2

    eager = run_steps(case, torch.float32, MANY_SHAPES, 5, 1, True, monkeypatch, mask)
    listed = run_steps(case, torch.float32, MANY_SHAPES, 5, 1, False, monkeypatch, mask)
    assert_bitwise_equal(*eager, *listed)


def _versions(params, opt):
    rows = []
    for p in params:
        state = [v for _, v in sorted(opt.state.get(p, {}).items()) if torch.is_tensor(v)]
        rows.append([p._version, p.grad._version, *(t._version for t in state)])
    return rows


@pytest.mark.parametrize("case", FULL_CASES + [c for c in OPTIMIZER_CASES if c.name == "SGD"][:1],
                         ids=case_ids(FULL_CASES + [c for c in OPTIMIZER_CASES
                                                    if c.name == "SGD"][:1]))
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scale"])
def test_eager_entry_bumps_what_the_op_bumps(case, scaled, monkeypatch):
    """The entry skips the dispatcher's ADInplaceOrView kernel and bumps the versions
    itself: every param and state tensor moves as much as through the op; a grad moves
    only when the step writes it (unscaled, with grad_scale), as torch.optim never
    changes a grad's version."""
    deltas = []
    for eager in (True, False):
        with monkeypatch.context() as m:
            if not eager:
                list_path_only(m)
            calls = EntryCalls(m)
            params = [torch.randn(5, requires_grad=True), torch.randn(2, 3, requires_grad=True)]
            opt = case.fused(params, backend="cpu", **case.options)
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()  # creates the state
            before = _versions(params, opt)
            if scaled:
                opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)
            opt.step()
            after = _versions(params, opt)
            assert calls.results[-1:] == ([True] if eager else [])
        rows = [[a - b for a, b in zip(ra, rb)] for ra, rb in zip(after, before)]
        deltas.append(rows)
        for row in rows:
            param, grad, *states = row
            assert param >= 1 and all(d >= 1 for d in states), rows
            assert (grad >= 1) if scaled else (grad == 0), rows
    assert deltas[0] == deltas[1]


def test_eager_entry_error_is_the_op_error(monkeypatch):
    """State that does not fit its param (set by hand) fails the op's checks with the
    same RuntimeError on both paths, and changes nothing."""
    messages = []
    for eager in (True, False):
        with monkeypatch.context() as m:
            if not eager:
                list_path_only(m)
            p = torch.randn(6, requires_grad=True)
            opt = fused_optim.AdamW([p])
            p.grad = torch.randn(6)
            opt.step()
            opt.state[p]["exp_avg"] = torch.zeros(5)
            before = p.detach().clone()
            step_before = opt.state[p]["step"].clone()
            with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] has shape \[5\]") as info:
                opt.step()
            messages.append(str(info.value))
            assert torch.equal(p, before) and torch.equal(opt.state[p]["step"], step_before)
    assert messages[0] == messages[1]
    assert "Exception raised from" not in messages[0]  # no C++ backtrace in the message


def _adam_state(p):
    return {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p)}


def _adam_entry(params, state, amsgrad=False, grad_scale=None, found_inf=None):
    """The eager entry of the adam_ op, called as FusedOptimizer calls it."""
    return _extension.C.step_group_(
        "adam_", params, state, ["exp_avg", "exp_avg_sq", "max_exp_avg_sq" if amsgrad else None],
        ["step"], torch.tensor(0.1, dtype=torch.float64), [0.9, 0.999, 0.0, 1e-8],
        [amsgrad, False, False], grad_scale, found_inf)


class _SubTensor(torch.Tensor):
    pass


def _declined_groups():
    """(name, params, state) groups the entry must decline."""
    out = []

    def row(p, grad=True, state=True):
        if grad:
            p.grad = torch.ones_like(p)
        return p, (_adam_state(p) if state else None)

    def group(name, rows):
        params = [p for p, _ in rows]
        state = {p: s for p, s in rows if s is not None}
        out.append((name, params, state))

    group("state not created yet", [row(torch.randn(3)), row(torch.randn(4), state=False)])
    group("complex param", [row(torch.randn(3, dtype=torch.complex64))])
    group("mixed dtypes", [row(torch.randn(3)), row(torch.randn(3, dtype=torch.float64))])
    group("integer param", [row(torch.arange(3))])
    group("tensor subclass", [row(torch.randn(3)), row(torch.randn(3).as_subclass(_SubTensor))])
    group("non-contiguous param", [row(torch.randn(4, 6).t())])
    noncontig = torch.randn(3, 2)
    noncontig.grad = torch.randn(2, 3).t()
    group("non-contiguous grad", [(noncontig, _adam_state(noncontig))])
    sparse = torch.randn(4)
    sparse.grad = torch.ones(4).to_sparse()
    group("sparse grad", [(sparse, _adam_state(sparse))])
    missing = torch.randn(3)
    missing.grad = torch.ones(3)
    st = _adam_state(missing)
    del st["exp_avg_sq"]
    group("state key missing", [(missing, st)])
    pystep = torch.randn(3)
    pystep.grad = torch.ones(3)
    st = _adam_state(pystep)
    st["step"] = 1.0
    group("step is a float", [(pystep, st)])
    return out


@pytest.mark.parametrize("name,params,state", _declined_groups(),
                         ids=[g[0] for g in _declined_groups()])
def test_eager_entry_declines_and_changes_nothing(name, params, state):
    before = [(p.detach().clone(), p._version) for p in params]
    states_before = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                     for p, s in state.items()}
    assert _adam_entry(params, state) is False
    for (value, version), p in zip(before, params):
        assert torch.equal(p.detach(), value) and p._version == version, name
    for p, s in state.items():
        for k, v in s.items():
            old = states_before[id(p)][k]
            assert (torch.equal(v, old) if torch.is_tensor(v) else v == old), (name, k)


def test_eager_entry_declines_amsgrad_without_max_state():
    p = torch.randn(3)
    p.grad = torch.ones(3)
    assert _adam_entry([p], {p: _adam_state(p)}, amsgrad=True) is False


def test_eager_entry_sgd_needs_every_momentum_buffer():
    a, b = torch.randn(3), torch.randn(3)
    a.grad, b.grad = torch.ones(3), torch.ones(3)

    def entry(state):
        return _extension.C.step_group_(
            "sgd_", [a, b], state, ["momentum_buffer"], [],
            torch.tensor(0.1, dtype=torch.float64), [0.9, 0.0, 0.0], [False, False, False],
            None, None)

    state = {a: {"momentum_buffer": torch.zeros(3)}}
    assert entry(state) is False
    state[b] = {"momentum_buffer": None}  # torch.optim.SGD's marker for "not yet"
    assert entry(state) is False
    state[b] = {"momentum_buffer": torch.zeros(3)}
    assert entry(state) is True
    assert torch.equal(state[a]["momentum_buffer"], torch.ones(3))


def test_eager_entry_no_grads_is_a_no_op():
    p = torch.randn(3)
    state = {p: _adam_state(p)}
    assert _adam_entry([p], state) is True
    assert state[p]["step"].item() == 1.0


def test_eager_entry_rejects_arguments_of_another_op():
    p = torch.randn(3)
    p.grad = torch.ones(3)
    with pytest.raises(TypeError, match="do not match fused_optim::sgd_"):
        _extension.C.step_group_("sgd_", [p], {}, ["exp_avg", "exp_avg_sq", None], ["step"],
                                 torch.tensor(0.1), [0.9, 0.999, 0.0, 1e-8],
                                 [False, False, False], None, None)
    with pytest.raises(ValueError, match="no registered op"):
        _extension.C.step_group_("nope_", [p], {}, [], [], torch.tensor(0.1), [], [],
                                 None, None)


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_op(monkeypatch):
    """Under a dispatch mode the step goes through torch.ops.fused_optim, so the mode
    (a profiler, FakeTensorMode, a user's tracer) sees the op."""
    calls = EntryCalls(monkeypatch)
    p = torch.randn(4, requires_grad=True)
    opt = fused_optim.AdamW([p])
    p.grad = torch.randn(4)
    opt.step()
    with _OpNames() as mode:
        opt.step()
    assert "fused_optim.adam_.default" in mode.names
    assert calls.results == [False]  # the first step's call; none under the mode
    opt.step()
    assert calls.results == [False, True]


def test_auto_backend_takes_the_entry_and_reference_does_not(monkeypatch):
    calls = EntryCalls(monkeypatch)
    p = torch.randn(4, requires_grad=True)
    p.grad = torch.randn(4)
    opt = fused_optim.Adam([p])
    opt.step()
    opt.step()
    assert calls.results == [False, True]
    assert select_backend("auto", p.device, p.dtype).name == "cpu"
    ref = fused_optim.Adam([torch.randn(4, requires_grad=True)], backend="reference")
    ref.param_groups[0]["params"][0].grad = torch.randn(4)
    ref.step()
    ref.step()
    assert calls.results == [False, True]  # the reference backend has no entry


def test_grad_scaler_arguments_reach_the_kernel(monkeypatch):
    """found_inf set: the eager step changes nothing (steps included); grad_scale
    divides the grads, as on the list path."""
    results = []
    for eager in (True, False):
        with monkeypatch.context() as m:
            if not eager:
                list_path_only(m)
            torch.manual_seed(0)
            p = torch.randn(5, requires_grad=True)
            opt = fused_optim.Adam([p], lr=0.1)
            p.grad = torch.randn(5)
            opt.step()
            snapshot = [p.detach().clone()] + [v.clone() for v in opt.state[p].values()]
            opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
            opt.step()
            now = [p.detach()] + list(opt.state[p].values())
            assert all(torch.equal(a, b) for a, b in zip(now, snapshot))
            opt.found_inf = torch.tensor(0.0)
            opt.step()
            results.append([p.detach().clone()] + [v.clone() for v in opt.state[p].values()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("case", FULL_CASES, ids=case_ids(FULL_CASES))
def test_profiler_sees_the_eager_step_under_the_op_name(case, monkeypatch):
    calls = EntryCalls(monkeypatch)
    p = torch.randn(4, requires_grad=True)
    opt = case.fused([p], **case.options)
    name = f"fused_optim::{opt.spec.op}"
    p.grad = torch.randn(4)
    opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert calls.results[-1] is True
    assert name in {e.name for e in prof.events()}


# -- the row-sparse engine's entry (csrc/eager.cpp sparse_step_) ----------------------

SPARSE_CASES = [("SparseAdam", {"lr": 4e-2}), ("Adagrad", {"lr": 0.1, "lr_decay": 0.05}),
                ("SGD", {"lr": 4.8e-3, "maximize": True})]


def _embedding_steps(name, options, dtype, entry, monkeypatch, steps=3):
    """Steps fused_optim.<name> on two embedding tables (one 1-D) with uncoalesced grads
    (duplicates included); returns (params, optimizer, what the entry returned)."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(37, 5, generator=gen).to(dtype), torch.randn(23, generator=gen).to(dtype)]
    returned: list[bool] = []
    with monkeypatch.context() as m:
        if entry:
            real = select_backend("cpu", torch.device("cpu"), dtype)

            def recording(*args):
                returned.append(real.sparse_group(*args))
                return returned[-1]

            from fused_optim import _sparse
            m.setattr(_sparse, "_sparse_backend",
                      lambda *a: dataclasses.replace(real, sparse_group=recording))
        else:
            list_path_only(m)
        opt = getattr(fused_optim, name)(params, backend="cpu", **options)
        for _ in range(steps):
            for p in params:
                idx = torch.randint(0, p.shape[0], (2, 11), generator=gen).flatten()
                values = torch.randn(idx.numel(), *p.shape[1:], generator=gen).to(dtype)
                p.grad = torch.sparse_coo_tensor(idx[None], values, p.shape)
            opt.step()
    return params, opt, returned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("name,options", SPARSE_CASES, ids=[c[0] for c in SPARSE_CASES])
def test_sparse_entry_matches_the_op_bit_for_bit(name, options, dtype, monkeypatch):
    a_params, a_opt, returned = _embedding_steps(name, options, dtype, True, monkeypatch)
    b_params, b_opt, _ = _embedding_steps(name, options, dtype, False, monkeypatch)
    assert returned == [True] * 3, "the entry did not take the embedding grads"
    for i, (pa, pb) in enumerate(zip(a_params, b_params)):
        assert torch.equal(pa, pb) and pa._version == pb._version, f"param {i}"
        sa, sb = a_opt.state[pa], b_opt.state[pb]
        assert sorted(sa) == sorted(sb)
        for key, va in sa.items():
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, sb[key]) and va._version == sb[key]._version, key
            else:
                assert va == sb[key], key


def test_sparse_entry_declines_and_changes_nothing():
    entry = _extension.C.sparse_step_
    p = torch.randn(6, 4)
    state = torch.zeros(6, 4)
    idx = torch.tensor([[0, 2, 2]])

    def declines(param, grad, states=None, constants=None):
        param.grad = grad
        before = param.clone(), [s.clone() for s in states or []]
        result = entry("adagrad", [param], states if states is not None else [state],
                       constants or [[1e-10, -0.1]], False)
        assert result is False
        assert torch.equal(param, before[0])
        assert all(torch.equal(s, b) for s, b in zip(states or [], before[1]))

    declines(p, torch.randn(6, 4))  # a dense grad
    declines(p, torch.sparse_coo_tensor(torch.tensor([[0, 1], [2, 3]]), torch.ones(2), (6, 4)))
    declines(torch.randn(4, 6).t(), torch.sparse_coo_tensor(idx, torch.ones(3, 4), (6, 4)))
    declines(p, torch.sparse_coo_tensor(idx, torch.ones(3, 4), (6, 4)),
             states=[torch.zeros(4, 6).t()])  # a state that is not contiguous
    declines(p, torch.sparse_coo_tensor(idx, torch.ones(4, 3).t(), (6, 4)))  # values strided
    assert entry("adagrad", [], [], [], False) is False
