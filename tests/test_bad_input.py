"""Bad and unusual input: the errors torch.optim raises (same type and message), clear
errors where fused_optim is stricter, and odd but valid params (complex, non-contiguous,
zero-size, without grads) that must still match torch. Raw op calls with bad arguments
raise RuntimeError and change nothing; no input crashes the process.
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

import fused_optim
from fused_optim._policy import POLICY_KEYS
from _oracle import (
    StateView,
    scalar_keys,
    assert_same_trajectory,
    clone_leaves,
    cpu_capability,
    free_run,
    make_grads,
    make_params,
    outcome,
    tensor_state,
)
from _tables import (
    DEFAULT_CASES,
    DTYPES,
    FULL_CASES,
    LOW_PRECISION,
    OPTIMIZERS,
    STEPS,
    case_ids,
    case_named,
    dtype_id,
    kernel_variants,
    variant_id,
)
from fused_optim import _extension
from fused_optim import backends as backends_mod

pytestmark = pytest.mark.usefixtures("oracle_threads")

CASES = FULL_CASES + DEFAULT_CASES
IDS = case_ids(CASES)
NAN = float("nan")


# ---------------------------------------------------------------------------------------
# Hyperparameter validation


# The param-group keys fused_optim adds to torch.optim's: its backend and memory policy.
OURS = ("backend", *POLICY_KEYS)

def _p():
    return [torch.zeros(3, requires_grad=True)]


# Besides _generic_bad's cases (which also cover Adam's and SGD's out-of-range and NaN
# values, tensor lrs and flag pairs): other magnitudes, tensor betas, SGD's nesterov rules.
ADAM_BAD = [
    {"eps": -1e-8}, {"weight_decay": -0.1},
    {"betas": (0.9, torch.tensor(0.999))},
    {"betas": (torch.tensor([0.9, 0.8]), torch.tensor(0.999))},
    {"betas": (torch.tensor(0.9), torch.tensor(0.999)), "foreach": True},
]
SGD_BAD = [
    {"momentum": -0.5}, {"weight_decay": -0.1},
    {"nesterov": True}, {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
]
# Where torch.optim accepts the value and fused_optim deliberately raises, with the
# error it raises (see fused_optim/sgd.py and adam.py).
STRICTER = {
    ("SGD", "lr", "nan"): (ValueError, "Invalid learning rate: nan"),
    ("SGD", "momentum", "nan"): (ValueError, "Invalid momentum value: nan"),
    ("SGD", "weight_decay", "nan"): (ValueError, "Invalid weight_decay value: nan"),
    ("SGD", "dampening", "nan"): (ValueError, "Invalid dampening value: nan"),
}


def _generic_bad(cls) -> list[dict]:
    """Out-of-range and non-finite values of every numeric argument of a torch.optim
    class's signature, the lr tensors torch refuses, and the flag pairs it refuses."""
    sig = inspect.signature(cls)
    out: list[dict] = [{"lr": torch.tensor([0.1, 0.2])}, {"lr": torch.tensor(NAN)},
                       {"lr": torch.tensor(0.1), "foreach": True}]
    for name, param in sig.parameters.items():
        default = param.default
        if name == "betas":
            out += [{"betas": b} for b in ((-0.1, 0.999), (1.0, 0.999), (NAN, 0.999),
                                           (0.9, -0.1), (0.9, 1.0), (0.9, NAN))]
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            out += [{name: -1.0}, {name: NAN}, {name: 2.0}, {name: math.inf}]  # lr too
    if "fused" in sig.parameters:
        out += [{"fused": True, "foreach": True}, {"fused": True, "differentiable": True}]
    return out


HYPER_CASES = ([(row.fused.__name__, kw) for row in OPTIMIZERS for kw in _generic_bad(row.torch)]
               + [("Adam", kw) for kw in ADAM_BAD] + [("AdamW", kw) for kw in ADAM_BAD]
               + [("SGD", kw) for kw in SGD_BAD])


def _kw_id(item):
    """The case spelled out; repr keeps a tensor lr apart from a float one (a 0-dim
    tensor formats as its float)."""
    name, kw = item
    return name + "-" + ",".join(f"{k}={v!r}" for k, v in kw.items()).replace(" ", "")


@pytest.mark.parametrize("item", HYPER_CASES, ids=[_kw_id(i) for i in HYPER_CASES])
def test_hyperparameter_errors_match_torch(item):
    name, kw = item
    theirs = outcome(lambda: getattr(torch.optim, name)(_p(), **kw))
    ours = outcome(lambda: getattr(fused_optim, name)(_p(), **kw))
    if theirs is not None or ours is None:
        assert ours == theirs, f"torch raises {theirs}, fused_optim {ours}"
        return
    key = (name, next(iter(kw)), "nan") if any(
        (isinstance(v, float) and math.isnan(v))
        or (isinstance(v, torch.Tensor) and bool(v.isnan().any())) for v in kw.values()) else None
    assert key in STRICTER, f"torch accepts {kw}; fused_optim raised {ours}"
    exc_type, message = STRICTER[key]
    assert ours == (exc_type, message.replace("nan", f"{kw[key[1]]}"))


