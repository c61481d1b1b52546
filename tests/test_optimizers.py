"""Parity with torch.optim: every optimizer case x dtype x backend x CPU instruction set.

Driven by tests/_tables.py (cases, shapes, tolerances). The Triton backend, when it is
available on this machine, runs under its interpreter: it gets TINY_SHAPES in the matrix
and is left out of the big-shape tests (tests/test_triton.py covers it in depth).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fused_optim
from _oracle import (
    assert_same_trajectory,
    check_parity,
    clone_leaves,
    cpu_capability,
    free_run,
    fused_threads,
    make_grads,
    make_params,
    tensor_state,
)
from _tables import (
    BIG_SHAPES,
    CHUNK,
    DEFAULT_CASES,
    DTYPES,
    FULL_CASES,
    MANY_SHAPES,
    OPTIMIZER_CASES,
    OPTIMIZERS,
    SLOW_BACKENDS,
    SMALL_SHAPES,
    STEPS,
    TINY_SHAPES,
    case_ids,
    case_named,
    case_variant_params,
    cpu_capabilities,
    dtype_id,
    kernel_variants,
    slow_backend_cases,
    variant_id,
)
from fused_optim import _extension
from fused_optim.backends import select_backend

pytestmark = pytest.mark.usefixtures("oracle_threads")

VARIANTS = kernel_variants()
FAST_VARIANTS = [v for v in VARIANTS if v[0] not in SLOW_BACKENDS]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case,variant",
                         case_variant_params(OPTIMIZER_CASES, VARIANTS, slow_backend_cases()))
def test_parity(case, variant, dtype):
    backend, cap = variant
    shapes = TINY_SHAPES if backend in SLOW_BACKENDS else SMALL_SHAPES
    check_parity(case, dtype, backend, cap, shapes)


@pytest.mark.parametrize("variant", FAST_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", FULL_CASES, ids=case_ids(FULL_CASES))
def test_parity_chunk_boundary(case, dtype, variant):
    """chunk + 1 elements and a 2-D param over a chunk, 37k elements in the bucket (the
    parallel region)."""
    check_parity(case, dtype, variant[0], variant[1], BIG_SHAPES)


MANY_TENSORS_CASES = DEFAULT_CASES + [case_named("Adam")]


@pytest.mark.parametrize("variant", FAST_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", MANY_TENSORS_CASES, ids=case_ids(MANY_TENSORS_CASES))
def test_parity_many_tensors(case, dtype, variant):
    """120 tensors of 1..600 elements in one bucket."""
    check_parity(case, dtype, variant[0], variant[1], MANY_SHAPES, steps=4)


LAID_OUT = [((1,), "contiguous"), ((3,), "offset"), ((0,), "contiguous"),
            ((CHUNK + 1,), "offset"), ((4099,), "contiguous"), ((13, 7), "transposed")]


@pytest.mark.parametrize("variant", FAST_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("case", FULL_CASES, ids=case_ids(FULL_CASES))
def test_parity_layouts(case, variant):
    """Params (and grads) one element into their storage (not 16-byte aligned: the SIMD
    loops' peeled and scalar paths) and transposed (dense, not contiguous: bucketed
    apart), an empty param, chunk + 1 elements."""
    check_parity(case, torch.float32, variant[0], variant[1], [s for s, _ in LAID_OUT],
                 steps=3, layouts=[lay for _, lay in LAID_OUT])


def test_tables_cover_every_optimizer():
    """tests/_tables.py has one row per optimizer class fused_optim exports (a
    FusedOptimizer subclass with a spec) and covers every registered spec, each row
    against torch.optim's class of the same name: a new optimizer cannot be left out of
    the parity tests (the benchmark's list is checked against the same rows in
    tests/test_bench.py)."""
    from fused_optim.optimizer import FusedOptimizer
    from fused_optim.spec import specs

    names = list(fused_optim.__all__) + [n for n in dir(fused_optim)
                                         if n not in fused_optim.__all__ and not n.startswith("_")]
    exported = {cls for cls in (getattr(fused_optim, n) for n in names)
                if isinstance(cls, type) and issubclass(cls, FusedOptimizer)
                and cls is not FusedOptimizer and getattr(cls, "spec", None) is not None}
    # An optimizer that takes sparse grads only (SparseAdam) has no dense parity row: its
    # parity tests are tests/test_sparse.py's, whose configs must name it.
    from test_sparse import CONFIGS as SPARSE_CONFIGS

    sparse_only = {c for c in exported if c.spec.sparse is not None and c.spec.sparse.only}
    untested = sorted(c.__name__ for c in sparse_only
                      if c.__name__ not in {name for name, _ in SPARSE_CONFIGS})
    assert not untested, f"no config in tests/test_sparse.py CONFIGS: {untested}"
    exported -= sparse_only
    rows = [row.fused for row in OPTIMIZERS]
    assert len(rows) == len(set(rows)), f"a class has two rows: {rows}"
    missing = sorted(c.__name__ for c in exported - set(rows))
    extra = sorted(c.__name__ for c in set(rows) - exported)
    assert not missing and not extra, (
        f"no row in tests/_tables.py OPTIMIZERS: {missing}; a row for no exported class: {extra}")
    # (a spec of another class's element-wise stages, Muon's, has no row: stages_of)
    assert {s.name for s in specs() if s.stages_of is None} == (
        {row.fused.spec.name for row in OPTIMIZERS} | {c.spec.name for c in sparse_only})
    for row in OPTIMIZERS:
        assert row.torch is getattr(torch.optim, row.fused.__name__), row.fused.__name__
        assert row.cases and row.full, f"{row.fused.__name__}: no cases"


def test_auto_backend_is_cpu_when_built():
    if _extension.C is None:
        pytest.skip(f"no compiled extension: {_extension.LOAD_ERROR}")
    for dtype in DTYPES:
        assert select_backend("auto", torch.device("cpu"), dtype).name == "cpu"
    assert fused_optim.available_backends("cpu")["cpu"] is None


def test_cpu_variants_cover_this_machine():
    if _extension.C is None:
        pytest.skip(f"no compiled extension: {_extension.LOAD_ERROR}")
    caps = _extension.C.supported_cpu_capabilities()
    assert caps[0] == "default"
    assert _extension.C.cpu_capability() in caps
    with pytest.raises(ValueError, match="not supported|unknown"):
        _extension.C.set_cpu_capability("no-such-isa")
    for cap in caps:
        with cpu_capability(cap):
            assert _extension.C.cpu_capability() == cap


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpu_variants_agree_bit_for_bit(dtype):
    """Every CPU instruction-set variant computes the same bits (no FP contraction, the
    same conversions), so a model's numbers do not depend on the machine's ISA."""
    caps = cpu_capabilities()
    if len(caps) < 2:
        pytest.skip(f"this CPU runs one variant only: {caps}")
    for case in FULL_CASES:
        results = []
        for cap in caps:
            gen = torch.Generator().manual_seed(0)
            params = make_params(BIG_SHAPES, dtype, gen)
            opt = case.fused(params, backend="cpu", **case.options)
            with cpu_capability(cap), fused_threads():
                for _ in range(3):
                    for p, g in zip(params, make_grads(BIG_SHAPES, dtype, gen)):
                        p.grad = g
                    opt.step()
            results.append([p.detach() for p in params]
                           + [v for p in params for v in tensor_state(opt, p).values()])
        for cap, other in zip(caps[1:], results[1:]):
            for i, (a, b) in enumerate(zip(results[0], other)):
                assert torch.equal(a, b), f"{case.id} {dtype}: {caps[0]} vs {cap}, tensor {i}"


def test_cpu_capability_environment_cap():
    """FUSED_OPTIM_CPU_CAPABILITY caps the variant chosen at start-up, never above what
    the CPU runs (read once per process, so in a child process)."""
    if _extension.C is None:
        pytest.skip(f"no compiled extension: {_extension.LOAD_ERROR}")
    caps = _extension.C.supported_cpu_capabilities()
    code = "import fused_optim; print(fused_optim._extension.C.cpu_capability())"
    for requested, expected in (("default", "default"), ("avx512", caps[-1])):
        env = {**os.environ, "FUSED_OPTIM_CPU_CAPABILITY": requested}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, timeout=120)
        if requested == "avx512" and "avx512" in caps:
            expected = "avx512"
        assert out.stdout.strip() == expected, (requested, out.stdout, out.stderr)


# ---------------------------------------------------------------------------------------
# Free-running trajectories (no re-sync): errors accumulate, ulps x steps.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("case", FULL_CASES + DEFAULT_CASES,
                         ids=case_ids(FULL_CASES + DEFAULT_CASES))
def test_free_running_trajectory(case, dtype):
    gen = torch.Generator().manual_seed(1)
    fused_params = make_params(SMALL_SHAPES, dtype, gen)
    oracle_params = clone_leaves(fused_params)
    fused = case.fused(fused_params, **case.options)
    oracle = case.torch(oracle_params, foreach=False, **case.options)
    grads = [make_grads(SMALL_SHAPES, dtype, gen) for _ in range(STEPS)]
    free_run(fused, oracle, fused_params, oracle_params, grads)
    assert_same_trajectory(fused, oracle, fused_params, oracle_params, STEPS, grads, case.id)


@pytest.mark.parametrize("case", FULL_CASES + DEFAULT_CASES,
                         ids=case_ids(FULL_CASES + DEFAULT_CASES))
def test_params_gain_and_lose_grads(case):
    """Params without a grad at some steps: per-param step counters diverge (Adam's bias
    corrections are per tensor) and SGD momentum buffers start at different steps."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(5,), (33,), (4, 9), (1,)]
    fused_params = make_params(shapes, torch.float64, gen)
    oracle_params = clone_leaves(fused_params)
    fused = case.fused(fused_params, **case.options)
    oracle = case.torch(oracle_params, foreach=False, **case.options)
    grads = [make_grads(shapes, torch.float64, gen) for _ in range(STEPS)]
    # param 1 starts at step 3, param 2 skips odd steps, param 3 never has a grad
    def skip(step, i):
        return (i == 1 and step < 3) or (i == 2 and step % 2 == 1) or i == 3

    free_run(fused, oracle, fused_params, oracle_params, grads, skip)
    assert fused_params[3].detach().equal(oracle_params[3].detach())
    # A param that never had a grad has the state torch gives it: none, or (Adagrad)
    # the initial state created at construction, untouched.
    untouched = tensor_state(fused, fused_params[3])
    assert sorted(untouched) == sorted(tensor_state(oracle, oracle_params[3]))
    for key, value in untouched.items():
        assert torch.equal(value, tensor_state(oracle, oracle_params[3])[key]), key
    assert_same_trajectory(fused, oracle, fused_params, oracle_params, STEPS, grads, case.id)


