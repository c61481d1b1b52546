"""GPU tests of the CUDA backend (csrc/cuda) and of the Triton backend on CUDA tensors.

  * The ops torch.ops.fused_optim.adam_ / sgd_ called directly, with state tensors built
    here (every option, dtype and lr kind, many tensors, found_inf, CUDA graphs,
    torch.compile, opcheck, a > 2^31-element tensor, input checks), and
    fused_optim.AdamW(backend="cuda") free-running against torch.optim.AdamW.
  * Every optimizer of tests/_tables.py through its class, on the "cuda" backend and,
    where Triton runs on this GPU, the "triton" backend (the test_every_optimizer_*
    tests at the end): parity per step, a device lr, many tensors, found_inf with CUDA
    graph replays.

Every test is skipped, with the reason, when there is no CUDA device or fused_optim._C
was built without its CUDA kernels; on a CPU-only machine the CUDA sources are only
compile-checked (.ci/compile_cuda.sh).

Oracle and tolerances: the project's (tests/_oracle.py, tests/_tables.py). Before each
step the torch.optim oracle (foreach=False; fp64 for fp16/bf16 storage) is set to the
kernel's params and state, both take the step on the same grads, and every element is
compared within TOLERANCES[dtype].ulps ulps of the storage dtype at the magnitude of
the numbers involved: 4 ulps for fp32/fp64 (same dtype as torch, different operation
order and FMA contraction), 1 ulp for fp16/bf16 against the fp64 run (the one rounding
of each stored value). Checks that are exact by construction compare bit for bit:

    what                                     why exact
    grads after grad_scale = 2^k             division by a power of two
    everything after a found_inf step        nothing may be written
    step counters                            integers far below 2^24
    CUDA graph replay vs eager calls         the same kernels on the same inputs
    torch.compile vs eager                   the same op on the same inputs
    > 2^31-element tensor vs small copies    element-wise math, independent of position
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

from _oracle import (
    assert_row_close,
    check_parity,
    laid_out,
    make_grads,
    make_params,
    row_scale,
    scalar_keys,
    tensor_state,
)
from _tables import (
    ADAM_LR,
    DEFAULT_CASES,
    FULL_CASES,
    LOW_PRECISION,
    OPTIMIZER_CASES,
    SGD_LR,
    TOLERANCES,
    case_ids,
    dtype_id,
    options_id,
    tolerance,
)
from fused_optim import _extension


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return ("no CUDA device (torch.cuda.is_available() is False); the CUDA sources are "
                "compile-checked by .ci/compile_cuda.sh instead")
    if _extension.C is None:
        return f"fused_optim._C is not built: {_extension.LOAD_ERROR}"
    if not _extension.op_has_kernel("adam_", "CUDA"):
        return ("fused_optim._C was built without CUDA kernels (torch without CUDA, no nvcc, "
                "or FUSED_OPTIM_BUILD_CUDA=0)")
    return None


SKIP_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

DEVICE = "cuda"
CHUNK = 65536  # kChunkSize in csrc/cuda/kernel_api.h: one thread block per chunk
STEPS = 5
GRAD_SCALE = 1024.0  # a power of two: unscaling is exact, so grads compare bit for bit
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Shapes and memory layouts of one bucket: sizes that are not multiples of the vector
# width (16 B: 4 fp32, 8 fp16/bf16, 2 fp64), an empty tensor, chunk + 1 (a one-element
# second block), and rows whose pointers are not 16-byte aligned ("offset": a view one
# element into its storage) or not contiguous ("transposed"): the scalar path.
SHAPES: list[tuple[tuple[int, ...], str]] = [
    ((1,), "contiguous"),
    ((3,), "offset"),
    ((0,), "contiguous"),
    ((CHUNK + 1,), "contiguous"),
    ((CHUNK + 1,), "offset"),
    ((4099,), "contiguous"),
    ((13, 7), "transposed"),
]


# ---------------------------------------------------------------------------------------
# Buckets: our side of a parity run.


def _lr(value: float, kind: str) -> Tensor:
    """lr as the op takes it: a CPU float64 tensor, or a CUDA float32/float64 tensor."""
    if kind == "cpu":
        return torch.tensor(value, dtype=torch.float64)
    return torch.tensor(value, dtype=torch.float32 if kind == "cuda32" else torch.float64,
                        device=DEVICE)


ADAM_STATES = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]


@dataclass
class Bucket:
    """Params, grads and state lists of one op call, all on DEVICE."""

    layouts: list[str]
    params: list[Tensor]
    states: dict[str, list[Tensor]] = field(default_factory=dict)
    steps: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)

    @staticmethod
    def make(params_cpu: list[Tensor], layouts: list[str], state_names: list[str],
             with_steps: bool) -> "Bucket":
        params = [laid_out(p.detach(), lay, DEVICE) for p, lay in zip(params_cpu, layouts)]
        states = {name: [laid_out(torch.zeros_like(p), lay, DEVICE)
                         for p, lay in zip(params, layouts)]
                  for name in state_names}
        steps = ([torch.zeros((), dtype=torch.float32, device=DEVICE) for _ in params]
                 if with_steps else [])
        return Bucket(layouts, params, states, steps)

    def set_grads(self, grads_cpu: list[Tensor], scale: float | None) -> None:
        self.grads = [laid_out(g * scale if scale else g, lay, DEVICE)
                      for g, lay in zip(grads_cpu, self.layouts)]

    def snapshot(self) -> list[Tensor]:
        return [t.clone() for t in [*self.params, *self.grads, *self.steps,
                                    *(t for ts in self.states.values() for t in ts)]]


def _adam_call(b: Bucket, lr: Tensor, opts: dict, grad_scale: Tensor | None = None,
               found_inf: Tensor | None = None) -> None:
    torch.ops.fused_optim.adam_(
        b.params, b.grads, b.states["exp_avg"], b.states["exp_avg_sq"],
        b.states.get("max_exp_avg_sq", []), b.steps, lr=lr,
        beta1=opts.get("beta1", 0.9), beta2=opts.get("beta2", 0.999),
        weight_decay=opts.get("weight_decay", 0.0), eps=opts.get("eps", 1e-8),
        amsgrad=opts.get("amsgrad", False), maximize=opts.get("maximize", False),
        decoupled_weight_decay=opts.get("decoupled", False),
        grad_scale=grad_scale, found_inf=found_inf)


def _sgd_call(b: Bucket, lr: Tensor, opts: dict, first: bool,
              grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    torch.ops.fused_optim.sgd_(
        b.params, b.grads, b.states.get("momentum_buffer", []), lr=lr,
        momentum=opts.get("momentum", 0.0), dampening=opts.get("dampening", 0.0),
        weight_decay=opts.get("weight_decay", 0.0), nesterov=opts.get("nesterov", False),
        maximize=opts.get("maximize", False), is_first_step=first,
        grad_scale=grad_scale, found_inf=found_inf)


# ---------------------------------------------------------------------------------------
# The parity runner: the op against torch.optim, re-synced before every step.


def _oracle_for(algorithm: str, opts: dict, params: list[Tensor], lr: float):
    if algorithm == "adam":
        cls = torch.optim.AdamW if opts.get("decoupled") else torch.optim.Adam
        return cls(params, lr=lr, betas=(opts.get("beta1", 0.9), opts.get("beta2", 0.999)),
                   eps=opts.get("eps", 1e-8), weight_decay=opts.get("weight_decay", 0.0),
                   amsgrad=opts.get("amsgrad", False), maximize=opts.get("maximize", False),
                   foreach=False)
    return torch.optim.SGD(params, lr=lr, momentum=opts.get("momentum", 0.0),
                           dampening=opts.get("dampening", 0.0),
                           weight_decay=opts.get("weight_decay", 0.0),
                           nesterov=opts.get("nesterov", False),
                           maximize=opts.get("maximize", False), foreach=False)


def _flat(ts: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts]) if ts else torch.empty(0, device=DEVICE)


def check_op_parity(algorithm: str, opts: dict, dtype: torch.dtype,
                    shapes: list[tuple[tuple[int, ...], str]], *, steps: int = STEPS,
                    lr_kind: str = "cpu", scaled: bool = False, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    sizes = [s for s, _ in shapes]
    layouts = [lay for _, lay in shapes]
    lowp = dtype in LOW_PRECISION
    oracle_dtype = torch.float64 if lowp else dtype
    ulps = TOLERANCES[dtype].ulps

    if algorithm == "adam":
        names = ADAM_STATES if opts.get("amsgrad") else ADAM_STATES[:2]
    else:
        names = ["momentum_buffer"] if opts.get("momentum", 0.0) != 0.0 else []
    params_cpu = make_params(sizes, dtype, gen)
    ours = Bucket.make(params_cpu, layouts, names, with_steps=algorithm == "adam")
    lr = _lr(ADAM_LR if algorithm == "adam" else SGD_LR, lr_kind)
    oracle_params = [p.detach().to(DEVICE, oracle_dtype).requires_grad_() for p in params_cpu]
    oracle = _oracle_for(algorithm, opts, oracle_params, float(lr))
    grad_scale = torch.tensor(GRAD_SCALE, device=DEVICE) if scaled else None

    for step in range(steps):
        grads_cpu = make_grads(sizes, dtype, gen)
        with torch.no_grad():  # re-sync the oracle to our state
            for i, po in enumerate(oracle_params):
                po.copy_(ours.params[i])
                st = oracle.state.get(po, {})
                for name in names:
                    if isinstance(st.get(name), Tensor):
                        st[name].copy_(ours.states[name][i])
                if isinstance(st.get("step"), Tensor):
                    st["step"].copy_(ours.steps[i])
        before = [_flat(ours.params), *(_flat(ours.states[n]) for n in names)]
        ours.set_grads(grads_cpu, GRAD_SCALE if scaled else None)
        for po, g in zip(oracle_params, grads_cpu):
            po.grad = g.to(DEVICE, oracle_dtype)

        if algorithm == "adam":
            _adam_call(ours, lr, opts, grad_scale)
        else:
            _sgd_call(ours, lr, opts, first=step == 0, grad_scale=grad_scale)
        oracle.step()

        label = (f"{algorithm} {opts} {dtype_id(dtype)} lr={lr_kind} scaled={scaled} "
                 f"step {step + 1}")
        grads = _flat([g.to(DEVICE) for g in grads_cpu])
        assert torch.equal(_flat(ours.grads), grads), f"{label}: grads not left unscaled"
        if ours.steps:
            steps_now = torch.stack(ours.steps)
            assert bool((steps_now == step + 1).all()), f"{label}: state_steps {steps_now}"
        pairs = [("param", _flat(ours.params), _flat([p.detach() for p in oracle_params]))]
        pairs += [(n, _flat(ours.states[n]), _flat([oracle.state[po][n] for po in oracle_params]))
                  for n in names]
        scale = row_scale([*before, grads, *(a for _, a, _ in pairs), *(b for _, _, b in pairs)])
        for name, a, b in pairs:
            assert a.dtype == dtype, f"{label}: {name} is {a.dtype}"
            assert_row_close(f"{label} {name}", a, b, scale, dtype, ulps)


# ---------------------------------------------------------------------------------------
# Parity: every option and dtype, awkward sizes and layouts.

ADAM_OPTIONS = [
    {"amsgrad": amsgrad, "maximize": maximize, **wd}
    for amsgrad in (False, True)
    for maximize in (False, True)
    for wd in ({}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled": True})
]
SGD_OPTIONS = [
    {**m, "maximize": maximize, **wd}
    for m in ({}, {"momentum": 0.9}, {"momentum": 0.9, "dampening": 0.3},
              {"momentum": 0.9, "nesterov": True})
    for maximize in (False, True)
    for wd in ({}, {"weight_decay": 0.1})
]
LR_KINDS = ["cpu", "cuda32", "cuda64"]


@pytest.mark.parametrize("scaled", [False, True], ids=["noscale", "grad_scale"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("opts", ADAM_OPTIONS, ids=options_id)
def test_adam_parity(opts, dtype, scaled):
    # lr kinds cycle over the cases so each kind meets every dtype and option family.
    lr_kind = LR_KINDS[(ADAM_OPTIONS.index(opts) + DTYPES.index(dtype) + scaled) % 3]
    check_op_parity("adam", opts, dtype, SHAPES, lr_kind=lr_kind, scaled=scaled)


@pytest.mark.parametrize("scaled", [False, True], ids=["noscale", "grad_scale"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=options_id)
def test_sgd_parity(opts, dtype, scaled):
    lr_kind = LR_KINDS[(SGD_OPTIONS.index(opts) + DTYPES.index(dtype) + scaled) % 3]
    check_op_parity("sgd", opts, dtype, SHAPES, lr_kind=lr_kind, scaled=scaled)


@pytest.mark.parametrize("lr_kind", LR_KINDS)
def test_lr_kinds(lr_kind):
    check_op_parity("adam", {"weight_decay": 0.1, "decoupled": True}, torch.float32, SHAPES,
                    lr_kind=lr_kind)
    check_op_parity("sgd", {"momentum": 0.9}, torch.float32, SHAPES, lr_kind=lr_kind)


# 1,100 tensors: AMSGrad holds 537 tensors per launch, so three launches; SGD with
# momentum 895. 8,192 tiny tensors: 14 Adam launches and 3 step-counter launches.
MANY = [(((i * 37) % 3000 + 1,), "contiguous" if i % 5 else "offset") for i in range(1100)]
HUGE_COUNT = [(((i * 7) % 64 + 1,), "contiguous") for i in range(8192)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_many_tensors_one_bucket(dtype):
    check_op_parity("adam", {"amsgrad": True, "weight_decay": 0.1}, dtype, MANY, steps=3)
    check_op_parity("sgd", {"momentum": 0.9, "nesterov": True}, dtype, MANY, steps=3)


def test_8192_tensors_one_bucket():
    check_op_parity("adam", {"weight_decay": 0.1, "decoupled": True}, torch.float32,
                    HUGE_COUNT, steps=2)


# ---------------------------------------------------------------------------------------
# found_inf: a skipped step changes nothing at all, steps included.


@pytest.mark.parametrize("algorithm", ["adam", "sgd"])
def test_found_inf_skips_everything(algorithm):
    gen = torch.Generator().manual_seed(1)
    sizes = [s for s, _ in SHAPES]
    names = ADAM_STATES if algorithm == "adam" else ["momentum_buffer"]
    b = Bucket.make(make_params(sizes, torch.float32, gen), [lay for _, lay in SHAPES], names,
                    with_steps=algorithm == "adam")
    opts = {"amsgrad": True, "weight_decay": 0.1} if algorithm == "adam" else {"momentum": 0.9}
    lr = _lr(1e-2, "cuda32")
    grad_scale = torch.tensor(GRAD_SCALE, device=DEVICE)
    found_inf = torch.zeros((), device=DEVICE)

    def call(first: bool) -> None:
        if algorithm == "adam":
            _adam_call(b, lr, opts, grad_scale, found_inf)
        else:
            _sgd_call(b, lr, opts, first, grad_scale, found_inf)

    b.set_grads(make_grads(sizes, torch.float32, gen), GRAD_SCALE)
    call(first=True)  # a normal step, so that every state is non-zero
    b.set_grads(make_grads(sizes, torch.float32, gen), GRAD_SCALE)
    found_inf.fill_(float("inf"))
    before = b.snapshot()
    call(first=False)
    after = b.snapshot()
    for i, (x, y) in enumerate(zip(before, after)):
        assert torch.equal(x, y), f"tensor {i} changed although found_inf was set"
    found_inf.zero_()
    call(first=False)
    if algorithm == "adam":
        assert all(s.item() == 2.0 for s in b.steps)
    assert not torch.equal(before[0], b.params[0]), "the step after the skip did not run"


# ---------------------------------------------------------------------------------------
# CUDA graphs: capture once, replay with a changing lr (and a skipped replay).


def test_cuda_graph_capture_and_replay():
    gen = torch.Generator().manual_seed(2)
    sizes = [s for s, _ in SHAPES]
    layouts = [lay for _, lay in SHAPES]
    params_cpu = make_params(sizes, torch.float32, gen)
    graph_b = Bucket.make(params_cpu, layouts, ADAM_STATES, with_steps=True)
    eager_b = Bucket.make(params_cpu, layouts, ADAM_STATES, with_steps=True)
    opts = {"amsgrad": True, "weight_decay": 0.1, "decoupled": True}
    # Static inputs of the graph: lr, grad_scale, found_inf and the grads.
    lr = torch.tensor(1e-2, device=DEVICE)
    grad_scale = torch.tensor(GRAD_SCALE, device=DEVICE)
    found_inf = torch.zeros((), device=DEVICE)
    graph_b.set_grads(make_grads(sizes, torch.float32, gen), GRAD_SCALE)
    eager_b.grads = [g.clone() for g in graph_b.grads]

    # Warm-up step on a side stream, as torch.cuda.graphs recommends; eager mirrors it.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _adam_call(graph_b, lr, opts, grad_scale, found_inf)
    torch.cuda.current_stream().wait_stream(side)
    _adam_call(eager_b, lr.clone(), opts, grad_scale.clone(), found_inf.clone())

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _adam_call(graph_b, lr, opts, grad_scale, found_inf)

    for k, (lr_value, inf) in enumerate([(5e-3, 0.0), (2e-2, 1.0), (1e-3, 0.0), (3e-2, 0.0)]):
        grads = make_grads(sizes, torch.float32, gen)
        for static, g, lay in zip(graph_b.grads, grads, layouts):
            static.copy_(laid_out(g * GRAD_SCALE, lay, DEVICE))
        eager_b.set_grads(grads, GRAD_SCALE)
        lr.fill_(lr_value)
        found_inf.fill_(inf)
        graph.replay()
        _adam_call(eager_b, torch.tensor(lr_value, device=DEVICE), opts, grad_scale.clone(),
                   torch.tensor(inf, device=DEVICE))
        for i, (x, y) in enumerate(zip(graph_b.snapshot(), eager_b.snapshot())):
            assert torch.equal(x, y), f"replay {k}: tensor {i} differs from the eager step"
    assert all(s.item() == 4.0 for s in graph_b.steps)  # warm-up + 3 of 4 replays


# ---------------------------------------------------------------------------------------
# torch.compile and torch.library.opcheck (fake kernels: fused_optim/_fake.py).


def _adam_args(amsgrad: bool, scaled: bool, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(1,), (3,), (CHUNK + 1,), (13, 7)]
    params = [p.detach().to(DEVICE) for p in make_params(sizes, torch.float32, gen)]
    grads = [g.to(DEVICE) * (GRAD_SCALE if scaled else 1.0)
             for g in make_grads(sizes, torch.float32, gen)]
    zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
    args = (params, grads, zeros(), zeros(), zeros() if amsgrad else [],
            [torch.zeros((), device=DEVICE) for _ in params])
    kwargs = dict(lr=torch.tensor(1e-2, device=DEVICE), beta1=0.9, beta2=0.999,
                  weight_decay=0.1, eps=1e-8, amsgrad=amsgrad, maximize=False,
                  decoupled_weight_decay=True,
                  grad_scale=torch.tensor(GRAD_SCALE, device=DEVICE) if scaled else None,
                  found_inf=torch.zeros((), device=DEVICE) if scaled else None)
    return args, kwargs


def _sgd_args(momentum: float, seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(1,), (3,), (CHUNK + 1,), (13, 7)]
    params = [p.detach().to(DEVICE) for p in make_params(sizes, torch.float32, gen)]
    grads = [g.to(DEVICE) for g in make_grads(sizes, torch.float32, gen)]
    bufs = [torch.zeros_like(p) for p in params] if momentum else []
    kwargs = dict(lr=torch.tensor(5e-2, dtype=torch.float64), momentum=momentum,
                  dampening=0.0, weight_decay=0.1, nesterov=False, maximize=False,
                  is_first_step=False, grad_scale=None, found_inf=None)
    return (params, grads, bufs), kwargs


@pytest.mark.parametrize("amsgrad,scaled", [(False, False), (True, True)])
def test_opcheck_adam(amsgrad, scaled):
    import fused_optim  # noqa: F401  (registers the fake kernels)

    args, kwargs = _adam_args(amsgrad, scaled)
    torch.library.opcheck(torch.ops.fused_optim.adam_.default, args, kwargs)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_opcheck_sgd(momentum):
    import fused_optim  # noqa: F401

    args, kwargs = _sgd_args(momentum)
    torch.library.opcheck(torch.ops.fused_optim.sgd_.default, args, kwargs)


def _clone_args(args, kwargs):
    def c(x):
        if isinstance(x, Tensor):
            return x.clone()
        if isinstance(x, (list, tuple)):
            return type(x)(c(y) for y in x)
        return x

    return c(args), {k: c(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile(backend):
    import fused_optim  # noqa: F401

    if backend == "inductor":
        pytest.importorskip("triton", reason="inductor needs triton on CUDA")
    torch._dynamo.reset()

    def adam_step(args, kwargs):
        torch.ops.fused_optim.adam_(*args, **kwargs)

    compiled = torch.compile(adam_step, backend=backend, fullgraph=True)
    args, kwargs = _adam_args(amsgrad=True, scaled=True)
    eager_args, eager_kwargs = _clone_args(args, kwargs)
    for lr in (1e-2, 3e-3, 2e-2):  # a tensor lr: no recompilation as it changes
        kwargs["lr"].fill_(lr)
        eager_kwargs["lr"].fill_(lr)
        for g, ge in zip(args[1], eager_args[1]):
            fresh = torch.randn_like(g) * GRAD_SCALE
            g.copy_(fresh)
            ge.copy_(fresh)
        compiled(args, kwargs)
        adam_step(eager_args, eager_kwargs)
    for i, (lc, le) in enumerate(zip(args, eager_args)):
        for j, (x, y) in enumerate(zip(lc, le)):
            assert torch.equal(x, y), f"list {i} tensor {j}: compiled step differs from eager"


# ---------------------------------------------------------------------------------------
# 64-bit indexing: a tensor of more than 2^31 elements.


def test_tensor_over_2_31_elements():
    n = 2**31 + CHUNK + 3
    lists = 4  # bf16 Adam: param, grad, exp_avg, exp_avg_sq
    need = lists * n * 2 + (1 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    dtype = torch.bfloat16
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    param = torch.randn(n, dtype=dtype, device=DEVICE, generator=gen)
    grad = torch.randn(n, dtype=dtype, device=DEVICE, generator=gen)
    exp_avg = torch.randn(n, dtype=dtype, device=DEVICE, generator=gen)
    exp_avg_sq = torch.rand(n, dtype=dtype, device=DEVICE, generator=gen)
    big = [param, grad, exp_avg, exp_avg_sq]
    # Windows across the 2^31 boundary and at both ends, plus random elements anywhere.
    index = torch.cat([
        torch.arange(0, 1000),
        torch.arange(2**31 - 600, 2**31 + 600),
        torch.arange(n - 1000, n),
        torch.randint(0, n, (100_000,), generator=torch.Generator().manual_seed(6)),
    ]).to(DEVICE)
    small = [t.index_select(0, index) for t in big]
    opts = {"weight_decay": 0.1, "decoupled": True}
    lr = torch.tensor(1e-2, device=DEVICE)
    for tensors in (big, small):
        b = Bucket(["contiguous"], [tensors[0]], {"exp_avg": [tensors[2]],
                                                  "exp_avg_sq": [tensors[3]]},
                   [torch.zeros((), device=DEVICE)], [tensors[1]])
        _adam_call(b, lr, opts)
        assert b.steps[0].item() == 1.0
    for name, t, s in zip(["param", "grad", "exp_avg", "exp_avg_sq"], big, small):
        assert torch.equal(t.index_select(0, index), s), f"{name}: elements differ"
    del big, small, param, grad, exp_avg, exp_avg_sq
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# Through the optimizer class.


def test_fused_optim_adamw_backend_cuda():
    import fused_optim

    if not hasattr(fused_optim, "AdamW"):
        pytest.skip("fused_optim.AdamW is not available")
    gen = torch.Generator().manual_seed(7)
    sizes = [(1,), (3,), (CHUNK + 1,), (13, 7)]
    ref = [p.detach().to(DEVICE).requires_grad_() for p in make_params(sizes, torch.float32, gen)]
    ours = [p.detach().clone().requires_grad_() for p in ref]
    opt = fused_optim.AdamW(ours, lr=ADAM_LR, weight_decay=0.1, amsgrad=True, backend="cuda")
    oracle = torch.optim.AdamW(ref, lr=ADAM_LR, weight_decay=0.1, amsgrad=True, foreach=False)
    ulps = TOLERANCES[torch.float32].ulps * STEPS  # free-running: the per-step budget, summed
    # Free-running values can cancel to ~0 at the end, so the magnitudes they were
    # computed from set the scale: the initial params, lr (an update's size) and the
    # largest grad seen (the moments' size).
    p0 = [p.detach().clone() for p in ref]
    gmax = [torch.zeros_like(p0_i) for p0_i in p0]
    for _ in range(STEPS):
        for p, q, g, m in zip(ours, ref, make_grads(sizes, torch.float32, gen), gmax):
            p.grad = g.to(DEVICE)
            q.grad = g.to(DEVICE)
            torch.maximum(m, q.grad.abs(), out=m)
        opt.step()
        oracle.step()
    for i, (p, q) in enumerate(zip(ours, ref)):
        assert opt.state[p]["step"].device.type == "cuda"
        assert opt.state[p]["step"].item() == STEPS
        scales = {"exp_avg": gmax[i], "exp_avg_sq": gmax[i] ** 2, "max_exp_avg_sq": gmax[i] ** 2}
        for key, size in scales.items():
            a, b = opt.state[p][key], oracle.state[q][key]
            assert_row_close(f"param {i} {key}", a, b, row_scale([a, b, size]), torch.float32,
                             ulps)
        lr_size = torch.full_like(p0[i], ADAM_LR)
        assert_row_close(f"param {i}", p.detach(), q.detach(),
                         row_scale([p, q, p0[i], lr_size]), torch.float32, ulps)


# ---------------------------------------------------------------------------------------
# Input checks specific to the CUDA op.


def test_rejects_cpu_step_counters():
    args, kwargs = _adam_args(amsgrad=False, scaled=False)
    args = (*args[:5], [s.cpu() for s in args[5]])
    with pytest.raises(RuntimeError, match="state_steps"):
        torch.ops.fused_optim.adam_(*args, **kwargs)


def test_rejects_lr_on_another_dtype():
    args, kwargs = _adam_args(amsgrad=False, scaled=False)
    kwargs["lr"] = kwargs["lr"].half()
    with pytest.raises(RuntimeError, match="lr must be float32 or float64"):
        torch.ops.fused_optim.adam_(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# Every optimizer of the table (tests/_tables.py), through its class: the CUDA C++
# backend and, where Triton runs on this GPU, the Triton backend, against torch.optim
# re-synced every step (tests/_oracle.py check_parity), on the layouts above.


def _gpu_backends() -> list[str]:
    if SKIP_REASON is not None:
        return ["cuda"]
    import fused_optim

    ok = fused_optim.available_backends(DEVICE, torch.float32)
    return [b for b in ("cuda", "triton") if ok.get(b) is None]


GPU_BACKENDS = _gpu_backends()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=case_ids(OPTIMIZER_CASES))
def test_every_optimizer_parity(case, dtype, backend):
    check_parity(case, dtype, backend, None, [s for s, _ in SHAPES], steps=STEPS,
                 device=DEVICE, layouts=[lay for _, lay in SHAPES])


@pytest.mark.parametrize("lr_kind", ["cuda32", "cuda64"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", FULL_CASES, ids=case_ids(FULL_CASES))
def test_every_optimizer_device_lr(case, backend, lr_kind):
    """An lr tensor on the GPU (float32 / float64), read by the kernels: no host sync."""
    check_parity(case, torch.float32, backend, None, [s for s, _ in SHAPES], steps=3,
                 device=DEVICE, layouts=[lay for _, lay in SHAPES],
                 options={"lr": _lr(case.options["lr"], lr_kind)})


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", FULL_CASES, ids=case_ids(FULL_CASES))
def test_every_optimizer_many_tensors(case, backend):
    """1,100 tensors in one bucket: several launches of the engine's tables."""
    check_parity(case, torch.float32, backend, None, [s for s, _ in MANY], steps=2,
                 device=DEVICE, layouts=[lay for _, lay in MANY])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", DEFAULT_CASES + FULL_CASES,
                         ids=case_ids(DEFAULT_CASES + FULL_CASES))