ROW_NAMES = [row.fused.__name__ for row in OPTIMIZERS]


@pytest.mark.parametrize("name", ROW_NAMES)
def test_foreach_fused_capturable_accepted_and_kept(name):
    """Accepted where torch accepts them on CPU params (capturable only with fused: the
    single-tensor path refuses CPU params, see test_torch_flags.py), kept in the groups
    as torch keeps them, no effect on the numbers."""
    sig = inspect.signature(getattr(torch.optim, name))
    extra = {"foreach": False}
    if "fused" in sig.parameters:
        extra["fused"] = True
        if "capturable" in sig.parameters:
            extra["capturable"] = True
    gen = torch.Generator().manual_seed(0)
    fp = make_params([(9,)], torch.float32, gen)
    a = getattr(fused_optim, name)(fp, lr=0.01, **extra)
    b_params = clone_leaves(fp)
    b = getattr(fused_optim, name)(b_params, lr=0.01)
    t = getattr(torch.optim, name)(clone_leaves(fp), lr=0.01, **extra)
    assert {k: v for k, v in a.param_groups[0].items() if k not in ("params", *OURS)} == \
        {k: v for k, v in t.param_groups[0].items() if k != "params"}
    for p, q in zip(fp, b_params):
        p.grad = q.grad = torch.ones(9)
    a.step()
    b.step()
    assert torch.equal(fp[0], b_params[0])


@pytest.mark.parametrize("name", ROW_NAMES)
def test_defaults_match_torch(name):
    ours = getattr(fused_optim, name)(_p()).defaults
    theirs = getattr(torch.optim, name)(_p()).defaults
    assert {k: v for k, v in ours.items() if k not in OURS} == theirs
    assert ours["backend"] == "auto"
    assert {k: ours[k] for k in POLICY_KEYS if k in ours} == (
        POLICY_KEYS if getattr(fused_optim, name)._memory_policy else {})


@pytest.mark.parametrize("name", ROW_NAMES)
def test_signature_matches_torch(name):
    """The same parameters, kinds and defaults as torch.optim's class, plus the
    keyword-only backend and, for the element-wise optimizers, the memory policy's
    options (fused_optim/_policy.py) at torch.optim's behaviour."""
    cls = getattr(fused_optim, name)
    ours = inspect.signature(cls).parameters
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    added = ["backend", *(POLICY_KEYS if cls._memory_policy else ())]
    assert list(ours)[:-len(added)] == list(theirs) and list(ours)[-len(added):] == added
    for key in added[1:]:
        assert ours[key].kind is inspect.Parameter.KEYWORD_ONLY
        assert ours[key].default == POLICY_KEYS[key]
    for key, param in theirs.items():
        assert ours[key].kind == param.kind, key
        assert ours[key].default == param.default, key
    assert ours["backend"].kind is inspect.Parameter.KEYWORD_ONLY


def test_tensor_betas_match_torch():
    case = case_named("Adam")
    gen = torch.Generator().manual_seed(0)
    fp = make_params([(9,), (3, 4)], torch.float32, gen)
    tp = clone_leaves(fp)
    betas = (torch.tensor(0.8), torch.tensor(0.99))
    fused = case.fused(fp, **{**case.options, "betas": betas})
    oracle = case.torch(tp, foreach=False, **{**case.options, "betas": betas})
    grads = [make_grads([(9,), (3, 4)], torch.float32, gen) for _ in range(STEPS)]
    free_run(fused, oracle, fp, tp, grads)
    assert_same_trajectory(fused, oracle, fp, tp, STEPS, grads)


