"""The Triton backend on the CPU, under the Triton interpreter.

[note: TRITON_INTERPRET ordering]
@triton.jit decides at decoration time whether a kernel is compiled or interpreted, so
TRITON_INTERPRET=1 must be set before fused_optim.triton_kernels is first imported, and
one process holds one flavour. On a machine without a GPU (CI) this module sets the
variable at import (pytest imports every test module before running any), imports the
kernels, then puts the variable back as it was, so the other test modules do not start
seeing an interpreted "triton" backend on the CPU; an autouse fixture sets it again
around each test here (the backend's availability check reads it). Nothing else in the
package imports the kernels eagerly (fused_optim._triton_backend loads them on first
use), so they are normally first imported here. The module instead runs itself in a
fresh interpreter (test_in_subprocess, TRITON_INTERPRET=1 in its environment) when
  * a GPU is present: interpreted kernels in this process would make the "triton"
    backend unavailable on CUDA for every other test of the session, or
  * something imported the kernels earlier in this process without the variable.
Running pytest with TRITON_INTERPRET=1 already set keeps everything in one process.

What is compared, per step:
  * bit-exact against `_exact_adam` / `_exact_sgd` below, the operation sequence of the
    C++ math (csrc/include/fused_optim/math/) spelled out with one torch op per
    operation: every op rounds once, as in the kernels, so no tolerance applies;
  * against torch.optim (foreach=False) with the tolerances of tests/_tables.py
    (TOLERANCES, ulps per step; fp16/bf16 against an fp64 torch run).
Sizes straddle the test launch configuration (BLOCK=32 elements per iteration,
CHUNK=64 per program): 1, 3, BLOCK+1, CHUNK+1, 2*CHUNK+1, an empty and a 2-D tensor; one
test uses the production configuration (BLOCK+1, CHUNK+1 of 1024 / 16384).
The interpreter costs ~1.5 ms per @triton.jit call and ~10-30 ms per program: tensors
stay small.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
HAVE_TRITON = importlib.util.find_spec("triton") is not None
ROOT = Path(__file__).resolve().parent.parent
# In this process: on a machine without a GPU, or when the caller asked for interpreted
# kernels everywhere (see [note: TRITON_INTERPRET ordering]).
_IN_PROCESS = HAVE_TRITON and (_PREVIOUS_INTERPRET == "1" or not torch.cuda.is_available())
if _IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"

import fused_optim  # noqa: E402
from _oracle import assert_row_close, check_parity, row_scale  # noqa: E402
from _tables import DEFAULT_CASES, STEPS, case_ids, tolerance  # noqa: E402
from fused_optim import _triton_backend, backends  # noqa: E402

_INTERPRETED = False
if _IN_PROCESS:
    _triton_backend.load_kernels()
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402
    from fused_optim.triton_kernels import launcher  # noqa: E402
    from fused_optim.triton_kernels.math import to_storage  # noqa: E402

    _INTERPRETED = bool(_triton_backend._kernels_interpreted())

    @triton.jit
    def _store_bf16_kernel(x_ptr, out_ptr, N: tl.constexpr):
        """Stores fp32 values as bf16 through the kernels' rounding (the bf16 test)."""
        offs = tl.arange(0, N)
        tl.store(out_ptr + offs, to_storage(tl.load(x_ptr + offs), tl.bfloat16))

    if _PREVIOUS_INTERPRET is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

_RUN_HERE = _IN_PROCESS and _INTERPRETED
needs_interpreter = pytest.mark.skipif(
    not _RUN_HERE,
    reason="triton is not installed" if not HAVE_TRITON else
    "runs in a fresh interpreter instead (test_in_subprocess; see "
    "[note: TRITON_INTERPRET ordering])",
)

TEST_CONFIG = launcher.LaunchConfig(block=32, chunk=64) if _RUN_HERE else None
BLOCK, CHUNK = 32, 64
# 8 tensors for the option matrix, 20 for the many-tensor runs (25 programs per launch).
SHAPES = [(1,), (3,), (BLOCK + 1,), (CHUNK + 1,), (2 * CHUNK + 1,), (0,), (5, 7), (BLOCK,)]
MANY_SHAPES = SHAPES + [(2,), (31,), (CHUNK,), (7,), (96,), (40,), (1,), (17,), (63,),
                        (100,), (9,), (50,)]
TEST_STEPS = 3
LR = 1e-2


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """TRITON_INTERPRET=1 and the small launch configuration around every test here."""
    if not _RUN_HERE:
        yield
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(launcher, "CONFIG", TEST_CONFIG)
    launcher.clear_table_cache()
    yield


# ---------------------------------------------------------------------------------------
# The exact oracle: csrc/include/fused_optim/math/{adam,sgd,stages}.h, one op at a time.


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _round(x: float, opmath: torch.dtype) -> torch.Tensor:
    """A double rounded once to opmath, as static_cast<opmath_t>(double)."""
    return torch.tensor(x, dtype=torch.float64).to(opmath)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """IEEE square root. torch.sqrt is not correctly rounded in every build: in torch
    2.13.0+cpu on an AVX2 machine, ~20% of random fp32 inputs (1.4% in fp64) come out
    1 ulp off numpy's (and the kernels') sqrt."""
    return torch.from_numpy(np.sqrt(x.contiguous().numpy()))


