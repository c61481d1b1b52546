"""The torch.optim contract: state_dict both ways, lr schedulers, closures, zero_grad,
param groups, hooks, tensor lr, torch.compile, GradScaler, DTensor params.

Numbers are compared with torch.optim (foreach=False) over free-running trajectories,
with the tolerances of tests/_tables.py (ulps per step x steps).
"""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch

import fused_optim
from fused_optim._policy import POLICY_KEYS
from _oracle import (
    StateView,
    scalar_keys,
    assert_initial_state,
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
    FULL_CASES,
    case_ids,
    case_named,
    case_variant_params,
    kernel_variants,
)

pytestmark = pytest.mark.usefixtures("oracle_threads")

CASES = FULL_CASES + DEFAULT_CASES
IDS = case_ids(CASES)
VARIANTS = kernel_variants()
# One Adam, one SGD on a slow (interpreted) backend.
SLOW_CASES = [case_named("Adam"), case_named("SGD", nesterov=True)]
SHAPES = [(17,), (4, 9), (4097,)]
HALF = 5  # steps before and after a switch


def _pair(case, dtype=torch.float32, seed=0, shapes=SHAPES, fused_kw=None, torch_kw=None):
    gen = torch.Generator().manual_seed(seed)
    fp = make_params(shapes, dtype, gen)
    tp = clone_leaves(fp)
    fused = case.fused(fp, **{**case.options, **(fused_kw or {})})
    oracle = case.torch(tp, foreach=False, **{**case.options, **(torch_kw or {})})
    grads = [make_grads(shapes, dtype, gen) for _ in range(2 * HALF)]
    return fused, oracle, fp, tp, grads


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype, copy=True)


# ---------------------------------------------------------------------------------------
# state_dict


