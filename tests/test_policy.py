"""The memory policy (issue 14, fused_optim/_policy.py): state_dtype, master_weights and
stochastic_rounding on every element-wise optimizer and backend.

* Parity: each policy of every optimizer's full case against torch.optim in float64,
  re-synced before each step from what the policy stores (params or master copies, and
  states), every stored tensor within the rounding of its own storage dtype.
* The random bits: the documented counter layout, bit for bit (SGD, whose math is one
  multiply-add); reproducible from torch.manual_seed, resumed bit-identically from a
  checkpoint; unbiased where rounding to nearest stalls.
* Checkpoints between policies and to and from torch.optim; the bad inputs; GradScaler's
  skipped step.
* The Triton engine under the interpreter (tests/_interpreted.py; in a fresh interpreter
  on a GPU machine, test_triton_policy_in_subprocess): bit for bit the CPU engine under
  every policy (params, grads, states, master copies, rng_state, skipped steps
  included), the parity and documented-bits tests on a subset (the interpreter's time
  grows with the programs of a launch: small tensors, the test launch configuration;
  ~30 s of CPU for these tests on the 2-core dev machine), its op's checks.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import _interpreted
import pytest
import torch

import fused_optim
from _oracle import (assert_row_close, cpu_capability, make_grads, make_params, row_scale,
                     scalar_keys)
from _tables import FULL_CASES, TOLERANCES, kernel_variants, tolerance, variant_id
from fused_optim import _extension, _policy

# Whether the Triton kernels run interpreted in this process (before anything else
# imports them: see tests/_interpreted.py).
TRITON_HERE = _interpreted.load()
TRITON = ("triton", None)

# (id, param dtype, options): every policy the engines run (_policy.POLICIES).
POLICIES = [
    (f"{str(p).removeprefix('torch.')}-state_{str(s).removeprefix('torch.')}"
     + ("-master" if m else "") + ("-sr" if r else ""),
     p, {"state_dtype": s, "master_weights": m, "stochastic_rounding": r})
    for p, s, m, r in sorted(_policy.POLICIES, key=str)
]
STEPS = 3
# Sizes across the CPU engine's 16-element vectors and 16K-element chunks.
SHAPES = [(1,), (3,), (4, 33), (16385,)]


def _variants():
    """The CPU engine (every ISA) and the reference; the Triton engine is added where
    a test says so (TRITON: its own shapes and cases, run under the interpreter)."""
    return [v for v in kernel_variants(torch.float32) if v[0] != "triton"]


# The Triton engine's sizes: across the test launch configuration's 32-element blocks
# and 64-element chunks (7 programs).
TRITON_BLOCK, TRITON_CHUNK = 32, 64
TRITON_SHAPES = [(1,), (3,), (4, 33), (65,)]


@pytest.fixture
def triton_interpreted(monkeypatch):
    """The Triton backend on CPU tensors (TRITON_INTERPRET=1, the test launch
    configuration); the launcher module."""
    if not TRITON_HERE:
        pytest.skip("no interpreted Triton kernels in this process (triton missing, or a "
                    "GPU machine: test_triton_policy_in_subprocess)")
    from fused_optim.triton_kernels import launcher

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(launcher, "CONFIG", launcher.LaunchConfig(block=TRITON_BLOCK,
                                                                  chunk=TRITON_CHUNK))
    launcher.clear_table_cache()
    return launcher


def _needs_cpu_op() -> None:
    if _extension.C is None:
        pytest.skip(f"no C++ op to compare with: {_extension.LOAD_ERROR}")


def _assert_stored(label: str, value: torch.Tensor, e64: torch.Tensor, e32: torch.Tensor,
                   scale: torch.Tensor, stochastic: bool, optimizer: type) -> None:
    """A stored value against torch.optim re-synced from the same stored values.

    bf16 / fp16 storage: against float64 torch, within the one rounding of the stored
    value (to nearest: TOLERANCES' 1 ulp budget, measured <= 0.5; stochastic: < 1 ulp)
    plus the fp32 opmath's error, far below those ulps.
    fp32 storage (states, master copies): against float32 torch, within the fp32 parity
    tests' budget (tolerance(float32, optimizer)): against float64 the fp32 opmath's own
    error would count in full, unbounded where the math cancels. RMSprop x1.5: its
    momentum buffer sums g / (sqrt(v) + eps), largest where v is smallest; on these
    bf16-valued grads measured 10.2 fp32 ulps of the row (8 allowed) at one element of
    16385, the reference backend's and the CPU engine's alike (torch's FMA in addcmul)."""
    if value.dtype == torch.float32:
        factor = 1.5 if optimizer is fused_optim.RMSprop else 1.0
        assert_row_close(label, value, e32, scale, value.dtype,
                         factor * tolerance(torch.float32, optimizer).ulps)
    else:
        ulps = 1.0 if stochastic and value.dtype == torch.bfloat16 else TOLERANCES[value.dtype].ulps
        assert_row_close(label, value, e64, scale, value.dtype, ulps)


# Each optimizer's case with every option on (FULL_CASES), but RMSprop's without
# centered: its g / sqrt(v - a^2) cancels, data-dependently, where the fp32 opmath of any
# implementation is off by more than the fp32 parity tests' budget (measured 38 fp32 ulps
# of the row on these bf16-valued grads, the reference backend and the CPU engine alike:
# op order, not storage). Adam's amsgrad case keeps the fourth random word (three state
# lists) covered.
CASES = [dataclasses.replace(c, options={k: v for k, v in c.options.items() if k != "centered"})
         if c.name == "RMSprop" else c for c in FULL_CASES]


# The Triton engine's parity runs: Adam (three state lists: every random word) and
# RMSprop (without centered: square_avgs and momentum buffers around the absent
# grad_avgs, words 1 and 2), under every policy; its bits equal the CPU engine's for
# every optimizer (test_triton_matches_the_cpu_engine).
TRITON_PARITY = [c for c in CASES if c.id.split("-")[0] in ("Adam", "RMSprop")]


def _parity_params():
    out = []
    for variant in [*_variants(), TRITON]:
        for case in (TRITON_PARITY if variant == TRITON else CASES):
            for policy in POLICIES:
                out.append(pytest.param(case, policy, variant,
                                        id=f"{case.id}-{policy[0]}-{variant_id(variant)}"))
    return out


@pytest.mark.parametrize("case, policy, variant", _parity_params())
def test_policy_parity_with_torch(case, policy, variant, request):
    """Every policy against torch.optim re-synced before each step from what the policy
    stores (the master copy or the param, the states), each stored tensor against the
    oracle of its storage (_assert_stored)."""
    _, dtype, options = policy
    backend, cap = variant
    shapes = SHAPES
    if variant == TRITON:
        request.getfixturevalue("triton_interpreted")
        shapes = TRITON_SHAPES
    gen = torch.Generator().manual_seed(0)
    params = [p.requires_grad_() for p in make_params(shapes, dtype, gen)]
    scalars = scalar_keys(case)
    policy_keys = (_policy.MASTER_KEY, _policy.RNG_KEY)
    with cpu_capability(cap):
        fused = case.fused(params, backend=backend, **case.options, **options)
        oracles = {}
        for odtype in (torch.float64, torch.float32):
            ps = [p.detach().to(odtype).requires_grad_() for p in params]
            oracles[odtype] = (case.torch(ps, foreach=False, **case.options), ps)
        if any(lst.init != 0 for lst in case.spec.lists):
            # States that start at a non-zero value (Rprop's step sizes, Adagrad's
            # accumulators) start rounded to the policy's dtype: the oracles start from
            # those values (torch.optim takes a state it finds).
            for group in fused.param_groups:
                for p in group["params"]:
                    fused._create_state(group, p, fused.state[p])
            for odtype, (oracle, ps) in oracles.items():
                for p, po in zip(params, ps):
                    oracle.state[po] = {k: v.clone() if k in scalars
                                        else v.to(odtype, copy=True)
                                        for k, v in fused.state[p].items()
                                        if k not in policy_keys}
        for step in range(STEPS):
            grads = make_grads(shapes, dtype, gen)
            for oracle, ps in oracles.values():
                with torch.no_grad():
                    for p, po in zip(params, ps):
                        state = fused.state.get(p, {})
                        po.copy_(state.get(_policy.MASTER_KEY, p))
                        for key, value in state.items():
                            if key in oracle.state.get(po, {}):
                                oracle.state[po][key].copy_(value)
                for po, g in zip(ps, grads):
                    po.grad = g.to(po.dtype)
            # The row's values before the step count in its scale, as in check_parity.
            before = [[t.detach().clone() for k, t in [("param", p), *fused.state.get(p, {}).items()]
                       if k not in scalars and k != _policy.RNG_KEY] for p in params]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            fused.step()
            for oracle, _ in oracles.values():
                oracle.step()
            extra = ({_policy.MASTER_KEY} if options["master_weights"] else set()) | (
                {_policy.RNG_KEY} if options["stochastic_rounding"] else set())
            for i, (p, g) in enumerate(zip(params, grads)):
                state = fused.state[p]
                stored = [("param", p)] + [(k, v) for k, v in state.items()
                                           if k not in scalars and k not in policy_keys]
                if options["master_weights"]:
                    stored.append((_policy.MASTER_KEY, state[_policy.MASTER_KEY]))
                for key, value in stored[1:]:
                    want = (torch.float32 if key == _policy.MASTER_KEY else
                            _policy.state_dtype(_policy.policy_of(options), dtype))
                    assert value.dtype == want, (key, value.dtype)
                expected = {}
                for odtype, (oracle, ps) in oracles.items():
                    ostate = oracle.state[ps[i]]
                    assert set(state) == set(ostate) | extra, (sorted(state), sorted(ostate))
                    expected[odtype] = {"param": ps[i], _policy.MASTER_KEY: ps[i], **ostate}
                e64 = expected[torch.float64]
                scale = row_scale([g, *before[i], *(v for _, v in stored),
                                   *(e64[k] for k, _ in stored)])
                for key, value in stored:
                    sr = options["stochastic_rounding"] and not (
                        key == "param" and options["master_weights"])
                    _assert_stored(
                        f"{case.id} {policy[0]} {variant_id(variant)} step {step + 1} "
                        f"param {i} {key}", value, e64[key], expected[torch.float32][key],
                        scale, sr, case.fused)
                for key in scalars:
                    assert float(state[key]) == pytest.approx(float(e64[key]), rel=1e-6)


def _sgd_run(backend, steps, seed=0, dtype=torch.bfloat16, **options):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(1)
    params = [p.requires_grad_() for p in make_params(SHAPES, dtype, gen)]
    opt = fused_optim.SGD(params, lr=0.01, momentum=0.9, backend=backend,
                          stochastic_rounding=True, **options)
    for _ in range(steps):
        for p, g in zip(params, make_grads(SHAPES, dtype, gen)):
            p.grad = g
        opt.step()
    return opt, params


@pytest.mark.parametrize("variant", [*_variants(), TRITON], ids=variant_id)
def test_stochastic_rounding_uses_the_documented_bits(variant, request):
    """SGD with momentum on bf16 params, first step: buf = g exactly, p - lr * buf in
    fp32, both stored with Philox words at counter offset + i (word 0: the param, word
    1: momentum_buffer) under the param's seed ([note: the policy's random bits]).
    Triton: in its production launch configuration (16385 elements: two programs, the
    second counting from 16384)."""
    backend, cap = variant
    if variant == TRITON:
        launcher = request.getfixturevalue("triton_interpreted")
        request.getfixturevalue("monkeypatch").setattr(launcher, "CONFIG",
                                                       launcher.LaunchConfig())
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(1)
    params = [p.requires_grad_() for p in make_params(SHAPES, torch.bfloat16, gen)]
    grads = make_grads(SHAPES, torch.float32, gen)
    before = [p.detach().float() for p in params]
    with cpu_capability(cap):
        opt = fused_optim.SGD(params, lr=0.01, momentum=0.9, backend=backend,
                              stochastic_rounding=True, state_dtype=torch.float32)
        for p, g in zip(params, grads):
            p.grad = g.to(torch.bfloat16)
        opt.step()
    for i, (p, p0, g) in enumerate(zip(params, before, grads)):
        rng = opt.state[p][_policy.RNG_KEY]
        assert int(rng[1]) == p.numel()
        words = _policy.philox_words(rng[0], _policy.memory_offsets(p))
        g32 = g.to(torch.bfloat16).float()
        expected = _policy.bf16_stochastic(p0 - torch.tensor(0.01) * g32, words[0])
        assert torch.equal(p.detach().view(torch.int16), expected.view(torch.int16)), i
        assert torch.equal(opt.state[p]["momentum_buffer"], g32)
    # The seeds differ between params and follow torch.manual_seed.
    seeds = {int(opt.state[p][_policy.RNG_KEY][0]) for p in params}
    assert len(seeds) == len(params)


def test_stochastic_rounding_is_reproducible_and_resumes_bit_identically():
    a_opt, a = _sgd_run("auto", 4)
    b_opt, b = _sgd_run("auto", 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c_opt, c = _sgd_run("auto", 4, seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # Two steps, a checkpoint, a new optimizer, two more: the same bits as four.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    params = [p.requires_grad_() for p in make_params(SHAPES, torch.bfloat16, gen)]
    opt = fused_optim.SGD(params, lr=0.01, momentum=0.9, stochastic_rounding=True)
    for step in range(4):
        if step == 2:
            sd = copy.deepcopy(opt.state_dict())
            torch.manual_seed(123)  # a resumed run's generator is elsewhere
            opt = fused_optim.SGD(params, lr=0.01, momentum=0.9, stochastic_rounding=True)
            opt.load_state_dict(sd)
        for p, g in zip(params, make_grads(SHAPES, torch.bfloat16, gen)):
            p.grad = g
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(a, params))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_stochastic_rounding_does_not_stall_where_nearest_does(backend):
    """SGD steps of lr * g = 1e-4 on bf16 params of 1.0 (half an ulp is 2^-8 = 0.0039):
    rounding to nearest never moves them; stochastic rounding moves their mean by the
    fp32 run's amount (the mean of 2^16 independent roundings, within 4 standard
    deviations of the rounding noise)."""
    n, steps, lr = 1 << 16, 20, 1e-4
    runs = {}
    for rounding in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        opt = fused_optim.SGD([p], lr=lr, backend=backend, stochastic_rounding=rounding)
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
        runs[rounding] = p.detach().double()
    assert torch.equal(runs[False], torch.ones(n, dtype=torch.float64))
    exact = 1.0 - steps * float(torch.tensor(lr, dtype=torch.float32))
    ulp = 2.0 ** -8  # below 1.0
    noise = ulp / 2 / n ** 0.5 * steps ** 0.5
    assert abs(float(runs[True].mean()) - exact) < 4 * noise


def _adamw(params, **options):
    return fused_optim.AdamW(params, lr=1e-2, weight_decay=0.1, **options)


def _steps(opt, params, grads):
    for g_step in grads:
        for p, g in zip(params, g_step):
            p.grad = g.to(p.dtype)
        opt.step()


@pytest.mark.parametrize("source", ["torch", "fp32", "state_bf16", "master", "sr"])
@pytest.mark.parametrize("target", ["fp32", "state_bf16", "master", "sr", "torch"])
def test_checkpoints_move_between_policies(source, target):
    """A state_dict of any policy (or torch.optim's) loads into any other (cast on load;
    the master copy made from the param where the source had none); into torch.optim
    through torch_state_dict(). The loaded optimizer then steps like one that ran under
    its own policy from those values."""
    kinds = {"fp32": (torch.float32, {}), "state_bf16": (torch.float32,
                                                         {"state_dtype": torch.bfloat16}),
             "master": (torch.bfloat16, {"master_weights": True}),
             "sr": (torch.bfloat16, {"stochastic_rounding": True}),
             "torch": (torch.float32, None)}
    gen = torch.Generator().manual_seed(0)
    shapes = [(5,), (3, 4)]
    grads = [make_grads(shapes, torch.float32, gen) for _ in range(2)]
    init = make_params(shapes, torch.float32, gen)

    def build(kind):
        dtype, options = kinds[kind]
        params = [t.detach().to(dtype).requires_grad_() for t in init]
        if options is None:
            return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1), params
        return _adamw(params, **options), params

    src, src_params = build(source)
    _steps(src, src_params, grads)
    sd = (src.torch_state_dict() if target == "torch" and source != "torch"
          else src.state_dict())
    dst, dst_params = build(target)
    with torch.no_grad():
        for p, q in zip(dst_params, src_params):
            p.copy_(q)
    dst.load_state_dict(copy.deepcopy(sd))
    dtype, options = kinds[target]
    for p, q in zip(dst_params, src_params):
        state, saved = dst.state[p], src.state[q]
        assert float(state["step"]) == float(saved["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            want = p.dtype if options is None else _policy.state_dtype(
                _policy.policy_of(options), p.dtype)
            assert state[key].dtype == want, (key, state[key].dtype)
            assert torch.equal(state[key], saved[key].to(want))
        if options and options.get("master_weights"):
            master = state[_policy.MASTER_KEY]
            assert master.dtype == torch.float32
            # The source's copy, or one made from the (loaded model's) param.
            src_master = saved.get(_policy.MASTER_KEY, p.detach().float())
            assert torch.equal(master, src_master)
        else:
            assert _policy.MASTER_KEY not in state
        assert (_policy.RNG_KEY in state) == bool(options and options.get("stochastic_rounding"))
        if options is None:
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    _steps(dst, dst_params, grads[:1])  # and it steps
    assert all(bool(p.isfinite().all()) for p in dst_params)


@pytest.mark.parametrize("bad, message", [
    ({"master_weights": True}, "master_weights=True keeps an fp32 copy"),
    ({"state_dtype": torch.int64}, "state_dtype must be a floating-point dtype"),
    ({"state_dtype": "bfloat16"}, "state_dtype must be a torch.dtype or None"),
    ({"stochastic_rounding": True}, "stochastic_rounding=True rounds bf16 stores"),
    ({"state_dtype": torch.float16}, "cannot take state_dtype=torch.float16"),
    ({"master_weights": 1}, "master_weights must be a bool"),
])
def test_policies_that_cannot_apply_raise(bad, message):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=message):
        fused_optim.AdamW([p], **bad)
    opt = fused_optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [p], **bad})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="differentiable=True"):
        fused_optim.AdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))],
                          master_weights=True, differentiable=True)
    with pytest.raises(TypeError):
        fused_optim.SparseAdam([p], state_dtype=torch.bfloat16)


