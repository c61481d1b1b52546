"""Optimizer implementations under test ("providers"), discovered at run time.

Each provider is one small class: ``available(device, dtype, optim)`` returns None or a
one-line reason it cannot run; ``prepare(...)`` does one-off work that must stay outside
the timing (DeepSpeed's JIT build of its C++/CUDA op); ``make(params, hyper)`` returns a
ready optimizer. Every baseline is called through its own public API, never re-implemented.

  torch-forloop, torch-foreach, torch-fused   torch.optim with foreach=False / True, fused=True
  fused_optim[<backend>]                      one per fused_optim backend (cpu, cuda, triton,
                                              reference), pinned with backend=<name>
  deepspeed                                   DeepSpeedCPUAdam on CPU, FusedAdam on CUDA
  bnb-32bit, bnb-8bit                         bitsandbytes optimizers, when installed
  torchao-8bit, torchao-4bit, torchao-fp8     torchao.optim low-bit AdamW, when installed

The optimizers come from fused_optim itself (``optimizers``): every class it exports
that has a spec (fused_optim/spec.py) is benchmarkable under its class name lowercased,
and the torch.optim class of the same name is what the torch providers run. Nothing here
names an optimizer: its benchmark options are its spec's ``bench`` dict (``Hyper``).

"torch-forloop" is also the reference of the correctness column: every provider's params
after the timed steps are compared with its.

Sparse grads (the embedding shapes): an optimizer runs on them when its spec says how
(``Spec.sparse``), and one whose spec takes sparse grads only (SparseAdam) runs on them
only (``grads_reason``). torch.optim has one implementation for sparse grads, timed as
torch-forloop (foreach=True falls back to it, fused=True raises); fused_optim's backends
run when they have a row-sparse engine; the other libraries take dense grads only
(``Provider.sparse_grads``).
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Hyper", "Provider", "all_providers", "select", "optimizers", "optim_names",
           "resolve_optims", "grads_reason", "REFERENCE", "BASELINE", "TORCH_FAMILY",
           "PARAM_STD", "GRAD_STD"]

REFERENCE = "torch-forloop"   # the correctness reference
BASELINE = "torch-fused"      # the speed baseline of the ratio column
TORCH_FAMILY = "torch"        # the family whose fastest member is the second yardstick


# --------------------------------------------------------------------------------------
# The optimizers: fused_optim's classes and their specs
# --------------------------------------------------------------------------------------

def optimizers() -> dict[str, type]:
    """Benchmark name -> fused_optim class, for every optimizer class fused_optim exports
    with a spec (FusedOptimizer subclasses), in the package's ``__all__`` order. The name
    is the class name lowercased, as torch.optim's class of the same name is the peer.
    Raises ImportError when fused_optim does not import."""
    fo = importlib.import_module("fused_optim")
    base = importlib.import_module("fused_optim.optimizer").FusedOptimizer
    names = list(getattr(fo, "__all__", []))
    names += [n for n in dir(fo) if n not in names and not n.startswith("_")]
    out: dict[str, type] = {}
    for n in names:
        cls = getattr(fo, n, None)
        if (isinstance(cls, type) and issubclass(cls, base) and cls is not base
                and getattr(cls, "spec", None) is not None):
            out.setdefault(cls.__name__.lower(), cls)
    return out


def optim_names() -> list[str]:
    """The names ``--optim all`` runs; [] when fused_optim does not import."""
    try:
        return list(optimizers())
    except Exception:  # noqa: BLE001  (a broken build: no optimizer to run)
        return []


def resolve_optims(names: list[str]) -> list[str]:
    """Expands "all" (every benchmarkable optimizer) and checks each name; keeps order,
    drops repeats. A name may spell the class name with "_" or "-" ("sparse_adam").
    Raises ValueError naming the known ones."""
    out: list[str] = []
    known = optim_names()
    for n in names:
        for name in (known if n == "all" else [n.strip().lower()]):
            if name not in known and name.replace("_", "").replace("-", "") in known:
                name = name.replace("_", "").replace("-", "")
            if name not in out:
                out.append(name)
    for name in out:
        Hyper.for_optim(name)   # ValueError for an unknown name
    return out


def grads_reason(optim: str, sparse: bool) -> str | None:
    """Why ``optim`` does not run on dense (``sparse`` False) or sparse grads, or None.
    From its spec: ``Spec.sparse`` says how it takes sparse grads, and ``only`` that it
    takes nothing else. Raises ValueError for an unknown name."""
    spec = Hyper.for_optim(optim).spec
    rule = getattr(spec, "sparse", None)
    cls = optimizers()[optim].__name__
    if sparse and rule is None:
        return f"fused_optim.{cls} takes dense grads only"
    if not sparse and rule is not None and rule.only:
        return (f"fused_optim.{cls} takes sparse grads only: run it on an embedding shape "
                "(--shapes embeddings)")
    return None


def _torch_class(hyper: Hyper):
    """torch.optim's class of the same name, or None."""
    cls = getattr(torch.optim, hyper.class_name, None)
    return cls if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) else None


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# Constructor arguments that pick an implementation, not a hyperparameter: never taken
# from the optimizer's defaults into another library's constructor.
_SWITCHES = frozenset({"params", "self", "foreach", "fused", "capturable", "differentiable",
                       "backend"})

