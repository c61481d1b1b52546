"""fused_optim.Muon against torch.optim.Muon (its for-loop code, the oracle).

* parity over many steps: square, wide, tall (the transpose path) and odd shapes, a
  batch of equal shapes, every option (nesterov, weight_decay, each adjust_lr_fn, other
  Newton-Schulz coefficients and step counts, momentum 0), fp64 / fp32 / bf16 / fp16
  params, a tensor lr, non-contiguous params, several param groups;
* the batching itself: one bmm / two baddbmm per iteration for a batch of equal shapes,
  no per-param mm, and the same bits when a batch is cut into chunks;
* the contract: validation errors (type and message) identical to torch's, at
  construction and at the step; state_dict both ways with torch.optim.Muon; lr
  schedulers, closures, hooks, zero_grad, pickling, GradScaler; torch's optim_db configs
  and error inputs for Muon.

* the element-wise stages' op (torch.ops.fused_optim.muon_, with its bf16 work list):
  parity on every backend the CPU has (the C++ engine, the reference, and the Triton
  kernels under the interpreter where this process may run them: tests/_interpreted.py),
  one call per stage and batch, opcheck. (The Triton stages against the C++ op,
  element by element: tests/test_triton.py.)

Tolerance: none. On the CPU every param and buffer is bit-equal to torch's after every
step, in every dtype: the element-wise stages round as torch's ops round
(csrc/include/fused_optim/math/muon.h), and ATen's bf16 bmm gives each matrix of a
batch the bits its mm gives it alone.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch.optim import optimizer as torch_optimizer
from torch.utils._python_dispatch import TorchDispatchMode

import fused_optim
from fused_optim import _newton_schulz

# One intra-op thread (tests/conftest.py), as the other parity tests: a 2-core machine
# shared with other work thrashes with two. (Parity with two threads: the benchmark's
# max err column, bench/muon_bench.py.)
pytestmark = pytest.mark.usefixtures("oracle_threads")

# Shapes crossing SIMD and gemm-block boundaries: square, wide, tall, a column, a row.
SHAPES = [(16, 16), (24, 40), (40, 24), (33, 7), (7, 33), (1, 9), (9, 1)]
# A batch of equal shapes beside a few others, both orientations.
BATCH = [(32, 48)] * 5 + [(48, 32)] * 4 + [(17, 17)] * 3 + [(5, 11)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
STEPS = 12

OPTIONS = [
    {},
    {"nesterov": False},
    {"weight_decay": 0.0},
    {"adjust_lr_fn": "original"},
    {"adjust_lr_fn": "match_rms_adamw"},
    {"adjust_lr_fn": "match_rms_adamw", "nesterov": False, "weight_decay": 0.3},
    {"momentum": 0.0},
    {"momentum": 0.8, "ns_steps": 3},
    {"ns_coefficients": (3.4, -4.7, 2.0), "ns_steps": 7},
    {"eps": 1e-3},
]
# lr large enough that each step moves bf16 params by many ulps.
LR = 0.02


def _options_id(options):
    return "-".join(f"{k}={v}" for k, v in options.items()) or "default"


def _make(shapes, dtype, *, layout="contiguous"):
    params = []
    for shape in shapes:
        if layout == "transposed":  # a non-contiguous param: a transposed matrix
            p = torch.randn(shape[::-1], dtype=dtype).t()
        else:
            p = torch.randn(shape, dtype=dtype)
        params.append(p)
    return params


def _copies(params):
    return ([p.detach().clone(memory_format=torch.preserve_format).requires_grad_()
             for p in params],
            [p.detach().clone(memory_format=torch.preserve_format).requires_grad_()
             for p in params])


def _set_grads(pairs, dtype):
    for ref, ours in pairs:
        g = torch.randn(ref.shape, dtype=dtype)
        ref.grad = g.clone()
        ours.grad = g.clone()


def _assert_same(ref_opt, opt, ref_params, params, where):
    for i, (r, p) in enumerate(zip(ref_params, params)):
        assert torch.equal(r, p), (
            f"{where}: param {i} {tuple(p.shape)} differs by "
            f"{(r.double() - p.double()).abs().max().item():.3g}")
        rs, s = ref_opt.state.get(r, {}), opt.state.get(p, {})
        assert rs.keys() == s.keys(), where
        for key in rs:
            assert torch.equal(rs[key], s[key]), f"{where}: {key} of param {i} differs"
            assert rs[key].dtype == s[key].dtype and rs[key].stride() == s[key].stride()


def _run(shapes, dtype, options, *, steps=STEPS, layout="contiguous", lr=LR):
    ref_params, params = _copies(_make(shapes, dtype, layout=layout))
    ref_opt = torch.optim.Muon(ref_params, lr=lr, **options)
    opt = fused_optim.Muon(params, lr=lr, **options)
    for step in range(steps):
        _set_grads(zip(ref_params, params), dtype)
        ref_opt.step()
        opt.step()
        _assert_same(ref_opt, opt, ref_params, params, f"step {step + 1}")
    return ref_opt, opt


# -- parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("options", OPTIONS, ids=_options_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_shapes(dtype, options):
    _run(SHAPES, dtype, options)


@pytest.mark.parametrize("options", OPTIONS, ids=_options_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_batch_of_equal_shapes(dtype, options):
    """Batches of equal shapes (wide, tall, square at the least batched side) beside a
    matrix run alone."""
    _run(BATCH, dtype, options, steps=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_non_contiguous_params(dtype):
    _run(BATCH[:6] + SHAPES[:3], dtype, {"nesterov": False}, layout="transposed", steps=5)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_parity_tensor_lr(dtype, lr_dtype):
    """A tensor lr: torch keeps it a tensor, so 1 - lr * weight_decay and the adjusted lr
    round in lr's dtype; a [1]-shaped lr is squeezed, as torch does."""
    _run(SHAPES[:4], dtype, {}, lr=torch.tensor([0.03], dtype=lr_dtype), steps=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_two_threads(dtype):
    """The batched products with two intra-op threads (ATen and oneDNN split the work
    otherwise)."""
    torch.set_num_threads(2)  # restored by tests/conftest.py
    _run(BATCH, dtype, {}, steps=4)


def test_parity_large_batch():
    """The shapes of the benchmark, fewer of them: 1024 x 1024 runs the gemm's large-block
    path."""
    _run([(1024, 1024)] * 2 + [(256, 1024)], torch.float32, {}, steps=2)


def test_param_groups_and_params_without_grads():
    """Groups with their own options; params without grads are skipped (no state), as
    torch skips them; equal shapes in two groups are two batches (two group options)."""
    def groups(ps):
        return [{"params": ps[:4]},
                {"params": ps[4:8], "lr": 0.05, "nesterov": False, "adjust_lr_fn": "match_rms_adamw"},
                {"params": ps[8:], "weight_decay": 0.0, "momentum": 0.5}]

    ref_params, params = _copies(_make(BATCH, torch.float32))
    ref_opt = torch.optim.Muon(groups(ref_params), lr=LR)
    opt = fused_optim.Muon(groups(params), lr=LR)
    for step in range(5):
        _set_grads(zip(ref_params, params), torch.float32)
        for r, p in zip(ref_params[::3], params[::3]):
            r.grad = p.grad = None
        ref_opt.step()
        opt.step()
        _assert_same(ref_opt, opt, ref_params, params, f"step {step + 1}")
    assert params[0] not in opt.state


def test_mixed_dtypes_in_one_group():
    ref_params, params = _copies([torch.randn(24, 40, dtype=d) for d in DTYPES] * 2)
    ref_opt, opt = torch.optim.Muon(ref_params, lr=LR), fused_optim.Muon(params, lr=LR)
    for step in range(4):
        for r, p in zip(ref_params, params):
            r.grad = torch.randn_like(r)
            p.grad = r.grad.clone()
        ref_opt.step()
        opt.step()
        _assert_same(ref_opt, opt, ref_params, params, f"step {step + 1}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_parity_cuda(dtype):
    """On a GPU the batches are cuBLAS's batched bf16 gemm, whose bits need not be its
    single gemm's (unverified: no GPU on the dev machine). Tolerance: 2^-6 lr' per step
    on each param element (a couple of bf16 ulps of an update whose entries are under
    1), for fp64 / fp32 / bf16 params alike; the test prints whether it was exact."""
    ref_params = [torch.randn(s, dtype=dtype, device="cuda") for s in BATCH + SHAPES]
    params = [p.clone().requires_grad_() for p in ref_params]
    ref_params = [p.requires_grad_() for p in ref_params]
    ref_opt = torch.optim.Muon(ref_params, lr=LR, adjust_lr_fn="match_rms_adamw")
    opt = fused_optim.Muon(params, lr=LR, adjust_lr_fn="match_rms_adamw")
    exact = True
    for step in range(1, 9):
        for r, p in zip(ref_params, params):
            r.grad = torch.randn_like(r)
            p.grad = r.grad.clone()
        ref_opt.step()
        opt.step()
        for r, p in zip(ref_params, params):
            exact &= torch.equal(r, p)
            atol = step * 2.0 ** -6 * LR * 0.2 * max(r.shape)
            if dtype == torch.bfloat16:
                atol += step * 2.0 ** -8 * r.detach().abs().max().item()  # storage rounding
            torch.testing.assert_close(p, r, rtol=0, atol=atol)
    print(f"cuda {dtype}: {'bit-equal' if exact else 'within tolerance'} to torch")


# -- the batching --------------------------------------------------------------------------


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_one_batched_product_per_iteration():
    """24 equal shapes (and 3 of another): each Newton-Schulz iteration is one bmm and two
    baddbmm per shape, never a per-param mm / addmm; the element-wise stages are one
    call of the stages' op each per shape (momentum, apply), no per-param op."""
    params = [torch.randn(64, 32, requires_grad=True) for _ in range(24)]
    params += [torch.randn(32, 64, requires_grad=True) for _ in range(3)]
    opt = fused_optim.Muon(params, ns_steps=5)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # creates the buffers
    with _CountOps() as counted:
        opt.step()
    c = counted.counts
    assert c.get("bmm") == 2 * 5 and c.get("baddbmm") == 2 * 2 * 5, c
    assert "mm" not in c and "addmm" not in c, c
    if fused_optim.muon._stage_backend(torch.device("cpu"), torch.float32).name == "cpu":
        assert c.get("muon_") == 2 * 2, c
        assert not any(k.startswith("_foreach") or k in ("lerp_", "lerp", "mul_", "add_")
                       for k in c), c


def test_chunked_batches_give_the_same_bits(monkeypatch):
    """A batch larger than MAX_BATCH_ELEMENTS runs in chunks, with the same numbers."""
    monkeypatch.setattr(_newton_schulz, "MAX_BATCH_ELEMENTS", 3 * 32 * 48)
    assert _newton_schulz.chunks(5, 32 * 48) == [(0, 3), (3, 5)]
    assert _newton_schulz.chunks(2, 10**9) == [(0, 1), (1, 2)]
    # the CPU's cap applies on the CPU only
    monkeypatch.setattr(_newton_schulz, "MAX_CPU_BATCH_ELEMENTS", 2 * 32 * 48)
    assert _newton_schulz.chunks(5, 32 * 48, torch.device("cpu")) == [(0, 2), (2, 4), (4, 5)]
    assert _newton_schulz.chunks(5, 32 * 48, torch.device("meta")) == [(0, 3), (3, 5)]
    _run(BATCH, torch.float32, {}, steps=3)


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_sides_from_the_threshold(threads):
    """Matrices at and just above the least batched side, many random draws, 7
    iterations: each batched result is torch's per-matrix result to the bit (below it,
    ATen's bf16 kernels differ between bmm and mm: _newton_schulz.batch_is_exact)."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.set_num_threads(threads)  # restored by tests/conftest.py
    side = _newton_schulz.MIN_BATCHED_SIDE
    coefficients = (3.4445, -4.7750, 2.0315)
    for shape in [(side, side), (side, 3 * side), (3 * side, side), (side + 3, side + 7)]:
        assert _newton_schulz.batch_is_exact(torch.device("cpu"), *shape)
        for _ in range(20):
            g = torch.randn(4, *shape)
            out = _newton_schulz.newton_schulz_(g.bfloat16(), coefficients, 7, 1e-7)
            for i in range(4):
                assert torch.equal(out[i], _zeropower_via_newtonschulz(g[i], coefficients, 7, 1e-7)), shape
    assert not _newton_schulz.batch_is_exact(torch.device("cpu"), side - 1, 100)


def test_newton_schulz_matches_torchs_per_matrix():
    """The engine alone against torch's iteration, matrix by matrix, in bits."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    coefficients = (3.4445, -4.7750, 2.0315)
    for shape in [(3, 40, 24), (3, 24, 40), (2, 64, 64)]:
        g = torch.randn(shape)
        out = _newton_schulz.newton_schulz_(g.bfloat16(), coefficients, 5, 1e-7)
        for i in range(shape[0]):
            assert torch.equal(out[i], _zeropower_via_newtonschulz(g[i], coefficients, 5, 1e-7))
    zero = _newton_schulz.newton_schulz_(torch.zeros(2, 4, 6, dtype=torch.bfloat16),
                                         coefficients, 5, 1e-7)
    assert torch.equal(zero, torch.zeros(2, 4, 6, dtype=torch.bfloat16))


# -- errors --------------------------------------------------------------------------------


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return None


CONSTRUCTION_ERRORS = [
    {"lr": -1.0},
    {"lr": torch.tensor([0.1, 0.2])},
    {"lr": torch.tensor(-0.5)},
    {"momentum": -0.1},
    {"weight_decay": -1e-3},
    {"adjust_lr_fn": "arbitrary"},
    {"adjust_lr_fn": "original", "momentum": -1},
]


@pytest.mark.parametrize("kwargs", CONSTRUCTION_ERRORS, ids=_options_id)
def test_construction_errors_match_torch(kwargs):
    p = torch.randn(4, 5, requires_grad=True)
    expected = _error(lambda: torch.optim.Muon([p], **kwargs))
    assert expected is not None
    assert _error(lambda: fused_optim.Muon([p], **kwargs)) == expected


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4), ()], ids=str)
def test_non_2d_params_rejected_like_torch(shape):
    params = [torch.randn(4, 5, requires_grad=True), torch.randn(shape, requires_grad=True)]
    expected = _error(lambda: torch.optim.Muon(params))
    assert expected is not None and expected[0] is ValueError
    assert _error(lambda: fused_optim.Muon(params)) == expected
    assert _error(lambda: fused_optim.Muon(params[:1], nesterov=False).add_param_group(
        {"params": params[1:]})) is None  # as torch: add_param_group does not check


