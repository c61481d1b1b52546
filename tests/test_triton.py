"""The Triton backend on the CPU, under the Triton interpreter, driven by the spec tables.

Every test here is parametrized from tests/_tables.py (OPTIMIZERS, OPTIMIZER_CASES,
FULL_CASES, DEFAULT_CASES) and reads the optimizer's spec (fused_optim/spec.py) for its
lists, per-tensor state and arguments, so a new row there is covered without new code.

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

What is compared:
  * bit for bit against the C++ CPU backend (backend="cpu", its portable variant: every
    CPU variant computes the same bits, tests/test_optimizers.py) on the same inputs,
    params, grads (written back unscaled) and every state, per-tensor state included,
    after every step. The C++ and Triton math are the same operation sequence with one
    rounding per operation (csrc/include/fused_optim/math/, triton_kernels/math.py), so
    no tolerance applies. Float64 storage is compared within TOLERANCES (ulps per step,
    free-running) instead: Triton computes beta ** step by binary exponentiation
    (math.pow_int: libdevice's pow does not run in the interpreter), C++ calls pow(); in
    float64 opmath the two differ by an ulp of the bias corrections at some step counts,
    which float32 opmath rounds away (test_step_dependent_scalars_*). Where the C++ op
    is missing (extension not built, or built without that optimizer) these tests skip
    and say so (see _needs_cpu_op for why not the reference backend instead);
  * against torch.optim (foreach=False) through the optimizer classes, with the shared
    parity runner and tolerances (tests/_oracle.py check_parity).
Sizes straddle the test launch configuration (BLOCK=32 elements per iteration, CHUNK=64
per program): 1, 3, BLOCK+1, CHUNK+1, 2*CHUNK+1, an empty and a 2-D tensor, BLOCK; one
test per optimizer family uses the production configuration (BLOCK+1, CHUNK+1 of
1024 / 16384).

Cost: the interpreter costs ~1.5 ms per @triton.jit call and ~10-30 ms per program
(a program is one chunk of one tensor), which is nearly all of this file's time, so
tensors stay small and the programs per row are counted: the option matrix runs fp32 on
SHAPES (11 programs) for 3 launches and bf16 / fp16 on 4 tensors (5 programs) for 2; the
many-tensor (25 programs), float64 and production-size runs are for FULL_CASES or one
case per family only; the parity runs (whose torch oracle is cheap) use 4 tensors for
3 steps. ~80 s of CPU on the 2-core dev machine with 7 optimizer classes.
"""

from __future__ import annotations

import functools

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
HAVE_TRITON = importlib.util.find_spec("triton") is not None
ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
# In this process: on a machine without a GPU, or when the caller asked for interpreted
# kernels everywhere (see [note: TRITON_INTERPRET ordering]).
_IN_PROCESS = HAVE_TRITON and (_PREVIOUS_INTERPRET == "1" or not torch.cuda.is_available())
if _IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"

import fused_optim  # noqa: E402
from _oracle import (  # noqa: E402
    assert_row_close,
    check_parity,
    clone_leaves,
    cpu_capability,
    make_grads,
    make_params,
    row_scale,
)
from _tables import (  # noqa: E402
    DEFAULT_CASES,
    DTYPES,
    FULL_CASES,
    OPTIMIZER_CASES,
    TOLERANCES,
    OptCase,
    case_ids,
    dtype_id,
)
from fused_optim import _extension, _triton_backend, backends  # noqa: E402

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

BLOCK, CHUNK = 32, 64
TEST_CONFIG = launcher.LaunchConfig(block=BLOCK, chunk=CHUNK) if _RUN_HERE else None
# 8 tensors (11 programs) for the option matrix, 20 (25 programs) for the many-tensor runs.
SHAPES = [(1,), (3,), (BLOCK + 1,), (CHUNK + 1,), (2 * CHUNK + 1,), (0,), (5, 7), (BLOCK,)]
MANY_SHAPES = SHAPES + [(2,), (31,), (CHUNK,), (7,), (96,), (40,), (1,), (17,), (63,),
                        (100,), (9,), (50,)]
# bf16 / fp16 in the option matrix: a full block and a masked tail, two chunks, a 2-D
# tensor; 5 programs instead of 11 (the dtype changes the loads, stores and rounding, not
# the indexing, which fp32 covers on SHAPES).
LOW_PRECISION_SHAPES = [(1,), (BLOCK + 1,), (CHUNK + 1,), (5, 7)]
# The per-tensor kernels: one launch per tensor (and one per tensor for its state).
PER_TENSOR_SHAPES = [(1,), (BLOCK + 1,), (2 * CHUNK + 1,), (0,), (5, 7)]
PARITY_SHAPES = [(1,), (3,), (BLOCK + 1,), (CHUNK + 1,)]
TEST_STEPS = 3
LOW_AND_SINGLE = [torch.float32, torch.bfloat16, torch.float16]

# (grad_scale, found_inf) of each launch of a run: grads scaled by 2^10 (exact, so the
# unscaled grads are the drawn ones), a step GradScaler skips, a step without either.
PLAN = ((1024.0, 0.0), (1024.0, 1.0), (None, None))
TWO_STEPS = (PLAN[0], PLAN[2])


def _one_per_op(cases: list[OptCase]) -> list[OptCase]:
    """The first case of each op (Adam and AdamW share one): one per optimizer family."""
    out: dict[str, OptCase] = {}
    for c in cases:
        out.setdefault(c.spec.name, c)
    return list(out.values())


def _unique(cases: list[OptCase]) -> list[OptCase]:
    return list({c.id: c for c in cases}.values())


# Each family's case with every option on; those with per-tensor state; the cases whose
# per-tensor state holds a step count.
FAMILIES = _one_per_op(FULL_CASES)
STATEFUL = [c for c in FAMILIES if c.spec.scalars]
STEP_CASES = [c for c in OPTIMIZER_CASES if any(s.key == "step" for s in c.spec.scalars)]


def _family_ids(cases: list[OptCase]) -> list[str]:
    return [c.spec.name for c in cases]


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
# The oracle: the C++ op of the same optimizer (its portable CPU variant).


def _cpu_op_missing(spec) -> str | None:
    """Why the C++ op of this optimizer cannot run here, or None."""
    if _extension.C is None:
        return _extension.LOAD_ERROR
    if spec.op not in _extension.C.compiled_ops():
        return f"fused_optim._C was built without {spec.op}"
    return None


def _needs_cpu_op(spec) -> None:
    """Skips a test that compares with the C++ op when it is missing. (Not the reference
    backend instead: it follows the same math op by op but with torch ops that are not
    all correctly rounded or FMA-free, and ill-conditioned updates amplify that beyond
    any fixed tolerance: centered RMSprop's sqrt(v - m^2) differs by 10-27 fp32 ulps in
    one or two steps. The parity tests below compare with torch.optim either way.)"""
    reason = _cpu_op_missing(spec)
    if reason is not None:
        pytest.skip(f"no C++ op to compare with: {reason}")


def _exact(dtype: torch.dtype) -> bool:
    """Whether Triton must equal the C++ op bit for bit (see the module docstring): not
    in float64 storage, where beta ** step is pow_int in Triton and pow() in C++."""
    return dtype != torch.float64


def _oracle_step(spec, *lists, **kwargs) -> None:
    with cpu_capability("default"):
        backends.get_backend("cpu").step(spec, *lists, **kwargs)


def _triton_step(spec, *lists, **kwargs) -> None:
    """The backend's entry: torch.ops.fused_optim_triton.<op>, then launcher.step_table."""
    backends.get_backend("triton").step(spec, *lists, **kwargs)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's values as integers of its width: NaN payloads and signed zeros count."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    return t.detach().contiguous().view(ints[t.element_size()])


def _compare(label: str, got: dict[str, list[torch.Tensor]],
             want: dict[str, list[torch.Tensor]], *, exact: bool, steps: int = 1,
             scalar_keys=()) -> None:
    """Every tensor of `got` against `want`: bit for bit, or within the dtype's
    TOLERANCES ulps times `steps` (free-running) at the magnitude of the row (an
    element's values in every list, both sides); per-tensor state (scalar_keys) at its
    own magnitude."""
    assert got.keys() == want.keys(), f"{label}: lists {sorted(got)} != {sorted(want)}"
    for key in got:
        assert len(got[key]) == len(want[key]), f"{label}: {key} lengths differ"
        for i, (a, b) in enumerate(zip(got[key], want[key])):
            where = f"{label}: {key}[{i}] {tuple(a.shape)}"
            assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
            assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
            if exact:
                if not torch.equal(_bits(a), _bits(b)):
                    diff = (a.detach().double() - b.detach().double()).abs()
                    raise AssertionError(
                        f"{where}: not bit-equal to the oracle ({_bits(a).ne(_bits(b)).sum()} "
                        f"of {a.numel()} elements differ, max |diff| "
                        f"{diff.nan_to_num(float('inf')).max().item():.3g})")
                continue
            if key in scalar_keys:
                scale = row_scale([a, b])
            else:
                scale = row_scale([d[k][i] for d in (got, want) for k in d
                                   if k not in scalar_keys and len(d[k]) > i])
            assert_row_close(where, a, b, scale, a.dtype, TOLERANCES[a.dtype].ulps * steps)


# ---------------------------------------------------------------------------------------
# Runs through the optimizer classes: backend="triton" against the oracle backend.


def _class_tensors(opt, params) -> dict[str, list[torch.Tensor]]:
    out = {"param": [p.detach() for p in params], "grad": [p.grad for p in params]}
    keys = sorted({k for p in params for k, v in opt.state.get(p, {}).items()
                   if isinstance(v, torch.Tensor)})
    for key in keys:
        out[key] = [opt.state[p][key] for p in params]
    return out