def _lerp(start, end, w):
    """stages.h lerp: base + coefficient * (end - start)."""
    from_start = bool(w < 0.5)
    coefficient = w if from_start else w - 1
    return (start if from_start else end) + coefficient * (end - start)


def _exact_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr,
                beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
                grad_scale=None, found_inf=None):
    if found_inf is not None and found_inf.item() != 0:
        return
    lr = lr.item()
    for i, param in enumerate(params):
        om = _opmath(param.dtype)
        step = (state_steps[i] + 1).item()  # rounded in the counter's dtype
        state_steps[i].fill_(step)
        s = {
            "beta2": _round(beta2, om),
            "omb1": _round(1.0 - beta1, om),
            "omb2": _round(1.0 - beta2, om),
            "wd": _round(weight_decay, om),
            "decay": _round(1.0 - lr * weight_decay, om),
            "neg_step": _round(-(lr / (1.0 - beta1 ** step)), om),
            "inv_bc2_sqrt": _round(1.0 / math.sqrt(1.0 - beta2 ** step), om),
            "eps": _round(eps, om),
        }
        p, g = param.to(om), grads[i].to(om)
        m, v = exp_avgs[i].to(om), exp_avg_sqs[i].to(om)
        if grad_scale is not None:
            g = g / grad_scale.to(om).expand_as(g)  # expanded: no reciprocal shortcut
            grads[i].copy_(g)
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p * s["decay"]
            else:
                g = g + s["wd"] * p
        m = _lerp(m, g, s["omb1"])
        v = v * s["beta2"] + s["omb2"] * (g * g)
        second = v
        if amsgrad:
            vmax = max_exp_avg_sqs[i].to(om)
            vmax = torch.where(vmax.isnan(), vmax,
                               torch.where(v.isnan(), v, torch.where(vmax > v, vmax, v)))
            max_exp_avg_sqs[i].copy_(vmax)
            second = vmax
        denom = _sqrt(second) * s["inv_bc2_sqrt"] + s["eps"]
        p = p + s["neg_step"] * (m / denom)
        param.copy_(p)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)


def _exact_sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay,
               nesterov, maximize, is_first_step, grad_scale=None, found_inf=None):
    if found_inf is not None and found_inf.item() != 0:
        return
    lr = lr.item()
    for i, param in enumerate(params):
        om = _opmath(param.dtype)
        p, g = param.to(om), grads[i].to(om)
        if grad_scale is not None:
            g = g / grad_scale.to(om).expand_as(g)
            grads[i].copy_(g)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + _round(weight_decay, om) * p
        if momentum != 0:
            mom = _round(momentum, om)
            if is_first_step:
                b = g
            else:
                b = momentum_buffers[i].to(om) * mom + _round(1.0 - dampening, om) * g
            momentum_buffers[i].copy_(b)
            g = g + mom * b if nesterov else b
        param.copy_(p + _round(-lr, om) * g)


# ---------------------------------------------------------------------------------------
# The runner: the Triton backend, the exact oracle and torch.optim on the same data.

ADAM_OPTIONS = [
    dict(),
    dict(amsgrad=True),
    dict(maximize=True),
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, decoupled_weight_decay=True),
    dict(betas=(0.8, 0.99), eps=1e-6),
    dict(betas=(0.3, 0.95)),  # 1 - beta1 >= 0.5: lerp's second branch
    dict(weight_decay=0.1, amsgrad=True, maximize=True),
    dict(weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True, maximize=True),
]
SGD_OPTIONS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.5),
    dict(momentum=0.9, nesterov=True),
    dict(weight_decay=0.1),
    dict(maximize=True),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.1, maximize=True),
    dict(momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
]
ALL_ADAM = ADAM_OPTIONS[-1]
ALL_SGD = SGD_OPTIONS[-1]


def _opts_id(opts: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in opts.items()) or "default"


