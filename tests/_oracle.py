"""Helpers of the parity tests: deterministic data, the torch.optim oracle, comparisons.

See tests/_tables.py for what runs and the tolerances.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from _tables import LOW_PRECISION, STEPS, OptCase, tolerance
import fused_optim
from fused_optim import _extension
from fused_optim.spec import initial_value

# ---------------------------------------------------------------------------------------
# Threads. The oracle_threads fixture (tests/conftest.py) runs a test with one intra-op
# thread: on a 2-core shared machine ATen's and MKL's element-wise ops on a few thousand
# elements take milliseconds with two threads under load (the oracle's cost). Fused steps
# of the "cpu" backend run with the process's default thread count (fused_threads), so
# the CPU engine's parallel region really runs.

FUSED_THREADS = torch.get_num_threads()


@contextlib.contextmanager
def fused_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(FUSED_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------
# Data


def make_params(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype,
                gen: torch.Generator) -> list[Tensor]:
    """Leaf params drawn in fp64 and rounded once to dtype."""
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
            for s in shapes]


def make_grads(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype,
               gen: torch.Generator) -> list[Tensor]:
    """One step's grads in dtype. For fp16 |g| >= 0.25: Adam's exp_avg_sq is about
    1e-3 * g^2, which then stays near or above fp16's smallest normal (6.1e-5) instead of
    flushing to 0 and making the update lr * m / eps (torch does the same, but that is
    not what these tests are about)."""
    grads = []
    for s in shapes:
        g = torch.randn(s, generator=gen, dtype=torch.float64)
        if dtype == torch.float16:
            g = torch.where(g < 0, -1.0, 1.0) * g.abs().clamp_min(0.25)
        grads.append(g.to(dtype))
    return grads


def clone_leaves(params: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    return [p.detach().to(dtype or p.dtype, copy=True).requires_grad_() for p in params]


@contextlib.contextmanager
def cpu_capability(name: str | None) -> Iterator[None]:
    """Runs the block with the named CPU kernel variant, then restores the previous one."""
    if name is None or _extension.C is None:
        yield
        return
    before = _extension.C.cpu_capability()
    _extension.C.set_cpu_capability(name)
    try:
        yield
    finally:
        _extension.C.set_cpu_capability(before)


# ---------------------------------------------------------------------------------------
# Comparison


def outcome(fn: Callable[[], object], *, quiet: bool = False) -> tuple[type, str] | None:
    """None if fn() returns, else the (type, message) of what it raised: what the tests
    compare between torch.optim and fused_optim. `quiet`: warnings fn() emits are
    ignored."""
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            fn()
    except Exception as exc:  # noqa: BLE001  (the type and message are compared)
        return type(exc), str(exc)
    return None


def assert_row_close(label: str, actual: Tensor, expected: Tensor, scale: Tensor,
                     dtype: torch.dtype, ulps: float) -> None:
    """|actual - expected| <= ulps * eps(dtype) * scale + one subnormal ulp, elementwise."""
    assert actual.shape == expected.shape, f"{label}: shape {actual.shape} != {expected.shape}"
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    info = torch.finfo(dtype)
    bound = ulps * info.eps * scale + info.tiny * info.eps
    err = (a - e).abs()
    same_nonfinite = (a.isnan() & e.isnan()) | ((a == e) & a.isinf())
    bad = ~(err <= bound) & ~same_nonfinite
    if bool(bad.any()):
        flat = (err / bound).nan_to_num(nan=float("inf")).flatten()
        i = int(flat.argmax())
        raise AssertionError(
            f"{label}: {int(bad.sum())} of {a.numel()} elements differ by more than "
            f"{ulps} ulps ({dtype}); worst at flat index {i}: fused {a.flatten()[i].item()!r} "
            f"vs torch {e.flatten()[i].item()!r}, |diff| {err.flatten()[i].item():.3g} = "
            f"{(err.flatten()[i] / (info.eps * scale.flatten()[i])).item():.3g} ulps "
            f"of {scale.flatten()[i].item():.3g}"
        )


def _abs64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64).abs()


def row_scale(tensors: Sequence[Tensor]) -> Tensor:
    """Elementwise largest magnitude over a row of same-shaped tensors."""
    scale = _abs64(tensors[0])
    for t in tensors[1:]:
        scale = torch.maximum(scale, _abs64(t))
    return scale


def initial_state_value(opt, key: str, p: Tensor | None = None) -> float:
    """The value a new state tensor `key` of fused_optim optimizer `opt` starts at (its
    spec's init: 0 for moments and steps, Adagrad's initial_accumulator_value, the lr of
    p's group)."""
    group = next((g for g in opt.param_groups if any(q is p for q in g["params"])),
                 opt.param_groups[0])
    for s in (*opt.spec.lists, *opt.spec.scalars):
        if s.key == key:
            return float(initial_value(s.init, group, opt.defaults))
    raise KeyError(key)


def assert_initial_state(opt, p: Tensor, what: str) -> None:
    """Every state tensor of p still holds its initial value."""
    for key, value in tensor_state(opt, p).items():
        if value.is_complex():  # filled with complex(v, v), as torch.optim fills it
            value = torch.view_as_real(value)
        expected = torch.as_tensor(initial_state_value(opt, key, p), dtype=value.dtype)
        assert bool((value == expected).all()), f"{what} changed {key}"


def scalar_keys(x) -> frozenset[str]:
    """The per-tensor scalar state keys (``step``, NAdam's ``mu_product``, ASGD's
    ``eta`` and ``mu``) of a fused_optim optimizer, its class, a test case, a spec, or
    a torch.optim optimizer (its fused_optim namesake's); every other state tensor is
    shaped like its param."""
    spec = getattr(x, "spec", None)
    if spec is None and isinstance(x, torch.optim.Optimizer):
        spec = getattr(fused_optim, type(x).__name__).spec
    if spec is None:
        spec = x
    return frozenset(s.key for s in spec.scalars)


def assert_scalar_state_close(label: str, key: str, a: Tensor, b: Tensor) -> None:
    """A per-tensor scalar state against torch's: same dtype and shape, the step count
    exactly, others (mu_product, eta, mu) within one ulp of their dtype. The C++ engines
    compute them as torch does (double, then the state's rounding: bit-identical on the
    CPU); Triton's float64 pow (exp of log) may move a float32 rounding by one ulp."""
    assert a.dtype == b.dtype, f"{label}: dtype {a.dtype} != torch {b.dtype}"
    assert a.shape == b.shape, f"{label}: shape {a.shape} != torch {b.shape}"
    x, y = a.item(), b.item()
    if key == "step":
        assert x == y, f"{label}: {x} != torch {y}"
        return
    ulp = torch.finfo(b.dtype).eps * abs(y)
    assert abs(x - y) <= ulp or (x != x and y != y), f"{label}: {x} != torch {y} (1 ulp: {ulp})"


def tensor_state(opt: torch.optim.Optimizer, p: Tensor) -> dict[str, Tensor]:
    return {k: v for k, v in opt.state.get(p, {}).items() if isinstance(v, Tensor)}


def assert_state_structure(fused: torch.optim.Optimizer, oracle: torch.optim.Optimizer,
                           fused_params: Sequence[Tensor], oracle_params: Sequence[Tensor],
                           same_dtype: bool) -> None:
    """Same state keys per param, same per-tensor scalar states (step values exactly)
    and dtypes (state tensor dtypes too when both optimizers hold params of one dtype)."""
    scalars = scalar_keys(fused)
    for i, (pf, po) in enumerate(zip(fused_params, oracle_params)):
        sf, so = fused.state.get(pf, {}), oracle.state.get(po, {})
        assert sorted(sf) == sorted(so), f"param {i}: state keys {sorted(sf)} != torch {sorted(so)}"
        for key in sf:
            a, b = sf[key], so[key]
            if key in scalars:
                assert_scalar_state_close(f"param {i}: {key}", key, a, b)
            elif same_dtype:
                assert a.dtype == b.dtype, f"param {i}: {key} dtype {a.dtype} != torch {b.dtype}"
                assert a.stride() == b.stride(), f"param {i}: {key} strides differ from torch"


# ---------------------------------------------------------------------------------------
# The parity runner


def laid_out(t: Tensor, layout: str, device: torch.device | str = "cpu") -> Tensor:
    """A copy of t on `device` with the given memory layout: "contiguous", "offset" (a
    view one element into its storage: not 16-byte aligned) or "transposed" (dense, not
    contiguous)."""
    if layout == "contiguous":
        out = torch.empty(t.shape, dtype=t.dtype, device=device)
    elif layout == "offset":
        out = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)[1:].view(t.shape)
    elif layout == "transposed":
        out = torch.empty(t.shape[::-1], dtype=t.dtype, device=device).t()
    else:
        raise ValueError(layout)
    return out.copy_(t.detach())