# A step visible in bf16: see Hyper.for_optim.
_VISIBLE_ULPS = 4.0
# Init scale of the benchmark's params and grads (the runner draws them; Hyper.for_optim
# sizes lr on them). With params ~0.02 a step of lr 1e-3 is several bf16 ulps, so a
# provider that does not step is visible in bf16 too.
PARAM_STD, GRAD_STD = 0.02, 0.1


@dataclass(frozen=True, eq=False)
class Hyper:
    """Hyperparameters of the benchmarked step of one optimizer.

    ``kwargs`` is what every provider's constructor gets (torch.optim's and fused_optim's
    keyword names): the benchmark's lr and the spec's ``bench`` options. ``values`` is
    the whole step: the fused_optim class's defaults updated with ``kwargs`` (the byte
    model reads which state lists they keep; other libraries' constructors take the
    arguments they share with it). They do not change the bytes moved beyond that; they
    are chosen so that a step visibly moves bf16 params (see runner's init)."""

    optim: str                   # the benchmark's name: the class name lowercased
    class_name: str              # fused_optim's (and torch.optim's) class name
    kwargs: dict[str, Any]
    values: dict[str, Any]
    spec: Any = field(repr=False, default=None)
    sparse: bool = False         # the hyperparameters of the sparse-grad cases

    @classmethod
    def for_optim(cls, optim: str, *, sparse: bool = False) -> Hyper:
        """The benchmark's hyperparameters for ``optim``: the class defaults, the spec's
        ``bench`` options, and lr: the class default, raised tenfold (at most three
        times) while one step from the benchmark's init moves the median param by fewer
        than 4 bf16 ulps, so that a provider that does not step shows in the error column
        in bf16 too. (Default lrs pass as they are, except where the step is lr x grad:
        1e-3 there moves a param ~0.02 by ~1 ulp, and 1e-2 is used.)

        ``sparse``: the hyperparameters of the sparse-grad (embedding) cases. The spec's
        ``bench`` options stay only where its row-sparse engine runs them
        (``SparseGrads.engine``): SGD's momentum does not (torch keeps a sparse momentum
        buffer, stepped in torch ops), so SGD runs plain there, as the class defaults
        (no weight decay: torch refuses it with sparse grads). The lr is sized as above,
        on a sparse grad."""
        return _hyper_for(optim, bool(sparse))

    def torch_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for torch.optim's and fused_optim's constructors."""
        return dict(self.kwargs)

    def value(self, key: str) -> Any:
        return self.values[key]

    def kwargs_for(self, ctor) -> dict[str, Any]:
        """The step's hyperparameters that ``ctor`` (another library's optimizer class)
        takes under the same names: how a peer with torch.optim-like arguments gets the
        same step without naming them here."""
        try:
            params = inspect.signature(ctor).parameters
        except (TypeError, ValueError):
            return {}
        return {k: v for k, v in self.values.items() if k in params and k not in _SWITCHES}

    def flag(self, name: str) -> bool:
        """Whether an option (a hyperparameter a state list's ``when`` names) is on."""
        return bool(self.values.get(name))

    def to_dict(self) -> dict:
        d = {"optim": self.optim, "class": self.class_name, "kwargs": _jsonable(self.kwargs),
             "values": _jsonable({k: v for k, v in self.values.items() if k not in _SWITCHES})}
        if self.sparse:
            d["grads"] = "sparse"
        return d


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v if isinstance(v, (int, float, str, bool, list, type(None))) else repr(v)
    return out


@functools.lru_cache(maxsize=None)
def _hyper_for(optim: str, sparse: bool = False) -> Hyper:
    try:
        known = optimizers()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"unknown optimizer {optim!r}: fused_optim does not import "
                         f"({_first_line(e)})") from None
    cls = known.get(optim)
    if cls is None:
        raise ValueError(f"unknown optimizer {optim!r}; expected 'all' or one of "
                         f"{', '.join(known) or '(none: fused_optim exports no optimizer)'}")
    spec = cls.spec
    bench = dict(getattr(spec, "bench", None) or {})
    defaults = _defaults_of(cls, bench)
    if sparse and bench and not _engine_runs(spec, defaults):
        bench = {}
        defaults = _defaults_of(cls, bench)
    lr = _visible_lr(cls, bench, float(defaults.get("lr", 1e-3)), sparse)
    kwargs = {"lr": lr, **bench}
    return Hyper(optim, cls.__name__, kwargs, {**defaults, **kwargs}, spec, sparse)