def _data(shapes, dtype, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    grads = []
    for _ in range(steps):
        step_grads = []
        for s in shapes:
            g = torch.randn(s, generator=gen, dtype=torch.float64)
            if dtype == torch.float16:  # keep exp_avg_sq above fp16's subnormals
                g = torch.where(g < 0, -1.0, 1.0) * g.abs().clamp_min(0.25)
            step_grads.append(g.to(dtype))
        grads.append(step_grads)
    return params, grads


def _adam_kwargs(opts):
    beta1, beta2 = opts.get("betas", (0.9, 0.999))
    return dict(beta1=beta1, beta2=beta2, weight_decay=opts.get("weight_decay", 0.0),
                eps=opts.get("eps", 1e-8), amsgrad=opts.get("amsgrad", False),
                maximize=opts.get("maximize", False),
                decoupled_weight_decay=opts.get("decoupled_weight_decay", False))


def _sgd_kwargs(opts):
    return dict(momentum=opts.get("momentum", 0.0), dampening=opts.get("dampening", 0.0),
                weight_decay=opts.get("weight_decay", 0.0), nesterov=opts.get("nesterov", False),
                maximize=opts.get("maximize", False))


class _Lists:
    """One optimizer's state as the ops take it (lists per tensor)."""

    def __init__(self, algo, opts, params):
        self.algo, self.opts = algo, opts
        self.params = [p.clone() for p in params]
        if algo == "adam":
            z = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
            self.exp_avgs, self.exp_avg_sqs = z(), z()
            self.max_exp_avg_sqs = z() if opts.get("amsgrad") else []
            self.steps = [torch.zeros((), dtype=torch.float32) for _ in params]
        else:
            self.bufs = ([torch.zeros_like(p) for p in params]
                         if opts.get("momentum", 0.0) != 0.0 else [])
            self.first = True

    def step(self, fn, grads, lr, grad_scale=None, found_inf=None):
        lr_t = torch.tensor(lr, dtype=torch.float64)
        if self.algo == "adam":
            fn(self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
               self.steps, lr=lr_t, grad_scale=grad_scale, found_inf=found_inf,
               **_adam_kwargs(self.opts))
        else:
            first = self.first and bool(self.bufs)
            fn(self.params, grads, self.bufs, lr=lr_t, is_first_step=first,
               grad_scale=grad_scale, found_inf=found_inf, **_sgd_kwargs(self.opts))
            if found_inf is None or found_inf.item() == 0:
                self.first = False

    def tensors(self):
        if self.algo == "adam":
            return {"param": self.params, "exp_avg": self.exp_avgs,
                    "exp_avg_sq": self.exp_avg_sqs, "max_exp_avg_sq": self.max_exp_avg_sqs}
        return {"param": self.params, "momentum_buffer": self.bufs}


def _torch_optimizer(algo, opts, params):
    if algo == "adam":
        opts = dict(opts)
        cls = torch.optim.AdamW if opts.pop("decoupled_weight_decay", False) else torch.optim.Adam
        if cls is torch.optim.AdamW:
            opts.setdefault("weight_decay", 0.0)
        return cls(params, lr=LR, foreach=False, **opts)
    return torch.optim.SGD(params, lr=LR, foreach=False, **opts)


def _torch_state(opt, params, key):
    if key == "param":
        return [p.detach() for p in params]
    return [opt.state[p][key] for p in params]


def _run_and_compare(algo, opts, dtype, shapes, steps=TEST_STEPS, grad_scale=None,
                     compare_torch=True):
    """Runs the Triton backend, the exact oracle and torch.optim (fp64 for fp16/bf16)
    for `steps` steps on the same data; asserts bit-equality with the oracle and the
    tolerance of tests/_tables.py (ulps x steps, free-running) against torch."""
    backend = backends.get_backend("triton")
    fn = backend.adam_ if algo == "adam" else backend.sgd_
    exact = _exact_adam if algo == "adam" else _exact_sgd
    params, grads = _data(shapes, dtype, steps)
    tri, ora = _Lists(algo, opts, params), _Lists(algo, opts, params)
    torch_dtype = torch.float64 if dtype in (torch.float16, torch.bfloat16) else dtype
    ref_params = [p.to(torch_dtype).requires_grad_() for p in params]
    ref = _torch_optimizer(algo, opts, ref_params)
    scale_t = None if grad_scale is None else torch.tensor(grad_scale, dtype=torch.float32)
    for step_grads in grads:
        g_tri = [g * grad_scale if grad_scale else g.clone() for g in step_grads]
        g_ora = [g.clone() for g in g_tri]
        tri.step(fn, g_tri, LR, grad_scale=scale_t)
        ora.step(exact, g_ora, LR, grad_scale=scale_t)
        for p, g in zip(ref_params, step_grads):
            p.grad = g.to(torch_dtype)
        ref.step()
        if grad_scale is not None:  # grads are written back unscaled (exactly: 2^k)
            for a, g in zip(g_tri, step_grads):
                assert torch.equal(a, g), "grads were not written back unscaled"
    label = f"{algo} {_opts_id(opts)} {dtype}"
    for key, tri_list in tri.tensors().items():
        for i, (a, b) in enumerate(zip(tri_list, ora.tensors()[key])):
            assert a.dtype == dtype
            assert torch.equal(a, b), (
                f"{label} {key}[{i}] {tuple(a.shape)}: not bit-equal to the C++ op "
                f"sequence, max |diff| {(a.double() - b.double()).abs().max().item():.3g}")
    if algo == "adam":
        assert [s.item() for s in tri.steps] == [float(steps)] * len(shapes)
    if not compare_torch:
        return
    ulps = tolerance(dtype).ulps * steps
    grad_max = [torch.stack([g[i].double().abs() for g in grads]).amax(0)
                for i in range(len(shapes))]
    for key, tri_list in tri.tensors().items():
        if not tri_list:
            continue
        torch_list = _torch_state(ref, ref_params, key)
        for i, (a, b) in enumerate(zip(tri_list, torch_list)):
            row = [b, grad_max[i]] + [lst[i] for lst in tri.tensors().values() if lst]
            assert_row_close(f"{label} vs torch.optim {key}[{i}]", a, b, row_scale(row),
                             dtype, ulps)


# ---------------------------------------------------------------------------------------
# Parity


@needs_interpreter
@pytest.mark.parametrize("opts", ADAM_OPTIONS, ids=_opts_id)
def test_adam_options_fp32(opts):
    _run_and_compare("adam", opts, torch.float32, SHAPES)


@needs_interpreter
@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=_opts_id)
def test_sgd_options_fp32(opts):
    _run_and_compare("sgd", opts, torch.float32, SHAPES)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16,
                                   torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("algo,opts", [("adam", ALL_ADAM), ("sgd", ALL_SGD)],
                         ids=["adam", "sgd"])