def _ones_grad(t):
    t = t.requires_grad_()
    t.grad = torch.ones_like(t)
    return t


def _sparse_grad(t):
    t = t.requires_grad_()
    t.grad = torch.randn(t.shape).to_sparse()
    return t


# name -> (the groups' params, made fresh; options): the first group's params are the
# constructor's (2-D, as it requires), the others are added with add_param_group.
STEP_ERRORS = {
    "complex": (lambda: [[_ones_grad(torch.randn(4, 5, dtype=torch.complex64))]], {}),
    "sparse-grad": (lambda: [[_sparse_grad(torch.randn(4, 5))]], {}),
    "1d-param-added-later": (
        lambda: [[_ones_grad(torch.randn(4, 5))], [_ones_grad(torch.randn(6))]], {}),
    "1d-grad-first-then-bad-ns-steps": (
        lambda: [[torch.randn(3, 3, requires_grad=True)],
                 [_ones_grad(torch.randn(6)), _ones_grad(torch.randn(4, 5))]], {"ns_steps": 120}),
    "2d-grad-first-then-1d-and-bad-ns-steps": (
        lambda: [[torch.randn(3, 3, requires_grad=True)],
                 [_ones_grad(torch.randn(4, 5)), _ones_grad(torch.randn(6))]], {"ns_steps": 120}),
    "ns-steps-100": (lambda: [[_ones_grad(torch.randn(4, 5))]], {"ns_steps": 100}),
    "two-coefficients": (lambda: [[_ones_grad(torch.randn(4, 5))]],
                         {"ns_coefficients": (3.0, -4.0)}),
}