def _run_classes(case: OptCase, dtype: torch.dtype, shapes, plan=PLAN, seed: int = 0) -> None:
    """case.fused(backend="triton") and case.fused(backend="cpu") step on the same params
    and grads, with grad_scale / found_inf as torch.amp.GradScaler passes them (optimizer
    attributes), one launch per `plan` entry; everything is compared after each launch,
    and the grads are checked to be written back unscaled (or left as they were by a
    skipped step)."""
    spec = case.spec
    _needs_cpu_op(spec)
    oracle = "cpu"
    exact = _exact(dtype)
    scalar_keys = {s.key for s in spec.scalars}
    gen = torch.Generator().manual_seed(seed)
    params = make_params(shapes, dtype, gen)
    sides = {}
    for name in ("triton", oracle):
        ps = clone_leaves(params)
        sides[name] = (case.fused(ps, backend=name, **case.options), ps)
    real_steps = 0
    for k, (scale, found) in enumerate(plan):
        grads = make_grads(shapes, dtype, gen)
        skipped = bool(found)
        for name, (opt, ps) in sides.items():
            for p, g in zip(ps, grads):
                p.grad = g * scale if scale is not None else g.clone()
            opt.grad_scale = None if scale is None else torch.tensor(scale)
            opt.found_inf = None if found is None else torch.tensor(found)
            with cpu_capability("default" if name == "cpu" else None):
                opt.step()  # (the C++ one through its eager group entry after step 1)
        real_steps += not skipped
        label = (f"{case.id} {dtype_id(dtype)} launch {k + 1} (grad_scale={scale}, "
                 f"found_inf={found}) vs {oracle}")
        got, want = _class_tensors(*sides["triton"]), _class_tensors(*sides[oracle])
        _compare(label, got, want, exact=exact, steps=max(real_steps, 1),
                 scalar_keys=scalar_keys)
        for i, (p, g) in enumerate(zip(sides["triton"][1], grads)):
            expected = g * scale if skipped and scale is not None else g
            assert torch.equal(_bits(p.grad), _bits(expected)), (
                f"{label}: grad[{i}] was not " + ("left scaled" if skipped else "unscaled"))


# ---------------------------------------------------------------------------------------
# Runs of the op itself: one bucket's arguments, built through the optimizer class.


class _Args:
    """One bucket's op arguments for a case: the lists in spec.list_args() order (a list
    the case leaves out is empty), the per-tensor state lists, the float and bool
    arguments by name (a per-call one, SGD's is_first_step, False) and lr.

    The state is the class's own (keys, dtypes, initial values), after one step (of the
    C++ backend, or the reference one without it) so that it is not all initial values;
    the grads are new."""

    def __init__(self, spec, lists, h, lr):
        self.spec, self.lists, self.h, self.lr = spec, lists, h, lr
        self.names = [*spec.list_args(), *(s.arg for s in spec.scalars)]

    @classmethod
    def make(cls, case: OptCase, shapes, dtype: torch.dtype = torch.float32, seed: int = 0,
             state_dtype: torch.dtype | None = None) -> "_Args":
        spec = case.spec
        oracle = "reference" if _cpu_op_missing(spec) else "cpu"
        gen = torch.Generator().manual_seed(seed)
        params = make_params(shapes, dtype, gen)
        opt = case.fused(params, backend=oracle, **case.options)
        for p, g in zip(params, make_grads(shapes, dtype, gen)):
            p.grad = g
        with cpu_capability("default" if oracle == "cpu" else None):
            opt.step()
        for p, g in zip(params, make_grads(shapes, dtype, gen)):
            p.grad = g
        group = opt.param_groups[0]
        lists, states = opt._group_lists(group)
        h = {x.name: x.kind() for x in spec.hypers if x.group_key == ""}
        h.update(opt._hyper(group))
        # Detached (the params are leaves that require grad) and copied: the optimizer
        # keeps no alias of what the tests mutate.
        lists = [[t.detach().clone() for t in lst] for lst in lists]
        states = [[t.to(state_dtype or t.dtype, copy=True) for t in lst] for lst in states]
        return cls(spec, lists + states, h, float(group["lr"]))

    def clone(self) -> "_Args":
        return _Args(self.spec, [[t.clone() for t in lst] for lst in self.lists], dict(self.h),
                     self.lr)

    @property
    def n_lists(self) -> int:
        return len(self.spec.list_args())

    @property
    def params(self) -> list[torch.Tensor]:
        return self.lists[0]

    @property
    def grads(self) -> list[torch.Tensor]:
        return self.lists[1]

    def states(self, key: str) -> list[torch.Tensor]:
        """Per-tensor state list of the state key (e.g. "step")."""
        j = [s.key for s in self.spec.scalars].index(key)
        return self.lists[self.n_lists + j]

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        return dict(zip(self.names, self.lists))

    def set_grads(self, grads: list[torch.Tensor], scale: float | None = None) -> None:
        for dst, g in zip(self.grads, grads):
            dst.copy_(g * scale if scale is not None else g)

    def call(self, fn, *, lr: torch.Tensor | None = None, grad_scale=None, found_inf=None,
             **kwargs) -> None:
        if lr is None:
            lr = torch.tensor(self.lr, dtype=torch.float64)  # as the classes pass a float lr
        fn(self.spec, *self.lists, lr=lr, grad_scale=grad_scale, found_inf=found_inf,
           **self.h, **kwargs)


def _scalars_of(v) -> dict:
    """grad_scale / found_inf keyword arguments of one PLAN entry, as tensors."""
    scale, found = v
    return dict(grad_scale=None if scale is None else torch.tensor(scale),
                found_inf=None if found is None else torch.tensor(found))


def _against_oracle(label: str, got: _Args, want: _Args, steps: int = 1) -> None:
    """Triton's results `got` against the C++ op's `want` after `steps` calls: bit for
    bit, or within tolerance in float64 (see _exact)."""
    spec, dtype = got.spec, got.params[0].dtype
    _compare(label, got.tensors(), want.tensors(), exact=_exact(dtype), steps=steps,
             scalar_keys={s.arg for s in spec.scalars})


def _same_bits(label: str, got: _Args, want: _Args) -> None:
    _compare(label, got.tensors(), want.tensors(), exact=True)


# ---------------------------------------------------------------------------------------
# Exactness against the C++ backend


@needs_interpreter
@pytest.mark.parametrize("dtype", LOW_AND_SINGLE, ids=dtype_id)
@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=case_ids(OPTIMIZER_CASES))
def test_matches_cpu_backend(case, dtype):
    """Every option case, fp32 / bf16 / fp16 storage, tensors straddling BLOCK and CHUNK:
    bit for bit the C++ backend's params, grads and state after every launch: in fp32 on
    SHAPES a scaled step, a skipped one, a plain one; in bf16 / fp16 (fewer tensors) the
    two steps."""
    if dtype == torch.float32:
        _run_classes(case, dtype, SHAPES)
    else:
        _run_classes(case, dtype, LOW_PRECISION_SHAPES, plan=TWO_STEPS)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", FULL_CASES, ids=case_ids(FULL_CASES))
def test_many_tensors_every_dtype(case, dtype):
    """20 tensors (25 programs) in one launch per step, every option on, every dtype
    (float64 within TOLERANCES: see the module docstring)."""
    _run_classes(case, dtype, MANY_SHAPES, plan=TWO_STEPS)


def _production_params():
    return [pytest.param(c, (torch.float32, torch.bfloat16)[i % 2],
                         id=f"{c.spec.name}-{dtype_id((torch.float32, torch.bfloat16)[i % 2])}")
            for i, c in enumerate(FAMILIES)]


@needs_interpreter
@pytest.mark.parametrize("case,dtype", _production_params())
def test_production_launch_config(case, dtype, monkeypatch):
    """The default BLOCK / CHUNK (1024 / 16384): BLOCK + 1 and CHUNK + 1 elements, one
    case per optimizer family (fp32 and bf16 in turn)."""
    config = launcher.LaunchConfig()
    monkeypatch.setattr(launcher, "CONFIG", config)
    shapes = [(1,), (3,), (config.block + 1,), (config.chunk + 1,)]
    _run_classes(case, dtype, shapes, plan=TWO_STEPS)
    # (a table per launch: the grads are new tensors every step)
    assert {t.n_programs for t in launcher._TABLES.values()} == {1 + 1 + 1 + 2}


@needs_interpreter
@pytest.mark.parametrize("case", STEP_CASES, ids=case_ids(STEP_CASES))
def test_step_dependent_scalars_exact_over_many_steps(case):
    """From step counts far into training, the scalars computed from the step (Adam's
    and Adamax's bias corrections 1 - beta^t from float64 hyperparameters: see [note:
    exact float64 hyperparameters] in math.py, a beta rounded to float32 changes them by
    ~2 ulp; Adagrad's lr decay; ...) are those of the C++ op, which uses pow(): float32
    params, one tensor per count, for every case whose per-tensor state is a step count.
    float64 params within TOLERANCES: there pow_int and pow() differ by an ulp of the
    bias corrections at some counts (Adam at steps 57 and 1234, for instance)."""
    _needs_cpu_op(case.spec)
    counts = [0.0, 1.0, 9.0, 99.0, 999.0, 12344.0, 65535.0, 1e6]
    for dtype in (torch.float32, torch.float64):
        tri = _Args.make(case, [(1,)] * len(counts), dtype)
        for s, c in zip(tri.states("step"), counts):
            s.fill_(c)
        ora = tri.clone()
        tri.call(_triton_step)
        ora.call(_oracle_step)
        _against_oracle(f"{case.id} {dtype_id(dtype)} at steps {counts}", tri, ora)
        assert [s.item() for s in tri.states("step")] == [c + 1 for c in counts]