MIXED_DTYPE_CASES = [case_named("Adam"), case_named("SGD", nesterov=True)]


@pytest.mark.parametrize("case", MIXED_DTYPE_CASES, ids=case_ids(MIXED_DTYPE_CASES))
def test_mixed_dtypes_in_one_group(case):
    """One group holding fp32, fp64, bf16 and fp16 params: one kernel call per dtype.
    Every bucket gives bit for bit what its params give alone, and the fp32 / fp64 ones
    match torch (the low-precision ones are checked against fp64 in test_parity)."""
    gen = torch.Generator().manual_seed(3)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    shapes = [(17,), (4097,), (9, 7), (33,)]
    params = [make_params([s], d, gen)[0] for s, d in zip(shapes, dtypes)]
    together = clone_leaves(params)
    alone = [clone_leaves([p])[0] for p in params]
    oracle = clone_leaves(params[:2])
    opt_together = case.fused(together, **case.options)
    opt_alone = [case.fused([p], **case.options) for p in alone]
    opt_oracle = case.torch(oracle, foreach=False, **case.options)
    grads = [[make_grads([s], d, gen)[0] for s, d in zip(shapes, dtypes)] for _ in range(STEPS)]
    for step_grads in grads:
        for p, q, g in zip(together, alone, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        for p, g in zip(oracle, step_grads):
            p.grad = g.clone()
        opt_together.step()
        for opt in opt_alone:
            opt.step()
        opt_oracle.step()
    for p, q in zip(together, alone):
        assert p.dtype == q.dtype
        assert torch.equal(p.detach(), q.detach()), f"{p.dtype} bucket differs when grouped"
    assert_same_trajectory(opt_together, opt_oracle, together[:2], oracle, STEPS,
                           [g[:2] for g in grads], case.id)