def test_every_optimizer_found_inf_and_cuda_graph(case, backend):
    """A step captured in a CUDA graph after a warm-up step, replayed with a changing
    device lr, grads and found_inf: every replay equals an eager optimizer's step on
    the same inputs, bit for bit; a replay with found_inf set changes nothing."""
    gen = torch.Generator().manual_seed(8)
    sizes = [s for s, _ in SHAPES]
    layouts = [lay for _, lay in SHAPES]
    init = make_params(sizes, torch.float32, gen)
    lr_value = case.options["lr"]
    opts = {}
    for name in ("graph", "eager"):
        params = [laid_out(p, lay, DEVICE).requires_grad_() for p, lay in zip(init, layouts)]
        lr = torch.tensor(lr_value, device=DEVICE)
        opt = case.fused(params, backend=backend, **{**case.options, "lr": lr})
        opt.grad_scale = torch.tensor(GRAD_SCALE, device=DEVICE)
        opt.found_inf = torch.zeros((), device=DEVICE)
        for p, g, lay in zip(params, make_grads(sizes, torch.float32, gen), layouts):
            p.grad = laid_out(g * GRAD_SCALE, lay, DEVICE)
        opts[name] = (opt, params, lr)
    graph_opt, graph_params, graph_lr = opts["graph"]
    eager_opt, eager_params, eager_lr = opts["eager"]
    for p, q in zip(graph_params, eager_params):
        q.grad.copy_(p.grad)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph_opt.step()  # warm-up: creates the state outside the capture
    torch.cuda.current_stream().wait_stream(side)
    eager_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    for k, (lr_new, inf) in enumerate([(lr_value / 2, 0.0), (lr_value * 2, 1.0),
                                       (lr_value / 3, 0.0)]):
        grads = make_grads(sizes, torch.float32, gen)
        for p, q, g, lay in zip(graph_params, eager_params, grads, layouts):
            p.grad.copy_(laid_out(g * GRAD_SCALE, lay, DEVICE))
            q.grad.copy_(p.grad)
        for opt, lr in ((graph_opt, graph_lr), (eager_opt, eager_lr)):
            lr.fill_(lr_new)
            opt.found_inf.fill_(inf)
        before = [t.clone() for p in graph_params for t in (p, *tensor_state(graph_opt, p).values())]
        graph.replay()
        eager_opt.step()
        after = [t for p in graph_params for t in (p, *tensor_state(graph_opt, p).values())]
        if inf:
            assert all(torch.equal(a, b) for a, b in zip(before, after)), f"replay {k} with found_inf changed state"
        for i, (p, q) in enumerate(zip(graph_params, eager_params)):
            assert torch.equal(p.detach(), q.detach()), f"replay {k}: param {i} differs from eager"
            sg, se = tensor_state(graph_opt, p), tensor_state(eager_opt, q)
            assert sorted(sg) == sorted(se)
            for key in sg:
                assert torch.equal(sg[key], se[key]), f"replay {k}: {key} of param {i} differs"