def check_parity(case: OptCase, dtype: torch.dtype, backend: str, cap: str | None,
                 shapes: Sequence[tuple[int, ...]], steps: int = STEPS, seed: int = 0, *,
                 device: str = "cpu", layouts: Sequence[str] | None = None,
                 options: dict | None = None) -> None:
    """Runs case.fused for `steps` consecutive steps; before each step the torch.optim
    oracle (fp64 for bf16/fp16) is set to the fused optimizer's params and state, both
    step on the same grads, and every tensor of every row is compared per element.
    Params (and their grads) live on `device` in `layouts` (see laid_out; default
    contiguous); `options` override the case's (e.g. a CUDA tensor lr)."""
    gen = torch.Generator().manual_seed(seed)
    lowp = dtype in LOW_PRECISION
    oracle_dtype = torch.float64 if lowp else dtype
    layouts = list(layouts) if layouts is not None else ["contiguous"] * len(shapes)
    options = {**case.options, **(options or {})}
    fused_params = [laid_out(p, lay, device).requires_grad_()
                    for p, lay in zip(make_params(shapes, dtype, gen), layouts)]
    oracle_params = [p.detach().to(oracle_dtype, copy=True).requires_grad_() for p in fused_params]
    ulps = tolerance(dtype, case.fused).ulps
    scalars = scalar_keys(case)
    oracle_options = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in options.items()}
    with cpu_capability(cap):
        fused = case.fused(fused_params, backend=backend, **options)
        oracle = case.torch(oracle_params, foreach=False, **oracle_options)
        for step in range(steps):
            grads = [laid_out(g, lay, device) for g, lay in zip(make_grads(shapes, dtype, gen),
                                                                layouts)]
            before = []
            with torch.no_grad():
                for pf, po in zip(fused_params, oracle_params):
                    po.copy_(pf)
                    state = tensor_state(fused, pf)
                    for key, value in state.items():
                        oracle.state[po][key].copy_(value)
                    before.append([pf.detach().clone(),
                                   *(v.clone() for k, v in state.items() if k not in scalars)])
            for pf, po, g in zip(fused_params, oracle_params, grads):
                pf.grad = g.clone(memory_format=torch.preserve_format)
                po.grad = g.to(oracle_dtype)
            # The reference backend is plain torch: one thread, like the oracle.
            with fused_threads() if backend == "cpu" else contextlib.nullcontext():
                fused.step()
            oracle.step()
            assert_state_structure(fused, oracle, fused_params, oracle_params,
                                   same_dtype=not lowp)
            for i, (pf, po, g) in enumerate(zip(fused_params, oracle_params, grads)):
                sf, so = tensor_state(fused, pf), tensor_state(oracle, po)
                pairs = [("param", pf, po)] + [(k, sf[k], so[k]) for k in sf
                                               if k not in scalars]
                scale = row_scale([*before[i], g, *(b for _, _, b in pairs)])
                for key, a, b in pairs:
                    assert a.dtype == dtype, f"{key} of param {i} is {a.dtype}, not {dtype}"
                    assert_row_close(
                        f"{case.id} {backend}{'/' + cap if cap else ''} {dtype} step {step + 1}"
                        f" param {i} {tuple(pf.shape)} {layouts[i]} {key}", a, b, scale, dtype,
                        ulps)