# ---------------------------------------------------------------------------------------
# Sparse grads


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=case_ids(DEFAULT_CASES))
def test_sparse_grads(case):
    """Where torch.optim refuses a sparse grad, the same RuntimeError, and nothing changes
    (no state is created); where it takes them (SGD, Adagrad: the row-sparse engine,
    tests/test_sparse.py), the same step. A dense grad afterwards steps normally."""
    p, q = torch.zeros(4, requires_grad=True), torch.ones(2, requires_grad=True)
    tp, tq = clone_leaves([p, q])
    opt = case.fused([p, q], **case.options)
    oracle = case.torch([tp, tq], **case.options)
    state_before = copy.deepcopy(opt.state_dict()["state"])
    for a, b in ((p, tp), (q, tq)):
        a.grad = b.grad = torch.ones(a.shape)
    q.grad = torch.ones(2).to_sparse()
    tq.grad = torch.ones(2).to_sparse()
    theirs, ours = outcome(oracle.step), outcome(opt.step)
    assert ours == theirs
    if theirs is None:
        torch.testing.assert_close(p.detach(), tp.detach(), rtol=0, atol=0)
        torch.testing.assert_close(q.detach(), tq.detach(), rtol=0, atol=0)
    else:
        assert torch.equal(p.detach(), torch.zeros(4)) and torch.equal(q.detach(), torch.ones(2))
        after = opt.state_dict()["state"]
        assert sorted(after) == sorted(state_before), "a failed step created state"
    q.grad = tq.grad = torch.ones(2)
    theirs, ours = outcome(oracle.step), outcome(opt.step)
    assert ours == theirs  # a dense grad steps, or (SGD's sparse momentum) raises as torch
    if theirs is None:
        assert not torch.equal(p.detach(), torch.zeros(4))


# ---------------------------------------------------------------------------------------
# Odd but valid params: complex, non-contiguous, zero-size, without grads


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["c64", "c128"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_complex_params_match_torch(case, dtype):
    """Complex params are stepped through their real views, as torch.optim does; mixed
    with a real param in the same group. State stays complex, as torch's."""
    gen = torch.Generator().manual_seed(0)
    real = dtype.to_real()
    shapes = [(5,), (3, 4), (7,)]
    init = [torch.randn(s, dtype=dtype, generator=gen) for s in shapes[:2]]
    init.append(torch.randn(shapes[2], dtype=real, generator=gen))
    fp = [t.clone().requires_grad_() for t in init]
    tp = [t.clone().requires_grad_() for t in init]
    fused = case.fused(fp, **case.options)
    oracle = case.torch(tp, foreach=False, **case.options)
    grads = [[torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in init]
             for _ in range(STEPS)]
    free_run(fused, oracle, fp, tp, grads)
    for a, b in zip(fp, tp):
        sa, sb = tensor_state(fused, a), tensor_state(oracle, b)
        assert {k: v.dtype for k, v in sa.items()} == {k: v.dtype for k, v in sb.items()}

    def as_real(t):
        return torch.view_as_real(t) if t.is_complex() else t

    fv, tv = StateView(fused, fp, as_real), StateView(oracle, tp, as_real, fused.spec)
    real_grads = [[as_real(g) for g in step] for step in grads]
    assert_same_trajectory(fv, tv, fv.params, tv.params, STEPS, real_grads, "complex")


def _noncontiguous_params(gen):
    """(param, grad maker) pairs whose rows the compiled kernels cannot index flat."""
    return [
        torch.randn(7, 5, generator=gen).t(),                      # transposed view
        torch.randn(40, generator=gen)[::3],                       # strided slice
        torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last),
        torch.randn(6, 10, generator=gen)[:, 2:7],                 # row-strided slice
        torch.randn(33, generator=gen),                            # contiguous, with
    ]                                                              # a non-contiguous grad