@needs_interpreter
@pytest.mark.parametrize("case", FAMILIES, ids=_family_ids(FAMILIES))
def test_lr_tensor_dtypes(case):
    """lr as a float64 (what the classes pass for a float lr) or float32 tensor: as the
    C++ op (the arithmetic with lr rounds in lr's dtype: [note: lr arithmetic] in
    math.py)."""
    _needs_cpu_op(case.spec)
    for lr_dtype in (torch.float64, torch.float32):
        kwargs = dict(lr=torch.tensor(3e-3, dtype=lr_dtype), grad_scale=torch.tensor(4.0),
                      found_inf=torch.tensor(0.0))
        tri = _Args.make(case, [(3,), (BLOCK + 1,), (CHUNK + 1,)])
        ora = tri.clone()
        tri.call(_triton_step, **kwargs)
        ora.call(_oracle_step, **kwargs)
        _against_oracle(f"{case.id} lr {lr_dtype}", tri, ora)


@needs_interpreter
@pytest.mark.parametrize("case", FAMILIES, ids=_family_ids(FAMILIES))
def test_host_lr_matches_device_lr(case):
    """An lr passed by value (a CPU lr for GPU params, forced here with _host_lr: on the
    CPU both are "on the device") gives the same bits as one the kernel reads."""
    for lr_dtype in (torch.float64, torch.float32):
        kwargs = dict(lr=torch.tensor(3e-3, dtype=lr_dtype), grad_scale=torch.tensor(4.0),
                      found_inf=torch.tensor(0.0))
        device = _Args.make(case, [(3,), (BLOCK + 1,)])
        host = device.clone()
        device.call(launcher.step_table, **kwargs)
        host.call(launcher.step_table, _host_lr=True, **kwargs)
        _same_bits(f"{case.id} lr {lr_dtype} host vs device", host, device)


# ---------------------------------------------------------------------------------------
# Parity with torch.optim through the optimizer classes (the shared runner)


def _parity_params():
    out = [pytest.param(c, torch.float32, id=f"{c.id}-float32")
           for c in _unique(DEFAULT_CASES + FULL_CASES)]
    out += [pytest.param(c, torch.bfloat16, id=f"{c.id}-bfloat16") for c in FULL_CASES]
    return out


@needs_interpreter
@pytest.mark.usefixtures("oracle_threads")
@pytest.mark.parametrize("case,dtype", _parity_params())
def test_parity_with_torch_optim(case, dtype):
    """fused_optim's classes with backend="triton" against torch.optim (re-synced every
    step, tests/_tables.py tolerances): DEFAULT and FULL cases in fp32, FULL in bf16."""
    check_parity(case, dtype, "triton", None, PARITY_SHAPES, steps=TEST_STEPS)


# ---------------------------------------------------------------------------------------
# found_inf, per-tensor state, the resident table, the per-tensor kernels