def _step_error(cls, make, kwargs):
    first, *others = make()
    opt = cls(first, **kwargs)
    for params in others:
        opt.add_param_group({"params": params})
    return _error(opt.step)


@pytest.mark.parametrize("case", STEP_ERRORS)
def test_step_errors_match_torch(case):
    """The step's errors: torch's type and message (checked before anything changes:
    torch has stepped the group's earlier params by then, ours none)."""
    make, kwargs = STEP_ERRORS[case]
    expected = _step_error(torch.optim.Muon, make, kwargs)
    assert expected is not None
    assert _step_error(fused_optim.Muon, make, kwargs) == expected


# -- contract ------------------------------------------------------------------------------


def _trained(cls, params, steps, **kwargs):
    opt = cls(params, lr=LR, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt


@pytest.mark.parametrize("direction", ["torch->fused", "fused->torch"])
def test_state_dict_both_ways(direction):
    """Train 3 steps with one class, load its state_dict into the other, train 3 more:
    the same bits as torch's optimizer trained 6 steps."""
    src_cls, dst_cls = ((torch.optim.Muon, fused_optim.Muon) if direction == "torch->fused"
                        else (fused_optim.Muon, torch.optim.Muon))
    shapes = BATCH[:3] + SHAPES[:3]
    ref_params, params = _copies(_make(shapes, torch.float32))
    torch.manual_seed(1)
    ref = _trained(torch.optim.Muon, ref_params, 3, nesterov=False, adjust_lr_fn="match_rms_adamw")
    torch.manual_seed(1)
    src = _trained(src_cls, params, 3, nesterov=False, adjust_lr_fn="match_rms_adamw")
    saved = copy.deepcopy(src.state_dict())
    assert saved["param_groups"] == ref.state_dict()["param_groups"]
    assert sorted(saved["state"][0]) == ["momentum_buffer"]
    dst = dst_cls(params, lr=1.0)  # overwritten by the load
    dst.load_state_dict(saved)
    for opt in (ref, dst):
        torch.manual_seed(2)
        for _ in range(3):
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.randn_like(p)
            opt.step()
    _assert_same(ref, dst, ref_params, params, direction)


def test_state_dict_format_matches_torch():
    ref_params, params = _copies(_make(SHAPES[:3], torch.float32))
    ref = _trained(torch.optim.Muon, ref_params, 1)
    ours = _trained(fused_optim.Muon, params, 1)
    a, b = ref.state_dict(), ours.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys() == {"momentum_buffer"}


def test_pickle_and_deepcopy():
    params = _make(SHAPES[:3], torch.float32)
    for p in params:
        p.requires_grad_()
    opt = _trained(fused_optim.Muon, params, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert type(clone) is fused_optim.Muon
        clone.step()  # grads travel with the params


@pytest.mark.parametrize("scheduler", ["StepLR", "CosineAnnealingLR", "OneCycleLR"])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lr_scheduler(scheduler, tensor_lr):
    make = {
        "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
        "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=0.05, total_steps=10, cycle_momentum=False),
    }[scheduler]
    lr = torch.tensor(LR) if tensor_lr else LR
    ref_params, params = _copies(_make(SHAPES[:4], torch.float32))
    ref_opt = torch.optim.Muon(ref_params, lr=lr.clone() if tensor_lr else lr)
    opt = fused_optim.Muon(params, lr=lr.clone() if tensor_lr else lr)
    ref_sched, sched = make(ref_opt), make(opt)
    for step in range(6):
        _set_grads(zip(ref_params, params), torch.float32)
        ref_opt.step()
        opt.step()
        ref_sched.step()
        sched.step()
        _assert_same(ref_opt, opt, ref_params, params, f"step {step + 1}")
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


def test_closure():
    torch.manual_seed(3)
    data = torch.randn(8, 12)
    ref_model = torch.nn.Sequential(torch.nn.Linear(12, 16, bias=False),
                                    torch.nn.Linear(16, 4, bias=False))
    model = copy.deepcopy(ref_model)
    results = []
    for m, cls in ((ref_model, torch.optim.Muon), (model, fused_optim.Muon)):
        opt = cls(m.parameters(), lr=LR)
        calls = []

        def closure(m=m, opt=opt, calls=calls):
            opt.zero_grad()
            loss = m(data).square().mean()
            loss.backward()
            calls.append(torch.is_grad_enabled())
            return loss

        losses = [opt.step(closure).item() for _ in range(4)]
        results.append((losses, calls, [p.detach().clone() for p in m.parameters()]))
    (ref_losses, ref_calls, ref_ps), (losses, calls, ps) = results
    assert losses == ref_losses and calls == ref_calls == [True] * 4
    assert all(torch.equal(a, b) for a, b in zip(ref_ps, ps))
    assert fused_optim.Muon(model.parameters()).step() is None


def test_hooks_and_zero_grad():
    params = [torch.randn(6, 4, requires_grad=True), torch.randn(4, 6, requires_grad=True)]
    opt = fused_optim.Muon(params)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd-pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    handle = torch_optimizer.register_optimizer_step_post_hook(
        lambda o, args, kwargs: seen.append("global-post"))
    try:
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    finally:
        handle.remove()
    opt.load_state_dict(opt.state_dict())
    assert seen == ["pre", "post", "global-post", "sd-pre", "load-post"]
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)


def test_grad_scaler_cpu():
    """torch.amp.GradScaler unscales the grads and skips a step with an inf, for Muon as
    for torch's (neither takes grad_scale / found_inf itself)."""
    assert not getattr(fused_optim.Muon([torch.randn(2, 2, requires_grad=True)]),
                       "_step_supports_amp_scaling", False)
    results = []
    for cls in (torch.optim.Muon, fused_optim.Muon):
        torch.manual_seed(4)
        params = [torch.randn(8, 6, requires_grad=True), torch.randn(6, 8, requires_grad=True)]
        opt = cls(params, lr=LR)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        for step in range(4):
            loss = sum((p * torch.randn_like(p)).sum() for p in params)
            if step == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_defaults_and_signature_match_torch():
    import inspect

    ours = inspect.signature(fused_optim.Muon.__init__).parameters
    theirs = inspect.signature(torch.optim.Muon.__init__).parameters
    assert list(ours) == list(theirs)
    assert all(ours[k].default == theirs[k].default for k in theirs)
    p = torch.randn(3, 3, requires_grad=True)
    assert fused_optim.Muon([p]).defaults == torch.optim.Muon([p]).defaults


# -- torch's optim_db ----------------------------------------------------------------------

# torch's optim_db inputs for Muon (torch/testing/_internal/common_optimizers.py,
# optim_inputs_func_muon), written out: importing optim_db needs expecttest, which this
# environment lacks; test_optim_db_configs_are_torchs compares them where it imports.
OPTIM_DB_CONFIGS = [
    ("default", {}),
    ("non-default lr", {"lr": 0.01}),
    ("Tensor lr", {"lr": torch.tensor(0.001)}),
    ("non-default weight_decay", {"weight_decay": 0.2}),
    ("non-default momentum", {"momentum": 0.8}),
    ("passing alternative ns_steps", {"ns_steps": 6}),
    ("passing alternative ns_coefficients", {"ns_coefficients": (3.4, -4.7, 2.0)}),
]


def _optim_db_muon():
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_optimizers import optim_db

    return next(info for info in optim_db if info.optim_cls is torch.optim.Muon)


def test_optim_db_configs_are_torchs():
    info = _optim_db_muon()
    theirs = [(c.desc, c.kwargs) for c in info.optim_inputs_func("cpu", torch.float32)]
    assert [d for d, _ in theirs] == [d for d, _ in OPTIM_DB_CONFIGS]
    for (_, a), (_, b) in zip(theirs, OPTIM_DB_CONFIGS):
        assert a.keys() == b.keys() and all(
            torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
            for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", OPTIM_DB_CONFIGS, ids=lambda c: c[0].replace(" ", "-"))
def test_optim_db_configs(config, dtype):
    """torch's optim_db inputs for Muon, each stepped 6 times on a few weights of both
    orientations (one of them a batch of two)."""
    desc, kwargs = config
    ref_params, params = _copies(_make([(20, 18), (18, 20), (20, 18), (5, 5)], dtype))
    ref_opt = torch.optim.Muon(ref_params, **copy.deepcopy(kwargs))
    opt = fused_optim.Muon(params, **copy.deepcopy(kwargs))
    for step in range(6):
        _set_grads(zip(ref_params, params), dtype)
        ref_opt.step()
        opt.step()
        _assert_same(ref_opt, opt, ref_params, params, f"{desc} step {step + 1}")


def _error_inputs():
    """torch's optim_db error inputs for Muon (optim_error_inputs_func_muon, the
    Muon-specific ones, and the one for every optimizer on a CPU), written out as
    (desc, params, kwargs, at the step)."""
    def with_grad(t):
        t.grad = torch.rand_like(t)
        return t

    return [
        ("invalid param type", lambda: torch.nn.Parameter(torch.randn(1, 1)), {}, False),
        ("only support 2D parameters", lambda: [with_grad(torch.rand(2, 3, 4))], {}, False),
        ("only support `original` and `match_rms_adamw`", lambda: [with_grad(torch.rand(2, 3))],
         {"adjust_lr_fn": "arbitrary"}, False),
        ("does not support complex parameters",
         lambda: [with_grad(torch.rand(2, 3, dtype=torch.complex64))], {}, True),
    ]


@pytest.mark.parametrize("case", _error_inputs(), ids=lambda c: c[0].replace(" ", "-"))
def test_optim_db_error_inputs(case):
    """The same error type and message from ours as from torch, at construction or at
    the step, as the input says."""
    desc, make, kwargs, at_step = case

    def attempt(cls):
        opt = cls(make(), **kwargs)
        if at_step:
            opt.step()
        else:
            raise AssertionError(f"{desc}: constructed")

    expected = _error(lambda: attempt(torch.optim.Muon))
    assert expected is not None and expected[0] is not AssertionError, desc
    assert _error(lambda: attempt(fused_optim.Muon)) == expected, desc


# -- the element-wise stages' op -------------------------------------------------------------


def _stage_backends():
    import _interpreted

    from fused_optim.backends import get_backend

    names = ["reference"]
    if get_backend("cpu").unavailable(torch.device("cpu"), torch.float32) is None:
        names.insert(0, "cpu")
    if _interpreted.load():
        names.append("triton")
    return names


def _use_backend(monkeypatch, backend):
    """FUSED_OPTIM_BACKEND=backend; for "triton", TRITON_INTERPRET=1 too (its
    availability check reads it: the kernels run interpreted on the CPU)."""
    monkeypatch.setenv("FUSED_OPTIM_BACKEND", backend)
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("backend", _stage_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [{}, {"nesterov": False, "adjust_lr_fn": "match_rms_adamw"}],
                         ids=_options_id)
def test_stages_parity_per_backend(backend, dtype, options, monkeypatch):
    """The stages on each backend the CPU has, bit-equal to torch: a batch of wide, tall
    (a transposed update) and odd shapes (sizes crossing SIMD widths)."""
    _use_backend(monkeypatch, backend)
    _run(BATCH[:7] + [(33, 7), (7, 33)], dtype, options, steps=3)


@pytest.mark.parametrize("backend", _stage_backends())
def test_stages_one_call_per_batch(backend, monkeypatch):
    """Each stage is ONE call per batch on every backend (the chosen one: the C++ engine
    where built); a transposed param's rows go to the reference (torch ops on strides)."""
    import fused_optim.muon as muon

    _use_backend(monkeypatch, backend)
    calls = []
    real = muon._stage_backend

    def spy(device, dtype):
        chosen = real(device, dtype)

        class Spy:
            name = chosen.name

            @staticmethod
            def step(spec, *lists, **kw):
                calls.append((chosen.name, len(lists[0]), kw["apply"]))
                chosen.step(spec, *lists, **kw)
        return Spy

    monkeypatch.setattr(muon, "_stage_backend", spy)
    params = [torch.randn(24, 40, requires_grad=True) for _ in range(4)]
    params += [torch.randn(40, 24, requires_grad=True) for _ in range(3)]
    opt = fused_optim.Muon(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert calls == [(backend, 4, False), (backend, 4, True), (backend, 3, False),
                     (backend, 3, True)]


def test_stages_named_backend_without_work_lists_raises(monkeypatch):
    """A backend without bf16 work lists (Backend.work_lists: a registered one; every
    built-in backend has them) named by FUSED_OPTIM_BACKEND raises before anything
    changes, as a named backend that cannot run a bucket does; under "auto" the next
    backend of AUTO_ORDER that has them runs the stages, with torch's bits, and says so
    once."""
    from fused_optim import backends

    cpu = backends.get_backend("cpu" if "cpu" in _stage_backends() else "reference")
    monkeypatch.setitem(backends._REGISTRY, "nowork",
                        backends.Backend("nowork", lambda device, dtype: None, cpu.step))
    monkeypatch.setenv("FUSED_OPTIM_BACKEND", "nowork")
    params = [torch.randn(9, 13, requires_grad=True) for _ in range(2)]
    before = [p.detach().clone() for p in params]
    opt = fused_optim.Muon(params)
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="'nowork' was requested but cannot run Muon's "
                                         "element-wise stages"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(not s["momentum_buffer"].any() for s in opt.state.values())  # as created

    monkeypatch.delenv("FUSED_OPTIM_BACKEND")
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ["nowork", *backends.AUTO_ORDER["cpu"]])
    backends._SELECTED.clear()
    with pytest.warns(UserWarning, match=f"'nowork' has no bf16 work lists yet; backend "
                                         f"'{cpu.name}' runs Muon's element-wise stages"):
        _run(SHAPES[:3], torch.float32, {}, steps=2)


def test_stages_choose_triton_without_a_warning(monkeypatch):
    """The Triton kernels have work lists: named (FUSED_OPTIM_BACKEND=triton) or first
    in AUTO_ORDER (as on a GPU without the CUDA engine), they run the stages, with no
    fallback warning, and the stages then change nothing on another backend's account
    (torch's bits: test_stages_parity_per_backend)."""
    import _interpreted

    if not _interpreted.load():
        pytest.skip("the Triton kernels do not run interpreted in this process")
    from fused_optim import backends
    from fused_optim.muon import _stage_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setenv("FUSED_OPTIM_BACKEND", "triton")
        assert _stage_backend(cpu, torch.float32).name == "triton"
        monkeypatch.delenv("FUSED_OPTIM_BACKEND")
        monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ["triton", *backends.AUTO_ORDER["cpu"]])
        backends._SELECTED.clear()
        assert _stage_backend(cpu, torch.float16).name == "triton"
        _run(SHAPES[:3], torch.float16, {}, steps=2)


def _stage_args(dtype, apply, transposed=False, n=3, shape=(9, 13)):
    params = [torch.randn(shape, dtype=dtype) for _ in range(n)]
    grads = [torch.randn(shape, dtype=dtype) for _ in range(n)]
    bufs = [torch.randn(shape, dtype=dtype) for _ in range(n)]
    updates = [torch.randn(shape).bfloat16() for _ in range(n)]
    kwargs = {"lr": torch.tensor(0.02, dtype=torch.float64), "momentum": 0.9,
              "weight_decay": 0.1, "lr_ratio": 1.5, "nesterov": True, "apply": apply,
              "transposed_update": transposed}
    return (params, grads, bufs, updates), kwargs


@pytest.mark.skipif(not hasattr(torch.ops.fused_optim, "muon_"), reason="no compiled muon_ op")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stage", ["momentum", "apply", "apply-transposed"])
def test_stages_opcheck(stage, dtype):
    args, kwargs = _stage_args(dtype, stage != "momentum", stage == "apply-transposed")
    torch.library.opcheck(torch.ops.fused_optim.muon_.default, args, kwargs)


@pytest.mark.skipif(not hasattr(torch.ops.fused_optim, "muon_"), reason="no compiled muon_ op")
def test_stages_op_checks_the_work_list_dtype():
    """The updates list is bf16 whatever the params' dtype: the op and its fake kernel
    refuse another dtype with the same message."""
    (params, grads, bufs, updates), kwargs = _stage_args(torch.float32, False)
    updates = [u.float() for u in updates]
    message = "updates\\[0\\] must be bfloat16"
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fused_optim.muon_(params, grads, bufs, updates, **kwargs)
    with pytest.raises(RuntimeError, match=message), torch._subclasses.FakeTensorMode() as mode:
        fake = [[mode.from_tensor(t) for t in lst] for lst in (params, grads, bufs, updates)]
        torch.ops.fused_optim.muon_(*fake, **{**kwargs, "lr": mode.from_tensor(kwargs["lr"])})