def _odd_grads(params, gen, step):
    grads = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if i == 4:
            g = torch.randn(66, generator=gen)[::2]               # strided grad
        elif i == 2 and step % 2:
            g = g.contiguous()                                     # layout differs from param
        elif i == 2:
            g = g.to(memory_format=torch.channels_last)
        grads.append(g)
    return grads


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_noncontiguous_params_and_grads_match_torch(case):
    # Two copies with identical values and strides on separate storage.
    fp, tp = ([b.clone(memory_format=torch.preserve_format).requires_grad_() if i == 2 else
               b.detach().requires_grad_()
               for i, b in enumerate(_noncontiguous_params(torch.Generator().manual_seed(0)))]
              for _ in range(2))
    for a, b in zip(fp, tp):
        assert torch.equal(a, b) and a.stride() == b.stride()
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    assert not fp[0].is_contiguous() and not fp[1].is_contiguous()
    fused = case.fused(fp, **case.options)
    oracle = case.torch(tp, foreach=False, **case.options)
    gens = [torch.Generator().manual_seed(2) for _ in range(2)]
    grads = []
    for step in range(STEPS):
        fg, tg = (_odd_grads(fp, gen, step) for gen in gens)  # same values, own storage
        assert not fg[4].is_contiguous()
        for p, g in zip(fp, fg):
            p.grad = g  # as is: no clone, which would make the strided grad contiguous
        for p, g in zip(tp, tg):
            p.grad = g
        fused.step()
        oracle.step()
        grads.append([g.contiguous() for g in tg])
    for a, b in zip(fp, tp):
        for key, value in tensor_state(fused, a).items():
            if key not in scalar_keys(fused):
                # State takes its param's layout (torch.optim.SGD's momentum buffer takes
                # the first grad's instead: a layout detail, the numbers are the same).
                assert value.stride() == torch.empty_like(a).stride(), key
    assert_same_trajectory(fused, oracle, fp, tp, STEPS, grads, case.id)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loaded_state_with_other_layout(case):
    """A state_dict whose state tensors have another memory layout than the params
    (e.g. saved from a transposed model) still loads and steps like torch."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (5, 3)]
    fp = make_params(shapes, torch.float32, gen)
    tp = clone_leaves(fp)
    src = case.torch(clone_leaves(fp), foreach=False, **case.options)
    for q in src.param_groups[0]["params"]:
        q.grad = torch.randn(q.shape, generator=gen)
    src.step()
    sd = copy.deepcopy(src.state_dict())
    for st in sd["state"].values():
        for k, v in list(st.items()):
            if k not in scalar_keys(case) and v.dim() == 2:
                st[k] = v.t().contiguous().t()  # same values, column-major
    fused = case.fused(fp, **case.options)
    oracle = case.torch(tp, foreach=False, **case.options)
    fused.load_state_dict(copy.deepcopy(sd))
    oracle.load_state_dict(copy.deepcopy(sd))
    grads = [make_grads(shapes, torch.float32, gen) for _ in range(3)]
    free_run(fused, oracle, fp, tp, grads)
    assert_same_trajectory(fused, oracle, fp, tp, 4, grads, case.id)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_params_viewing_one_flat_buffer(case):
    """Params and grads that are views at offsets into one flat buffer each (as flat-param
    wrappers and grad buckets lay them out)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(5,), (3, 7), (4097,), ()]
    sizes = [math.prod(s) for s in shapes]
    flats = [torch.randn(sum(sizes) + 3, generator=gen) for _ in range(2)]
    flats[1].copy_(flats[0])

    def views(flat):
        out, offset = [], 3
        for shape, n in zip(shapes, sizes):
            out.append(flat[offset:offset + n].view(shape))
            offset += n
        return out

    fp = [v.detach().requires_grad_() for v in views(flats[0])]
    tp = [v.detach().requires_grad_() for v in views(flats[1])]
    assert fp[1].storage_offset() > 0
    fused = case.fused(fp, **case.options)
    oracle = case.torch(tp, foreach=False, **case.options)
    grads = []
    for _ in range(STEPS):
        flat_grad = torch.randn(sum(sizes) + 3, generator=gen)
        for params in (fp, tp):
            for p, g in zip(params, views(flat_grad.clone())):
                p.grad = g
        grads.append([g.clone() for g in views(flat_grad)])
        fused.step()
        oracle.step()
    assert_same_trajectory(fused, oracle, fp, tp, STEPS, grads, case.id)
    assert torch.equal(flats[0][:3], flats[1][:3]), "wrote outside the params"


NONFINITE_CASES = [case_named("Adam"), case_named("AdamW"), case_named("SGD", dampening=0.3)]


@pytest.mark.parametrize("variant", kernel_variants(), ids=variant_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=case_ids(NONFINITE_CASES))
def test_nonfinite_grads_propagate_like_torch(case, dtype, variant):
    """NaN / +-inf in grads (no GradScaler): the same elements of params and state become
    NaN / inf as in torch (amsgrad's max propagates NaN, as torch.maximum), in the SIMD
    body and the tail, and nothing else is disturbed."""
    backend, cap = variant
    gen = torch.Generator().manual_seed(0)
    shapes = [(37,), (5,)]
    fp = make_params(shapes, dtype, gen)
    tp = clone_leaves(fp, torch.float64 if dtype in LOW_PRECISION else dtype)
    fused = case.fused(fp, backend=backend, **case.options)
    oracle = case.torch(tp, foreach=False, **case.options)
    with cpu_capability(cap):
        for step in range(3):
            grads = make_grads(shapes, dtype, gen)
            if step == 1:
                grads[0][3], grads[0][20], grads[0][36] = NAN, math.inf, -math.inf
                grads[1][4] = NAN
            for p, q, g in zip(fp, tp, grads):
                p.grad, q.grad = g.clone(), g.to(q.dtype)
            fused.step()
            oracle.step()
    for p, q in zip(fp, tp):
        pairs = [(p, q)] + [(v, tensor_state(oracle, q)[k])
                            for k, v in tensor_state(fused, p).items()
                            if k not in scalar_keys(fused)]
        for a, b in pairs:
            a, b = a.detach().double(), b.detach().double()
            assert torch.equal(a.isnan(), b.isnan())
            assert torch.equal(a.isinf(), b.isinf()) and torch.equal(a[a.isinf()], b[b.isinf()])
            finite = a.isfinite()
            assert bool(finite.any())
            torch.testing.assert_close(a[finite], b[finite], rtol=0.02, atol=0.02)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zero_size_params_match_torch(case):
    gen = torch.Generator().manual_seed(0)
    shapes = [(0,), (5,), (0, 3), (3,)]
    fp = make_params(shapes, torch.float32, gen)
    tp = clone_leaves(fp)
    fused = case.fused(fp, **case.options)
    oracle = case.torch(tp, foreach=False, **case.options)
    grads = [make_grads(shapes, torch.float32, gen) for _ in range(3)]
    free_run(fused, oracle, fp, tp, grads)
    assert_same_trajectory(fused, oracle, fp, tp, 3, grads, case.id)
    # a bucket of zero-size params only
    only = [torch.zeros(0, requires_grad=True), torch.zeros(0, 2, requires_grad=True)]
    opt = case.fused(only, **case.options)
    for t in only:
        t.grad = torch.zeros_like(t)
    opt.step()
    assert all(sorted(opt.state[t]) == sorted(tensor_state(oracle, tp[0])) for t in only)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_params_without_grads_are_skipped(case):
    gen = torch.Generator().manual_seed(0)
    fp = make_params([(4,), (3, 3)], torch.float32, gen)
    before = [p.detach().clone() for p in fp]
    fused = case.fused(fp, **case.options)
    oracle = case.torch(clone_leaves(fp), foreach=False, **case.options)
    initial = fused.state_dict()["state"]
    fused.step()
    fused.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(fp, before))
    # No state is created without a grad; state torch creates at construction
    # (Adagrad's) stays as it was.
    after = fused.state_dict()["state"]
    assert sorted(after) == sorted(initial) == sorted(oracle.state_dict()["state"])
    for i, st in after.items():
        assert sorted(st) == sorted(initial[i])
        assert all(torch.equal(v, initial[i][k]) for k, v in st.items()), "state changed"