@needs_interpreter
@pytest.mark.parametrize("case", FAMILIES, ids=_family_ids(FAMILIES))
def test_found_inf_changes_nothing(case):
    """found_inf != 0: every list and every state as it was, grads still scaled; then
    found_inf == 0 runs the step as the C++ op does."""
    _needs_cpu_op(case.spec)
    args = _Args.make(case, SHAPES)
    args.set_grads([g.clone() for g in args.grads], 1024.0)
    before = args.clone()
    args.call(_triton_step, grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0))
    _same_bits(f"{case.id} found_inf=1", args, before)
    ora = args.clone()
    kwargs = dict(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
    args.call(_triton_step, **kwargs)
    ora.call(_oracle_step, **kwargs)
    _against_oracle(f"{case.id} found_inf=0", args, ora)
    assert any(not torch.equal(a, b) for a, b in zip(args.params, before.params))


@needs_interpreter
@pytest.mark.parametrize("case", STATEFUL, ids=_family_ids(STATEFUL))
def test_state_advanced_once_per_call_across_chunks(case):
    """A tensor of many programs still advances its per-tensor state once per call (the
    arrivals counter), an empty one advances it too, and the counters are back to zero
    after each launch; the state is the C++ op's after every call."""
    shapes = [(7 * CHUNK + 5,), (0,), (1,), (3 * CHUNK,)]
    _needs_cpu_op(case.spec)
    tri = _Args.make(case, shapes)
    ora = tri.clone()
    keys = [s.key for s in case.spec.scalars]
    for call in range(1, 4):
        previous = {key: [s.item() for s in tri.states(key)] for key in keys}
        tri.call(_triton_step)
        ora.call(_oracle_step)
        _against_oracle(f"{case.id} call {call}", tri, ora, steps=call)
        for key in keys:  # the values themselves: _against_oracle
            now = [s.item() for s in tri.states(key)]
            if key == "step":
                assert now == [b + 1 for b in previous[key]]
        assert len(launcher._TABLES) == 1
        table = next(iter(launcher._TABLES.values()))
        assert table.arrivals.tolist() == [0, 0, 0, 0]
        assert table.n_programs == 8 + 1 + 1 + 3


@needs_interpreter
@pytest.mark.parametrize("case", STATEFUL, ids=_family_ids(STATEFUL))
def test_float64_state(case):
    """Per-tensor state in float64 tensors (torch.optim's with a float64 default dtype):
    read and stored in float64, as the C++ op does."""
    _needs_cpu_op(case.spec)
    tri = _Args.make(case, SHAPES, state_dtype=torch.float64)
    ora = tri.clone()
    for call in range(1, 3):
        tri.call(_triton_step)
        ora.call(_oracle_step)
        _against_oracle(f"{case.id} call {call}", tri, ora, steps=call)
    assert all(s.dtype == torch.float64 for lst in tri.lists[tri.n_lists:] for s in lst)


@needs_interpreter
@pytest.mark.parametrize("case", STATEFUL, ids=_family_ids(STATEFUL))
def test_mixed_state_dtypes(case):
    """States of several dtypes in one call, as torch.optim leaves them after loading a
    float64 model's state_dict (`step` float32, NAdam's mu_product float64), and rows
    whose states differ (one param's state loaded, another's new): each state list is
    read and stored in its own dtype, as the C++ op does, in one launch per kind of row."""
    _needs_cpu_op(case.spec)
    tri = _Args.make(case, SHAPES)
    states = tri.lists[tri.n_lists:]
    for j, lst in enumerate(states):
        for i in range(len(lst)):
            if (j + i) % 2:  # every other state list in float64, alternating by row
                lst[i] = lst[i].double()
    ora = tri.clone()
    for call in range(1, 3):
        tri.call(_triton_step)
        ora.call(_oracle_step)
        _against_oracle(f"{case.id} call {call}", tri, ora, steps=call)
    for j, lst in enumerate(states):
        assert [s.dtype for s in lst] == [torch.float64 if (j + i) % 2 else torch.float32
                                          for i in range(len(lst))]


@needs_interpreter
@pytest.mark.parametrize("case", FAMILIES, ids=_family_ids(FAMILIES))
def test_table_resident_across_steps_and_rebuilt_on_change(case):
    """One table per parameter set, reused while lr, grad_scale and found_inf change;
    rebuilt when a tensor is replaced or added."""
    args = _Args.make(case, [(3,), (CHUNK + 1,), (0,)])
    launcher.clear_table_cache()
    for k in range(3):
        args.call(_triton_step, lr=torch.tensor(args.lr * (1 + k), dtype=torch.float64),
                  grad_scale=torch.tensor(2.0 ** k), found_inf=torch.tensor(0.0))
    assert launcher.table_cache_info() == {"builds": 1, "hits": 2, "size": 1}
    table = next(iter(launcher._TABLES.values()))
    assert table.meta.device == args.params[0].device and table.meta.dtype == torch.int64
    assert table.arrivals.tolist() == [0, 0, 0]

    args.params[1] = args.params[1].clone()  # a param replaced: a new address
    args.call(_triton_step)
    assert launcher.table_cache_info()["builds"] == 2
    for lst in args.lists:  # a tensor added to the bucket
        if lst:
            lst.append(lst[0].clone())
    args.call(_triton_step)
    assert launcher.table_cache_info()["builds"] == 3
    args.call(_triton_step)
    assert launcher.table_cache_info() == {"builds": 3, "hits": 3, "size": 3}


@needs_interpreter
@pytest.mark.parametrize("case", STATEFUL, ids=_family_ids(STATEFUL))
def test_table_keyed_by_state_dtype(case):
    """A float64 state where a float32 one was (the same addresses, as reused memory may
    give) gets a table of its own: the table fixes how the kernel reads the state."""
    _needs_cpu_op(case.spec)
    args = _Args.make(case, [(3,), (BLOCK + 1,)])
    n = args.n_lists
    memory = [[torch.zeros(1, dtype=torch.float64) for _ in lst] for lst in args.lists[n:]]
    for lst, mem in zip(args.lists[n:], memory):
        for i, m in enumerate(mem):
            m.view(torch.float32)[0] = lst[i]
            lst[i] = m.view(torch.float32)[0]  # float32, at m's address
    ora = args.clone()
    args.call(_triton_step)
    ora.call(_oracle_step)
    _against_oracle(f"{case.id} float32 state", args, ora)
    for lst, mem in zip(args.lists[n:], memory):
        for i, m in enumerate(mem):
            m[0] = lst[i].item()
            lst[i] = m[0]  # float64, at the same address
    ora.lists[n:] = [[s.double() for s in lst] for lst in ora.lists[n:]]
    args.call(_triton_step)
    ora.call(_oracle_step)
    _against_oracle(f"{case.id} float64 state", args, ora, steps=2)
    assert launcher.table_cache_info()["builds"] == 2


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", FAMILIES, ids=_family_ids(FAMILIES))
def test_per_tensor_kernels_match_table_kernels(case, dtype):
    """The kernels torch.compile traces (launcher.step_per_tensor: one launch per tensor,
    tensors as arguments, then one that stores its state) compute the same bits as the
    table kernel: a scaled step, then a skipped one."""
    table = _Args.make(case, PER_TENSOR_SHAPES, dtype)
    per_tensor = table.clone()
    gen = torch.Generator().manual_seed(1)
    for k, v in enumerate(PLAN[:2]):
        grads = make_grads(PER_TENSOR_SHAPES, dtype, gen)
        table.set_grads(grads, v[0])
        per_tensor.set_grads(grads, v[0])
        table.call(launcher.step_table, **_scalars_of(v))
        per_tensor.call(launcher.step_per_tensor, **_scalars_of(v))
        _same_bits(f"{case.id} {dtype_id(dtype)} launch {k + 1}", per_tensor, table)


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
    mine = p.clone().requires_grad_()
    mine.grad = g.clone()
    fused_optim.SGD([mine], lr=1.0, backend="triton").step()
    ref = p.clone().requires_grad_()
    ref.grad = g.clone()
    torch.optim.SGD([ref], lr=1.0, foreach=False).step()
    assert torch.equal(mine.detach().view(torch.int16), ref.detach().view(torch.int16))
    truncated = (p.float() - g.float()).view(torch.int32) >> 16 << 16
    assert not torch.equal(mine.detach().float(), truncated.view(torch.float32)), "no tie"


# ---------------------------------------------------------------------------------------
# Work lists ([note: work lists] in launcher.py): Muon's element-wise stages, the op
# muon_ with its bf16 `updates` beside params of any dtype, against the C++ op on the
# same arguments, bit for bit in every dtype (no pow in its scalars: float64 is exact
# too). Muon is no row of tests/_tables.py (its class runs its own step around the
# Newton-Schulz iteration: Spec.stages_of), so its op is driven here directly; its
# class against torch.optim.Muon on this backend is tests/test_muon.py's.

# 7 tensors, 7 programs: an empty one, a full block and a tail, two chunks, a 2-D one
# scaled by 2^-16 (fp16's subnormals in the params' rounding between two ops).
MUON_SHAPES = [(1,), (3,), (BLOCK + 1,), (CHUNK + 1,), (0,), (5, 7)]
MUON_STAGES = {
    "momentum": {"apply": False, "nesterov": False, "transposed_update": False},
    "nesterov": {"apply": False, "nesterov": True, "transposed_update": False},
    "apply": {"apply": True, "nesterov": False, "transposed_update": False},
    # bf16 params: the split add (alpha * O rounded to bf16 first); others: the flag is
    # ignored, as by math/muon.h
    "apply-transposed": {"apply": True, "nesterov": False, "transposed_update": True},
}
# Two launches on the same lists: 1 - momentum and momentum on both sides of 0.5 (both
# branches of each lerp), a float64 and a float32 lr, weight decay on and off.
MUON_LAUNCHES = (
    {"lr": (0.02, torch.float64), "momentum": 0.95, "weight_decay": 0.1, "lr_ratio": 1.5},
    {"lr": (0.3, torch.float32), "momentum": 0.4, "weight_decay": 0.0, "lr_ratio": 0.7},
)


def _muon_spec():
    from fused_optim.muon import STAGES

    return STAGES


def _muon_lists(shapes, dtype: torch.dtype, seed: int = 0) -> list[list[torch.Tensor]]:
    """params, grads, momentum_buffers (dtype) and updates (bf16); the last shape's
    values scaled by 2^-16."""
    gen = torch.Generator().manual_seed(seed)
    lists: list[list[torch.Tensor]] = [[], [], [], []]
    for i, shape in enumerate(shapes):
        scale = 2.0 ** -16 if i == len(shapes) - 1 else 1.0
        for k in range(4):
            value = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
            lists[k].append(value.to(torch.bfloat16 if k == 3 else dtype))
    return lists


def _muon_kwargs(stage: str, launch: dict) -> dict:
    value, lr_dtype = launch["lr"]
    return {**launch, "lr": torch.tensor(value, dtype=lr_dtype), **MUON_STAGES[stage]}


def _muon_same_bits(label: str, got, want) -> None:
    names = _muon_spec().list_args()
    _compare(label, dict(zip(names, got)), dict(zip(names, want)), exact=True)


@needs_interpreter
@pytest.mark.parametrize("stage", list(MUON_STAGES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_muon_stages_match_cpu_op(dtype, stage):
    """Each stage, every param dtype: params, grads, buffers and the bf16 updates bit for
    bit the C++ op's after each of two launches."""
    spec = _muon_spec()
    _needs_cpu_op(spec)
    got = _muon_lists(MUON_SHAPES, dtype)
    want = [[t.clone() for t in lst] for lst in got]
    for k, launch in enumerate(MUON_LAUNCHES):
        kwargs = _muon_kwargs(stage, launch)
        _triton_step(spec, *got, **kwargs)
        _oracle_step(spec, *want, **kwargs)
        _muon_same_bits(f"muon {stage} {dtype_id(dtype)} launch {k + 1}", got, want)


@needs_interpreter
@pytest.mark.parametrize("dtype,stage", [(torch.float32, "nesterov"),
                                         (torch.bfloat16, "apply-transposed")],
                         ids=["float32-nesterov", "bfloat16-apply-transposed"])
def test_muon_production_launch_config(dtype, stage, monkeypatch):
    """The default BLOCK / CHUNK (1024 / 16384): BLOCK + 1 and CHUNK + 1 elements."""
    spec = _muon_spec()
    _needs_cpu_op(spec)
    config = launcher.LaunchConfig()
    monkeypatch.setattr(launcher, "CONFIG", config)
    got = _muon_lists([(1,), (3,), (config.block + 1,), (config.chunk + 1,)], dtype)
    want = [[t.clone() for t in lst] for lst in got]
    kwargs = _muon_kwargs(stage, MUON_LAUNCHES[0])
    _triton_step(spec, *got, **kwargs)
    _oracle_step(spec, *want, **kwargs)
    _muon_same_bits(f"muon {stage} {dtype_id(dtype)}", got, want)
    assert {t.n_programs for t in launcher._TABLES.values()} == {1 + 1 + 1 + 2}


@needs_interpreter
@pytest.mark.parametrize("dtype,stage", [(torch.float32, "nesterov"),
                                         (torch.bfloat16, "apply-transposed")],
                         ids=["float32-nesterov", "bfloat16-apply-transposed"])
def test_muon_per_tensor_kernels_match_table_kernels(dtype, stage):
    """The kernels torch.compile traces (one launch per tensor, the bf16 update an
    ordinary argument) give the table kernel's bits."""
    spec = _muon_spec()
    table = _muon_lists(PER_TENSOR_SHAPES, dtype)
    per_tensor = [[t.clone() for t in lst] for lst in table]
    kwargs = _muon_kwargs(stage, MUON_LAUNCHES[0])
    launcher.step_table(spec, *table, **kwargs)
    launcher.step_per_tensor(spec, *per_tensor, **kwargs)
    _muon_same_bits(f"muon {stage} {dtype_id(dtype)} per tensor", per_tensor, table)


@needs_interpreter
def test_muon_stages_read_and_write_only_their_lists():
    """Each stage loads only the lists it reads and stores only those it writes
    (math.muon_skip_reads / muon_skip_writes: math/muon.h's reads / writes): the
    momentum stage leaves the params alone, the apply stage the buffers, the updates and
    the grads (even with grad_scale: it never reads them). Seen in bits: bf16 NaNs whose
    payload any store would change (0x7f81: a bf16 param stores 0x7fc0, a work list
    0x7fc1) stay in every list a stage does not write."""
    from fused_optim.triton_kernels.launcher import _prepare

    spec = _muon_spec()
    for stage, reads, writes in (("nesterov", {1, 2}, {1, 2, 3}), ("apply", {0, 3}, {0})):
        lists = _muon_lists([(BLOCK + 1,), (3,)], torch.bfloat16)
        before = [[t.clone() for t in lst] for lst in lists]
        for k in set(range(4)) - writes:
            for t in lists[k]:
                t.view(torch.int16).fill_(0x7F81)
        kwargs = _muon_kwargs(stage, MUON_LAUNCHES[0])
        h = {key: v for key, v in kwargs.items() if key != "lr"}
        c = _prepare(spec.op, spec, lists, h, torch.tensor(1.0)).constexprs
        assert c["READS"] == sum(1 << k for k in reads), stage
        assert c["WRITES"] == sum(1 << k for k in writes - {1}), stage  # grad: when read
        _triton_step(spec, *lists, grad_scale=torch.tensor(2.0), **kwargs)
        for k in range(4):
            for i, t in enumerate(lists[k]):
                if k in writes:
                    assert not torch.equal(t, before[k][i]), f"{stage}: list {k} not written"
                else:
                    assert (t.view(torch.int16) == 0x7F81).all(), f"{stage}: list {k} written"


@needs_interpreter
def test_muon_work_list_checks():
    """The C++ op's checks of a call with work lists: the work list in its own dtype,
    the other lists in the params' (never a memory policy's state dtype), no policy."""
    spec = _muon_spec()
    kwargs = _muon_kwargs("nesterov", MUON_LAUNCHES[0])
    lists = _muon_lists([(3,)], torch.float32)
    with pytest.raises(RuntimeError, match=r"updates\[0\] must be bfloat16 \(a bfloat16 work "
                                           r"list\)"):
        _triton_step(spec, *lists[:3], [t.float() for t in lists[3]], **kwargs)
    lists = _muon_lists([(3,)], torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] is torch.float32, "
                                           r"params\[0\] is torch.bfloat16"):
        _triton_step(spec, *lists[:2], [t.float() for t in lists[2]], lists[3], **kwargs)
    with pytest.raises(RuntimeError, match="takes no memory policy"):
        _triton_step(spec, *lists, master_params=[t.float() for t in lists[0]], **kwargs)


# ---------------------------------------------------------------------------------------
# The row-sparse engine (triton_kernels/sparse.py) against the C++ one
# (torch.ops.fused_optim.sparse_rows_, csrc/sparse_rows.cpp)

SPARSE_MATHS = ["sparse_adam", "adagrad", "sgd"]
# Param 0 has no entries (the kernel then addresses everything from param 1); param 1's
# row 3 five times, row 1 twice, rows 2, 4 and 6-11 never; param 2's rows 6 and 2 three
# times each (interleaved), rows 1 and 3-5 never. Widths 5 and 3 with a row block of 4
# (test_sparse_matches_cpu_op): a full block and a masked one, and a param with no
# second block.
SPARSE_SHAPES = [(4, 2), (13, 5), (7, 3)]
SPARSE_ROWS = [[], [3, 1, 3, 0, 12, 3, 5, 3, 1, 3], [6, 2, 2, 0, 6, 6, 2]]
# Per-tensor constants of each row math (SparseGrads.constants' order), different for
# every param so that a kernel reading another param's constants shows:
# sparse_adam (1 - beta1, 1 - beta2, eps, -step_size), adagrad (eps, -clr), sgd (-lr).
SPARSE_CONSTANTS = {
    "sparse_adam": [[0.3, 0.1, 1e-4, -1.0], [0.1, 1e-3, 1e-8, -1e-2],
                    [0.2, 1e-2, 1e-6, -3e-2]],
    "adagrad": [[1e-3, -1.0], [1e-10, -5e-2], [1e-6, -0.1]],
    "sgd": [[-1.0], [-5e-2], [-0.3]],
}


def _needs_sparse_cpu_op() -> None:
    if _extension.C is None:
        pytest.skip(f"no C++ op to compare with: {_extension.LOAD_ERROR}")
    if not hasattr(torch.ops.fused_optim, "sparse_rows_"):
        pytest.skip("no C++ op to compare with: fused_optim._C has no sparse_rows_")


def _sparse_engine():
    from fused_optim.triton_kernels import sparse
    return sparse


def _math_module():
    from fused_optim.triton_kernels import math
    return math


class _SparseCall:
    """One sparse_step call's arguments (fused_optim/_sparse.py's contract): params,
    states (state-major, non-negative: the row maths take square roots of them), the
    entries' rows and values, the constants."""

    def __init__(self, math: str, dtype: torch.dtype, shapes, rows, gen: torch.Generator,
                 constants=None):
        n_states = getattr(_math_module(), f"{math}_rows_shape").states
        self.math = math
        self.params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)
                       for s in shapes]
        self.states = [torch.rand(s, generator=gen, dtype=torch.float64).to(dtype)
                       for _ in range(n_states) for s in shapes]
        self.rows = [torch.tensor(r, dtype=torch.int64) for r in rows]
        self.values = [torch.randn(len(r), s[1], generator=gen,
                                   dtype=torch.float64).to(dtype)
                       for r, s in zip(rows, shapes)]
        self.constants = torch.tensor(constants or SPARSE_CONSTANTS[math][:len(shapes)],
                                      dtype=torch.float64)

    def clone(self) -> "_SparseCall":
        other = object.__new__(_SparseCall)
        other.__dict__.update(self.__dict__)
        other.params = [p.clone() for p in self.params]
        other.states = [s.clone() for s in self.states]
        return other

    def run(self, fn, maximize: bool) -> None:
        fn(self.math, self.params, self.rows, self.values, self.states, self.constants,
           maximize=maximize)

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"param": self.params, "state": self.states}