def _engine_runs(spec, group: dict) -> bool:
    """Whether the row-sparse engine steps sparse grads under ``group``'s options (see
    Hyper.for_optim); False where the spec takes no sparse grads."""
    rule = getattr(spec, "sparse", None)
    if rule is None:
        return False
    if rule.engine is None:
        return True
    try:
        return bool(rule.engine(group))
    except Exception:  # noqa: BLE001  (an option torch refuses with sparse grads)
        return False


def _defaults_of(cls, kwargs: dict) -> dict:
    """The class's param-group defaults under ``kwargs`` (one dummy param, no step)."""
    return dict(cls([torch.nn.Parameter(torch.zeros(1))], **kwargs).defaults)


def _visible_lr(cls, bench: dict, lr: float, sparse: bool = False) -> float:
    """See Hyper.for_optim. Measured on the CPU on 4096 elements with torch.optim's class
    of the same name (fused_optim's when torch has none), from a fixed seed; ``sparse``:
    4096 rows of one element, every row touched by a sparse grad."""
    ctor = getattr(torch.optim, cls.__name__, None) or cls
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(4096, generator=gen) * PARAM_STD
    g0 = torch.randn(4096, generator=gen) * GRAD_STD
    if sparse:
        p0 = p0[:, None]
        g0 = torch.sparse_coo_tensor(torch.arange(4096)[None], g0[:, None], (4096, 1),
                                     check_invariants=True)
    # bf16 keeps 8 significant bits: one ulp at |p| is 2^(floor(log2 |p|) - 7).
    ulp = torch.exp2(torch.floor(torch.log2(p0.abs().clamp_min(1e-30))) - 7)
    for attempt in range(4):   # the default, then up to three tenfold raises
        if attempt:
            lr = float(f"{lr * 10:.6g}")
        p = torch.nn.Parameter(p0.clone())
        p.grad = g0.clone()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ctor([p], **{**bench, "lr": lr}).step()
        except Exception:  # noqa: BLE001  (the run reports the class's own error)
            return lr
        moved = ((p.detach() - p0).abs() / ulp).median().item()
        if not math.isfinite(moved) or moved >= _VISIBLE_ULPS:
            break
    return lr


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _dist_version(*names: str) -> str | None:
    for n in names:
        try:
            return importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@dataclass