# ---------------------------------------------------------------------------------------
# Bad state_dicts: a clear error, and the optimizer as it was


def _trained(case, shapes=((4,), (2, 3)), steps=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = make_params(list(shapes), torch.float32, gen)
    opt = case.fused(params, **case.options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, params


def _assert_unchanged_and_usable(opt, params, case):
    """The optimizer equals a twin that never saw the bad state_dict, and keeps stepping
    like it."""
    twin, twin_params = _trained(case)
    for p, q in zip(params, twin_params):
        assert torch.equal(p.detach(), q.detach())
        sp, sq = tensor_state(opt, p), tensor_state(twin, q)
        assert sorted(sp) == sorted(sq)
        assert all(torch.equal(sp[k], sq[k]) for k in sq)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in twin.param_groups]
    for p, q in zip(params, twin_params):
        p.grad = torch.full(p.shape, 0.5)
        q.grad = torch.full(q.shape, 0.5)
    opt.step()
    twin.step()
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(params, twin_params))


_ADAM, _SGD_M = case_named("Adam"), case_named("SGD", nesterov=True)


@pytest.mark.parametrize("case,other", [(_ADAM, _SGD_M), (_SGD_M, _ADAM)],
                         ids=["SGD-into-Adam", "Adam-into-SGD"])
@pytest.mark.parametrize("source", ["fused", "torch"])
def test_state_dict_of_another_optimizer(case, other, source):
    opt, params = _trained(case)
    src_cls = other.fused if source == "fused" else other.torch
    gen = torch.Generator().manual_seed(5)
    src_params = make_params([(4,), (2, 3)], torch.float32, gen)
    src = src_cls(src_params, **other.options)
    for p in src_params:
        p.grad = torch.ones_like(p)
    src.step()
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(src.state_dict())
    _assert_unchanged_and_usable(opt, params, case)


@pytest.mark.parametrize("case", [_ADAM, _SGD_M], ids=["Adam", "SGD"])
def test_state_dict_with_other_shapes(case):
    opt, params = _trained(case)
    other, _ = _trained(case, shapes=((4,), (3, 2)), seed=1)
    with pytest.raises(ValueError, match=r"has shape \(3, 2\) but the param has shape \(2, 3\)"):
        opt.load_state_dict(other.state_dict())
    _assert_unchanged_and_usable(opt, params, case)


@pytest.mark.parametrize("case", [_ADAM, _SGD_M], ids=["Adam", "SGD"])
def test_state_dict_with_other_groups_or_counts(case):
    opt, params = _trained(case)
    torch_opt = case.torch(clone_leaves(params), foreach=False, **case.options)
    bad = []
    sd = opt.state_dict()
    two_groups = copy.deepcopy(sd)
    two_groups["param_groups"].append({**sd["param_groups"][0], "params": [7]})
    bad.append(two_groups)
    one_param = copy.deepcopy(sd)
    one_param["param_groups"][0]["params"] = [0]
    one_param["state"].pop(1, None)
    bad.append(one_param)
    for sd_bad in bad:
        ours = outcome(lambda: opt.load_state_dict(copy.deepcopy(sd_bad)))
        theirs = outcome(lambda: torch_opt.load_state_dict(copy.deepcopy(sd_bad)))
        assert ours is not None and ours == theirs
        assert ours[0] is ValueError
    for junk in ({}, {"state": {}}, [1, 2], None):
        with pytest.raises(ValueError, match="expects a dict with 'state' and 'param_groups'"):
            opt.load_state_dict(junk)
    _assert_unchanged_and_usable(opt, params, case)