def _cpu_sparse_step(math, params, rows, values, states, constants, *, maximize) -> None:
    with cpu_capability("default"):
        torch.ops.fused_optim.sparse_rows_(params, rows, values, states, constants,
                                           math=math, maximize=maximize)


@functools.lru_cache(maxsize=None)
def _interpreter_fuses_fma() -> bool:
    """Whether this Triton's interpreter rounds tl.fma once, as compiled kernels do
    (fma.rn). Triton 3.9's does; 3.6's (the H200 machine's) rounds the product first:
    there the row maths that use one (SGD's and Adagrad's add_(alpha=) in fp32 / fp64)
    part from the C++ engine by an ulp in an element or two (measured: 1-2 of 65)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fma_kernel(x_ptr, out_ptr):
        a = tl.load(x_ptr)
        c = tl.load(x_ptr + 1)
        tl.store(out_ptr, tl.fma(a, a, c))

    # (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24: a float32 product rounds the 2^-24 away.
    x = torch.tensor([1 + 2.0**-12, -(1 + 2.0**-11)], dtype=torch.float32)
    out = torch.zeros(1, dtype=torch.float32)
    fma_kernel[(1,)](x, out)
    return out.item() != 0.0


def _sparse_exact(math: str, dtype: torch.dtype) -> bool:
    """Bit-equal to the C++ engine, unless the interpreter's tl.fma rounds twice and the
    math uses one (then within the dtype's ulps: _interpreter_fuses_fma)."""
    uses_fma = math in ("sgd", "adagrad") and dtype in (torch.float32, torch.float64)
    return not uses_fma or _interpreter_fuses_fma()


@needs_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("math", SPARSE_MATHS)
def test_sparse_matches_cpu_op(math, dtype, monkeypatch):
    """Three params in one call (the first without entries), duplicate rows, a row touched five
    times, untouched rows, rows of two blocks (a row block of 4 elements), maximize off
    then on: params and states bit for bit those of the C++ engine after each call.
    Exact, not within ulps: the row maths are the same operation sequence with the same
    roundings and fused multiply-adds, and the entries are summed in the same order (the
    C++ engine sorts a coalescing math's entries with torch's unstable sort, which leaves
    these few duplicates in index order: checked below; many duplicates are the next
    test's). The warning filter: masked-off lanes of the interpreter divide 0 by fp16's
    eps rounded to 0."""
    _needs_sparse_cpu_op()
    sparse = _sparse_engine()
    monkeypatch.setattr(sparse, "MAX_BLOCK", 4)
    for r in SPARSE_ROWS:
        r = torch.tensor(r, dtype=torch.int64)
        assert torch.equal(torch.sort(r).indices, torch.sort(r, stable=True).indices)
    gen = torch.Generator().manual_seed(0)
    tri = _SparseCall(math, dtype, SPARSE_SHAPES, SPARSE_ROWS, gen)
    cpu = tri.clone()
    n = len(SPARSE_SHAPES)
    for maximize in (False, True):
        before = tri.clone()
        versions = [t._version for t in tri.params + tri.states]
        tri.run(backends.get_backend("triton").sparse_step, maximize)
        cpu.run(_cpu_sparse_step, maximize)
        _compare(f"sparse {math} {dtype_id(dtype)} maximize={maximize}", tri.tensors(),
                 cpu.tensors(), exact=_sparse_exact(math, dtype))
        # Only the touched rows changed (each of them, in the params: an element's
        # update may round away in fp16 / bf16, a whole row's does not), and autograd
        # was told about the in-place writes (not for param 0, which has no entries).
        for t, r in enumerate(SPARSE_ROWS):
            touched = torch.zeros(SPARSE_SHAPES[t][0], dtype=torch.bool)
            touched[r] = True
            for j, (a, b) in enumerate(zip(tri.params[t::n] + tri.states[t::n],
                                           before.params[t::n] + before.states[t::n])):
                assert torch.equal(_bits(a[~touched]), _bits(b[~touched])), (t, j)
            assert (tri.params[t][touched] != before.params[t][touched]).any(1).all(), t
        assert [t._version > v for t, v in zip(tri.params + tri.states, versions)] == [
            i % n != 0 for i in range(len(versions))]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("math", [m for m in SPARSE_MATHS
                                  if m != "sgd"])  # the maths that coalesce
def test_sparse_sums_duplicates_in_index_order(math, dtype):
    """Many duplicates (40 and 30 entries of two rows, interleaved, and a single one):
    the engine sums a row's entries in index order (its stable sort), each sum rounded
    to the storage dtype, exactly as the C++ engine updates with those sums given as a
    coalesced grad (strictly increasing rows: no sort). The C++ engine on the raw
    entries sums in its unstable sort's order, which differs here (checked): measured
    up to 16 fp32 ulps (Adagrad's sum, cancellation in the grad's sum) and 19 bf16 ulps
    from this engine, which is why the order is tested exactly instead."""
    _needs_sparse_cpu_op()
    gen = torch.Generator().manual_seed(1)
    rows = torch.cat([torch.full((40,), 2), torch.full((30,), 4), torch.tensor([0])])
    rows = rows[torch.randperm(len(rows), generator=gen)]
    assert not torch.equal(torch.sort(rows).indices, torch.sort(rows, stable=True).indices)
    tri = _SparseCall(math, dtype, [(6, 5)], [rows.tolist()], gen)
    coalesced = tri.clone()
    unique = rows.unique()
    sums = []
    for row in unique.tolist():
        at = (rows == row).nonzero().flatten().tolist()
        acc = tri.values[0][at[0]]
        for i in at[1:]:
            acc = (acc.float() + tri.values[0][i].float()).to(dtype)  # opmath add, rounded
        sums.append(acc)
    coalesced.rows, coalesced.values = [unique], [torch.stack(sums)]
    tri.run(backends.get_backend("triton").sparse_step, False)
    coalesced.run(_cpu_sparse_step, False)
    _compare(f"sparse {math} {dtype_id(dtype)} duplicates", tri.tensors(),
             coalesced.tensors(), exact=True)


# (fused_optim class, torch.optim class, options): every optimizer whose spec takes sparse
# grads through the row math, with maximize and its other options.
SPARSE_CLASS_CASES = [
    (fused_optim.SparseAdam, torch.optim.SparseAdam, {"lr": 1e-2}),
    (fused_optim.SparseAdam, torch.optim.SparseAdam,
     {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True}),
    (fused_optim.SGD, torch.optim.SGD, {"lr": 5e-2}),
    (fused_optim.SGD, torch.optim.SGD, {"lr": 5e-2, "maximize": True}),
    (fused_optim.Adagrad, torch.optim.Adagrad,
     {"lr": 5e-2, "lr_decay": 0.1, "initial_accumulator_value": 0.1}),
    (fused_optim.Adagrad, torch.optim.Adagrad, {"lr": 5e-2, "maximize": True}),
]


@needs_interpreter
@pytest.mark.usefixtures("oracle_threads")
@pytest.mark.parametrize("fused,reference,options", SPARSE_CLASS_CASES,
                         ids=[f"{f.__name__}-{'-'.join(o)}"
                              for f, _, o in SPARSE_CLASS_CASES])
def test_sparse_embedding_matches_torch_optim(fused, reference, options, monkeypatch):
    """nn.Embedding(20, 4, sparse=True) for 3 steps (a row looked up five times per
    batch): backend="triton" bit for bit the "cpu" backend (the C++ engine), and within
    TOLERANCES of torch.optim (measured: SparseAdam and SGD bit-equal, Adagrad 1 ulp:
    torch's own sparse ops, not the row math's order, decide that last place); weight and
    every state. The Triton engine ran once per step (not a fallback)."""
    _needs_sparse_cpu_op()
    sparse = _sparse_engine()
    calls = []
    real = sparse.sparse_step
    monkeypatch.setattr(sparse, "sparse_step",
                        lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(20, 4, generator=gen)
    sides = {}
    for name in ("triton", "cpu", "torch"):
        emb = torch.nn.Embedding(20, 4, sparse=True)
        with torch.no_grad():
            emb.weight.copy_(weight)
        opt = (reference(emb.parameters(), **options) if name == "torch"
               else fused(emb.parameters(), backend=name, **options))
        sides[name] = (emb, opt)
    for step in range(1, 4):
        idx = torch.randint(0, 20, (3, 4), generator=gen)
        idx[0, :] = 5
        idx[1, 0] = 5
        out_grad = torch.randn(3, 4, 4, generator=gen)
        for emb, opt in sides.values():
            opt.zero_grad()
            emb(idx).backward(out_grad)
            opt.step()
        got = {"weight": [sides["triton"][0].weight.detach()]}
        want = {name: {"weight": [sides[name][0].weight.detach()]}
                for name in ("cpu", "torch")}
        for key, value in sides["triton"][1].state[sides["triton"][0].weight].items():
            got[key] = [torch.as_tensor(value)]
            for name in ("cpu", "torch"):
                emb, opt = sides[name]
                want[name][key] = [torch.as_tensor(opt.state[emb.weight][key])]
        label = f"{fused.__name__} {options} step {step}"
        _compare(f"{label} vs cpu", got, want["cpu"],
                 exact=_sparse_exact(fused.spec.sparse.math, torch.float32))
        # A step count (SparseAdam's is an int, a tensor in fused_optim's state_dict form
        # or not) compared as a number; the floating-point rest within tolerance.
        for key in [k for k, v in got.items() if not v[0].is_floating_point()
                    or v[0].numel() == 1]:
            assert float(got.pop(key)[0]) == float(want["torch"].pop(key)[0]), (label, key)
        _compare(f"{label} vs torch.optim", got, want["torch"], exact=False, steps=step)
    assert len(calls) == 3, calls


@needs_interpreter
def test_sparse_step_edge_cases_and_checks():
    """Params without entries (and with empty rows) change nothing; each row math's
    shape agrees with its spec (states, coalescing); a call that breaks the contract
    raises before anything runs."""
    from fused_optim.spec import specs

    step = backends.get_backend("triton").sparse_step
    maths = {s.sparse.math: s.sparse for s in specs() if s.sparse is not None}
    assert sorted(maths) == sorted(SPARSE_MATHS)
    for name, rule in maths.items():
        shape = getattr(_math_module(), f"{name}_rows_shape")
        assert (shape.states, shape.coalesce) == (len(rule.states), rule.coalesce), name
        assert shape.constants == len(SPARSE_CONSTANTS[name][0]), name

    gen = torch.Generator().manual_seed(3)
    call = _SparseCall("adagrad", torch.float32, [(4, 3), (5, 0)], [[], [1, 1]], gen,
                       constants=[[1e-10, -0.1], [1e-10, -0.1]])
    before = call.clone()
    call.run(step, False)
    _compare("no entries", call.tensors(), before.tensors(), exact=True)

    def expect(message, **changes):
        args = dict(math="adagrad", params=call.params, rows=call.rows, values=call.values,
                    states=call.states, constants=call.constants)
        args.update(changes)
        with pytest.raises((RuntimeError, NotImplementedError), match=message):
            step(args.pop("math"), *args.values(), maximize=False)

    expect("no Triton row math 'adam'", math="adam")
    expect("keeps 1 states per param: expected 2 state tensors, got 1",
           states=call.states[:1])
    expect(r"constants must be a float64 CPU tensor of shape \[2, 2\]",
           constants=call.constants[:, :1].contiguous())
    expect(r"rows\[0\] must be a 1-D int64", rows=[call.rows[0].int(), call.rows[1]])
    expect(r"values\[1\] must be a contiguous torch.float32 tensor of shape \[2, 0\]",
           values=[call.values[0], torch.zeros(2, 1)])
    expect(r"params\[1\] must be a contiguous 2-D", params=[call.params[0], torch.zeros(5)])
    expect(r"states\[0\] must be a contiguous", states=[call.states[0].double(),
                                                         call.states[1]])
    for bad in ([1, 4], [-1, 1]):  # params[0] has 4 rows
        expect("row index out of range", rows=[torch.tensor(bad), call.rows[1]],
               values=[torch.ones(2, 3), call.values[1]])
    _compare("after the errors", call.tensors(), before.tensors(), exact=True)


# ---------------------------------------------------------------------------------------
# Errors, availability, registration


@needs_interpreter
@pytest.mark.parametrize("case", FAMILIES, ids=_family_ids(FAMILIES))
def test_input_errors(case):
    """The op's checks (launcher._prepare, _check_bucket, _check_scalar) and messages,
    for every list and state list of the spec."""
    spec = case.spec
    args = _Args.make(case, [(3,), (4,)])
    prefix = re.escape(f"fused_optim_triton::{spec.op}: ")
    n_lists, n_all = args.n_lists, len(args.lists)

    def expect(message, lists=None, h=None, fn=_triton_step, **kwargs):
        launcher.clear_table_cache()  # the checks run when a table is built
        with pytest.raises(RuntimeError, match=prefix + message):
            fn(spec, *(args.lists if lists is None else lists),
               lr=kwargs.pop("lr", torch.tensor(args.lr)), **(args.h if h is None else h),
               **kwargs)

    def replaced(k, tensors):
        return [tensors if j == k else lst for j, lst in enumerate(args.lists)]

    expect(f"expected {n_all} lists, got {n_all - 1}", args.lists[:-1], fn=launcher.step_table)
    for k, s in enumerate(spec.lists, start=2):
        if s.when is None or not args.lists[k]:
            continue
        off = {**args.h, s.when: type(args.h[s.when])(0)}
        expect(f"{s.arg} must be empty when {s.when}=", h=off)
    for k in range(1, n_all):
        if args.lists[k]:
            expect(rf"expected 2 {args.names[k]} \(one per param\), got 1",
                   replaced(k, args.lists[k][:1]))
    expect("all tensors of one call must have one dtype",
           replaced(1, [t.double() for t in args.grads]))
    expect(r"grads\[1\] has shape \(2, 2\)", replaced(1, [args.grads[0], args.grads[1].view(2, 2)]))
    strided = [[torch.zeros(6, dtype=lst[0].dtype)[::2], lst[1]] if k < n_lists and lst else lst
               for k, lst in enumerate(args.lists)]
    expect(r"params\[0\] must be non-overlapping and dense", strided)
    for j in range(n_lists, n_all):
        expect("state must be float32 or float64",
               replaced(j, [torch.tensor(1), torch.tensor(2)]))
        expect(rf"{args.names[j]}\[0\] must be a one-element tensor",
               replaced(j, [torch.zeros(2), args.lists[j][1]]))
    expect("grad_scale must be float32", grad_scale=torch.tensor(2.0, dtype=torch.float64))
    expect("found_inf must be a one-element tensor", found_inf=torch.zeros(2))
    expect("lr must be a one-element tensor", lr=torch.tensor([1e-3, 1e-3]))

    # A row must share one layout.
    mixed = _channels_last(_Args.make(case, [(2, 3, 4, 5)]))
    mixed.lists[1] = [t.contiguous() for t in mixed.lists[1]]
    with pytest.raises(RuntimeError, match=prefix + r"grads\[0\] has strides"):
        mixed.call(_triton_step)


def _channels_last(args: _Args) -> _Args:
    for lst in args.lists[:args.n_lists]:
        lst[:] = [t.contiguous(memory_format=torch.channels_last) for t in lst]
    return args


@needs_interpreter
@pytest.mark.parametrize("case", FAMILIES, ids=_family_ids(FAMILIES))
def test_channels_last_rows(case):
    """Rows of channels_last tensors are dense: accepted, and stepped as by the C++ op."""
    _needs_cpu_op(case.spec)
    row = _channels_last(_Args.make(case, [(2, 3, 4, 5), (1, 2, 3, 2)]))
    ora = row.clone()
    assert ora.params[0].is_contiguous(memory_format=torch.channels_last)
    assert not ora.params[0].is_contiguous()
    row.call(_triton_step)
    ora.call(_oracle_step)
    _against_oracle(f"{case.id} channels_last", row, ora)


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
@pytest.mark.parametrize("case", FAMILIES, ids=_family_ids(FAMILIES))
def test_ops_registered_with_fake_kernels(case):
    """torch.ops.fused_optim_triton.<op> of every spec is a triton_op: schema (mutations)
    and the fake kernel check out. It takes every argument positionally: the lists, lr,
    grad_scale, found_inf, the spec's floats and flags, then master_params and
    rng_states, empty here (triton_kernels/ops.py; with them: test_policy.py).
    (torch.compile's trace needs compiled kernels: test_torch_compile_traces_*.)"""
    spec = case.spec
    args = _Args.make(case, [(3,), (BLOCK + 1,)])
    positional = (*args.lists, torch.tensor(args.lr, dtype=torch.float64), torch.tensor(2.0),
                  torch.tensor(0.0), *(args.h[x.name] for x in spec.floats),
                  *(args.h[x.name] for x in spec.flags), [], [])
    op = getattr(torch.ops.fused_optim_triton, spec.op).default
    result = torch.library.opcheck(op, positional,
                                   test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}, result


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


def _subprocess_env(**extra) -> dict[str, str]:
    return dict(os.environ, **extra, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))


def test_package_imports_without_triton():
    res = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON],
                         env=_subprocess_env(TRITON_INTERPRET="1"), cwd=str(ROOT),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