@pytest.mark.parametrize("direction", ["fused->torch", "torch->fused", "fused->fused"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_switch_mid_training(case, direction):
    """5 steps with one class, state_dict, load into the other, 5 more: the trajectory
    is that of a torch run that never switched."""
    first_cls, second_cls = {
        "fused->torch": (case.fused, case.torch),
        "torch->fused": (case.torch, case.fused),
        "fused->fused": (case.fused, case.fused),
    }[direction]
    _, never, params, never_params, grads = _pair(case)

    def make(cls):
        kw = {"foreach": False} if cls is case.torch else {}
        return cls(params, **case.options, **kw)

    first = make(first_cls)
    for g in grads[:HALF]:
        _set_grads(params, g)
        first.step()
    saved = copy.deepcopy(first.state_dict())
    second = make(second_cls)
    second.load_state_dict(saved)
    for p in params:
        for key, value in tensor_state(second, p).items():
            if key == "step":
                assert value.dtype == torch.float32 and value.item() == HALF
            elif key in scalar_keys(case):
                assert value.dtype == torch.float32 and value.dim() == 0
            else:
                assert value.dtype == p.dtype and value.shape == p.shape
    for g in grads[HALF:]:
        _set_grads(params, g)
        second.step()
    for g in grads:
        _set_grads(never_params, g)
        never.step()
    assert_same_trajectory(second, never, params, never_params, 2 * HALF, grads, direction)


@pytest.mark.parametrize("case,variant", case_variant_params(FULL_CASES, VARIANTS, SLOW_CASES))
def test_torch_state_dict_of_float64_params(case, variant):
    """torch.optim's load_state_dict casts every state but `step` to the param's dtype:
    a float64 model's loaded state keeps `step` in float32 and the other per-tensor
    states (NAdam's mu_product, ASGD's eta and mu) in float64. fused_optim keeps those
    dtypes, as the torch class does, and every backend steps on from them like torch."""
    backend, cap = variant
    _, _, params, _, grads = _pair(case, dtype=torch.float64)
    first = case.torch(params, foreach=False, **case.options)
    for g in grads[:HALF]:
        _set_grads(params, g)
        first.step()
    saved = copy.deepcopy(first.state_dict())
    second = case.fused(params, backend=backend, **case.options)
    second.load_state_dict(copy.deepcopy(saved))
    again_params = clone_leaves(params)
    again = case.torch(again_params, foreach=False, **case.options)
    again.load_state_dict(copy.deepcopy(saved))
    for p, q in zip(params, again_params):
        ours, theirs = tensor_state(second, p), tensor_state(again, q)
        assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}
    with cpu_capability(cap):
        for g in grads[HALF:]:
            _set_grads(params, g)
            second.step()
    for g in grads[HALF:]:
        _set_grads(again_params, g)
        again.step()
    assert_same_trajectory(second, again, params, again_params, HALF, grads[HALF:],
                           f"{case.id} {backend}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_format_matches_torch(case):
    fused, oracle, fp, tp, grads = _pair(case)
    free_run(fused, oracle, fp, tp, grads[:2])
    fsd, tsd = fused.state_dict(), oracle.state_dict()
    assert sorted(fsd) == sorted(tsd)
    assert sorted(fsd["state"]) == sorted(tsd["state"])
    for i in tsd["state"]:
        assert sorted(fsd["state"][i]) == sorted(tsd["state"][i])
        for key, value in tsd["state"][i].items():
            assert fsd["state"][i][key].dtype == value.dtype, key
            assert fsd["state"][i][key].shape == value.shape, key
    for fg, tg in zip(fsd["param_groups"], tsd["param_groups"]):
        # Beside backend, the memory policy's keys (fused_optim/_policy.py), at
        # torch.optim's behaviour (checked: a default group keeps torch's storage).
        extra = {"backend"} | (set(POLICY_KEYS) if fused._memory_policy else set())
        assert set(fg) - set(tg) == extra, "extra param-group keys besides backend and policy"
        assert all(fg[k] == v for k, v in POLICY_KEYS.items() if k in fg)
        assert set(tg) - set(fg) == set(), "param-group keys of torch missing"
        for key in tg:
            if key != "foreach":  # the oracle was built with foreach=False
                assert fg[key] == tg[key], key


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=case_ids(DEFAULT_CASES))
def test_old_state_dict_gets_torchs_group_defaults(case):
    # A state_dict from an older torch lacks the newer group keys; torch's __setstate__
    # fills them in. Whichever keys torch fills in when one is missing, we fill in with
    # the same value.
    fused, oracle, *_ = _pair(case)
    sd = oracle.state_dict()
    checked = 0
    for key in sd["param_groups"][0]:
        if key in ("params", "lr"):
            continue
        old = copy.deepcopy(sd)
        del old["param_groups"][0][key]
        oracle.load_state_dict(copy.deepcopy(old))
        if key not in oracle.param_groups[0]:
            continue   # torch has no default for it
        fused.load_state_dict(old)
        assert key in fused.param_groups[0], key
        assert fused.param_groups[0][key] == oracle.param_groups[0][key], key
        checked += 1
    assert checked >= 3   # foreach, maximize, differentiable at least


def test_state_dict_keeps_backend_choice_when_loading_torch_state():
    case = case_named("Adam")
    fused, oracle, fp, tp, grads = _pair(case, fused_kw={"backend": "reference"})
    free_run(fused, oracle, fp, tp, grads[:2])
    fused.load_state_dict(oracle.state_dict())
    assert fused.param_groups[0]["backend"] == "reference"
    # and a fused state_dict carries its own choice
    other = case.fused(fp, **case.options)
    other.load_state_dict(fused.state_dict())
    assert other.param_groups[0]["backend"] == "reference"


def test_adam_state_dict_into_adamw_stays_decoupled():
    """As torch.optim.AdamW: loading Adam's state_dict keeps the decay decoupled."""
    results = []
    for module in (torch.optim, fused_optim):
        p = torch.zeros(3, requires_grad=True)
        adam = module.Adam([p], weight_decay=0.1)
        p.grad = torch.ones(3)
        adam.step()
        adamw = module.AdamW([p], weight_decay=0.1)
        adamw.load_state_dict(adam.state_dict())
        results.append(adamw.param_groups[0]["decoupled_weight_decay"])
    assert results == [True, True]


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=case_ids(DEFAULT_CASES))
def test_pickle_and_deepcopy(case):
    fused, _, fp, _, grads = _pair(case)
    _set_grads(fp, grads[0])
    fused.step()
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert clone.param_groups[0]["backend"] == "auto"
        assert ([sorted(s) for s in clone.state.values()]
                == [sorted(s) for s in fused.state.values()])
        params = clone.param_groups[0]["params"]
        _set_grads(params, grads[1])
        clone.step()  # runs, on its own copies