class Provider:
    """Base class. ``family`` groups providers for --providers (e.g. "torch")."""

    name: str
    family: str
    capturable: bool = False      # can run inside a CUDA graph (--cuda-graph)
    note: str = ""
    setup_s: float = 0.0          # one-off prepare time, reported, never timed
    # The thread pool its CPU steps run on ([note: idle gap] in runner.py): "torch" is
    # torch's OpenMP pool (at::parallel_for), which fused_optim's CPU kernels share.
    threads: str = "torch"
    _prepared: set = field(default_factory=set, repr=False)

    def available(self, device: torch.device, dtype: torch.dtype, optim: str) -> str | None:
        raise NotImplementedError

    def prepare(self, device: torch.device, dtype: torch.dtype, optim: str) -> None:
        """One-off work (JIT builds); runs outside the timing."""

    def make(self, params: list[torch.Tensor], hyper: Hyper, *, capturable: bool = False):
        raise NotImplementedError

    def sparse_grads(self, device: torch.device, dtype: torch.dtype, optim: str) -> str | None:
        """``available`` for the sparse-grad (embedding) cases: None, or why this
        provider does not run them. The base class: a provider takes dense grads only."""
        return f"{self.name} takes dense grads only"

    def version(self) -> str | None:
        return None

    def not_in_all(self, device: torch.device) -> str | None:
        """Why ``--providers all`` leaves this provider out on ``device`` (None: it is in).
        Naming the provider or its family runs it anyway."""
        return None


# --------------------------------------------------------------------------------------
# torch.optim
# --------------------------------------------------------------------------------------

def _hyper_or_reason(optim: str) -> tuple[Hyper | None, str | None]:
    try:
        return Hyper.for_optim(optim), None
    except ValueError as e:
        return None, str(e)


class TorchOptim(Provider):
    """torch.optim's class of the optimizer's name, as its for-loop, foreach or fused
    implementation."""

    def __init__(self, impl: str):
        super().__init__(name=f"torch-{impl}", family=TORCH_FAMILY,
                         capturable=impl in ("foreach", "fused"))
        self.impl = impl

    def available(self, device, dtype, optim):
        hyper, reason = _hyper_or_reason(optim)
        if hyper is None:
            return reason
        cls = _torch_class(hyper)
        if cls is None:
            return f"torch.optim has no {hyper.class_name}"
        if self.impl == "fused":
            if not _accepts(cls, "fused"):
                return f"torch.optim.{hyper.class_name} has no fused implementation"
            # Ask torch, on a 1-element tensor: it checks some combinations when the
            # optimizer is constructed, others (devices, for some classes) at its first step.
            try:
                p = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
                opt = cls([p], fused=True, **hyper.torch_kwargs())
                p.grad = torch.zeros_like(p)
                opt.step()
            except Exception as e:  # noqa: BLE001
                return _first_line(e)
        elif self.impl == "foreach" and not _accepts(cls, "foreach"):
            return f"torch.optim.{hyper.class_name} has no foreach implementation"
        return None

    def sparse_grads(self, device, dtype, optim):
        """torch.optim has one implementation for sparse grads: timed as torch-forloop;
        foreach=True falls back to it (SGD, Adagrad) and fused=True raises."""
        if self.impl != "forloop":
            hyper, _ = _hyper_or_reason(optim)
            cls = _torch_class(hyper) if hyper else None
            if cls is None or not _accepts(cls, self.impl):
                why = f"it has no {self.impl} option"
            elif self.impl == "foreach":
                why = "foreach=True falls back to it"
            else:
                why = "fused=True raises"
            return (f"torch.optim.{hyper.class_name if hyper else optim} has one "
                    f"implementation for sparse grads, timed as torch-forloop ({why})")
        return self.available(device, dtype, optim)

    def make(self, params, hyper, *, capturable=False):
        cls = _torch_class(hyper)
        kw = hyper.torch_kwargs()
        if self.impl == "forloop":
            if _accepts(cls, "foreach"):
                kw.update(foreach=False)
        elif self.impl == "foreach":
            kw.update(foreach=True)
        else:
            kw.update(fused=True)
        if capturable and _accepts(cls, "capturable"):
            kw.update(capturable=True)
        return cls(params, **kw)

    def version(self):
        return torch.__version__