# The compile subprocesses read the cases from tests/_tables.py (argv[1] is tests/), and
# the call's constexprs from launcher._prepare, as a real step makes them.
_CASE_ARGS = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
from _tables import FULL_CASES

FAMILIES = {}
for c in FULL_CASES:
    FAMILIES.setdefault(c.spec.name, c)

def hyper_of(case):
    # The op's float and bool arguments of a case, as its optimizer class passes them.
    opt = case.fused([torch.zeros(1, requires_grad=True)], **case.options)
    h = {x.name: x.kind() for x in case.spec.hypers if x.group_key == ""}
    h.update(opt._hyper(opt.param_groups[0]))
    return h

def lists_of(case, h, sizes, dtype=torch.float32):
    spec = case.spec
    lists = [[torch.randn(k, dtype=dtype) for k in sizes] for _ in spec.list_args()]
    for k, s in enumerate(spec.lists, start=2):
        if not spec.has(s, h):
            lists[k] = []
    return lists + [[torch.zeros(()) for _ in sizes] for _ in spec.scalars]
"""

_COMPILE_FOR_SM90 = _CASE_ARGS + r"""
import os, re
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # silence triton 3.9's notice
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_optim import _triton_backend
_triton_backend.load_kernels()
from fused_optim.triton_kernels import launcher as L