# ---------------------------------------------------------------------------------------
# lr schedulers


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.05, total_steps=2 * HALF + 1),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9 ** e),
}


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lr_scheduler(case, scheduler, tensor_lr):
    """A scheduler changes lr (OneCycleLR also beta1 / momentum) between steps exactly
    as it does for torch.optim; the numbers follow."""
    if tensor_lr:
        kw = {"lr": torch.tensor(case.options["lr"])}
        fused, oracle, fp, tp, grads = _pair(case, fused_kw=kw,
                                             torch_kw={"lr": torch.tensor(case.options["lr"])})
    else:
        fused, oracle, fp, tp, grads = _pair(case)
    made = []
    for opt in (fused, oracle):
        try:
            made.append(SCHEDULERS[scheduler](opt))
        except Exception as exc:  # noqa: BLE001  (OneCycleLR needs momentum or betas)
            made.append((type(exc), str(exc)))
    if not all(isinstance(m, torch.optim.lr_scheduler.LRScheduler) for m in made):
        assert made[0] == made[1], f"torch: {made[1]}, fused_optim: {made[0]}"
        return
    fs, ts = made
    for g in grads:
        _set_grads(fp, g)
        _set_grads(tp, g)
        fused.step()
        oracle.step()
        fs.step()
        ts.step()
        for fg, tg in zip(fused.param_groups, oracle.param_groups):
            assert float(fg["lr"]) == float(tg["lr"])
            assert isinstance(fg["lr"], torch.Tensor) == tensor_lr
            for key in ("betas", "momentum"):
                if key in tg:
                    assert fg[key] == tg[key]
    assert fs.get_last_lr() == ts.get_last_lr()
    assert_same_trajectory(fused, oracle, fp, tp, len(grads), grads, scheduler)


# ---------------------------------------------------------------------------------------
# closures, zero_grad, param groups, hooks, tensor lr


CLOSURE_CASES = DEFAULT_CASES + [case_named("Adam")]


@pytest.mark.parametrize("case", CLOSURE_CASES, ids=case_ids(CLOSURE_CASES))
def test_closure(case):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 6), torch.randn(8, 1)
    fused = case.fused(model.parameters(), **case.options)
    oracle = case.torch(twin.parameters(), foreach=False, **case.options)

    def closure_for(m, opt):
        def closure():
            assert torch.is_grad_enabled(), "closure must run with grad enabled"
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss
        return closure

    for _ in range(HALF):
        with torch.no_grad():  # step enables grad for the closure itself
            lf = fused.step(closure_for(model, fused))
            lt = oracle.step(closure_for(twin, oracle))
        assert isinstance(lf, torch.Tensor) and lf.requires_grad
        torch.testing.assert_close(lf, lt, rtol=1e-5, atol=1e-6)
    assert fused.step() is None  # no closure: None, as torch
    assert oracle.step() is None
    assert_same_trajectory(fused, oracle, list(model.parameters()), list(twin.parameters()),
                           HALF + 1)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    case = case_named("Adam")
    fused, _, fp, _, grads = _pair(case)
    _set_grads(fp, grads[0])
    fused.step()
    held = [p.grad for p in fp]
    fused.zero_grad(set_to_none=set_to_none)
    for p, g in zip(fp, held):
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is g and not bool(g.any())
    fused.step()  # no grads (None) or zero grads: runs
    if set_to_none:
        assert all(tensor_state(fused, p)["step"].item() == 1 for p in fp)
    fused.zero_grad()  # default: set_to_none=True, as torch
    assert all(p.grad is None for p in fp)