# ---------------------------------------------------------------------------------------
# Sparse grads: the row-sparse engine on the GPU (fused_optim/_sparse.py; the "cuda"
# backend's op csrc/cuda/sparse_rows_cuda.cu, the "triton" backend's
# triton_kernels/sparse.py), against torch.optim on the same GPU. tests/test_sparse.py
# holds the CPU's (bit-level) tests; here torch's CUDA coalesce() may sum a row's
# duplicates in another order than the engines' index order, so sums part by a rounding
# or so and carry it on: params and states are compared within 8 ulps (fp32) / 2 ulps
# (bf16) of each tensor's largest magnitude per step.

SPARSE_CONFIGS = [("SparseAdam", {"lr": 4e-2}), ("Adagrad", {"lr": 0.1}),
                  ("SGD", {"lr": 4.8e-3}), ("SGD", {"lr": 4.8e-3, "momentum": 0.9})]


def _sparse_grad(num: int, dim: int, lookups: int, dtype: torch.dtype,
                 gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, max(1, num // 2), (lookups,), generator=gen)
    values = torch.randn(lookups, dim, generator=gen).to(dtype)
    return torch.sparse_coo_tensor(idx[None], values, (num, dim)).to(DEVICE)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("config", SPARSE_CONFIGS,
                         ids=lambda c: c[0] + ("-momentum" if "momentum" in c[1] else ""))
def test_sparse_embedding_parity(config, dtype, backend):
    """Two embeddings (one wider than a block of 256 threads), 4 steps: duplicates,
    untouched rows, a step without lookups."""
    import fused_optim

    name, options = config
    gen = torch.Generator().manual_seed(10)
    shapes = [(1000, 300), (37, 5)]
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    ps = [torch.nn.Parameter(p.to(DEVICE)) for p in init]
    tps = [torch.nn.Parameter(p.to(DEVICE)) for p in init]
    fused = getattr(fused_optim, name)(ps, backend=backend, **options)
    oracle = getattr(torch.optim, name)(tps, **options)
    for step in range(4):
        grads = [_sparse_grad(1000, 300, 700, dtype, gen),
                 _sparse_grad(37, 5, 0 if step == 2 else 9, dtype, gen)]
        for p, tp, g in zip(ps, tps, grads):
            p.grad, tp.grad = g.clone(), g.clone()
        fused.step()
        oracle.step()
    ulps = 8 if dtype == torch.float32 else 2
    eps = torch.finfo(dtype).eps
    for i, (p, tp) in enumerate(zip(ps, tps)):
        pairs = [("param", p.detach(), tp.detach())]
        for key, v in oracle.state[tp].items():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                mine = fused.state[p][key]
                if v.is_sparse:
                    v, mine = v.coalesce().to_dense(), mine.coalesce().to_dense()
                pairs.append((key, mine, v))
        for what, a, b in pairs:
            scale = b.float().abs().max().item()
            torch.testing.assert_close(a.float(), b.float(), rtol=0,
                                       atol=ulps * 4 * eps * scale,
                                       msg=lambda m: f"{name} {backend} param {i} {what}: {m}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sparse_rows_out_of_range_is_an_error(backend):
    """An index past the param's rows raises before anything is written."""
    import fused_optim

    p = torch.nn.Parameter(torch.zeros(4, 2, device=DEVICE))
    opt = fused_optim.SGD([p], lr=0.1, backend=backend)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.ones(2, 2), (4, 2),
                                     check_invariants=False).to(DEVICE)
    with pytest.raises(RuntimeError, match="out of range"):
        opt.step()
    torch.cuda.synchronize()
    assert torch.equal(p.detach().cpu(), torch.zeros(4, 2))


# ---------------------------------------------------------------------------------------
# Memory policies (fused_optim/_policy.py) on the "cuda" backend ([note: storage policy]
# in csrc/cuda/multi_tensor_apply.cuh): the same semantics as the CPU engine, which
# tests/test_policy.py checks against torch.optim. Here the CUDA engine is compared with
# the CPU engine, each step from the same stored values (the CUDA optimizer's tensors are
# re-synced from the CPU optimizer's before every step):
#   * SGD with power-of-two lr, momentum and weight decay: every product is exact, so
#     nvcc's FMA contraction cannot change a rounding: bit for bit, every policy, the
#     random bits included;
#   * every other optimizer's full case: stored values within the one rounding of their
#     storage (TOLERANCES' 1 ulp for bf16 / fp16 stores, nearest or stochastic: the same
#     random word rounds an fp32 value a few ulps off to at most the neighbouring bf16),
#     fp32 stores within 1.5x the fp32 parity budget (tolerance(float32, optimizer);
#     the 1.5 is test_policy.py's RMSprop momentum-buffer factor, applied to all): nvcc
#     contracts a * b + c into FMAs, the CPU engine is built with -ffp-contract=off, so
#     the fp32 opmath differs by a few fp32 ulps; and at least 99% of the bf16 / fp16
#     stored elements bit-identical (a few fp32 ulps flip a bf16 rounding rarely);
#   * rng_states bit for bit (the offset advances by numel per step, on the device).

POLICY_SHAPES = [(1,), (3,), (4, 33), (CHUNK + 7,), (13, 7)]


def _policies():
    from fused_optim import _policy

    return [(f"{dtype_id(p)}-state_{dtype_id(s)}" + ("-master" if m else "")
             + ("-sr" if r else ""),
             p, {"state_dtype": s, "master_weights": m, "stochastic_rounding": r})
            for p, s, m, r in sorted(_policy.POLICIES, key=str)]


POLICIES = _policies()
# RMSprop without centered, as in tests/test_policy.py (its cancellation is op order).
POLICY_CASES = [dataclasses.replace(c, options={k: v for k, v in c.options.items()
                                                if k != "centered"})
                if c.name == "RMSprop" else c for c in FULL_CASES]


def _bits(t: Tensor) -> Tensor:
    """t's stored bits, on the CPU (NaNs compare by their bits)."""
    t = t.detach().cpu().reshape(-1)
    return t.view(torch.uint8) if t.is_floating_point() else t


def _policy_pair(fused_cls, params_cpu, options, backend="cuda"):
    """The same optimizer on the CPU engine and on `backend` (CUDA copies of the params),
    with identical state (the CPU one's, rng seeds included)."""
    cuda_params = [p.detach().to(DEVICE, copy=True).requires_grad_() for p in params_cpu]
    cpu_opt = fused_cls(params_cpu, backend="cpu", **options)
    cuda_opt = fused_cls(cuda_params, backend=backend, **options)
    for opt in (cpu_opt, cuda_opt):
        for group in opt.param_groups:
            for p in group["params"]:
                opt._create_state(group, p, opt.state[p])
    for p, q in zip(params_cpu, cuda_params):
        for key, value in cpu_opt.state[p].items():
            cuda_opt.state[q][key].copy_(value)
    return cpu_opt, cuda_opt, cuda_params


def _policy_tensors(opt, p):
    """(key, tensor) of what a step stores for param p: the param, its state."""
    return [("param", p), *sorted(opt.state[p].items())]


def _resync(cpu_opt, cuda_opt, params_cpu, params_cuda):
    with torch.no_grad():
        for p, q in zip(params_cpu, params_cuda):
            for (k, a), (_, b) in zip(_policy_tensors(cpu_opt, p), _policy_tensors(cuda_opt, q)):
                b.copy_(a)


@pytest.mark.parametrize("policy", POLICIES, ids=[p[0] for p in POLICIES])
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_policy_sgd_bit_for_bit_with_cpu_engine(policy, nesterov):
    import fused_optim

    _, dtype, options = policy
    gen = torch.Generator().manual_seed(21)
    params = [p.requires_grad_() for p in make_params(POLICY_SHAPES, dtype, gen)]
    hyper = dict(lr=2.0 ** -7, momentum=0.5, weight_decay=2.0 ** -4, nesterov=nesterov)
    cpu_opt, cuda_opt, cuda_params = _policy_pair(fused_optim.SGD, params, {**hyper, **options})
    for step in range(3):
        for p, q, g in zip(params, cuda_params, make_grads(POLICY_SHAPES, dtype, gen)):
            p.grad = g
            q.grad = g.to(DEVICE, copy=True)
        cpu_opt.step()
        cuda_opt.step()
        for i, (p, q) in enumerate(zip(params, cuda_params)):
            for (key, a), (key_b, b) in zip(_policy_tensors(cpu_opt, p),
                                            _policy_tensors(cuda_opt, q)):
                assert key == key_b
                assert a.dtype == b.dtype, (key, a.dtype, b.dtype)
                assert torch.equal(_bits(a), _bits(b)), (
                    f"{policy[0]} step {step + 1} param {i} {key} differs from the CPU engine")


@pytest.mark.parametrize("policy", POLICIES, ids=[p[0] for p in POLICIES])
@pytest.mark.parametrize("case", POLICY_CASES, ids=case_ids(POLICY_CASES))
def test_policy_matches_cpu_engine(case, policy):
    from fused_optim import _policy

    _, dtype, options = policy
    gen = torch.Generator().manual_seed(22)
    params = [p.requires_grad_() for p in make_params(POLICY_SHAPES, dtype, gen)]
    cpu_opt, cuda_opt, cuda_params = _policy_pair(case.fused, params,
                                                  {**case.options, **options})
    scalars = scalar_keys(case)
    for step in range(3):
        _resync(cpu_opt, cuda_opt, params, cuda_params)
        before = [[t.detach().clone() for k, t in _policy_tensors(cpu_opt, p)
                   if k not in scalars and k != _policy.RNG_KEY] for p in params]
        grads = make_grads(POLICY_SHAPES, dtype, gen)
        for p, q, g in zip(params, cuda_params, grads):
            p.grad = g
            q.grad = g.to(DEVICE, copy=True)
        cpu_opt.step()
        cuda_opt.step()
        for i, (p, q, g) in enumerate(zip(params, cuda_params, grads)):
            stored = [(k, a, b.detach().cpu()) for (k, a), (_, b)
                      in zip(_policy_tensors(cpu_opt, p), _policy_tensors(cuda_opt, q))]
            scale = row_scale([g, *before[i], *(a for k, a, _ in stored
                                                if k not in scalars and k != _policy.RNG_KEY)])
            for key, a, b in stored:
                label = f"{case.id} {policy[0]} step {step + 1} param {i} {key}"
                assert a.dtype == b.dtype, label
                if key == _policy.RNG_KEY:
                    assert torch.equal(a, b), label
                    assert int(b[1]) == (step + 1) * p.numel(), label
                elif key in scalars:
                    assert torch.equal(a, b), label
                elif a.dtype == torch.float32:
                    assert_row_close(label, b, a, scale, torch.float32,
                                     1.5 * tolerance(torch.float32, case.fused).ulps)
                else:
                    assert_row_close(label, b, a, scale, a.dtype, TOLERANCES[a.dtype].ulps)
                    same = (a.view(torch.int16) == b.view(torch.int16)).double().mean()
                    assert float(same) >= 0.99, f"{label}: {float(same):.4f} bit-identical"


def test_policy_stochastic_rounding_uses_the_documented_bits():
    """SGD with momentum on bf16 params, first step, on the GPU: the param is
    p - lr * g in fp32 (lr = 2^-7: lr * g is exact, so an FMA rounds the same), stored
    with Philox word 0 at counter offset + i under the param's seed; momentum_buffer
    (fp32) is g; the offset advances by numel on the device
    ([note: the policy's random bits] in fused_optim/_policy.py)."""
    import fused_optim
    from fused_optim import _policy

    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(1)
    params = [p.to(DEVICE).requires_grad_()
              for p in make_params(POLICY_SHAPES, torch.bfloat16, gen)]
    grads = make_grads(POLICY_SHAPES, torch.float32, gen)
    before = [p.detach().float().cpu() for p in params]
    lr = 2.0 ** -7
    opt = fused_optim.SGD(params, lr=lr, momentum=0.9, backend="cuda",
                          stochastic_rounding=True, state_dtype=torch.float32)
    for p, g in zip(params, grads):
        p.grad = g.to(torch.bfloat16).to(DEVICE)
    opt.step()
    for i, (p, p0, g) in enumerate(zip(params, before, grads)):
        rng = opt.state[p][_policy.RNG_KEY].cpu()
        assert int(rng[1]) == p.numel()
        words = _policy.philox_words(rng[0], _policy.memory_offsets(p.cpu()))
        g32 = g.to(torch.bfloat16).float()
        expected = _policy.bf16_stochastic(p0 - torch.tensor(lr) * g32, words[0])
        got = p.detach().cpu()
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), i
        assert torch.equal(opt.state[p]["momentum_buffer"].cpu(), g32), i


@pytest.mark.parametrize("options", [
    {"master_weights": True, "stochastic_rounding": True, "state_dtype": torch.bfloat16},
    {"stochastic_rounding": True},
    {"master_weights": True},
], ids=["master-sr-state_bf16", "sr", "master"])
def test_policy_cuda_graph_and_found_inf(options):
    """AdamW under a policy, captured in a CUDA graph after a warm-up step: each replay
    draws new random bits (the offsets advance on the device) and equals an eager step,
    bit for bit; a replay with found_inf set changes nothing, rng_states included."""
    import fused_optim

    gen = torch.Generator().manual_seed(9)
    init = make_params(POLICY_SHAPES, torch.bfloat16, gen)
    opts = {}
    for name in ("graph", "eager"):
        torch.manual_seed(3)
        params = [p.detach().to(DEVICE).requires_grad_() for p in init]
        opt = fused_optim.AdamW(params, lr=torch.tensor(1e-2, device=DEVICE), weight_decay=0.1,
                                backend="cuda", **options)
        opt.found_inf = torch.zeros((), device=DEVICE)
        for p in params:
            p.grad = torch.zeros_like(p)
        opts[name] = (opt, params)
    (graph_opt, graph_params), (eager_opt, eager_params) = opts["graph"], opts["eager"]

    def set_grads():
        grads = make_grads(POLICY_SHAPES, torch.bfloat16, gen)
        for p, q, g in zip(graph_params, eager_params, grads):
            p.grad.copy_(g)
            q.grad.copy_(g)

    def everything(opt, params):
        return [t.clone() for p in params for t in (p.detach(), *opt.state[p].values())]

    set_grads()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph_opt.step()  # warm-up: creates the state outside the capture
    torch.cuda.current_stream().wait_stream(side)
    eager_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    for k, inf in enumerate([0.0, 1.0, 0.0, 0.0]):
        set_grads()
        graph_opt.found_inf.fill_(inf)
        eager_opt.found_inf.fill_(inf)
        before = everything(graph_opt, graph_params)
        graph.replay()
        eager_opt.step()
        after = everything(graph_opt, graph_params)
        if inf:
            assert all(torch.equal(a, b) for a, b in zip(before, after)), f"replay {k}"
        else:
            assert not all(torch.equal(a, b) for a, b in zip(before, after)), f"replay {k}"
        for a, b in zip(after, everything(eager_opt, eager_params)):
            assert torch.equal(a, b), f"replay {k} differs from the eager step"


def test_policy_auto_runs_the_cuda_engine():
    """backend='auto' now runs a policy's CUDA bucket on the CUDA engine (no fallback
    warning), and backend='cuda' takes it."""
    import warnings

    import fused_optim

    for backend in ("auto", "cuda"):
        p = torch.nn.Parameter(torch.randn(100, dtype=torch.bfloat16, device=DEVICE))
        opt = fused_optim.AdamW([p], backend=backend, master_weights=True,
                                stochastic_rounding=True, state_dtype=torch.bfloat16)
        p.grad = torch.randn_like(p)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        assert float(opt.state[p]["rng_state"][1]) == 100


# ---------------------------------------------------------------------------------------
# Muon's element-wise stages (op muon_: a bf16 work list, [note: bf16 work lists] in
# csrc/include/fused_optim/math/optimizer.h) on the CUDA engine. Written without a GPU:
# the engine's bits against the CPU engine's are ctest's (test_cuda_engine.cpp,
# cuda_engine_bf16_work_lists_match_cpu_bits, host emulation); these check them against
# torch's own CUDA ops.

MUON_STAGES = {
    "momentum": {"apply": False, "nesterov": False},
    "nesterov": {"apply": False, "nesterov": True},
    "apply": {"apply": True, "nesterov": False},
}


def _muon_lists(dtype: torch.dtype) -> list[list[Tensor]]:
    """params, grads, momentum_buffers (dtype) and updates (bf16) on DEVICE: sizes across
    the vector widths and a chunk (257 x 257 > CHUNK), and one row one element into its
    storage (not 16-byte aligned: the scalar path)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 1), (3, 5), (7, 9), (257, 257), (6, 11)]
    lists: list[list[Tensor]] = [[], [], [], []]
    for i, shape in enumerate(shapes):
        for k in range(4):
            value = torch.randn(shape, generator=gen, dtype=torch.float64)
            value = value.to(torch.bfloat16 if k == 3 else dtype)
            if i == len(shapes) - 1:  # offset
                store = torch.empty(value.numel() + 1, dtype=value.dtype, device=DEVICE)
                lists[k].append(store[1:].view(shape).copy_(value))
            else:
                lists[k].append(value.to(DEVICE))
    return lists


@pytest.mark.parametrize("stage", list(MUON_STAGES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_muon_stages_bit_for_bit_with_torch_ops(stage, dtype):
    """The op on the CUDA engine against the reference backend on the same CUDA tensors
    (fused_optim/muon.py's muon_reference: torch's lerp_, lerp, .bfloat16(), mul_ and
    add_), bit for bit: the same operations, each rounded once (lerp and the add one
    fused multiply-add in math/muon.h, as nvcc contracts ATen's expressions). bf16
    params' apply stage is not compared: fused_optim.Muon runs it on the reference (its
    kernel casts alpha to bf16 as torch's CPU add_ does)."""
    if stage == "apply" and dtype == torch.bfloat16:
        pytest.skip("bf16 params' apply stage runs on the reference (fused_optim/muon.py)")
    from fused_optim.backends import get_backend
    from fused_optim.muon import STAGES

    kwargs = {"lr": torch.tensor(0.02, dtype=torch.float64), "momentum": 0.95,
              "weight_decay": 0.1, "lr_ratio": 1.5, "transposed_update": False,
              **MUON_STAGES[stage]}
    got = _muon_lists(dtype)
    want = _muon_lists(dtype)
    get_backend("cuda").step(STAGES, *got, **kwargs)
    get_backend("reference").step(STAGES, *want, **kwargs)
    torch.cuda.synchronize()
    for name, g_list, w_list in zip(("params", "grads", "momentum_buffers", "updates"), got,
                                    want):
        for i, (g, w) in enumerate(zip(g_list, w_list)):
            assert torch.equal(g, w), (
                f"{stage} {dtype} {name}[{i}]: {(g != w).sum().item()} elements differ, "
                f"max |diff| {(g.double() - w.double()).abs().max().item()}")


def test_muon_runs_its_stages_on_the_cuda_engine():
    """fused_optim.Muon's automatic choice on a GPU is the CUDA engine, with no warning."""
    import warnings

    import fused_optim
    from fused_optim import muon

    assert muon._stage_backend(torch.device(DEVICE), torch.float32).name == "cuda"
    p = torch.nn.Parameter(torch.randn(64, 32, device=DEVICE))
    p.grad = torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_optim.Muon([p]).step()