TYPE = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16"}

def compile_ptx(kernel, types, constexprs):
    names = kernel.arg_names
    missing = [n for n in names if n not in types and n not in constexprs]
    assert not missing, f"{kernel.__name__}: no type or value for {missing}"
    sig = {n: types.get(n, "constexpr") for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if isinstance(sig[n], str) and sig[n].startswith("*")}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "enable_fp_fusion": False}).asm["ptx"]

def prepared(case, dtype, policy=None, h=None, lists=None):
    # policy: (state dtype, master, stochastic) of a memory policy, or None; h and lists:
    # the call's arguments (default: the case's, through its class)
    h = h or hyper_of(case)
    lists = lists or lists_of(case, h, [4], dtype)
    master = rng = None
    if policy is not None:
        state, m, r = policy
        n = len(case.spec.list_args())
        lists = [[t.to(state) for t in lst] if 2 <= k < n else lst
                 for k, lst in enumerate(lists)]
        master = [torch.zeros(4)] if m else None
        rng = [torch.zeros(2, dtype=torch.int64)] if r else None
    call = L._prepare(case.spec.op, case.spec, lists, h, None, master, rng)
    consts = dict(call.constexprs, DTYPE=L._TL_DTYPE[dtype], OPMATH=L._opmath(dtype),
                  STATE_F64=0, MAXIMIZE=bool(h.get("maximize", False)),
                  CHUNK=16384, BLOCK=1024)
    return consts, {"hyper": ("fp32",) * len(call.hyper)}, call.state_dtype

def table_kernel(case, dtype, device_scalars, state_f64=0, policy=None, h=None, lists=None):
    consts, types, state = prepared(case, dtype, policy, h, lists)
    consts["STATE_F64"] = state_f64
    types.update(base="*" + TYPE[dtype], state_base="*" + TYPE[state], list_offsets="*i64",
                 state_ptrs="*i64", numels="*i64", n_chunks="*i64", work="*i64",
                 arrivals="*i32", n_tensors="i32", lr_parts=("fp32", "fp32", "fp32"))
    consts.update(LR_ON_DEVICE=device_scalars, UNSCALE=device_scalars,
                  HAS_FOUND_INF=device_scalars, ELEM_ALIGN=16 // dtype.itemsize,
                  STATE_ALIGN=16 // state.itemsize, WORK_ALIGN=8, MASTER_ALIGN=4,
                  LR_DTYPE=tl.float32 if device_scalars else tl.float64)
    if consts["FIXED"]:  # the work lists (bf16: Muon's)
        types["work_base"] = "*bf16"
    else:
        consts["work_base"] = None
    for name in ("lr_ptr", "grad_scale_ptr", "found_inf_ptr"):
        if device_scalars:
            types[name] = "*fp32"
        else:
            consts[name] = None
    if consts["MASTER"]:
        types.update(master_base="*fp32", master_offsets="*i64")
    else:
        consts.update(master_base=None, master_offsets=None)
    if consts["STOCHASTIC"]:
        types["rng_ptrs"] = "*i64"
    else:
        consts["rng_ptrs"] = None
    return compile_ptx(L._table_kernel, types, consts)

def tensor_kernel(case, dtype):
    consts, types, _ = prepared(case, dtype)
    types.update(numel="i64", lr_ptr="*fp64", grad_scale_ptr="*fp32", found_inf_ptr="*fp32")
    consts.update(LR_DTYPE=tl.float64, UNSCALE=True, HAS_FOUND_INF=True, m=None, rng=None)
    for k in range(8):
        if k < consts["N_LISTS"] and (consts["LISTS"] >> k) & 1:
            types[f"x{k}"] = "*" + TYPE[dtype]
        else:
            consts[f"x{k}"] = None
    for j in range(4):
        if j < consts["N_STATES"]:
            types[f"s{j}"] = "*fp32"
        else:
            consts[f"s{j}"] = None
    return compile_ptx(L._tensor_kernel, types, consts)

# Every family's fp32 table kernel (device lr, grad_scale, found_inf), SGD's bf16 table
# kernel (lr by value, nothing else), Adam's fp64 per-tensor kernel.
jobs = [(f"{name} fp32 table", case, lambda c: table_kernel(c, torch.float32, True))
        for name, case in FAMILIES.items()]
if "sgd" in FAMILIES:
    jobs.append(("sgd bf16 table", FAMILIES["sgd"],
                 lambda c: table_kernel(c, torch.bfloat16, False)))
if "adam" in FAMILIES:
    jobs.append(("adam fp64 per-tensor", FAMILIES["adam"],
                 lambda c: tensor_kernel(c, torch.float64)))
# The memory policy's table kernels: AdamW (amsgrad: three state lists, the fourth random
# word) on bf16 params with fp32 master copies and bf16 states rounded stochastically,
# SGD on fp32 params with bf16 states rounded stochastically.
for name, policy_dtype, policy in (("adam", torch.bfloat16, (torch.bfloat16, True, True)),
                                   ("sgd", torch.float32, (torch.bfloat16, False, True))):
    if name in FAMILIES:
        jobs.append((f"{name} {TYPE[policy_dtype]} policy table", FAMILIES[name],
                     lambda c, d=policy_dtype, p=policy: table_kernel(c, d, True, policy=p)))
# Muon's stages (its op's bf16 work list beside the params: [note: work lists] in
# launcher.py; Muon is no row of the tables): the momentum stage with nesterov on fp32
# params, the apply stage on fp64 params, the split add on bf16 params.
from types import SimpleNamespace
from fused_optim.muon import STAGES as MUON

def muon_table(dtype, **flags):
    h = {"momentum": 0.95, "weight_decay": 0.1, "lr_ratio": 1.5, "nesterov": False,
         "apply": False, "transposed_update": False, **flags}
    lists = [[torch.randn(4, dtype=dtype)] for _ in range(3)] + [[torch.randn(4).bfloat16()]]
    return lambda c: table_kernel(c, dtype, True, h=h, lists=lists)

muon = SimpleNamespace(spec=MUON)
jobs += [("muon fp32 table, momentum nesterov", muon, muon_table(torch.float32, nesterov=True)),
         ("muon fp64 table, apply", muon, muon_table(torch.float64, apply=True)),
         ("muon bf16 table, apply split", muon,
          muon_table(torch.bfloat16, apply=True, transposed_update=True))]
