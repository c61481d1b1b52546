"""The tables that drive the tests: optimizers under test, shapes, dtypes, backends, tolerances.

Every parity test is parametrized from these tables, so adding an optimizer (or an option)
to OPTIMIZER_CASES puts it through every dtype, backend and CPU instruction set at once.
The oracle is torch.optim with foreach=False (its single-tensor "for-loop" code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import fused_optim
from fused_optim import _extension

# ---------------------------------------------------------------------------------------
# Optimizers under test: one row per fused_optim class, with its torch.optim namesake, the
# lr of its tests and its option cases.


@dataclass(frozen=True)
class OptCase:
    name: str
    fused: type
    torch: type
    options: dict[str, Any] = field(default_factory=dict)
    # A short tag for the test id; the options spelled out otherwise.
    tag: str = ""

    @property
    def id(self) -> str:
        if self.tag:
            return f"{self.name}-{self.tag}"
        return f"{self.name}-{options_id({k: v for k, v in self.options.items() if k != 'lr'})}"

    @property
    def spec(self):
        return self.fused.spec


@dataclass(frozen=True)
class OptimizerRow:
    """An optimizer's cases. ``cases``: every option alone, then the combinations that
    select different kernels (each a compile-time variant: a list an option adds, a term
    an option adds or skips); ``full``: the cases with every option on, which also run
    the expensive shapes and the contract tests; ``default``: the plain case of the
    contract tests (torch's defaults, or the one that keeps state)."""

    fused: type
    torch: type
    lr: float
    cases: tuple[dict[str, Any], ...]
    full: tuple[dict[str, Any], ...]
    default: dict[str, Any] = field(default_factory=dict)
    # dtype -> (factor, reason): a multiple of TOLERANCES[dtype] where this optimizer's
    # checks were measured to need more than that table's ~5-operation budget. Only the
    # dtypes listed; the reason states the measurement (with every factor set to 1).
    ulps_factors: dict[torch.dtype, tuple[float, str]] = field(default_factory=dict)

    def case(self, options: dict[str, Any]) -> OptCase:
        return OptCase(self.fused.__name__, self.fused, self.torch, {"lr": self.lr, **options})


# lr is larger than torch's default so that every step moves the params by many ulps
# even in bf16; weight decay is large enough that a wrong decay mode is visible.
ADAM_LR = 1e-2
SGD_LR = 5e-2

OPTIMIZERS: list[OptimizerRow] = [
    OptimizerRow(
        fused_optim.Adam, torch.optim.Adam, ADAM_LR,
        cases=({}, {"amsgrad": True}, {"maximize": True}, {"weight_decay": 0.1},
               {"weight_decay": 0.1, "decoupled_weight_decay": True},
               {"betas": (0.8, 0.99), "eps": 1e-6},
               {"weight_decay": 0.1, "amsgrad": True, "maximize": True},
               {"weight_decay": 0.1, "decoupled_weight_decay": True, "amsgrad": True,
                "maximize": True}),
        full=({"weight_decay": 0.1, "amsgrad": True, "maximize": True},),
    ),
    OptimizerRow(
        fused_optim.AdamW, torch.optim.AdamW, ADAM_LR,
        cases=({}, {"amsgrad": True}, {"maximize": True},
               {"weight_decay": 0.1, "amsgrad": True, "maximize": True}, {"weight_decay": 0.0}),
        full=({"weight_decay": 0.1, "amsgrad": True, "maximize": True},),
    ),
    OptimizerRow(
        fused_optim.SGD, torch.optim.SGD, SGD_LR,
        cases=({}, {"momentum": 0.9}, {"momentum": 0.9, "dampening": 0.5},
               {"momentum": 0.9, "nesterov": True}, {"weight_decay": 0.1}, {"maximize": True},
               {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1, "maximize": True},
               {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True}),
        full=({"momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True},
              {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}),
        default={"momentum": 0.9},
    ),
    OptimizerRow(
        fused_optim.Adagrad, torch.optim.Adagrad, 5e-2,
        cases=({}, {"lr_decay": 0.1}, {"weight_decay": 0.1}, {"initial_accumulator_value": 0.5},
               {"maximize": True}, {"eps": 1e-6},
               {"lr_decay": 0.1, "weight_decay": 0.1, "initial_accumulator_value": 0.5,
                "maximize": True}),
        full=({"lr_decay": 0.1, "weight_decay": 0.1, "initial_accumulator_value": 0.5,
               "maximize": True},),
    ),
    OptimizerRow(
        fused_optim.RMSprop, torch.optim.RMSprop, 1e-2,
        cases=({}, {"centered": True}, {"momentum": 0.9}, {"weight_decay": 0.1},
               {"maximize": True}, {"alpha": 0.9, "eps": 1e-6},
               {"centered": True, "momentum": 0.9},
               {"centered": True, "momentum": 0.9, "weight_decay": 0.1, "maximize": True}),
        full=({"centered": True, "momentum": 0.9, "weight_decay": 0.1, "maximize": True},),
        # Measured on the CPU (every variant, the reference and Triton-interpreter
        # backends) with x1. bfloat16 / float16: <= 0.50 of their 1 ulp, like every
        # optimizer (the storage rounding dominates): no factor.
        ulps_factors={
            torch.float32: (2.0, (
                "re-synced steps: centered with momentum chains ~11 operations into the "
                "buffer (decay, square, lerp, square, difference, sqrt, +eps, divide, "
                "scale, add) and the buffer g / sqrt(v - a^2) is the row's largest value, "
                "so their errors count at its magnitude: measured 4.8 ulps (every option "
                "on, chunk-boundary shapes; torch's add(alpha) and lerp use FMA, the CPU "
                "kernels do not), <= 2.6 with fewer options. Free-running: "
                "test_grad_scaler_cpu's model computes its grads from its own diverging "
                "params, a small grad is a cancellation in backward, and g / sqrt(v) passes "
                "its relative difference on at the size of the step: 47.8 ulps over 6 "
                "steps with the default options (8.0 per step: the x2 is used up there), "
                "37.6 with every option")),
            torch.float64: (2.0, (
                "measured 2.9 ulps per re-synced step (centered, momentum) and 3.1 per "
                "free-running step (test_tensor_lr_rounds_in_its_dtype_like_torch): within "
                "x1 at 78% of it on the CPU; kept for the GPU runs (test_cuda.py), where "
                "nvcc contracts into FMAs and this was not measured")),
        },
    ),
    OptimizerRow(
        fused_optim.Adadelta, torch.optim.Adadelta, 1.0,
        cases=({}, {"weight_decay": 0.1}, {"maximize": True}, {"rho": 0.5, "eps": 1e-4},
               {"weight_decay": 0.1, "maximize": True, "rho": 0.95}),
        full=({"weight_decay": 0.1, "maximize": True, "rho": 0.95},),
    ),
    OptimizerRow(
        fused_optim.Adamax, torch.optim.Adamax, 1e-2,
        cases=({}, {"weight_decay": 0.1}, {"maximize": True}, {"betas": (0.5, 0.99), "eps": 1e-6},
               {"weight_decay": 0.1, "maximize": True, "betas": (0.8, 0.99)}),
        full=({"weight_decay": 0.1, "maximize": True, "betas": (0.8, 0.99)},),
    ),
    # NAdam: the per-tensor mu_product state; momentum_decay large enough that mu_t moves
    # visibly within the tests' steps.
    OptimizerRow(
        fused_optim.NAdam, torch.optim.NAdam, 1e-2,
        cases=({}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True},
               {"maximize": True}, {"momentum_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6},
               {"weight_decay": 0.1, "maximize": True, "momentum_decay": 0.05},
               {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True,
                "momentum_decay": 0.05}),
        full=({"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True,
               "momentum_decay": 0.05},),
    ),
    # RAdam: rho_t > 5 from step 6 with beta2 = 0.999 and with 0.9, so every case runs
    # both branches within STEPS (10).
    OptimizerRow(
        fused_optim.RAdam, torch.optim.RAdam, 1e-2,
        cases=({}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True},
               {"maximize": True}, {"betas": (0.8, 0.9), "eps": 1e-6},
               {"weight_decay": 0.1, "maximize": True, "betas": (0.8, 0.9)},
               {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}),
        full=({"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},),
    ),
    # ASGD: t0 within STEPS so that averaging starts (mu != 1) mid-run; torch's default
    # t0 = 1e6 keeps ax a copy of the params.
    OptimizerRow(
        fused_optim.ASGD, torch.optim.ASGD, 5e-2,
        cases=({}, {"t0": 3}, {"lambd": 0.1, "alpha": 0.5, "t0": 2}, {"weight_decay": 0.1},
               {"maximize": True},
               {"t0": 4, "lambd": 0.05, "alpha": 0.6, "weight_decay": 0.1, "maximize": True}),
        full=({"t0": 4, "lambd": 0.05, "alpha": 0.6, "weight_decay": 0.1, "maximize": True},),
        default={"t0": 4},
    ),
    OptimizerRow(
        fused_optim.Rprop, torch.optim.Rprop, 1e-2,
        cases=({}, {"maximize": True}, {"etas": (0.3, 1.5), "step_sizes": (1e-3, 0.03)},
               {"maximize": True, "etas": (0.3, 1.5), "step_sizes": (1e-3, 0.03)}),
        full=({"maximize": True, "etas": (0.3, 1.5), "step_sizes": (1e-3, 0.03)},),
    ),
]

OPTIMIZER_CASES: list[OptCase] = [row.case(o) for row in OPTIMIZERS for o in row.cases]
# The case per algorithm with every option on, and the defaults: the subset that runs the
# expensive shapes (chunk + 1, 100+ tensors) and the contract tests.
FULL_CASES: list[OptCase] = [row.case(o) for row in OPTIMIZERS for o in row.full]
DEFAULT_CASES: list[OptCase] = [row.case(row.default) for row in OPTIMIZERS]


def case_named(name: str, cases: list[OptCase] | None = None, **options: Any) -> OptCase:
    """The one case of `cases` (default FULL_CASES) of optimizer `name` (the class name)
    whose options include `options`: a test picks its case by what it needs, not by its
    position in a table that grows."""
    found = [c for c in (FULL_CASES if cases is None else cases) if c.name == name
             and all(k in c.options and c.options[k] == v for k, v in options.items())]
    if len(found) != 1:
        raise LookupError(f"{len(found)} cases of {name} with {options}: "
                          f"{[c.id for c in found]}")
    return found[0]


def options_id(options: dict[str, Any]) -> str:
    """Options spelled out for a test id: k=v,k=v, or "default" for none."""
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


def case_ids(cases: list[OptCase]) -> list[str]:
    return [c.id for c in cases]


# ---------------------------------------------------------------------------------------
# Shapes. The CPU engine splits tensors into chunks of kChunkSize = 16384 elements
# (csrc/cpu/kernel_api.h) and runs a bucket serially below 32768 elements (ops_cpu.cpp);
# SIMD bodies are 8 (fp32) / 4 (fp64) lanes wide and half-precision goes through blocks of
# 512.

CHUNK = 16384
# A 0-dim param, sizes that are not multiples of any vector width or block, a 2-D param.
SMALL_SHAPES: list[tuple[int, ...]] = [(), (1,), (3,), (17,), (4097,), (7, 13)]
# chunk + 1 (a one-element second chunk) and a 2-D param over a chunk: 37k elements in
# one bucket, above the serial threshold, so the parallel region runs.
BIG_SHAPES: list[tuple[int, ...]] = [(1,), (17,), (CHUNK + 1,), (129, 130)]
# 120 tensors of 1..600 elements (36k in all, so also parallel): the multi-tensor table.
MANY_SHAPES: list[tuple[int, ...]] = [((i * 37) % 600 + 1,) for i in range(120)]
# What a backend that is slow on this machine (the Triton interpreter) runs instead.
TINY_SHAPES: list[tuple[int, ...]] = [(1,), (3,), (17,), (5, 7)]

STEPS = 10

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW_PRECISION = (torch.bfloat16, torch.float16)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------
# Tolerances: ONE table. Every parity check is per element and per step: the oracle is
# re-synced to the fused optimizer's state before each step (exact: same dtype, or an
# upcast to fp64), both take the step, and then for every tensor of the row
#
#     |fused_i - oracle_i| <= ulps * eps(dtype) * scale_i + subnormal(dtype)
#
# where scale_i is the largest magnitude among the values element i's update reads and
# writes (param, grad and every state, before and after the step), i.e. the tolerance is
# a number of ulps of the storage dtype at the magnitude of the numbers involved
# (eps * |x| >= ulp(x) for normal x). Free-running trajectories (no re-sync, used by the
# contract tests) get ulps * steps.


@dataclass(frozen=True)
class Tol:
    ulps: float
    reason: str


TOLERANCES: dict[torch.dtype, Tol] = {
    torch.float32: Tol(
        4.0,
        "same dtype as torch, different op order: ATen's vectorized add(alpha), lerp and "
        "addcmul use FMA, the kernels are built with -ffp-contract=off; addcdiv rounds "
        "(v*m)/d where the kernels round v*(m/d); the kernels multiply sqrt(v) by "
        "1/sqrt(1-beta2^t) where torch divides. About 5 ops per update, each within 1/2 "
        "ulp of the largest operand: measured <= 2.3 ulps per step",
    ),
    torch.float64: Tol(4.0, "as float32: same op-order and FMA differences, in fp64 ulps"),
    torch.bfloat16: Tol(
        1.0,
        "compared with an fp64 torch run fed the same rounded grads and states: the only "
        "difference allowed is the one rounding of each stored value to bf16 (<= 1/2 ulp) "
        "plus fp32-opmath vs fp64 differences that can move a value across a rounding tie "
        "(< 1/2 ulp); measured <= 0.5 ulps",
    ),
    torch.float16: Tol(1.0, "as bfloat16, in fp16 ulps (10 mantissa bits); measured <= 0.5"),
}


def tolerance(dtype: torch.dtype, optimizer: type | None = None) -> Tol:
    """The tolerance of one step in `dtype`, for `optimizer` (a fused_optim class) when
    its row asks for a multiple of TOLERANCES in that dtype."""
    tol = TOLERANCES[dtype]
    for row in OPTIMIZERS:
        if optimizer is not None and issubclass(optimizer, row.fused) and dtype in row.ulps_factors:
            factor, reason = row.ulps_factors[dtype]
            return Tol(tol.ulps * factor, f"{tol.reason}; x{factor:g}: {reason}")
    return tol


# ---------------------------------------------------------------------------------------
# Backends and CPU instruction sets of this machine.

# Backends whose kernels are slow here (on the CPU, Triton runs only under its
# interpreter, ~1 s per test): they run TINY_SHAPES on SLOW_BACKEND_CASES only and skip the
# big-shape tests; tests/test_triton.py covers them in depth.
SLOW_BACKENDS = {"triton"}


def cpu_capabilities() -> list[str]:
    if _extension.C is None:
        return []
    return list(_extension.C.supported_cpu_capabilities())


def kernel_variants(dtype: torch.dtype = torch.float32) -> list[tuple[str, str | None]]:
    """(backend, cpu capability or None) for every backend that runs CPU tensors of this
    dtype here; the "cpu" backend once per instruction set this CPU runs."""
    out: list[tuple[str, str | None]] = []
    for name, reason in fused_optim.available_backends("cpu", dtype).items():
        if reason is not None:
            continue
        if name == "cpu":
            out.extend(("cpu", cap) for cap in cpu_capabilities())
        else:
            out.append((name, None))
    return out


def slow_backend_cases() -> list[OptCase]:
    return DEFAULT_CASES + FULL_CASES


def case_variant_params(cases: list[OptCase], variants: list[tuple[str, str | None]],
                        slow_cases: list[OptCase]) -> list[Any]:
    """pytest params (case, variant): every case on every fast variant, only slow_cases
    on a slow backend."""
    import pytest

    slow_ids = {c.id for c in slow_cases}
    return [pytest.param(c, v, id=f"{c.id}-{variant_id(v)}")
            for c in cases for v in variants
            if v[0] not in SLOW_BACKENDS or c.id in slow_ids]


def variant_id(variant: tuple[str, str | None]) -> str:
    backend, cap = variant
    return f"{backend}-{cap}" if cap else backend