def _groups(case, params):
    """Per-group hyperparameters that differ from the defaults in every way the
    algorithm has."""
    if case.name == "SGD":
        extra = {"lr": 0.02, "momentum": 0.5, "weight_decay": 0.2, "dampening": 0.1}
    else:
        extra = {"lr": 0.03, "betas": (0.7, 0.95), "weight_decay": 0.2, "eps": 1e-5,
                 "amsgrad": not case.options.get("amsgrad", False)}
    return [{"params": params[:1]}, {"params": params[1:2], **extra}], {"params": params[2:],
                                                                        "lr": 0.001}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_param_groups_with_own_hyperparameters(case):
    gen = torch.Generator().manual_seed(0)
    fp = make_params(SHAPES, torch.float32, gen)
    tp = clone_leaves(fp)
    f_groups, f_added = _groups(case, fp)
    t_groups, t_added = _groups(case, tp)
    fused = case.fused(f_groups, **case.options)
    oracle = case.torch(t_groups, foreach=False, **case.options)
    fused.add_param_group(f_added)
    oracle.add_param_group(t_added)
    assert len(fused.param_groups) == 3
    for fg, tg in zip(fused.param_groups, oracle.param_groups):
        assert {k: v for k, v in fg.items()
                if k not in ("params", "backend", "foreach", *POLICY_KEYS)} == \
            {k: v for k, v in tg.items() if k not in ("params", "foreach")}
    grads = [make_grads(SHAPES, torch.float32, gen) for _ in range(2 * HALF)]
    free_run(fused, oracle, fp, tp, grads)
    assert_same_trajectory(fused, oracle, fp, tp, len(grads), grads, case.id)


def test_param_groups_with_different_backends():
    case = case_named("Adam")
    gen = torch.Generator().manual_seed(0)
    fp = make_params(SHAPES, torch.float64, gen)
    tp = clone_leaves(fp)
    fused = case.fused([{"params": fp[:1], "backend": "reference"}, {"params": fp[1:]}],
                       backend="cpu", **case.options)
    assert [g["backend"] for g in fused.param_groups] == ["reference", "cpu"]
    oracle = case.torch(tp, foreach=False, **case.options)
    grads = [make_grads(SHAPES, torch.float64, gen) for _ in range(HALF)]
    free_run(fused, oracle, fp, tp, grads)
    assert_same_trajectory(fused, oracle, fp, tp, HALF, grads)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        fused.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "backend": "nope"})


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=case_ids(DEFAULT_CASES))
def test_duplicate_params_rejected_like_torch(case):
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    errors = []
    for cls, kw in ((case.torch, {"foreach": False}), (case.fused, {})):
        opt = cls([p], **case.options, **kw)
        with pytest.raises(Exception) as add:
            opt.add_param_group({"params": [q, p]})
        assert len(opt.param_groups) == 1
        with pytest.raises(Exception) as init:
            cls([{"params": [p]}, {"params": [p]}], **case.options, **kw)
        errors.append([(type(e.value), str(e.value)) for e in (add, init)])
    assert errors[0] == errors[1]
    assert errors[1][0] == (ValueError, "some parameters appear in more than one parameter group")


def test_hooks():
    case = case_named("Adam")
    fused, _, fp, _, grads = _pair(case)
    calls = []
    handles = [
        fused.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", opt))),
        fused.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt))),
        fused.register_state_dict_pre_hook(lambda opt: calls.append(("sd_pre", opt))),
        fused.register_state_dict_post_hook(lambda opt, sd: calls.append(("sd_post", opt))),
        fused.register_load_state_dict_pre_hook(lambda opt, sd: calls.append(("load_pre", opt))),
        fused.register_load_state_dict_post_hook(lambda opt: calls.append(("load_post", opt))),
    ]
    _set_grads(fp, grads[0])
    fused.step()
    assert [c[0] for c in calls] == ["pre", "post"]
    assert all(c[1] is fused for c in calls)
    calls.clear()
    sd = fused.state_dict()
    fused.load_state_dict(sd)
    assert [c[0] for c in calls] == ["sd_pre", "sd_post", "load_pre", "load_post"]

    # A pre hook sees the state before the step, a post hook after.
    seen = []
    handles.append(fused.register_step_pre_hook(
        lambda opt, a, k: seen.append(tensor_state(opt, fp[0])["step"].item())))
    handles.append(fused.register_step_post_hook(
        lambda opt, a, k: seen.append(tensor_state(opt, fp[0])["step"].item())))
    fused.step()
    assert seen == [1.0, 2.0]

    # A load_state_dict pre hook may replace the state_dict, a state_dict post hook the
    # returned one.
    fused.register_state_dict_post_hook(lambda opt, sd: {**sd, "extra": 1})
    assert fused.state_dict()["extra"] == 1
    for h in handles:
        h.remove()
    calls.clear()
    fused.step()
    assert calls == [] and seen == [1.0, 2.0]

    # Global hooks, as torch.optim.
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )
    glob = []
    h1 = register_optimizer_step_pre_hook(lambda opt, a, k: glob.append("pre"))
    h2 = register_optimizer_step_post_hook(lambda opt, a, k: glob.append("post"))
    try:
        fused.step()
    finally:
        h1.remove()
        h2.remove()
    assert glob == ["pre", "post"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tensor_lr(case):
    lr = case.options["lr"]
    fused, oracle, fp, tp, grads = _pair(case, fused_kw={"lr": torch.tensor(lr)},
                                         torch_kw={"lr": torch.tensor(lr)})
    free_run(fused, oracle, fp, tp, grads[:HALF])
    # changing the tensor in place changes the next steps
    fused.param_groups[0]["lr"].fill_(lr / 3)
    oracle.param_groups[0]["lr"].fill_(lr / 3)
    free_run(fused, oracle, fp, tp, grads[HALF:])
    assert_same_trajectory(fused, oracle, fp, tp, len(grads), grads, case.id)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.bfloat16], ids=["f32-lr", "bf16-lr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case,variant", case_variant_params(CASES, VARIANTS, SLOW_CASES))