def test_state_dict_with_float_step_loads():
    """Old torch.optim state_dicts hold `step` as a Python number."""
    opt, params = _trained(_ADAM)
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["step"] = float(st["step"].item())
    fresh = _ADAM.fused(params, **_ADAM.options)
    fresh.load_state_dict(sd)
    for p in params:
        step = fresh.state[p]["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == torch.float32
        assert step.item() == 2.0
        p.grad = torch.ones_like(p)
    fresh.step()
    assert fresh.state[params[0]]["step"].item() == 3.0


# ---------------------------------------------------------------------------------------
# Raw op calls: RuntimeError, inputs untouched, never a crash

needs_ops = pytest.mark.skipif(_extension.C is None, reason="fused_optim._C is not built")


def _adam_args(n=2, shape=(3,), dtype=torch.float32, amsgrad=False):
    mk = lambda: [torch.randn(shape).to(dtype) for _ in range(n)]  # noqa: E731
    args = dict(params=mk(), grads=mk(), exp_avgs=mk(),
                exp_avg_sqs=[t.abs() for t in mk()], max_exp_avg_sqs=mk() if amsgrad else [],
                state_steps=[torch.tensor(1.0) for _ in range(n)])
    kw = dict(lr=torch.tensor(0.01), beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
              amsgrad=amsgrad, maximize=False, decoupled_weight_decay=False)
    return args, kw


def _sgd_args(n=2, shape=(3,), dtype=torch.float32, momentum=0.9):
    mk = lambda: [torch.randn(shape).to(dtype) for _ in range(n)]  # noqa: E731
    args = dict(params=mk(), grads=mk(), momentum_buffers=mk() if momentum else [])
    kw = dict(lr=torch.tensor(0.01), momentum=momentum, dampening=0.0, weight_decay=0.0,
              nesterov=False, maximize=False, is_first_step=False)
    return args, kw


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _mutate(op, edit):
    """(op name, args, kwargs) after edit(args, kwargs)."""
    def build():
        args, kw = (_adam_args if op == "adam_" else _sgd_args)()
        edit(args, kw)
        return args, kw
    return build


def _set(key, value):
    def edit(args, kw):
        (args if key in args else kw)[key] = value(args, kw) if callable(value) else value
    return edit


def _item(key, i, value):
    def edit(args, kw):
        args[key][i] = value(args[key][i])
    return edit


BAD_CALLS = {
    # op, edit, expected message fragment
    "adam-grads-length": ("adam_", _set("grads", lambda a, k: a["grads"][:1]),
                          "expected 2 grads (one per param), got 1"),
    "adam-exp_avgs-length": ("adam_", _set("exp_avgs", lambda a, k: a["exp_avgs"] * 2),
                             "expected 2 exp_avgs (one per param), got 4"),
    "adam-steps-length": ("adam_", _set("state_steps", lambda a, k: a["state_steps"][:1]),
                          "expected 2 state_steps (one per param), got 1"),
    "adam-amsgrad-list-missing": ("adam_", _set("amsgrad", True),
                                  "expected 2 max_exp_avg_sqs (one per param), got 0"),
    "adam-amsgrad-list-unexpected": ("adam_", _set("max_exp_avg_sqs", lambda a, k: a["exp_avgs"]),
                                     "max_exp_avg_sqs must be empty when amsgrad=False"),
    "adam-int-params": ("adam_", lambda a, k: a.update({n: [t.to(torch.int32) for t in a[n]]
                                                       for n in ("params", "grads", "exp_avgs",
                                                                 "exp_avg_sqs")}),
                        "parameters must be float32, float64, float16 or bfloat16, got Int"),
    "adam-int-grad": ("adam_", _item("grads", 1, lambda t: t.to(torch.int64)),
                      "grads[1] is Long, params[0] is Float"),
    "adam-mixed-float-dtypes": ("adam_", _item("exp_avgs", 0, lambda t: t.double()),
                                "all tensors of one call must have one dtype"),
    "adam-shape": ("adam_", _item("exp_avg_sqs", 1, lambda t: torch.zeros(4)),
                   "exp_avg_sqs[1] has shape [4] but params[1] has shape [3]"),
    "adam-lr-two-elements": ("adam_", _set("lr", torch.tensor([0.1, 0.2])),
                             "lr must be a one-element tensor, got shape [2]"),
    "adam-int-step": ("adam_", _item("state_steps", 0, lambda t: t.long()),
                      "state_steps[0] must be float32 or float64, got Long"),
    "adam-step-two-elements": ("adam_", _item("state_steps", 1, lambda t: torch.zeros(2)),
                               "state_steps[1] must be a one-element tensor"),
    "adam-found_inf-float64": ("adam_", _set("found_inf", torch.tensor(0.0, dtype=torch.float64)),
                               "found_inf must be float32, got Double"),
    "adam-grad_scale-two-elements": ("adam_", _set("grad_scale", torch.ones(2)),
                                     "grad_scale must be a one-element tensor"),
    "adam-overlapping-grad": ("adam_", _item("grads", 0, lambda t: torch.zeros(1).expand(3)),
                              "grads[0] must be non-overlapping and dense"),
    "adam-complex": ("adam_", lambda a, k: a.update({n: [torch.zeros(3, dtype=torch.complex64)
                                                         for _ in a[n]]
                                                     for n in ("params", "grads", "exp_avgs",
                                                               "exp_avg_sqs")}),
                     "got ComplexFloat"),
    "adam-sparse-grad": ("adam_", _item("grads", 0, lambda t: t.to_sparse()),
                         "SparseCPU"),
    "adam-meta-param": ("adam_", _item("params", 1, _meta),
                        "all tensors of one call must be on one device; params[1] is on meta"),
    "adam-meta-first-param": ("adam_", _item("params", 0, _meta),
                              "all tensors of one call must be on one device"),
    "adam-meta-state": ("adam_", _item("exp_avg_sqs", 1, _meta),
                        "exp_avg_sqs[1] is on meta, params[0] on cpu"),
    "adam-meta-step": ("adam_", _item("state_steps", 0, _meta),
                       "state_steps[0] is on meta but the params are on cpu"),
    "adam-meta-lr": ("adam_", _set("lr", torch.tensor(0.1, device="meta")),
                     "lr is on meta but the params are on cpu"),
    "adam-meta-found_inf": ("adam_", _set("found_inf", torch.tensor(0.0, device="meta")),
                            "found_inf is on meta but the params are on cpu"),
    "sgd-grads-length": ("sgd_", _set("grads", lambda a, k: a["grads"][:1]),
                         "expected 2 grads (one per param), got 1"),
    "sgd-buffers-length": ("sgd_", _set("momentum_buffers", lambda a, k: a["momentum_buffers"][:1]),
                           "expected 2 momentum_buffers (one per param), got 1"),
    "sgd-buffers-without-momentum": ("sgd_", _set("momentum", 0.0),
                                     "momentum_buffers must be empty when momentum=0"),
    "sgd-int-params": ("sgd_", lambda a, k: a.update({n: [t.to(torch.int32) for t in a[n]]
                                                     for n in ("params", "grads",
                                                               "momentum_buffers")}),
                       "parameters must be float32, float64, float16 or bfloat16, got Int"),
    "sgd-shape": ("sgd_", _item("momentum_buffers", 0, lambda t: torch.zeros(3, 1)),
                  "momentum_buffers[0] has shape [3, 1] but params[0] has shape [3]"),
    "sgd-lr-two-elements": ("sgd_", _set("lr", torch.tensor([0.1, 0.2])),
                            "lr must be a one-element tensor, got shape [2]"),
    "sgd-strides": ("sgd_", lambda a, k: a.update(
        params=[torch.zeros(3, 4), torch.zeros(3)],
        grads=[torch.zeros(4, 3).t(), torch.zeros(3)],
        momentum_buffers=[torch.zeros(3, 4), torch.zeros(3)]),
        "every tensor of a row must share one memory layout"),
    "sgd-meta-grad": ("sgd_", _item("grads", 1, _meta),
                      "all tensors of one call must be on one device; grads[1] is on meta"),
    "sgd-grad_scale-int": ("sgd_", _set("grad_scale", torch.tensor(1)),
                           "grad_scale must be float32, got Long"),
}


@needs_ops
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_raw_op_bad_arguments(name):
    op_name, edit, fragment = BAD_CALLS[name]
    args, kw = _mutate(op_name, edit)()
    snapshot = {k: [t.clone() for t in v if t.device.type != "meta" and not t.is_sparse]
                for k, v in args.items()}
    op = getattr(torch.ops.fused_optim, op_name)
    with pytest.raises(RuntimeError) as err:
        op(*args.values(), **kw)
    assert fragment in str(err.value), str(err.value)
    if "Sparse" not in fragment:
        assert f"fused_optim::{op_name}" in str(err.value), "the error does not name the op"
    for k, before in snapshot.items():
        now = [t for t in args[k] if t.device.type != "meta" and not t.is_sparse]
        for a, b in zip(now, before):
            assert torch.equal(a, b), f"a rejected call changed {k}"


@needs_ops
def test_raw_op_empty_lists_are_a_no_op():
    lr = torch.tensor(0.1)
    torch.ops.fused_optim.adam_([], [], [], [], [], [], lr=lr, beta1=0.9, beta2=0.999,
                                weight_decay=0.0, eps=1e-8, amsgrad=True, maximize=False,
                                decoupled_weight_decay=False)
    torch.ops.fused_optim.sgd_([], [], [], lr=lr, momentum=0.9, dampening=0.0,
                               weight_decay=0.0, nesterov=False, maximize=False,
                               is_first_step=True)


# ---------------------------------------------------------------------------------------
# Backend selection


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'fastest'.*known backends: auto"):
        fused_optim.Adam(_p(), backend="fastest")
    with pytest.raises(TypeError, match="backend must be a str"):
        fused_optim.SGD(_p(), backend=1)
    with pytest.raises(ValueError, match="unknown backend"):
        fused_optim.AdamW([{"params": _p(), "backend": "nope"}])


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_cuda_backend_on_cpu_params_names_the_reason(name):
    if fused_optim.available_backends("cpu")["cuda"] is None:
        pytest.skip("the cuda backend claims CPU tensors")
    params = _p()
    opt = getattr(fused_optim, name)(params, backend="cuda")
    params[0].grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"backend 'cuda' was requested but cannot run "
                                         r"torch.float32 tensors on cpu: runs cuda tensors only"):
        opt.step()
    assert torch.equal(params[0].detach(), torch.zeros(3))