def test_many_tensors_every_dtype(algo, opts, dtype):
    """20 tensors (25 programs) in one launch per step, every option on."""
    _run_and_compare(algo, opts, dtype, MANY_SHAPES)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("algo,opts", [("adam", ALL_ADAM), ("sgd", ALL_SGD)],
                         ids=["adam", "sgd"])
def test_grad_scale(algo, opts, dtype):
    """grads are divided by grad_scale (2^10: exact, so torch gets the same grads) and
    written back unscaled."""
    _run_and_compare(algo, opts, dtype, SHAPES, grad_scale=1024.0)


@needs_interpreter
def test_production_launch_config():
    """The default BLOCK / CHUNK (1024 / 16384): BLOCK + 1 and CHUNK + 1 elements."""
    launcher.CONFIG = launcher.LaunchConfig()
    shapes = [(1,), (3,), (launcher.CONFIG.block + 1,), (launcher.CONFIG.chunk + 1,)]
    _run_and_compare("adam", ALL_ADAM, torch.float32, shapes, steps=2)
    _run_and_compare("sgd", ALL_SGD, torch.bfloat16, shapes, steps=2)


@needs_interpreter
@pytest.mark.parametrize("case", DEFAULT_CASES, ids=case_ids(DEFAULT_CASES))
def test_optimizer_classes(case):
    """fused_optim.Adam / AdamW / SGD(backend="triton") against torch.optim with the
    shared parity runner (re-synced every step, tests/_tables.py tolerances)."""
    check_parity(case, torch.float32, "triton", None, [(1,), (3,), (BLOCK + 1,), (CHUNK + 1,)],
                 steps=min(STEPS, TEST_STEPS))


@needs_interpreter
def test_bias_corrections_exact_over_many_steps():
    """From step counts far into training, the bias corrections of float64
    hyperparameters (see [note: exact float64 hyperparameters] in math.py) match the
    double-precision formula: a beta rounded to float32 changes them by ~2 ulp."""
    backend = backends.get_backend("triton")
    counts = [0.0, 1.0, 9.0, 99.0, 999.0, 12344.0, 65535.0, 1e6]
    for beta1, beta2, lr in [(0.9, 0.999, 1e-3), (0.95, 0.9999, 3e-4), (0.5, 0.98, 0.1)]:
        lists = {}
        for name, fn in [("triton", backend.adam_), ("exact", _exact_adam)]:
            p = [torch.zeros(1) for _ in counts]
            g = [torch.ones(1) for _ in counts]
            m = [torch.zeros(1) for _ in counts]
            v = [torch.zeros(1) for _ in counts]
            st = [torch.tensor(c) for c in counts]
            fn(p, g, m, v, [], st, lr=torch.tensor(lr, dtype=torch.float64), beta1=beta1,
               beta2=beta2, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
               decoupled_weight_decay=False)
            lists[name] = (p, st)
        for i, c in enumerate(counts):
            assert torch.equal(lists["triton"][0][i], lists["exact"][0][i]), (beta1, c)
            assert lists["triton"][1][i].item() == c + 1


# ---------------------------------------------------------------------------------------
# found_inf, steps, the resident table


def _adam_state(shapes, dtype=torch.float32, amsgrad=True):
    params, grads = _data(shapes, dtype, 1)
    z = lambda: [torch.randn_like(p).abs() for p in params]  # noqa: E731
    return dict(params=params, grads=grads[0], exp_avgs=z(), exp_avg_sqs=z(),
                max_exp_avg_sqs=z() if amsgrad else [],
                state_steps=[torch.tensor(float(i)) for i in range(len(shapes))])


def _adam_call(state, **kw):
    kwargs = dict(lr=torch.tensor(LR), beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8,
                  amsgrad=bool(state["max_exp_avg_sqs"]), maximize=False,
                  decoupled_weight_decay=True)
    kwargs.update(kw)
    backends.get_backend("triton").adam_(
        state["params"], state["grads"], state["exp_avgs"], state["exp_avg_sqs"],
        state["max_exp_avg_sqs"], state["state_steps"], **kwargs)