# ---------------------------------------------------------------------------------------
# Free-running trajectories (no re-sync): errors accumulate, so ulps x steps.


def free_run(fused, oracle, fused_params, oracle_params, grads_per_step, skip=None):
    for step, grads in enumerate(grads_per_step):
        for i, (pf, po, g) in enumerate(zip(fused_params, oracle_params, grads)):
            has_grad = skip is None or not skip(step, i)
            pf.grad = g.clone() if has_grad else None
            po.grad = g.to(po.dtype) if has_grad else None
        fused.step()
        oracle.step()


def assert_same_trajectory(fused, oracle, fused_params, oracle_params, steps,
                           grads_per_step=None, label=""):
    """Compares params and state after `steps` free-running steps; the tolerance is the
    dtype's ulps per step times the steps, at the magnitude of each element's row (param,
    states and, when given, the largest grad it saw)."""
    for i, (pf, po) in enumerate(zip(fused_params, oracle_params)):
        sf, so = tensor_state(fused, pf), tensor_state(oracle, po)
        assert sorted(sf) == sorted(so), f"{label} param {i}: keys {sorted(sf)} != {sorted(so)}"
        scalars = scalar_keys(fused)
        for key in scalars & sf.keys():
            assert_scalar_state_close(f"{label} param {i} {key}", key, sf[key], so[key])
        pairs = [("param", pf, po)] + [(k, sf[k], so[k]) for k in sf if k not in scalars]
        row = [b for _, _, b in pairs]
        if grads_per_step:
            row.append(torch.stack([g[i].detach().double().abs() for g in grads_per_step]).amax(0))
        scale = row_scale(row)
        for key, a, b in pairs:
            assert a.dtype == b.dtype, f"{label} param {i} {key}: {a.dtype} != torch {b.dtype}"
            assert_row_close(f"{label} param {i} {key}", a, b, scale, pf.dtype,
                             tolerance(pf.dtype, type(fused)).ulps * steps)


class StateView:
    """An optimizer-like object holding `opt`'s params and state through `convert`
    (e.g. torch.view_as_real, DTensor.full_tensor), for assert_same_trajectory."""

    def __init__(self, opt, params, convert, spec=None):
        self.spec = spec if spec is not None else opt.spec
        self.params = [convert(p.detach()) for p in params]
        scalars = scalar_keys(self.spec)
        self.state = {
            cp: {k: (v if k in scalars else convert(v))
                 for k, v in opt.state[p].items()}
            for cp, p in zip(self.params, params) if p in opt.state
        }