def _spy_reference(monkeypatch):
    calls = []
    ref = backends_mod.get_backend("reference")

    def spy(spec, *args, **kwargs):
        calls.append(spec.op)
        return ref.step(spec, *args, **kwargs)

    monkeypatch.setitem(backends_mod._REGISTRY, "reference",
                        backends_mod.Backend("reference", ref.unavailable, spy))
    backends_mod._SELECTED.clear()
    return calls


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=case_ids(DEFAULT_CASES))
def test_env_var_selects_backend(monkeypatch, case):
    calls = _spy_reference(monkeypatch)
    monkeypatch.setenv("FUSED_OPTIM_BACKEND", "reference")
    backends_mod._SELECTED.clear()
    params = _p()
    opt = case.fused(params, **case.options)
    params[0].grad = torch.ones(3)
    opt.step()
    assert calls == [case.spec.op]
    name = case.name
    # an explicit backend is not overridden by the environment
    explicit = getattr(fused_optim, name)(_p(), backend="cpu" if _extension.C else "reference")
    explicit.param_groups[0]["params"][0].grad = torch.ones(3)
    calls.clear()
    explicit.step()
    assert calls == ([] if _extension.C else calls)


@pytest.mark.parametrize("value,match", [("nope", "unknown backend 'nope'"),
                                         ("cuda", "runs cuda tensors only")])