def test_tensor_lr_rounds_in_its_dtype_like_torch(case, variant, dtype, lr_dtype):
    """torch.optim computes with a tensor lr in the tensor's dtype (`lr / bias_correction1`,
    `1 - lr * weight_decay` round in float32 for a float32 lr): measured with torch 2.13,
    AdamW(lr=torch.tensor(0.01), weight_decay=0.1) on float64 params ends 8.3e-8 away from
    lr=0.01 after 3 steps, 1e7 float64 ulps. Every backend follows torch's rounding: the
    trajectories agree within the float64 / float32 step tolerance."""
    backend, cap = variant
    lr = torch.tensor(case.options["lr"], dtype=lr_dtype)
    fused, oracle, fp, tp, grads = _pair(case, dtype=dtype,
                                         fused_kw={"lr": lr.clone(), "backend": backend},
                                         torch_kw={"lr": lr.clone()})
    with cpu_capability(cap):
        free_run(fused, oracle, fp, tp, grads[:HALF])
    assert_same_trajectory(fused, oracle, fp, tp, HALF, grads[:HALF], case.id)


def test_lr_tensor_shapes_accepted_like_torch():
    p = torch.zeros(3, requires_grad=True)
    for cls in (fused_optim.Adam, fused_optim.AdamW, fused_optim.SGD):
        opt = cls([p], lr=torch.tensor([0.01]))  # one element, not 0-dim
        p.grad = torch.ones(3)
        opt.step()
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        fused_optim.Adam([p], lr=torch.tensor([0.01, 0.02]))
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        fused_optim.SGD([p], lr=torch.tensor([0.01, 0.02]))


@pytest.mark.parametrize("case,variant", case_variant_params(CASES, VARIANTS, SLOW_CASES))
def test_step_marks_params_modified_like_torch(case, variant):
    """A step bumps the params' version counters, so backward through a graph that saved
    a param before the step raises, as it does with torch.optim, instead of silently
    using the updated values."""
    backend, cap = variant
    outcomes = []
    for cls, kw in ((case.torch, {"foreach": False}), (case.fused, {"backend": backend})):
        p = torch.randn(4, 3, requires_grad=True)
        w = torch.randn(4, 3, requires_grad=True)
        y = (p * w).sum()  # saves p for w's grad
        opt = cls([p], **case.options, **kw)
        p.grad = torch.ones(4, 3)
        version = p._version
        with cpu_capability(cap):
            opt.step()
        assert p._version > version, f"{cls.__module__}: the step did not bump p's version"
        raised = outcome(y.backward)
        outcomes.append(raised[0] if raised else None)
    assert outcomes == [RuntimeError, RuntimeError]


@pytest.mark.parametrize("case,variant", case_variant_params(CASES, VARIANTS, SLOW_CASES))
def test_step_leaves_other_versions_like_torch(case, variant):
    """A step changes the version of exactly what torch.optim's step changes: the params
    and the state it updates, never a grad (unless GradScaler's unscaling writes it) or
    a tensor lr."""
    backend, cap = variant
    seen = []
    for cls, kw in ((case.torch, {"foreach": False}), (case.fused, {"backend": backend})):
        p = torch.randn(4, 3, requires_grad=True)
        lr = torch.tensor(case.options["lr"])
        opt = cls([p], **{**case.options, "lr": lr}, **kw)
        grads = []
        with cpu_capability(cap):
            for _ in range(2):
                p.grad = torch.randn(4, 3)
                grads.append((p.grad, p.grad._version))
                opt.step()
        assert all(g._version == v for g, v in grads), f"{cls.__module__}: a grad changed version"
        assert lr._version == 0, f"{cls.__module__}: lr changed version"
        seen.append(sorted(k for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)))
    assert seen[0] == seen[1]