def _snapshot(state):
    return {k: [t.clone() for t in v] for k, v in state.items()}


@needs_interpreter
def test_found_inf_changes_nothing():
    for algo in ("adam", "sgd"):
        state = _adam_state(SHAPES)
        before = _snapshot(state)
        found = torch.tensor(1.0)
        if algo == "adam":
            _adam_call(state, grad_scale=torch.tensor(1024.0), found_inf=found)
        else:
            backends.get_backend("triton").sgd_(
                state["params"], state["grads"], state["exp_avgs"], lr=torch.tensor(LR),
                momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=True, maximize=False,
                is_first_step=False, grad_scale=torch.tensor(1024.0), found_inf=found)
        for key, tensors in state.items():
            for a, b in zip(tensors, before[key]):
                assert torch.equal(a, b), f"{algo}: found_inf != 0 changed {key}"
    # ...and found_inf == 0 runs the step, counting it once.
    state = _adam_state(SHAPES)
    _adam_call(state, found_inf=torch.tensor(0.0))
    assert [s.item() for s in state["state_steps"]] == [i + 1.0 for i in range(len(SHAPES))]


@needs_interpreter
def test_step_counted_once_per_call_across_chunks():
    """A tensor of many programs still counts its step once (the arrivals counter), an
    empty one counts it too, and the counters are back to zero after each launch."""
    shapes = [(7 * CHUNK + 5,), (0,), (1,), (3 * CHUNK,)]
    state = _adam_state(shapes, amsgrad=False)
    for call in range(1, 4):
        _adam_call(state)
        assert [s.item() for s in state["state_steps"]] == [float(i + call) for i in range(4)]
        table = next(iter(launcher._TABLES.values()))
        assert table.arrivals.tolist() == [0, 0, 0, 0]
        assert table.n_programs == 8 + 1 + 1 + 3


@needs_interpreter
def test_float64_step_counters():
    state = _adam_state(SHAPES, amsgrad=False)
    state["state_steps"] = [torch.tensor(5.0, dtype=torch.float64) for _ in SHAPES]
    ref = _snapshot(state)
    _adam_call(state)
    _exact_adam(ref["params"], ref["grads"], ref["exp_avgs"], ref["exp_avg_sqs"], [],
                ref["state_steps"], lr=torch.tensor(LR), beta1=0.9, beta2=0.999,
                weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False,
                decoupled_weight_decay=True)
    for a, b in zip(state["params"], ref["params"]):
        assert torch.equal(a, b)
    assert all(s.dtype == torch.float64 and s.item() == 6.0 for s in state["state_steps"])


@needs_interpreter
def test_table_resident_across_steps_and_rebuilt_on_change():
    state = _adam_state(SHAPES)
    launcher.clear_table_cache()
    for _ in range(3):  # same tensors; lr, grad_scale and found_inf values change freely
        _adam_call(state, lr=torch.tensor(LR * (1 + _)), grad_scale=torch.tensor(2.0 ** _),
                   found_inf=torch.tensor(0.0))
    assert launcher.table_cache_info()["builds"] == 1
    assert launcher.table_cache_info()["hits"] == 2
    table = next(iter(launcher._TABLES.values()))
    assert table.meta.device == state["params"][0].device and table.meta.dtype == torch.int64

    state["params"][2] = state["params"][2].clone()  # a param replaced: new address
    _adam_call(state)
    assert launcher.table_cache_info()["builds"] == 2
    for key in state:  # a tensor added to the bucket
        state[key] = state[key] + [state[key][0].clone()] if state[key] else []
    _adam_call(state)
    assert launcher.table_cache_info()["builds"] == 3
    _adam_call(state)
    assert launcher.table_cache_info()["builds"] == 3


@needs_interpreter
def test_host_lr_matches_device_lr():
    """A CPU lr for GPU params is passed by value instead of read by the kernel: both
    give the same step (forced here: on the CPU both are "on the device")."""
    a = _adam_state(SHAPES)
    b = _snapshot(a)
    kwargs = dict(lr=torch.tensor(3e-3, dtype=torch.float64), beta1=0.9, beta2=0.999,
                  weight_decay=0.1, eps=1e-8, amsgrad=True, maximize=True,
                  decoupled_weight_decay=False)
    launcher.adam_table(*a.values(), **kwargs)
    launcher.adam_table(*b.values(), **kwargs, _host_lr=True)
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y), key