def test_env_var_bad_value(monkeypatch, value, match):
    monkeypatch.setenv("FUSED_OPTIM_BACKEND", value)
    backends_mod._SELECTED.clear()
    params = _p()
    opt = fused_optim.Adam(params)
    params[0].grad = torch.ones(3)
    with pytest.raises(ValueError, match=match):
        opt.step()


def test_without_compiled_extension_falls_back_to_reference(monkeypatch):
    """As if _C were never built: the reference backend runs, says so once, and still
    matches torch."""
    monkeypatch.setattr(_extension, "C", None)
    monkeypatch.setattr(_extension, "LOAD_ERROR", "fused_optim._C is not available (test)")
    monkeypatch.setattr(backends_mod, "_FELL_BACK_WARNED", set())
    backends_mod._SELECTED.clear()
    assert fused_optim.available_backends("cpu")["cpu"] == "fused_optim._C is not available (test)"
    case = case_named("Adam")
    gen = torch.Generator().manual_seed(0)
    fp = make_params([(5,), (2, 3)], torch.float32, gen)
    tp = clone_leaves(fp)
    fused = case.fused(fp, **case.options)
    oracle = case.torch(tp, foreach=False, **case.options)
    grads = [make_grads([(5,), (2, 3)], torch.float32, gen) for _ in range(3)]
    with pytest.warns(UserWarning, match="pure-torch reference backend") as record:
        free_run(fused, oracle, fp, tp, grads)
    assert len([w for w in record if "reference backend" in str(w.message)]) == 1
    assert_same_trajectory(fused, oracle, fp, tp, 3, grads)
    with pytest.raises(ValueError, match="backend 'cpu' was requested but cannot run"):
        opt = case.fused(fp, backend="cpu", **case.options)
        opt.step()