# ---------------------------------------------------------------------------------------
# torch.compile


# Every optimizer with every option on, and SGD with momentum (its first-step split).
COMPILE_CASES = [c for c in FULL_CASES if c.name != "Adam"][:1] + [
    c for c in FULL_CASES if c.name not in ("Adam", "AdamW")] + [case_named("SGD", DEFAULT_CASES)]


@pytest.mark.parametrize("case", COMPILE_CASES, ids=case_ids(COMPILE_CASES))
def test_compiled_step_fullgraph_no_recompile(case):
    """torch.compile(opt.step, fullgraph=True) from the very first step, with a tensor lr
    changed between steps as a scheduler does: one graph for the first step (it creates
    the state, as with torch.optim) and one for every later step, and eager numbers."""
    import torch._dynamo

    torch._dynamo.reset()
    lr = torch.tensor(case.options["lr"])
    fused, oracle, fp, tp, grads = _pair(case, shapes=[(17,), (3, 5)],
                                         fused_kw={"lr": lr},
                                         torch_kw={"lr": torch.tensor(case.options["lr"])})
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    step = torch.compile(fused.step, fullgraph=True, backend=counting_backend)
    after_second = None
    for i, g in enumerate(grads):
        _set_grads(fp, g)
        _set_grads(tp, g)
        new_lr = case.options["lr"] * (0.8 ** i)
        lr.fill_(new_lr)
        oracle.param_groups[0]["lr"].fill_(new_lr)
        step()
        oracle.step()
        if i == 1:
            after_second = len(compiles)
    assert after_second is not None and after_second <= 2
    assert len(compiles) == after_second, (
        f"recompiled: {len(compiles)} graphs for {len(grads)} steps")
    assert_same_trajectory(fused, oracle, fp, tp, len(grads), grads, "compiled")
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------
# GradScaler: grad_scale / found_inf




def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in tensor_state(opt, p).items()} for p in params])


def _assert_untouched(opt, params, snapshot, what):
    ps, states = snapshot
    for i, (p, before) in enumerate(zip(params, ps)):
        assert torch.equal(p.detach(), before), f"{what}: param {i} changed"
    for i, (p, before) in enumerate(zip(params, states)):
        now = tensor_state(opt, p)
        assert sorted(now) == sorted(before), f"{what}: state keys of param {i} changed"
        for key in before:
            assert torch.equal(now[key], before[key]), f"{what}: {key} of param {i} changed"


@pytest.mark.parametrize("case,variant", case_variant_params(CASES, VARIANTS, SLOW_CASES))
def test_found_inf_skips_everything(case, variant):
    """A step with found_inf != 0 leaves params and every state tensor, step included,
    untouched: on the first step (fresh zero state) and later."""
    backend, cap = variant
    fused, _, fp, _, grads = _pair(case, fused_kw={"backend": backend})
    with cpu_capability(cap):
        for step in range(3):
            _set_grads(fp, grads[step])
            fp[0].grad[0] = float("inf")
            snapshot = _snapshot(fused, fp)
            fused.grad_scale = torch.tensor(2.0)
            fused.found_inf = torch.tensor(1.0)
            fused.step()
            del fused.grad_scale, fused.found_inf
            if step == 0:
                # lazily created state stays at its initial values
                for p in fp:
                    assert_initial_state(fused, p, "the first skipped step")
            else:
                _assert_untouched(fused, fp, snapshot, f"skipped step {step}")
            _set_grads(fp, grads[step + 3])
            fused.step()  # a normal step in between