# Every per-tensor state list of every family in float64 but the first (a loaded float64
# model's state: step float32, the others float64).
for name, case in FAMILIES.items():
    n_states = len(case.spec.scalars)
    if n_states > 1:
        mask = (1 << n_states) - 2
        jobs.append((f"{name} fp32 table, state mask {mask}", case,
                     lambda c, m=mask: table_kernel(c, torch.float32, True, m)))
for label, case, build in jobs:
    ptx = build(case)
    count = lambda pattern: len(re.findall(pattern, ptx))
    width = "v2" if "fp64" in label else "v4"  # 16 bytes
    vector = count(rf"ld\.global\.{width}") and count(rf"st\.global\.{width}")
    print(label, "vector", vector, "div.rn", count(r"div\.rn"), "sqrt.rn", count(r"sqrt\.rn"),
          "div.full", count(r"div\.full"), "fma.rn", count(r"fma\.rn"), "atom", count("atom"))
    assert vector, f"{label}: no 16-byte vectorized loads and stores"
    # No contracted multiply-add in the element math. In fp32 / bf16 kernels that math is
    # float32, and float64 instructions are per-tensor scalars: libdevice's float64 exp
    # and log (NAdam's and ASGD's pow) are built from fma.rn.f64, on purpose. Muon's math
    # has explicit ones (ATen's lerp and add: math/muon.h), but for the split add.
    fma = r"fma\.rn" if "fp64" in label else r"fma\.rn\.f32"
    assert not count(r"div\.full|div\.approx|sqrt\.approx"), f"{label}: inexact ops"
    if label.startswith("muon"):
        assert bool(count(fma)) == ("split" not in label), f"{label}: {fma}"
    else:
        assert not count(fma), f"{label}: contracted multiply-add"
    if "policy" in label:  # the random counter is advanced once per tensor too
        assert count("atom") and count(r"mul\.hi\.u32"), f"{label}: atom, Philox"
    elif "table" in label:
        assert bool(count("atom")) == bool(case.spec.scalars), f"{label}: atom"
    if label.split()[0] == "adam":
        f = "f64" if "fp64" in label else "f32"
        assert count(rf"div\.rn\.{f}") and count(rf"sqrt\.rn\.{f}"), f"{label}: no IEEE ops"

# The row-sparse kernel (triton_kernels/sparse.py) of every row math: fp32, bf16 and
# fp64 with aligned rows (ELEM_ALIGN: 16-byte vectorized accesses), fp16 without.
from fused_optim.triton_kernels import math as M, sparse as SP
for math in ("sparse_adam", "adagrad", "sgd"):
    shape = getattr(M, f"{math}_rows_shape")
    for dtype, align in ((torch.float32, 4), (torch.bfloat16, 8), (torch.float64, 2),
                         (torch.float16, 1)):
        label = f"{math} {TYPE.get(dtype, 'fp16')} rows, ELEM_ALIGN {align}"
        ptx = compile_ptx(SP._rows_kernel, dict(
            base="*" + TYPE.get(dtype, "fp16"), table="*i64", keys="*i64", perm="*i64",
            tensor_of="*i64", nnz="i32"), dict(
            ROWS=getattr(M, f"{math}_rows"), N_STATES=shape.states,
            N_CONSTANTS=shape.constants, COALESCE=shape.coalesce, DTYPE=L._TL_DTYPE[dtype],
            OPMATH=L._opmath(dtype), MAXIMIZE=True, BLOCK=1024, ELEM_ALIGN=align))
        count = lambda pattern: len(re.findall(pattern, ptx))
        print(label, "v4/v2 loads", count(r"ld\.global\.v[24]"), "div.rn", count(r"div\.rn"),
              "sqrt.rn", count(r"sqrt\.rn"), "fma.rn", count(r"fma\.rn"))
        if align > 1:
            width = "v2" if dtype == torch.float64 else "v4"
            assert count(rf"ld\.global\.{width}") and count(rf"st\.global\.{width}"), label
        assert not count(r"div\.full|div\.approx|sqrt\.approx"), f"{label}: inexact ops"
        # Fused multiply-adds exactly where the row math has one (add_scaled in fp32 /
        # fp64: sgd, adagrad), none contracted anywhere else.
        fused = math in ("sgd", "adagrad") and dtype in (torch.float32, torch.float64)
        assert bool(count(r"fma\.rn")) == fused, f"{label}: fma.rn"
        if math != "sgd":
            assert count(r"div\.rn") and count(r"sqrt\.rn"), f"{label}: no IEEE ops"
print("OK")
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler: compile the table kernel of
    every optimizer family (fp32; SGD also bf16) and of Muon's stages (fp32, fp64, bf16,
    with their bf16 work list), Adam's fp64 per-tensor kernel and the row-sparse kernel
    of every row math (fp32, bf16, fp64, fp16) to PTX for sm_90 (no GPU needed), and
    check what the design relies on: 16-byte vectorized accesses, IEEE division and
    sqrt, no contracted FMA (the explicit ones of the row maths and of Muon's where they
    have them), the arrivals atomic exactly where there is per-tensor state."""
    res = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90, str(TESTS)],
                         env=_subprocess_env(), cwd=str(ROOT), capture_output=True, text=True,
                         timeout=600)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("triton's ptxas is not available")
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]


_TRACE_WITH_TORCH_COMPILE = _CASE_ARGS + r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
from torch._dynamo.backends.common import aot_autograd
from fused_optim import _triton_backend
_triton_backend.load_kernels()

graphs = []
class Traced(Exception):
    pass
def keep_graph(gm, example_inputs):
    graphs.append(gm.code)
    raise Traced  # compiled kernels cannot run without a GPU: stop after tracing

def traced_code(op, args):
    # The code of the graph torch.compile traces for op(*args).
    def step(*args):
        op(*args)

    graphs.clear()
    torch._dynamo.reset()
    try:
        torch.compile(step, backend=aot_autograd(fw_compiler=keep_graph), fullgraph=True)(*args)
    except Exception as exc:
        assert graphs, exc
    return graphs[0]

sizes = [3, 5, 40000]
for name, case in FAMILIES.items():
    spec = case.spec
    h = hyper_of(case)
    op = getattr(torch.ops.fused_optim_triton, spec.op)
    args = (*lists_of(case, h, sizes), torch.tensor(1e-3), torch.tensor(2.0),
            torch.tensor(0.0), *(h[x.name] for x in spec.floats),
            *(h[x.name] for x in spec.flags), [], [])
    code = traced_code(op, args)
    nodes = code.count("triton_kernel_wrapper_functional(")
    tensor_nodes = code.count("'numel': ")  # _tensor_kernel's; _state_kernel has none
    print(name, "nodes", nodes, "tensor kernels", tensor_nodes)
    assert tensor_nodes == len(sizes), code
    assert nodes == len(sizes) * (2 if spec.scalars else 1), code
    assert code.count("grid = [(3, 1, 1)]") == 1, code  # 40000 elements: 3 chunks of 16384
    assert "aten.add" not in code, code  # the state is advanced by the kernels

# Muon's stages (its bf16 work list an ordinary bf16 argument of the per-tensor kernel):
# one node per tensor and stage, no state kernel (no per-tensor state).
from fused_optim.muon import STAGES as MUON
for apply in (False, True):
    lists = [[torch.randn(k) for k in sizes] for _ in range(3)]
    lists.append([torch.randn(k).bfloat16() for k in sizes])
    args = (*lists, torch.tensor(1e-3), None, None, 0.95, 0.1, 1.5, True, apply, False, [], [])
    code = traced_code(torch.ops.fused_optim_triton.muon_, args)
    nodes = code.count("triton_kernel_wrapper_functional(")
    print("muon apply" if apply else "muon momentum", "nodes", nodes)
    assert code.count("'numel': ") == len(sizes) and nodes == len(sizes), code

# SGD with the memory policy (bf16 params and momentum buffers, fp32 master copies,
# stochastic rounding): per tensor its kernel and its state kernel (which advances its
# random counter, as SGD has no per-tensor state).
if "sgd" in FAMILIES:
    case = FAMILIES["sgd"]
    spec = case.spec
    h = hyper_of(case)
    lists = [[t.bfloat16() for t in lst] for lst in lists_of(case, h, sizes)]
    args = (*lists, torch.tensor(1e-3), None, torch.tensor(0.0),
            *(h[x.name] for x in spec.floats), *(h[x.name] for x in spec.flags),
            [torch.zeros(k) for k in sizes], [torch.tensor([1, 0]) for _ in sizes])
    op = torch.ops.fused_optim_triton.sgd_
    code = traced_code(op, args)
    nodes = code.count("triton_kernel_wrapper_functional(")
    print("sgd policy nodes", nodes)
    assert code.count("'numel': ") == len(sizes) and nodes == 2 * len(sizes), code
    assert "aten.add" not in code, code  # the counter is advanced by the kernels
print("OK")
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_torch_compile_traces_per_tensor_kernels():
    """torch.compile (dynamo + AOT functionalization, no Inductor) traces each family's
    op (and Muon's stages', with their bf16 work list) into one wrap_triton
    _tensor_kernel node per tensor, plus one _state_kernel node per tensor for an
    optimizer with per-tensor state (which the kernels advance: no aten.add), or with
    stochastic rounding (SGD's memory policy: the random counter). Compiled kernels are
    needed, so it runs in a subprocess; without a GPU the graph is traced, not run (and
    Triton's mutation analysis, which needs a GPU target, falls back to "all
    mutated")."""
    res = subprocess.run([sys.executable, "-c", _TRACE_WITH_TORCH_COMPILE, str(TESTS)],
                         env=_subprocess_env(), cwd=str(ROOT), capture_output=True, text=True,
                         timeout=600)
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