@needs_interpreter
def test_per_tensor_kernels_match_table_kernels():
    """The kernels torch.compile traces (one launch per tensor, tensors as arguments)
    compute the same bits as the table kernels."""
    for algo, opts in [("adam", ALL_ADAM), ("sgd", ALL_SGD)]:
        for dtype in (torch.float32, torch.bfloat16):
            params, grads = _data(SHAPES, dtype, 2)
            table, per_tensor = _Lists(algo, opts, params), _Lists(algo, opts, params)
            if algo == "adam":
                fns = (launcher.adam_table, launcher.adam_per_tensor)
            else:
                fns = (launcher.sgd_table, launcher.sgd_per_tensor)
            for step_grads in grads:
                scale = torch.tensor(4.0)
                table.step(fns[0], [g * 4 for g in step_grads], LR, grad_scale=scale,
                           found_inf=torch.tensor(0.0))
                per_tensor.step(fns[1], [g * 4 for g in step_grads], LR, grad_scale=scale,
                                found_inf=torch.tensor(0.0))
            for key, lst in table.tensors().items():
                for x, y in zip(lst, per_tensor.tensors()[key]):
                    assert torch.equal(x, y), (algo, dtype, key)
            if algo == "adam":
                assert [s.item() for s in per_tensor.steps] == [2.0] * len(SHAPES)


# ---------------------------------------------------------------------------------------
# Storage rounding


@needs_interpreter
def test_bf16_store_rounds_to_nearest_even():
    """fp32 values exactly between two bf16 numbers (and next to them) round as torch's
    .to(torch.bfloat16) does: to the even neighbour. The interpreter's own cast
    truncates; on a GPU the explicit rounding is still used (unverified there)."""
    bits = []
    for hi in (0x3F80, 0x3F81, 0xBF80, 0xBF81, 0x7F7F, 0x0001, 0x0080, 0x4049):
        for lo in (0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF):
            bits.append((hi << 16) | lo)
    x = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([x, torch.tensor([float("inf"), -float("inf"), float("nan")])])
    n = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.zeros(n - x.numel())])
    out = torch.empty(n, dtype=torch.bfloat16)
    _store_bf16_kernel[(1,)](x, out, n)
    expected = x.to(torch.bfloat16)
    finite = ~x.isnan()
    assert torch.equal(out[finite].view(torch.int16), expected[finite].view(torch.int16))
    assert out[~finite].isnan().all()
    # The ties really are ties, and both directions occur.
    ties = torch.tensor([(b & 0xFFFF) == 0x8000 for b in bits] + [False] * (n - len(bits)))
    up = (out.float() > x) & ties
    down = (out.float() < x) & ties
    assert up.any() and down.any()


@needs_interpreter
def test_bf16_step_rounds_ties_like_torch():
    """An SGD step whose fp32 result is exactly a bf16 tie is stored like torch.optim's
    bf16 SGD stores it (param.add_(grad, alpha=-lr) rounds its fp32 result to nearest
    even)."""
    # p - 1 * g lands exactly halfway: 1 + 2^-8 (tie between 1 and 1 + 2^-7) etc.
    p = torch.tensor([1.0, 1.0, 2.0, -1.0, 1.0078125], dtype=torch.bfloat16)
    g = torch.tensor([-2 ** -8, -3 * 2 ** -8, -2 ** -7, 2 ** -8, -2 ** -8], dtype=torch.bfloat16)
    mine = [p.clone()]
    backends.get_backend("triton").sgd_(
        mine, [g.clone()], [], lr=torch.tensor(1.0), momentum=0.0, dampening=0.0,
        weight_decay=0.0, nesterov=False, maximize=False, is_first_step=False)
    ref = p.clone().requires_grad_()
    ref.grad = g.clone()
    torch.optim.SGD([ref], lr=1.0, foreach=False).step()
    assert torch.equal(mine[0].view(torch.int16), ref.detach().view(torch.int16))
    truncated = (p.float() - g.float()).view(torch.int32) >> 16 << 16
    assert not torch.equal(mine[0].float(), truncated.view(torch.float32)), "no tie tested"


# ---------------------------------------------------------------------------------------
# Errors, availability, registration


@needs_interpreter
def test_input_errors():
    backend = backends.get_backend("triton")
    state = _adam_state([(3,), (4,)])
    with pytest.raises(RuntimeError, match="max_exp_avg_sqs must be empty"):
        _adam_call({**state, "max_exp_avg_sqs": state["params"]}, amsgrad=False)
    with pytest.raises(RuntimeError, match="expected 2 exp_avgs"):
        _adam_call({**state, "exp_avgs": state["exp_avgs"][:1]})
    with pytest.raises(RuntimeError, match="one dtype"):
        _adam_call({**state, "exp_avgs": [t.double() for t in state["exp_avgs"]]})
    with pytest.raises(RuntimeError, match="non-overlapping and dense"):
        _adam_call({**state, "params": [torch.zeros(6)[::2], state["params"][1]],
                    "grads": [torch.zeros(6)[::2], state["grads"][1]],
                    "exp_avgs": [torch.zeros(6)[::2], state["exp_avgs"][1]],
                    "exp_avg_sqs": [torch.zeros(6)[::2], state["exp_avg_sqs"][1]],
                    "max_exp_avg_sqs": [torch.zeros(6)[::2], state["max_exp_avg_sqs"][1]]})
    with pytest.raises(RuntimeError, match="float32 or all float64"):
        _adam_call({**state, "state_steps": [torch.tensor(1), torch.tensor(2)]})
    with pytest.raises(RuntimeError, match="momentum_buffers must be empty"):
        backend.sgd_(state["params"], state["grads"], state["exp_avgs"], lr=torch.tensor(LR),
                     momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                     maximize=False, is_first_step=False)
    # channels_last rows are dense: accepted.
    x = [torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last) for _ in range(4)]
    _adam_call({"params": [x[0]], "grads": [x[1]], "exp_avgs": [x[2]],
                "exp_avg_sqs": [x[3].abs()], "max_exp_avg_sqs": [],
                "state_steps": [torch.tensor(0.0)]})