@pytest.mark.parametrize("case,variant", case_variant_params(CASES, VARIANTS, SLOW_CASES))
def test_grad_scale_equals_unscaled_step(case, variant):
    """grads * 2**k with grad_scale = 2**k and found_inf = 0: bit for bit an unscaled
    step (division by a power of two is exact), grads left unscaled."""
    backend, cap = variant
    scaled, _, sp, pp, grads = _pair(case, fused_kw={"backend": backend})
    plain = case.fused(pp, backend=backend, **case.options)
    with cpu_capability(cap):
        for g in grads[:HALF]:
            _set_grads(sp, [x * 1024 for x in g])
            _set_grads(pp, g)
            scaled.grad_scale = torch.tensor(1024.0)
            scaled.found_inf = torch.tensor(0.0)
            scaled.step()
            del scaled.grad_scale, scaled.found_inf
            plain.step()
            for a, b in zip(sp, pp):
                assert torch.equal(a.grad, b.grad), "grads are not left unscaled"
    for a, b in zip(sp, pp):
        assert torch.equal(a.detach(), b.detach())
        sa, sb = tensor_state(scaled, a), tensor_state(plain, b)
        for key in sb:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("inf_step", [0, 2], ids=["inf-first-step", "inf-third-step"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grad_scaler_cpu(case, inf_step):
    """torch.amp.GradScaler("cpu") end to end: finite steps equal torch.optim under the
    same scaler; a step with an inf grad is skipped (torch's also) and the scale backs
    off identically. A skipped first step leaves the next one a first step (SGD's
    momentum buffer starts as the grad, whatever the dampening)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    twin = copy.deepcopy(model)
    x = torch.randn(8, 6)
    fused = case.fused(model.parameters(), **case.options)
    oracle = case.torch(twin.parameters(), foreach=False, **case.options)
    fs = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    ts = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    steps = 6
    for i in range(steps):
        for m, opt, scaler in ((model, fused, fs), (twin, oracle, ts)):
            opt.zero_grad()
            scaler.scale((m(x) ** 2).mean()).backward()
            if i == inf_step:
                next(m.parameters()).grad[0, 0] = float("inf")
                snapshot = _snapshot(opt, list(m.parameters()))
            scaler.step(opt)
            scaler.update()
            if i == inf_step and i > 0:
                _assert_untouched(opt, list(m.parameters()), snapshot, f"{type(opt)} inf step")
            elif i == inf_step:  # the first step: no state, or only its initial values
                assert all(torch.equal(p.detach(), b) for p, b in zip(m.parameters(), snapshot[0]))
                if opt is fused:
                    for p in m.parameters():
                        assert_initial_state(opt, p, "the first skipped step")
                else:
                    for p, before in zip(m.parameters(), snapshot[1]):
                        now = tensor_state(opt, p)
                        assert sorted(now) == sorted(before)
                        assert all(torch.equal(now[k], before[k]) for k in now)
            assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
        assert fs.get_scale() == ts.get_scale()
    assert_same_trajectory(fused, oracle, list(model.parameters()), list(twin.parameters()),
                           steps)


# ---------------------------------------------------------------------------------------
# DTensor params (FSDP2-style)


DTENSOR_CASES = DEFAULT_CASES + [case_named("AdamW")]


@pytest.mark.parametrize("case", DTENSOR_CASES, ids=case_ids(DTENSOR_CASES))
def test_dtensor_params_match_plain_tensors(case, tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    store = dist.FileStore(os.fspath(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(0)
        shapes = [(17, 5), (33,), (4097,)]
        placements = [[Shard(0)], [Replicate()], [Shard(0)]]
        plain = make_params(shapes, torch.float32, gen)
        dparams = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, pl))
                   for p, pl in zip(plain, placements)]
        tparams = clone_leaves(plain)
        fused = case.fused(dparams, **case.options)
        oracle = case.torch(tparams, foreach=False, **case.options)
        grads = [make_grads(shapes, torch.float32, gen) for _ in range(HALF)]
        for g in grads:
            for p, gg, pl in zip(dparams, g, placements):
                p.grad = distribute_tensor(gg.clone(), mesh, pl)
            _set_grads(tparams, g)
            fused.step()
            oracle.step()
        for p in dparams:
            for key, value in tensor_state(fused, p).items():
                if value.dim() > 0:
                    assert type(value) is type(p), f"{key} is not a DTensor like its param"
        view = StateView(fused, dparams, lambda t: t.full_tensor())
        assert_same_trajectory(view, oracle, view.params, tparams, HALF, grads, "DTensor")
    finally:
        dist.destroy_process_group()