def test_grad_scaler_skip_leaves_master_and_offset_untouched():
    p = torch.nn.Parameter(torch.randn(100, dtype=torch.bfloat16))
    opt = fused_optim.AdamW([p], master_weights=True, stochastic_rounding=True,
                            state_dtype=torch.bfloat16)
    p.grad = torch.randn_like(p)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    param = p.detach().clone()
    opt.grad_scale = torch.tensor(2.0)
    opt.found_inf = torch.tensor(1.0)
    p.grad = torch.randn_like(p)
    opt.step()
    assert torch.equal(p.detach(), param)
    for key, value in before.items():
        assert torch.equal(opt.state[p][key], value), key


def test_sparse_grads_take_no_policy():
    emb = torch.nn.Embedding(10, 4, sparse=True).to(torch.bfloat16)
    opt = fused_optim.SGD(emb.parameters(), lr=0.1, stochastic_rounding=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients take no memory policy"):
        opt.step()


def test_a_backend_without_policies_falls_back_under_auto():
    """A backend without policies: named, a ValueError; under auto the next backend of
    AUTO_ORDER that has them (on the CPU: the CPU engine, else the reference)."""
    from fused_optim import optimizer as fo

    group = {"backend": "nopolicy"}
    backend = fused_optim.backends.Backend("nopolicy", lambda d, t: None, lambda *a, **k: None)
    assert not backend.policies
    with pytest.raises(ValueError, match="has no memory policy"):
        fo._policy_fallback(group, backend, torch.device("cpu"), torch.bfloat16)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        chosen = fo._policy_fallback({"backend": "auto"}, backend, torch.device("cpu"),
                                     torch.bfloat16)
    cpu_ok = fused_optim.backends.get_backend("cpu").unavailable(torch.device("cpu"),
                                                                    torch.bfloat16) is None
    assert chosen.name == ("cpu" if cpu_ok else "reference")


def test_op_checks_policy_lists():
    """The C++ op and its fake kernel check the policy lists (same messages)."""
    if fused_optim._extension.C is None:
        pytest.skip("fused_optim._C is not built")
    p = torch.zeros(4, dtype=torch.bfloat16)
    g = torch.ones(4, dtype=torch.bfloat16)
    step = torch.zeros(())
    op = torch.ops.fused_optim.adam_
    kw = dict(lr=torch.tensor(0.1), beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8,
              amsgrad=False, maximize=False, decoupled_weight_decay=False)
    states = [[torch.zeros(4)], [torch.zeros(4)], []]
    for device in ("cpu", "meta"):
        def call(**policy):
            t = lambda x: x.to(device)  # noqa: E731
            op([t(p)], [t(g)], *[[t(s) for s in lst] for lst in states], [t(step)], **kw,
               **{k: [t(x) for x in v] for k, v in policy.items()})
        with pytest.raises(RuntimeError, match="master_params\\[0\\] must be a dense float32"):
            call(master_params=[torch.zeros(4, dtype=torch.bfloat16)])
        with pytest.raises(RuntimeError, match="rng_states\\[0\\] must be a contiguous int64"):
            call(rng_states=[torch.zeros(3, dtype=torch.int64)])
        with pytest.raises(RuntimeError, match="expected 1 master_params"):
            call(master_params=[torch.zeros(4), torch.zeros(4)])
    # fp32 states on bf16 params with a master copy: a policy the engine runs.
    master = torch.zeros(4)
    op([p], [g], *states, [step], **kw, master_params=[master])
    assert float(master[0]) != 0.0 and float(p[0]) == float(master[0].bfloat16())
    bad = [[torch.zeros(4, dtype=torch.float16)], [torch.zeros(4, dtype=torch.float16)], []]
    with pytest.raises(RuntimeError, match="one dtype"):
        op([p], [g], *bad, [step], **kw, master_params=[master])


def test_opcheck_with_policy_lists():
    if fused_optim._extension.C is None:
        pytest.skip("fused_optim._C is not built")
    p = torch.randn(37, dtype=torch.bfloat16)
    args = ([p], [torch.randn(37, dtype=torch.bfloat16)], [torch.zeros(37, dtype=torch.bfloat16)],
            [torch.zeros(37, dtype=torch.bfloat16)], [], [torch.zeros(())])
    kwargs = dict(lr=torch.tensor(0.1), beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8,
                  amsgrad=False, maximize=False, decoupled_weight_decay=False,
                  master_params=[p.float()], rng_states=[torch.tensor([7, 0])])
    torch.library.opcheck(torch.ops.fused_optim.adam_.default, args, kwargs)


# ---------------------------------------------------------------------------------------
# The Triton engine: bit for bit the CPU engine, its checks. (Its parity with torch.optim
# and the documented bits: the tests above, with the TRITON variant.)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's values as integers of its width: NaN payloads and signed zeros count."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    return t.detach().contiguous().view(ints[t.element_size()])


def _assert_same_bits(label: str, got: dict[str, list[torch.Tensor]],
                      want: dict[str, list[torch.Tensor]]) -> None:
    assert got.keys() == want.keys(), (label, sorted(got), sorted(want))
    for key in got:
        for i, (a, b) in enumerate(zip(got[key], want[key], strict=True)):
            assert a.dtype == b.dtype, f"{label}: {key}[{i}] {a.dtype} != {b.dtype}"
            assert torch.equal(_bits(a), _bits(b)), (
                f"{label}: {key}[{i}] not bit-equal to the CPU engine's "
                f"({int(_bits(a).ne(_bits(b)).sum())} of {a.numel()} elements differ)")


def _tensors(opt, params) -> dict[str, list[torch.Tensor]]:
    """Every tensor a step writes: params, grads (unscaled), each state (per-tensor
    state, master copies and rng_state included)."""
    out = {"param": [p.detach() for p in params], "grad": [p.grad for p in params]}
    for key in sorted({k for p in params for k in opt.state.get(p, {})}):
        out[key] = [opt.state[p][key] for p in params]
    return out


# Each optimizer family's full case (CASES) under two policies that use every part of the
# engine's policy path (bf16 states from fp32 master copies, stochastically rounded; bf16
# params rounded stochastically over fp32 states); SGD's and Adam's under every policy.
_EVERY_POLICY = ("SGD", "Adam")
_TWO_POLICIES = ("bfloat16-state_bfloat16-master-sr", "bfloat16-state_float32-sr")


def _engine_params():
    out, families = [], set()
    for case in CASES:
        family = case.spec.name
        if family in families:
            continue
        families.add(family)
        for policy in POLICIES:
            if case.id.split("-")[0] in _EVERY_POLICY or policy[0] in _TWO_POLICIES:
                out.append(pytest.param(case, policy, id=f"{case.id}-{policy[0]}"))
    return out


@pytest.mark.parametrize("case, policy", _engine_params())
def test_triton_matches_the_cpu_engine(case, policy, triton_interpreted):
    """backend="triton" and backend="cpu" (its portable variant) from the same params,
    grads and seeds, three launches as torch.amp.GradScaler makes them (grads scaled by
    2^10, a skipped step, a plain one): every tensor bit for bit after each (the C++ and
    Triton math are the same operations, rounded once each: tests/test_triton.py; the
    policy's loads, roundings and random words are the same too)."""
    _needs_cpu_op()
    _, dtype, options = policy
    gen = torch.Generator().manual_seed(0)
    init = make_params(TRITON_SHAPES, dtype, gen)
    sides = {}
    for backend in ("triton", "cpu"):
        torch.manual_seed(7)  # the rng_state seeds
        params = [t.detach().clone().requires_grad_() for t in init]
        sides[backend] = (case.fused(params, backend=backend, **case.options, **options),
                          params)
    for k, (scale, found) in enumerate(((1024.0, 0.0), (1024.0, 1.0), (None, None))):
        grads = make_grads(TRITON_SHAPES, dtype, gen)
        for backend, (opt, params) in sides.items():
            for p, g in zip(params, grads):
                p.grad = g * scale if scale is not None else g.clone()
            opt.grad_scale = None if scale is None else torch.tensor(scale)
            opt.found_inf = None if found is None else torch.tensor(found)
            with cpu_capability("default" if backend == "cpu" else None):
                opt.step()
        _assert_same_bits(f"{case.id} {policy[0]} launch {k + 1}",
                          _tensors(*sides["triton"]), _tensors(*sides["cpu"]))
    if options["stochastic_rounding"]:
        opt, params = sides["triton"]
        for p in params:  # two real steps, the skipped one advancing nothing
            assert int(opt.state[p][_policy.RNG_KEY][1]) == 2 * p.numel()


def _op_call(name: str, dtype: torch.dtype, state_dtype: torch.dtype, master: bool):
    """(spec, the op's lists, its keyword arguments) of one call with stochastic
    rounding, from the optimizer class after one step (its state); the rng_states set to
    a 64-bit seed and an offset 40 below 2^32, so that counters cross into the high
    word, and one grad a NaN of all-ones payload (0x7fffffff, a GPU's NaN), which the
    naive bf16 rounding would carry into -0.0."""
    cls = {"SGD": fused_optim.SGD, "AdamW": fused_optim.AdamW}[name]
    kw = (dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1) if name == "SGD"
          else dict(lr=0.01, weight_decay=0.1, amsgrad=True))
    gen = torch.Generator().manual_seed(0)
    params = [p.requires_grad_() for p in make_params(TRITON_SHAPES, dtype, gen)]
    opt = cls(params, backend="reference", stochastic_rounding=True,
              state_dtype=state_dtype, master_weights=master, **kw)
    for p, g in zip(params, make_grads(TRITON_SHAPES, dtype, gen)):
        p.grad = g
    opt.step()
    for p, g in zip(params, make_grads(TRITON_SHAPES, dtype, gen)):
        p.grad = g
    params[2].grad.view(-1)[5] = float("nan")
    if dtype == torch.float32:
        params[2].grad.view(-1)[5:6].view(torch.int32).fill_(0x7FFFFFFF)
    group = opt.param_groups[0]
    spec = opt.spec
    lists, states = opt._group_lists(group)
    h = {x.name: x.kind() for x in spec.hypers if x.group_key == ""}
    h.update(opt._hyper(group))
    lists = [[t.detach().clone() for t in lst] for lst in lists + states]
    n = len(spec.list_args()) + len(spec.scalars)
    for i, rng in enumerate(lists[n + 1]):
        rng.copy_(torch.tensor([-0x123456789ABCDEF - i, (1 << 32) - 40]))
    kwargs = dict(lr=torch.tensor(kw["lr"], dtype=torch.float64), **h,
                  master_params=lists[n] or None, rng_states=lists[n + 1])
    return spec, lists[:n], lists[n:], kwargs