# --------------------------------------------------------------------------------------
# fused_optim, one provider per backend
# --------------------------------------------------------------------------------------

FUSED_OPTIM_BACKENDS = ("cpu", "cuda", "triton", "reference")


class FusedOptim(Provider):
    def __init__(self, backend: str):
        super().__init__(name=f"fused_optim[{backend}]", family="fused_optim", capturable=True)
        self.backend = backend

    def _module(self):
        return importlib.import_module("fused_optim")

    def available(self, device, dtype, optim):
        try:
            self._module()
            from fused_optim.backends import available_backends
        except Exception as e:  # noqa: BLE001  (a broken build must not stop the bench)
            return f"fused_optim does not import ({_first_line(e)})"
        hyper, reason = _hyper_or_reason(optim)
        if hyper is None:
            return reason
        try:
            reasons = available_backends(device, dtype)
        except Exception as e:  # noqa: BLE001
            return _first_line(e)
        if self.backend not in reasons:
            return f"backend {self.backend!r} is not registered"
        return reasons[self.backend]

    def sparse_grads(self, device, dtype, optim):
        """Pinned backends only where the backend has a row-sparse engine: elsewhere
        fused_optim steps sparse grads on another backend, which this name would hide."""
        reason = self.available(device, dtype, optim)
        if reason is not None:
            return reason
        from fused_optim.backends import get_backend

        if getattr(get_backend(self.backend), "sparse_step", None) is None:
            return (f"backend {self.backend!r} has no row-sparse engine (fused_optim steps "
                    "sparse grads on another backend)")
        return None

    def make(self, params, hyper, *, capturable=False):
        cls = optimizers()[hyper.optim]
        kw = hyper.torch_kwargs()
        if capturable and _accepts(cls, "capturable"):
            kw.update(capturable=True)
        return cls(params, backend=self.backend, **kw)

    def version(self):
        try:
            fo = self._module()
        except Exception:  # noqa: BLE001
            return None
        return getattr(fo, "__version__", None)


# --------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------

class DeepSpeed(Provider):
    """DeepSpeedCPUAdam on CPU, FusedAdam on CUDA. Both are built by DeepSpeed's op
    builder (ninja) on first use; ``prepare`` does that build, outside the timing, and the
    build time is reported as setup_s."""

    # The torch.optim classes whose step DeepSpeed's Adam kernels take (adamw_mode picks
    # the decay); DeepSpeed's API, not this harness's list of optimizers.
    TORCH_CLASSES = frozenset({"Adam", "AdamW"})

    def __init__(self):
        super().__init__(name="deepspeed", family="deepspeed",
                         threads="deepspeed-openmp")  # its own libgomp

    def available(self, device, dtype, optim):
        hyper, reason = _hyper_or_reason(optim)
        if hyper is None:
            return reason
        if hyper.class_name not in self.TORCH_CLASSES:
            return (f"DeepSpeed has no {hyper.class_name} for this benchmark "
                    f"({'/'.join(sorted(self.TORCH_CLASSES))} only)")
        if importlib.util.find_spec("deepspeed") is None:
            return "not installed (pip install deepspeed)"
        if device.type == "cpu":
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                return f"DeepSpeedCPUAdam does not take {dtype}"
            return None
        if device.type == "cuda":
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                return f"FusedAdam does not take {dtype}"
            return None
        return f"no DeepSpeed optimizer for device {device.type}"

    def _builder(self, device):
        _quiet_deepspeed()
        if device.type == "cpu":
            from deepspeed.ops.op_builder import CPUAdamBuilder
            return CPUAdamBuilder()
        from deepspeed.ops.op_builder import FusedAdamBuilder
        return FusedAdamBuilder()

    def prepare(self, device, dtype, optim):
        if device.type in self._prepared:
            return
        import time
        t0 = time.perf_counter()
        self._builder(device).load()
        self.setup_s += time.perf_counter() - t0
        self._prepared.add(device.type)

    def make(self, params, hyper, *, capturable=False):
        _quiet_deepspeed()
        decoupled = hyper.flag("decoupled_weight_decay")
        if params[0].device.type == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(params, adamw_mode=decoupled,
                                    **hyper.kwargs_for(DeepSpeedCPUAdam))
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam(params, adam_w_mode=decoupled, **hyper.kwargs_for(FusedAdam))

    def version(self):
        return _dist_version("deepspeed")