@needs_interpreter
def test_split_f64_is_exact():
    gen = torch.Generator().manual_seed(0)
    values = [0.9, 0.999, 1e-8, 0.1, 1 - 1e-12, 3e-4, 0.0, 1.0, -0.25]
    values += (torch.rand(200, generator=gen, dtype=torch.float64) * 10 - 5).tolist()
    for x in values:
        parts = launcher.split_f64(x)
        assert all(torch.tensor(p, dtype=torch.float32).item() == p for p in parts)
        assert parts[0] + parts[1] + parts[2] == x


@needs_interpreter
def test_availability():
    triton_ok = _triton_backend.unavailable
    assert triton_ok(torch.device("cpu"), torch.float32) is None
    assert triton_ok(torch.device("cpu"), torch.bfloat16) is None
    assert "not supported" in triton_ok(torch.device("cpu"), torch.int32)
    assert "not supported" in triton_ok(torch.device("meta"), torch.float32)
    assert fused_optim.available_backends("cpu", torch.float64)["triton"] is None
    os.environ.pop("TRITON_INTERPRET")
    reason = fused_optim.available_backends("cpu", torch.float32)["triton"]
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backends.select_backend("triton", torch.device("cpu"), torch.float32)


@needs_interpreter
def test_ops_registered_with_fake_kernels():
    """torch.ops.fused_optim_triton.* are triton_ops: schema (mutations) and the fake
    kernel check out. (torch.compile's trace needs a GPU: under the interpreter
    wrap_triton cannot launch on FakeTensors, and the op says so.)"""
    params, grads = _data([(3,), (BLOCK + 1,)], torch.float32, 1)
    args = (params, grads[0], [torch.zeros_like(p) for p in params],
            [torch.zeros_like(p) for p in params], [], [torch.zeros(()) for _ in params],
            torch.tensor(LR), None, None, 0.9, 0.999, 0.0, 1e-8, False, False, False)
    result = torch.library.opcheck(torch.ops.fused_optim_triton.adam_.default, args,
                                   test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}
    sgd_args = (params, grads[0], [torch.zeros_like(p) for p in params], torch.tensor(LR),
                torch.tensor(2.0), torch.tensor(0.0), 0.9, 0.0, 0.0, False, False, False)
    result = torch.library.opcheck(torch.ops.fused_optim_triton.sgd_.default, sgd_args,
                                   test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}


_WITHOUT_TRITON = r"""
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError
import torch, fused_optim
from fused_optim import backends
reason = fused_optim.available_backends("cpu", torch.float32)["triton"]
print("REASON", reason)
assert reason is not None and "not installed" in reason, reason
try:
    backends.select_backend("triton", torch.device("cpu"), torch.float32)
except ValueError as exc:
    assert "not installed" in str(exc), exc
else:
    raise AssertionError("select_backend('triton') did not raise")
p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
fused_optim.Adam([p], lr=0.1).step()  # "auto" still works
print("OK")
"""


def test_package_imports_without_triton():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    res = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], env=env, cwd=str(ROOT),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