@pytest.mark.parametrize("name, dtype, state_dtype, master", [
    ("SGD", torch.float32, torch.bfloat16, False),
    ("SGD", torch.bfloat16, torch.bfloat16, True),
    ("AdamW", torch.bfloat16, torch.bfloat16, False),
    ("AdamW", torch.bfloat16, torch.bfloat16, True),
], ids=["SGD-fp32-state_bf16", "SGD-bf16-master", "AdamW-bf16", "AdamW-bf16-master"])
def test_triton_and_cpu_round_stochastically_to_the_same_bits(name, dtype, state_dtype, master,
                                                                triton_interpreted):
    """One op call with stochastic rounding, the same inputs and [seed, offset] on the
    C++ op (CPU engine), the Triton table kernel and the per-tensor kernels torch.compile
    traces: the same bits everywhere (NaN included), the same advanced offsets."""
    _needs_cpu_op()
    launcher = triton_interpreted
    spec, lists, policy_lists, kwargs = _op_call(name, dtype, state_dtype, master)
    runs = {}
    for label, fn in (("cpu", fused_optim.backends.get_backend("cpu").step),
                      ("triton", fused_optim.backends.get_backend("triton").step),
                      ("per-tensor", launcher.step_per_tensor)):
        args = [[t.clone() for t in lst] for lst in lists]
        master_params, rng = ([[t.clone() for t in lst] if lst else None
                               for lst in policy_lists])
        with cpu_capability("default" if label == "cpu" else None):
            fn(spec, *args, **{**kwargs, "master_params": master_params, "rng_states": rng})
        runs[label] = dict(zip(range(len(args)), args), master=master_params or [],
                           rng=rng)
    for label in ("triton", "per-tensor"):
        _assert_same_bits(f"{name} {label}", runs[label], runs["cpu"])
    for t, r in zip(lists[0], runs["triton"]["rng"]):
        assert int(r[1]) == (1 << 32) - 40 + t.numel()
    assert runs["cpu"][0][2].view(-1)[5].isnan()  # the NaN stayed a NaN
    if state_dtype == torch.bfloat16:
        assert runs["cpu"][2][2].view(-1)[5].isnan()