def _quiet_deepspeed():
    import logging
    import os
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------
# bitsandbytes
# --------------------------------------------------------------------------------------

class Bitsandbytes(Provider):
    """bitsandbytes.optim's class of the optimizer's name, with optim_bits=32 or 8."""

    def __init__(self, bits: int):
        super().__init__(name=f"bnb-{bits}bit", family="bnb")
        self.bits = bits

    def available(self, device, dtype, optim):
        if importlib.util.find_spec("bitsandbytes") is None:
            return "not installed (pip install bitsandbytes)"
        try:
            bnb = importlib.import_module("bitsandbytes")
        except Exception as e:  # noqa: BLE001
            return f"bitsandbytes does not import ({_first_line(e)})"
        hyper, reason = _hyper_or_reason(optim)
        if hyper is None:
            return reason
        if self._class(bnb, hyper) is None:
            return f"bitsandbytes has no {hyper.class_name}"
        # Ask the library itself: one step on a tensor larger than its 8-bit threshold
        # (4096 elements; smaller tensors silently stay 32-bit).
        try:
            p = torch.zeros(8192, device=device, dtype=dtype, requires_grad=True)
            p.grad = torch.ones_like(p)
            self.make([p], hyper).step()
        except Exception as e:  # noqa: BLE001
            return f"bitsandbytes {bnb.__version__} cannot step {dtype} on {device.type} ({_first_line(e)})"
        return None

    def not_in_all(self, device):
        if device.type == "cpu":
            return "slow CPU fallback: on CPU only when named (--providers all,bnb)"
        return None

    @staticmethod
    def _class(bnb, hyper):
        cls = getattr(getattr(bnb, "optim", None), hyper.class_name, None)
        return cls if isinstance(cls, type) and _accepts(cls, "optim_bits") else None

    def make(self, params, hyper, *, capturable=False):
        import bitsandbytes as bnb
        cls = self._class(bnb, hyper)
        return cls(params, optim_bits=self.bits, **hyper.kwargs_for(cls))

    def version(self):
        return _dist_version("bitsandbytes")


# --------------------------------------------------------------------------------------
# torchao
# --------------------------------------------------------------------------------------