_COMPILE_FOR_SM90 = r"""
import os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # silence triton 3.9's notice
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_optim import _triton_backend
_triton_backend.load_kernels()
from fused_optim.triton_kernels import launcher as L

def compile_ptx(kernel, args):
    sig = {n: (args[n] if isinstance(args[n], str) else "constexpr") for n in kernel.arg_names}
    consts = {n: v for n, v in args.items() if not isinstance(v, str)}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
               if isinstance(args[n], str) and args[n].startswith("*")}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "enable_fp_fusion": False}).asm["ptx"]

def parts(*names):
    return {f"{n}_{p}": "fp32" for n in names for p in ("hi", "mid", "lo")}

adam = dict(base="*fp32", list_offsets="*i64", step_ptrs="*i64", numels="*i64",
            n_chunks="*i64", work="*i64", arrivals="*i32", n_tensors="i32",
            lr_ptr="*fp32", grad_scale_ptr="*fp32", found_inf_ptr="*fp32",
            **parts("lr", "beta1", "beta2", "wd", "eps"),
            DTYPE=tl.float32, OPMATH=tl.float32, STEP_DTYPE=tl.float32, AMSGRAD=True,
            MAXIMIZE=True, WEIGHT_DECAY=2, LR_ON_DEVICE=True, UNSCALE=True,
            HAS_FOUND_INF=True, CHUNK=16384, BLOCK=1024, ELEM_ALIGN=4)
sgd = dict(base="*bf16", list_offsets="*i64", numels="*i64", work="*i64", n_tensors="i32",
           lr_ptr=None, grad_scale_ptr=None, found_inf_ptr=None,
           **parts("lr", "momentum", "dampening", "wd"),
           DTYPE=tl.bfloat16, OPMATH=tl.float32, MOMENTUM=True, NESTEROV=True,
           FIRST_STEP=False, MAXIMIZE=False, WEIGHT_DECAY=True, LR_ON_DEVICE=False,
           UNSCALE=False, HAS_FOUND_INF=False, CHUNK=16384, BLOCK=1024, ELEM_ALIGN=8)
tensor = dict(p_ptr="*fp64", g_ptr="*fp64", m_ptr="*fp64", v_ptr="*fp64", vmax_ptr=None,
              step_ptr="*fp32", numel="i64", lr_ptr="*fp64", grad_scale_ptr="*fp32",
              found_inf_ptr="*fp32", **parts("beta1", "beta2", "wd", "eps"),
              DTYPE=tl.float64, OPMATH=tl.float64, AMSGRAD=False, MAXIMIZE=False,
              WEIGHT_DECAY=1, UNSCALE=True, HAS_FOUND_INF=True, CHUNK=16384, BLOCK=1024)
for name, kernel, args in [("adam fp32 table", L._adam_table_kernel, adam),
                           ("sgd bf16 table", L._sgd_table_kernel, sgd),
                           ("adam fp64 per-tensor", L._adam_tensor_kernel, tensor)]:
    ptx = compile_ptx(kernel, args)
    count = lambda pattern: len(re.findall(pattern, ptx))
    vector = count(r"ld\.global\.v[24]") and count(r"st\.global\.v[24]")
    print(name, "vector", vector, "div.full", count(r"div\.full"), "fma.rn",
          count(r"fma\.rn"), "sqrt.approx", count(r"sqrt\.approx"))
    assert vector, f"{name}: no vectorized loads and stores"
    assert not count(r"div\.full|sqrt\.approx|fma\.rn"), f"{name}: inexact ops"
    if "fp32" in name:
        assert count(r"div\.rn\.f32") and count(r"sqrt\.rn\.f32") and count(r"atom")
print("OK")
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler: compile three variants to
    PTX for sm_90 (no GPU needed) and check what the design relies on: 16-byte
    vectorized accesses through the table, IEEE division and sqrt, no contracted FMA."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    res = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, cwd=str(ROOT),
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("triton's ptxas is not available")
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]


_TRACE_WITH_TORCH_COMPILE = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch
from torch._dynamo.backends.common import aot_autograd
from fused_optim import _triton_backend
_triton_backend.load_kernels()

graphs = []
class Traced(Exception):
    pass
def keep_graph(gm, example_inputs):
    graphs.append(gm.code)
    raise Traced  # compiled kernels cannot run without a GPU: stop after tracing

def step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, grad_scale, found_inf):
    torch.ops.fused_optim_triton.adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr,
                                       grad_scale, found_inf, 0.9, 0.999, 0.01, 1e-8, False,
                                       False, True)

n = [3, 5, 40000]
args = ([torch.randn(k) for k in n], [torch.randn(k) for k in n], [torch.zeros(k) for k in n],
        [torch.zeros(k) for k in n], [torch.zeros(()) for k in n], torch.tensor(1e-3),
        torch.tensor(2.0), torch.tensor(0.0))
try:
    torch.compile(step, backend=aot_autograd(fw_compiler=keep_graph), fullgraph=True)(*args)
except Exception as exc:
    assert graphs, exc
code = graphs[0]
assert code.count("triton_kernel_wrapper_functional(") == len(n), code
assert "grid = [(3, 1, 1)]" in code, code  # 40000 elements: 3 chunks of 16384
assert code.count("aten.add") == len(n), code  # the step counters
print("OK")
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_torch_compile_traces_per_tensor_kernels():
    """torch.compile (dynamo + AOT functionalization, no Inductor) traces the op into one
    wrap_triton kernel node per tensor plus the step increments. Compiled kernels are
    needed, so it runs in a subprocess; without a GPU the graph is traced, not run (and
    Triton's mutation analysis, which needs a GPU target, falls back to "all mutated")."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    res = subprocess.run([sys.executable, "-c", _TRACE_WITH_TORCH_COMPILE], env=env,
                         cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]


@pytest.mark.skipif(_RUN_HERE or not HAVE_TRITON,
                    reason="the kernels run in this process under the interpreter")
def test_in_subprocess():
    """See [note: TRITON_INTERPRET ordering]."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(Path(__file__).resolve())], env=env, cwd=str(ROOT),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]