def test_triton_op_checks_policy_lists(triton_interpreted):
    """The Triton op's checks of the policy lists: the C++ op's messages
    (csrc/ops_common.h check_policy_lists, CheckedLists' state dtype rule), from the
    checks fused_optim/_fake.py shares; then opcheck with policy lists."""
    launcher = triton_interpreted
    spec = fused_optim.Adam.spec
    step = fused_optim.backends.get_backend("triton").step
    p = torch.zeros(4, dtype=torch.bfloat16)
    g = torch.ones(4, dtype=torch.bfloat16)
    kw = dict(lr=torch.tensor(0.1), beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8,
              amsgrad=False, maximize=False, decoupled_weight_decay=False)
    states = [[torch.zeros(4)], [torch.zeros(4)], []]

    def call(states=states, **policy):
        launcher.clear_table_cache()  # the checks run when a table is built
        step(spec, [p], [g], *states, [torch.zeros(())], **kw, **policy)

    prefix = "fused_optim_triton::adam_: "
    for policy, message in (
            ({"master_params": [torch.zeros(4, dtype=torch.bfloat16)]},
             r"master_params\[0\] must be a dense float32"),
            ({"rng_states": [torch.zeros(3, dtype=torch.int64)]},
             r"rng_states\[0\] must be a contiguous int64"),
            ({"rng_states": [torch.zeros(4, dtype=torch.int64)[::2]]},
             r"rng_states\[0\] must be a contiguous int64"),
            ({"master_params": [torch.zeros(4), torch.zeros(4)]}, "expected 1 master_params"),
            ({"master_params": [torch.zeros(2, 2)]},
             r"master_params\[0\] must have the sizes and strides of params\[0\]")):
        with pytest.raises(RuntimeError, match=prefix + message):
            call(**policy)
    # fp32 states on bf16 params with a master copy: a policy the engines run.
    master = torch.zeros(4)
    call(master_params=[master])
    assert float(master[0]) != 0.0 and float(p[0]) == float(master[0].bfloat16())
    bad = [[torch.zeros(4, dtype=torch.float16)], [torch.zeros(4, dtype=torch.float16)], []]
    with pytest.raises(RuntimeError, match=prefix + "all tensors of one call must have one dtype"):
        call(bad, master_params=[master])
    mixed = [[torch.zeros(4)], [torch.zeros(4, dtype=torch.bfloat16)], []]
    with pytest.raises(RuntimeError, match=prefix + "the state lists of one call must have one"):
        call(mixed, master_params=[master])
    # fp32 states of bf16 params without master copy nor rng_states: torch.optim's
    # storage is bf16 states, and (bf16, fp32, no master, no rounding) is a policy.
    call([[torch.zeros(4)], [torch.zeros(4)], []])
    with pytest.raises(RuntimeError, match=prefix + "no memory policy for torch.float16"):
        launcher.clear_table_cache()
        step(spec, [torch.zeros(4, dtype=torch.float16)], [torch.ones(4, dtype=torch.float16)],
             [torch.zeros(4, dtype=torch.float16)], [torch.zeros(4, dtype=torch.float16)], [],
             [torch.zeros(())], **kw, rng_states=[torch.tensor([1, 0])])
    zeros = [torch.zeros(4, dtype=torch.bfloat16)]
    args = ([p], [g], zeros, [t.clone() for t in zeros], [], [torch.zeros(())],
            torch.tensor(0.1), None, None, 0.9, 0.99, 0.0, 1e-8, False, False, False,
            [torch.zeros(4)], [torch.tensor([7, 0])])
    op = torch.ops.fused_optim_triton.adam_.default
    result = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.skipif(TRITON_HERE or not _interpreted.HAVE_TRITON,
                    reason="the Triton tests run in this process under the interpreter")
def test_triton_policy_in_subprocess():
    """On a GPU machine: the Triton tests of this module in a fresh interpreter, with
    TRITON_INTERPRET=1 ([note: TRITON_INTERPRET ordering] in test_triton.py)."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-k", "triton", str(Path(__file__).resolve())], env=env,
                         cwd=str(root), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]