class TorchAO(Provider):
    """torchao.optim's low-bit AdamW. Their step is torch.compile'd: the first step
    (outside the timing) compiles it."""

    CLASSES = {"8bit": "AdamW8bit", "4bit": "AdamW4bit", "fp8": "AdamWFp8"}
    # The torch.optim classes whose step these take: decoupled decay, so an L2 decay
    # (weight_decay != 0 without decoupled_weight_decay) is declined. torchao's API, not
    # this harness's list of optimizers.
    TORCH_CLASSES = frozenset({"Adam", "AdamW"})

    def __init__(self, kind: str):
        super().__init__(name=f"torchao-{kind}", family="torchao")
        self.kind = kind

    def _optim_module(self):
        try:
            return importlib.import_module("torchao.optim")
        except ImportError:
            return importlib.import_module("torchao.prototype.low_bit_optim")

    def available(self, device, dtype, optim):
        if importlib.util.find_spec("torchao") is None:
            return "not installed (pip install torchao)"
        hyper, reason = _hyper_or_reason(optim)
        if hyper is None:
            return reason
        if hyper.class_name not in self.TORCH_CLASSES:
            return f"torchao.optim has no low-bit {hyper.class_name}"
        if hyper.values.get("weight_decay") and not hyper.flag("decoupled_weight_decay"):
            return "torchao's low-bit optimizers decay decoupled only (AdamW-style)"
        try:
            mod = self._optim_module()
        except Exception as e:  # noqa: BLE001
            return f"torchao does not import ({_first_line(e)})"
        if not hasattr(mod, self.CLASSES[self.kind]):
            return f"torchao has no {self.CLASSES[self.kind]}"
        if self.kind == "fp8" and (device.type != "cuda"
                                   or torch.cuda.get_device_capability(device) < (8, 9)):
            return "AdamWFp8 needs a CUDA GPU with fp8 (sm89+)"
        return None

    def not_in_all(self, device):
        if device.type == "cpu":
            return "targets GPUs: on CPU only when named (--providers all,torchao)"
        return None

    def make(self, params, hyper, *, capturable=False):
        mod = self._optim_module()
        cls = getattr(mod, self.CLASSES[self.kind])
        return cls(params, **hyper.kwargs_for(cls))

    def version(self):
        return _dist_version("torchao")


# --------------------------------------------------------------------------------------
# Discovery and selection
# --------------------------------------------------------------------------------------

def all_providers() -> list[Provider]:
    """Every provider this harness knows, installed or not (in table order)."""
    backends = list(FUSED_OPTIM_BACKENDS)
    try:  # a backend registered beyond the built-in four is benchmarked too
        from fused_optim.backends import backend_names, available_backends
        available_backends("cpu")  # loads the built-in backends
        backends += [b for b in backend_names() if b not in backends]
    except Exception:  # noqa: BLE001  (reported per provider by available())
        pass
    return [
        TorchOptim("forloop"), TorchOptim("foreach"), TorchOptim("fused"),
        *[FusedOptim(b) for b in backends],
        DeepSpeed(),
        Bitsandbytes(32), Bitsandbytes(8),
        TorchAO("8bit"), TorchAO("4bit"), TorchAO("fp8"),
    ]


def select(providers: list[Provider], spec: str,
           device: torch.device | str = "cpu") -> tuple[list[Provider], dict[str, str]]:
    """Providers named by --providers: "all", or a comma list of names, families or
    globs ("torch-fused,fused_optim,deepspeed", "torch-*"), "all" among them.

    Returns (chosen, left_out): "all" leaves out the providers whose ``not_in_all`` gives
    a reason on ``device``; left_out maps their names to it."""
    device = torch.device(device)
    tokens = [t.strip() for t in spec.split(",") if t.strip()] or ["all"]
    chosen: list[Provider] = []
    left_out: dict[str, str] = {}
    for token in tokens:
        if token == "all":
            for p in providers:
                why = p.not_in_all(device)
                if why is not None:
                    left_out.setdefault(p.name, why)
                elif p not in chosen:
                    chosen.append(p)
            continue
        hits = [p for p in providers
                if p.family == token or fnmatch.fnmatchcase(p.name, token)
                or p.name == token]
        if not hits:
            names = ", ".join(sorted({p.name for p in providers} | {p.family for p in providers}))
            raise ValueError(f"--providers: {token!r} matches none of: {names}")
        chosen += [p for p in hits if p not in chosen]
    for p in chosen:
        left_out.pop(p.name, None)
    return [p for p in providers if p in chosen], left_out  # keep table order
